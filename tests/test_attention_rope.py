"""The KV-cached sampling step with Infinity's 2D RoPE (and q/k L2 norm) fused: ``ops.kv_cached_attention(...,
rope=...)`` against the float64 reference, scale by scale.

CPU lane: eager and the Triton kernels through the interpreter, float32, irregular and non-square schedules, head
dims 32-128, strided inputs and caches (the Infinity block's ``(B, H, capacity, c)`` cache layout), poisoned outputs;
the Infinity model's sampling loop on the fused step. GPU lane: bf16/fp16 at Infinity-2B's head dim and 1024 px,
within 2x eager's error, and CUDA-graph replay.
"""
import math

import pytest
import torch

import fastvar.ops as ops
from fastvar import dynamic_resolution as S
from fastvar.ops import attention as op_attention
from fastvar.reference import attention as ref
from fastvar.reference import infinity as ref_inf
from test_attention import make_scale_mul
from tolerances import REL, assert_like_eager, assert_rel




def random_rope(L, D, dtype=torch.float32, device="cpu"):
    """``(2, L, D/2)`` cos/sin of random angles (the op takes any rotation table)."""
    angle = torch.rand(L, D // 2, dtype=torch.float64, device=device) * 2 * math.pi
    return torch.stack((angle.cos(), angle.sin())).to(dtype)


def steps(impl, q, k, v, k_cache, v_cache, lens, sm, rope, scale=None):
    """Every scale through ``impl`` (an op or a reference), each with its rows of ``rope``; outputs concatenated."""
    start, out = 0, []
    for n in lens:
        s = slice(start, start + n)
        out.append(impl(q[:, s], k[:, s], v[:, s], k_cache, v_cache, start, scale, sm, rope[:, s]))
        start += n
    return torch.cat(out, 1)


CASES = [
    # token counts per scale, B, H, D, L2 norm (Infinity: always)
    ((1, 6, 24, 35), 3, 2, 32, True),                     # 1x1, 2x3, 4x6, 5x7: ragged tiles everywhere
    ((7, 20, 1, 30), 1, 2, 64, True),                     # not coarse to fine, a 1-token scale inside
    ((16, 48), 2, 1, 16, True),                           # scales on tile boundaries
    ((1, 6, 24, 35), 2, 1, 64, False),                    # rotation without the norm
    (S.scale_lens(S.scale_schedule(0.5, "0.06M")), 1, 1, 128, True),   # Infinity h/w 0.5: 1x1 ... 11x22
]


@pytest.mark.parametrize("lens,B,H,D,norm", CASES, ids=lambda x: str(x).replace(" ", ""))
def test_kv_cached_rope_steps_match_the_reference(cpu_backend, poisoned_empty, lens, B, H, D, norm):
    """Scale by scale: the outputs of the float64 reference (normalise, scale, rotate, attend), the cache filled
    with the rotated (normalised) keys and the values, the tail past the last scale untouched."""
    L, L_max = sum(lens), sum(lens) + 7
    qkv = torch.randn(B, L, 3, H, D)
    q, k, v = qkv.unbind(2)                              # strided views of one projection, as the model has them
    sm = make_scale_mul(H).detach() if norm else None
    rope = random_rope(L, D)
    k64, v64 = (torch.zeros(B, L, H, D, dtype=torch.float64) for _ in range(2))
    want = steps(ref.kv_cached_attention, q.double(), k.double(), v.double(), k64, v64, lens,
                 None if sm is None else sm.double(), rope.double(), None if norm else 1.0)
    # the Infinity cache layout (B, H, capacity, D), as a transposed view, poisoned
    k_cache = torch.full((B, H, L_max, D), float("nan")).transpose(1, 2)
    v_cache = torch.full((B, H, L_max, D), float("nan")).transpose(1, 2)
    got = steps(ops.kv_cached_attention, q, k, v, k_cache, v_cache, lens, sm, rope, None if norm else 1.0)
    assert got.shape == (B, L, H, D)
    assert_rel(got, want, REL[torch.float32], f"{cpu_backend}: outputs")
    assert_rel(k_cache[:, :L], k64, REL[torch.float32], f"{cpu_backend}: cached keys (rotated, normalised)")
    assert torch.equal(v_cache[:, :L], v), "cached values"
    assert torch.isnan(k_cache[:, L:]).all() and torch.isnan(v_cache[:, L:]).all(), "the cache tail was written"


def test_rope_with_the_official_table_and_an_offset(cpu_backend):
    """The official 2D-RoPE rows of one scale (the 1:1 template's 4x4 scale, after 1 + 4 cached tokens) in a
    guided batch, appended to a bigger cache holding earlier keys: the earlier rows and the tail stay as they were."""
    B2, H, D = 4, 2, 128
    sched = S.scale_schedule(1.0, "0.06M")
    table = ref_inf.rope2d_table(sched, D)
    past, n = 5, 16
    q, k, v = (torch.randn(B2, n, H, D) for _ in range(3))
    sm = make_scale_mul(H).detach()
    k_cache, v_cache = torch.randn(B2, past + n + 3, H, D), torch.randn(B2, past + n + 3, H, D)
    before = k_cache.clone(), v_cache.clone()
    out = ops.kv_cached_attention(q, k, v, k_cache, v_cache, past, 1.0, sm, rope=table[:, past:past + n])
    qn, kn = ref_inf.qk_norm(q.double().transpose(1, 2), k.double().transpose(1, 2), sm.double())
    qr, kr = ref.apply_rope2d(qn, kn, table[:, past:past + n].double())
    keys = torch.cat((before[0][:, :past].double().transpose(1, 2), kr), 2)
    values = torch.cat((before[1][:, :past].double(), v.double()), 1).transpose(1, 2)
    want = torch.nn.functional.scaled_dot_product_attention(qr, keys, values, scale=1.0).transpose(1, 2)
    assert_rel(out, want, REL[torch.float32], "out")
    assert_rel(k_cache[:, past:past + n], kr.transpose(1, 2), REL[torch.float32], "new keys")
    for c, b in zip((k_cache, v_cache), before):
        assert torch.equal(c[:, :past], b[:, :past]) and torch.equal(c[:, past + n:], b[:, past + n:])


def test_rope_errors_name_the_argument(cpu_backend):
    q = k = v = torch.randn(1, 4, 2, 16)
    kc, vc = torch.empty(1, 9, 2, 16), torch.empty(1, 9, 2, 16)
    with pytest.raises(ValueError, match=r"rope must have shape \(2, 4, 8\), got \(2, 3, 8\)"):
        ops.kv_cached_attention(q, k, v, kc, vc, 0, rope=torch.zeros(2, 3, 8))
    with pytest.raises(TypeError, match="rope must have dtype in"):
        ops.kv_cached_attention(q, k, v, kc, vc, 0, rope=torch.zeros(2, 4, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="rope must be a torch.Tensor"):
        ops.kv_cached_attention(q, k, v, kc, vc, 0, rope=[[0.0]])
    odd = torch.randn(1, 4, 2, 15)
    with pytest.raises(ValueError, match="the head dim D must be even, got D=15"):
        ops.kv_cached_attention(odd, odd, odd, torch.empty(1, 9, 2, 15), torch.empty(1, 9, 2, 15), 0,
                                rope=torch.zeros(2, 4, 7))


@pytest.mark.interpreter
def test_opcheck_with_rope():
    B, l, H, D = 1, 5, 2, 16
    q, k, v = (torch.randn(B, l, H, D) for _ in range(3))
    torch.library.opcheck(torch.ops.fastvar.kv_cached_attention.default,
                          (q, k, v, torch.zeros(B, 12, H, D), torch.zeros(B, 12, H, D), 3, 1.0,
                           torch.randn(1, H, 1, 1), random_rope(l, D)))


def test_infinity_self_attention_cached_steps_equal_its_masked_forward(cpu_backend):
    """The Infinity block's self-attention in sampling mode (``kv_caching``: the fused step, scale by scale, with
    the rows of the official RoPE table) gives its teacher-forced output (dense block-causal mask over all tokens),
    on a non-square schedule at head dim 128."""
    from fastvar.nn.infinity import SelfAttention
    sched = S.scale_schedule(0.5, "0.06M")[:5]           # 1x1, 2x2, 2x4, 3x6, 5x10 (a prefix: the table is the 0.06M one)
    lens = [h * w for _, h, w in sched]
    L, B = sum(lens), 2
    sa = SelfAttention(embed_dim=256, num_heads=2).eval()
    with torch.no_grad():
        for p in sa.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
        sa.scale_mul_1H11.copy_(torch.tensor([1.2, 2.0]).view(1, 2, 1, 1))
    rope = ref_inf.rope2d_table(S.scale_schedule(0.5, "0.06M"), 128)[:, :L]
    x = torch.randn(B, L, 256)
    with torch.no_grad():
        full = sa(x, ref_inf.padded_block_causal_mask(lens, 1), scale_schedule=sched, rope2d_freqs_grid=rope)
        sa.kv_caching(True)
        start, out = 0, []
        for si, n in enumerate(lens):
            out.append(sa(x[:, start:start + n], None, scale_schedule=sched, rope2d_freqs_grid=rope, scale_ind=si))
            start += n
        assert sa.kv_cache.k.shape[2] == L          # sized for the schedule's tokens
        sa.kv_caching(False)
    assert_rel(torch.cat(out, 1), full, REL[torch.float32], f"{cpu_backend}: cached steps vs masked forward")


# ------------------------------------------------------------------ low precision: fp16 in the interpreter, GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("h_div_w,B,H", [(1.0, 2, 4), (0.5, 2, 2)], ids=["1024px", "h/w0.5"])   # L = 10521; 45x90 last
def test_gpu_kv_cached_rope_sampling(h_div_w, B, H, dtype):
    """A guided batch at head dim 128 with the official RoPE table, sampled scale by scale."""
    _rope_low_precision_check(S.scale_schedule(h_div_w, "1M"), B, H, 128, dtype)


@pytest.mark.interpreter
def test_fp16_kv_cached_rope_sampling_in_interpreter():
    """The fp16 lane of the check above in the interpreter (which runs fp16 products as a GPU does, not bf16
    ones), on a non-square schedule: the rotation's fp32 arithmetic and the casts before each product."""
    _rope_low_precision_check(S.scale_schedule(0.5, "0.06M"), 1, 2, 32, torch.float16, device="cpu")


def _rope_low_precision_check(sched, B, H, D, dtype, device="cuda"):
    """Triton within 2x of eager's error at ``dtype`` against the float64 reference, scale by scale with the
    official RoPE table of ``sched``, the caches poisoned with NaN and their tail untouched."""
    lens = S.scale_lens(sched)
    L = sum(lens)
    rope = ref_inf.rope2d_table(sched, D, device=device)
    qkv = torch.randn(B, L, 3, H, D, dtype=dtype, device=device)
    q, k, v = qkv.unbind(2)
    sm = make_scale_mul(H, device=device, clamp_head=True).detach()
    k64, v64 = (torch.zeros(B, L, H, D, dtype=torch.float64, device=device) for _ in range(2))
    want = steps(ref.kv_cached_attention, q.double(), k.double(), v.double(), k64, v64, lens, sm.double(),
                 rope.double(), 1.0)
    outs = {}
    for impl in ("triton", "eager"):
        k_cache = torch.full((B, H, L + 5, D), float("nan"), dtype=dtype, device=device).transpose(1, 2)
        v_cache = torch.full((B, H, L + 5, D), float("nan"), dtype=dtype, device=device).transpose(1, 2)
        outs[impl] = steps(op_attention.KV_CACHED_IMPLS[impl], q, k, v, k_cache, v_cache, lens, sm, rope, 1.0)
        assert torch.isnan(k_cache[:, L:]).all() and torch.isnan(v_cache[:, L:]).all(), impl
        assert torch.isfinite(k_cache[:, :L]).all() and torch.isfinite(v_cache[:, :L]).all(), impl
    assert_like_eager(outs["triton"], outs["eager"], want, f"kv rope {lens[-1]} tokens")


@pytest.mark.gpu
def test_gpu_kv_cached_rope_cuda_graph():
    """The RoPE step (two launches) captured in a CUDA graph replays on new inputs, writing the cache in place."""
    B, H, D, past, n = 4, 16, 128, 30, 36
    rope = random_rope(n, D, device="cuda")
    sm = make_scale_mul(H, device="cuda").detach()
    q, k, v = (torch.randn(B, n, H, D, dtype=torch.bfloat16, device="cuda") for _ in range(3))
    k_cache = torch.randn(B, H, past + n, D, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
    v_cache = torch.randn(B, H, past + n, D, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
    ops.kv_cached_attention(q, k, v, k_cache, v_cache, past, 1.0, sm, rope)       # compile outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = ops.kv_cached_attention(q, k, v, k_cache, v_cache, past, 1.0, sm, rope)
    for _ in range(2):
        for t in (q, k, v):
            t.copy_(torch.randn_like(t))
        g.replay()
        kc, vc = k_cache.clone(), v_cache.clone()
        want = op_attention.KV_CACHED_IMPLS["eager"](q, k, v, kc, vc, past, 1.0, sm, rope)
        assert_like_eager(out, want, op_attention.KV_CACHED_IMPLS["eager"](
            *(t.double() for t in (q, k, v, kc, vc)), past, 1.0, sm.double(), rope.double()), "graph replay")
        assert torch.equal(v_cache[:, past:], v)
