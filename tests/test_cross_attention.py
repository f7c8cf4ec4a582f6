"""Packed variable-length cross-attention (Infinity's image -> text attention and text pool) against the
float64 reference.

CPU lane: eager and the Triton kernel through the interpreter, float32 (and float16) on irregular packed
sequences (empty query sequences, single keys, lengths across tile edges), non-contiguous q and the packed
(N, 2, H, D) k/v halves, outputs poisoned with NaN. GPU lane: Infinity's sizes in bfloat16 (the official
call's dtype), within 2x eager's error.
"""
import pytest
import torch

from fastvar import ops
from fastvar.reference import infinity as ref
from tolerances import REL, assert_like_eager, assert_rel




def _cu(lens, device="cpu"):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)


def _inputs(lq, lk, H, D, dtype=torch.float32, device="cpu", seed=0):
    """q as a strided slice of a wider tensor; k, v the halves of one packed (Nk, 2, H, D) projection."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(sum(lq), 2, H, D, generator=g)[:, 1]
    kv = torch.randn(sum(lk), 2, H, D, generator=g)
    k, v = kv.to(device=device, dtype=dtype).unbind(1)
    return q.to(device=device, dtype=dtype), k, v, _cu(lq, device), _cu(lk, device)


CASES = [
    # query lengths, key lengths, H, D
    ([5, 0, 37, 1], [3, 17, 1, 9], 3, 40),        # an empty query sequence, a single key, D not a power of 2
    ([1, 1, 1], [12, 5, 33], 2, 64),              # the text pool: one query per prompt
    ([70], [130], 1, 16),                         # several query and key tiles
    ([9, 16], [4, 2], 2, 128),                    # Infinity's head dim
]


@pytest.mark.parametrize("lq,lk,H,D", CASES)
def test_matches_float64_reference(cpu_backend, poisoned_empty, lq, lk, H, D):
    q, k, v, cq, ck = _inputs(lq, lk, H, D)
    scale = 0.37
    out = ops.varlen_cross_attention(q, k, v, cq, ck, scale)
    ref64 = ref.varlen_attention(q.double(), k.double(), v.double(), cq, ck, scale)
    assert out.shape == q.shape and out.dtype == torch.float32
    assert_rel(out, ref64, REL[torch.float32], f"{lq} x {lk}, H={H}, D={D}")
    default = ops.varlen_cross_attention(q, k, v, cq, ck)                  # 1 / sqrt(D)
    assert_rel(default, ref.varlen_attention(q.double(), k.double(), v.double(), cq, ck, D ** -0.5),
               REL[torch.float32], "default scale")


@pytest.mark.interpreter
@pytest.mark.parametrize("config", [(16, 16, 4, 1), (32, 16, 4, 1), (16, 64, 4, 1)])
def test_kernel_tiles(poisoned_empty, config):
    from fastvar.triton_kernels.cross_attention import varlen_cross_attention_fwd
    lq, lk = [33, 1, 17], [50, 16, 3]
    q, k, v, cq, ck = _inputs(lq, lk, 2, 24, seed=3)
    out = varlen_cross_attention_fwd(q, k, v, cq, ck, max(lq), max(lk), 0.5, config=config)
    assert_rel(out, ref.varlen_attention(q.double(), k.double(), v.double(), cq, ck, 0.5), REL[torch.float32],
               f"config {config}")


@pytest.mark.interpreter
def test_float16_within_eager_error(backend):
    q, k, v, cq, ck = _inputs([5, 23], [7, 40], 2, 32, dtype=torch.float16, seed=5)
    ref64 = ref.varlen_attention(q.double(), k.double(), v.double(), cq, ck, 0.2)
    backend("triton")
    out = ops.varlen_cross_attention(q, k, v, cq, ck, 0.2)
    assert_like_eager(out, ref.varlen_attention(q, k, v, cq, ck, 0.2), ref64, "float16")


def test_official_call_rounds_to_bfloat16_twice():
    """The official float32 call: q, k, v rounded to bf16, fp32 attention, the result rounded to bf16."""
    q, k, v, cq, ck = _inputs([4, 6], [3, 5], 2, 16, seed=7)
    out = ref.official_cross_attention(q, k, v, cq, ck, 0.25)
    bf = torch.bfloat16
    want = ref.varlen_attention(q.to(bf).float(), k.to(bf).float(), v.to(bf).float(), cq, ck, 0.25).to(bf).float()
    assert out.dtype == torch.float32 and torch.equal(out, want)


def test_bad_input():
    q, k, v, cq, ck = _inputs([3, 4], [2, 5], 2, 16)
    call = ops.varlen_cross_attention
    with pytest.raises(TypeError, match=r"cu_seqlens_q must have dtype in \['torch.int32'\], got torch.int64"):
        call(q, k, v, cq.long(), ck)
    with pytest.raises(ValueError, match=r"cu_seqlens_q must rise from 0 to Nq=7, got \[0, 3, 6\]"):
        call(q, k, v, torch.tensor([0, 3, 6], dtype=torch.int32), ck)
    with pytest.raises(ValueError, match=r"cu_seqlens_k must rise strictly from 0 to Nk=7 \(every sequence needs a key\)"):
        call(q, k, v, cq, torch.tensor([0, 0, 7], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens_q and cu_seqlens_k must hold the same number of sequences"):
        call(q, k, v, cq, torch.tensor([0, 7], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"max_seqlen_k must be the longest sequence of the offsets \(5\), got 4"):
        call(q, k, v, cq, ck, max_seqlen_k=4)
    with pytest.raises(ValueError, match=r"k and v must have shape \(Nk, H=2, c=16\)"):
        call(q, k[..., :8], v, cq, ck)
    with pytest.raises(TypeError, match="k must have the dtype of q"):
        call(q, k.double(), v, cq, ck)
    with pytest.raises(ValueError, match="softmax_scale must be finite"):
        call(q, k, v, cq, ck, float("inf"))
    with pytest.raises(ValueError, match=r"q must have 3 dims"):
        call(q[None], k, v, cq, ck)


@pytest.mark.gpu
@pytest.mark.parametrize("lq,lk,H,D", [([4096, 4096], [77, 300], 16, 128),      # 2B blocks at 1024 px
                                       ([1, 1, 1, 1], [77, 300, 5, 512], 16, 224),  # the 8B text pool
                                       ([2025, 3, 4050], [120, 1, 64], 28, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_sizes(lq, lk, H, D, dtype):
    q, k, v, cq, ck = _inputs(lq, lk, H, D, dtype=dtype, device="cuda", seed=11)
    out = ops.varlen_cross_attention(q, k, v, cq, ck)
    ref64 = ref.varlen_attention(q.double(), k.double(), v.double(), cq, ck, D ** -0.5)
    if dtype == torch.float32:
        assert_rel(out, ref64, REL[torch.float32], "float32")
    else:
        assert_like_eager(out, ref.varlen_attention(q, k, v, cq, ck, D ** -0.5), ref64, str(dtype))
