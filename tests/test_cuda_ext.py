"""GPU lane of the CUDA extension fastvar._C (``scripts/build_cuda.sh``): its ops against eager PyTorch and against
the Triton kernels, at VAR's sizes, in CUDA graphs and under torch.compile. Skipped (and saying why) without a
GPU or without the built extension; the same kernels run on CPU in tests/test_cuda_host.py.
"""
import os

import pytest
import torch

from builders import random_quantizer
from fastvar import ops
from fastvar.ops import cuda_ext
from fastvar.ops import sampling as S
from fastvar.reference import sampling as sref
from fastvar.schedule import PATCH_NUMS_256, PATCH_NUMS_512
from test_upsample import _code_map, _reference_walk
from tolerances import REL, assert_like_eager, assert_rel

pytestmark = [pytest.mark.gpu, pytest.mark.cuda_ext]
INF = float("inf")


@pytest.fixture
def seed():
    return int.from_bytes(os.urandom(4), "little") % 2 ** 31


def _walk(q, idx, B, backend_name, monkeypatch, **kw):
    """f_hat and every next map through ``get_next_autoregressive_input_from_idx`` on one backend."""
    monkeypatch.setenv("FASTVAR_BACKEND", backend_name)
    S_ = len(q.patch_hws)
    f_hat = torch.zeros(B, q.Cvae, *q.patch_hws[-1], device="cuda")
    nexts = []
    for si in range(S_):
        _, nxt = q.get_next_autoregressive_input_from_idx(si, S_, f_hat, idx[si], **kw)
        nexts.append(nxt.clone())
    return f_hat, nexts


@pytest.mark.parametrize("patch_nums", [PATCH_NUMS_256, PATCH_NUMS_512], ids=["256px", "512px"])
@pytest.mark.parametrize("B", [1, 16])
@pytest.mark.parametrize("tf32", [False, True], ids=["fp32", "tf32"])
def test_step_against_eager_and_triton(seed, monkeypatch, patch_nums, B, tf32):
    """VAR's sizes (Cvae 32, V 4096): every next map and f_hat within 2x eager float32's error against the float64
    step (eager under the same cudnn.allow_tf32; the CUDA kernel's conv is float32 FMAs either way), and within
    REL[float32] of the Triton path's when neither uses TF32."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    g = torch.Generator().manual_seed(seed)
    q = random_quantizer(patch_nums, C=32, V=4096, seed=seed).cuda()
    q64 = random_quantizer(patch_nums, C=32, V=4096, seed=seed).double().cuda()
    idx = [torch.randint(0, 4096, (B, h * w), generator=g).cuda() for h, w in q.patch_hws]
    with torch.no_grad():
        f_cuda, n_cuda = _walk(q, idx, B, "cuda", monkeypatch)
        f_eager, n_eager = _walk(q, idx, B, "eager", monkeypatch)
        f_triton, n_triton = _walk(q, idx, B, "triton", monkeypatch)
        # the op takes float32 only: the float64 step is the reference's own (ref.rq_step)
        f_64, n_64 = _reference_walk(q64, [_code_map(q64, i, h, w) for i, (h, w) in zip(idx, q64.patch_hws)])
    for si, (c, e, t, r) in enumerate(zip(n_cuda, n_eager, n_triton, n_64)):
        assert_like_eager(c, e, r.float(), f"seed {seed}: next map after scale {si}")
        if not tf32:      # both float32 (in two summation orders); under TF32 the Triton path's conv is cuDNN's TF32
            assert_rel(c, t, REL[torch.float32], f"seed {seed}: vs Triton after scale {si}")
    assert_like_eager(f_cuda, f_eager, f_64.float(), f"seed {seed}: f_hat")


@pytest.mark.parametrize("patch_nums", [PATCH_NUMS_256, PATCH_NUMS_512], ids=["256px", "512px"])
def test_step_identity_phi_equals_triton_bits(seed, monkeypatch, patch_nums):
    """Phi the identity: nothing but the bicubic gather and the area sums, in the same rounding sequence as the
    Triton kernel (the CUDA build's contraction of ATen's polynomials): bit-identical to Triton, and to ATen's
    CUDA kernels if nvcc contracted them as assumed (else within REL[float32], reported)."""
    g = torch.Generator().manual_seed(seed)
    q = random_quantizer(patch_nums, C=32, V=4096, quant_resi=0.0, seed=seed).cuda()
    idx = [torch.randint(0, 4096, (16, h * w), generator=g).cuda() for h, w in q.patch_hws]
    with torch.no_grad():
        f_cuda, n_cuda = _walk(q, idx, 16, "cuda", monkeypatch)
        f_triton, n_triton = _walk(q, idx, 16, "triton", monkeypatch)
        f_eager, n_eager = _walk(q, idx, 16, "eager", monkeypatch)
    for si, (c, t, e) in enumerate(zip(n_cuda, n_triton, n_eager)):
        assert torch.equal(c, t), f"seed {seed}: next map after scale {si} differs from Triton's"
        assert_rel(c, e, REL[torch.float32], f"seed {seed}: vs ATen after scale {si}")
    assert torch.equal(f_cuda, f_triton)


def test_step_cuda_graph_replay(seed, monkeypatch):
    """The whole per-scale chain captured once (launches on the capturing stream) and replayed, bit for bit."""
    g = torch.Generator().manual_seed(seed)
    q = random_quantizer(PATCH_NUMS_256, C=32, V=4096, seed=seed).cuda()
    idx = [torch.randint(0, 4096, (8, h * w), generator=g).cuda() for h, w in q.patch_hws]
    S_ = len(q.patch_hws)
    with torch.no_grad():
        f_ref, _ = _walk(q, idx, 8, "cuda", monkeypatch, validate=False)
        f_g = torch.zeros_like(f_ref)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for si in range(S_):
                q.get_next_autoregressive_input_from_idx(si, S_, f_g, idx[si], validate=False)
        f_g.zero_()
        graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(f_g, f_ref)


def test_step_compiles_to_one_graph(monkeypatch):
    monkeypatch.setenv("FASTVAR_BACKEND", "cuda")
    B, C = 2, 32
    codes = torch.randn(B, C, 5, 5, device="cuda")
    w, b = torch.randn(C, C, 3, 3, device="cuda") * 0.1, torch.randn(C, device="cuda")

    def step(f_hat, codes):
        return ops.upsample_accumulate_(f_hat, codes, w, b, 0.5, (8, 8))

    compiled = torch.compile(step, fullgraph=True)
    f1, f2 = torch.zeros(B, C, 16, 16, device="cuda"), torch.zeros(B, C, 16, 16, device="cuda")
    assert torch.equal(compiled(f1, codes), step(f2, codes)) and torch.equal(f1, f2)


# --------------------------------------------------------------------------------------------- sampler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,pn,V", [(1, 16, 4096), (8, 16, 4096), (64, 13, 4096), (3, 7, 1000), (4, 5, 16384)])
def test_sampler_against_triton_and_official(monkeypatch, dtype, B, pn, V):
    """The same tokens as the Triton kernel for the same noise (both compute e / q in float32 with CUDA's expf and
    IEEE division, the same top-k set; they can differ only where top-p's boundary mass is within float32
    rounding of 1 - p), and the official chain's up to its documented near-tie rate."""
    gen = torch.Generator(device="cuda").manual_seed(B * 100 + pn)
    l, t = pn * pn, 1.5 * 8 / 9
    logits = (torch.randn(2 * B, l, V, device="cuda", generator=gen) * 3).to(dtype)
    total = vs_triton = vs_official = 0
    for top_k, top_p in [(900, 0.96), (0, 0.0), (600, 0.8), (1, 0.0), (0, 0.5)]:
        noise = sref.exponential_noise(B * l, V, torch.Generator(device="cuda").manual_seed(11), device="cuda")
        out = {}
        for name in ("cuda", "triton"):
            monkeypatch.setenv("FASTVAR_BACKEND", name)
            out[name] = S.sample_cfg_top_k_top_p(logits, t, top_k, top_p, noise=noise, return_filtered=True)
        monkeypatch.delenv("FASTVAR_BACKEND")
        official = sref.sample_top_k_top_p_(sref.cfg_mix(logits.float(), t), top_k, top_p,
                                            torch.Generator(device="cuda").manual_seed(11))[..., 0]
        (tc, fc), (tt, ft) = out["cuda"], out["triton"]
        total += tc.numel()
        vs_triton += int((tc != tt).sum())
        vs_official += int((tc != official).sum())
        if top_p == 0:
            assert torch.equal(fc, ft), f"k={top_k}: the top-k support differs from Triton's"
        assert ((fc > -INF) != (ft > -INF)).sum() <= max(2, tc.numel() // 1000)
    assert vs_triton <= max(1, total // 100000), f"{vs_triton} of {total} tokens differ from Triton's"
    assert vs_official <= max(1, total // 10000), f"{vs_official} of {total} tokens differ from the official ones"


def test_sampler_bad_rows_and_validate(monkeypatch):
    monkeypatch.setenv("FASTVAR_BACKEND", "cuda")
    x = torch.randn(4, 3, 2000, device="cuda")
    x[1, 2, 5] = float("nan")
    with pytest.raises(ValueError, match="logits hold NaN after the CFG mix"):
        S.sample_cfg_top_k_top_p(x, 1.0, 30, 0.9)
    tok = S.sample_cfg_top_k_top_p(x, 1.0, 30, 0.9, validate=False)
    assert tok[1, 2] == -1 and (tok.flatten()[:-1] >= 0).all()


def test_sampler_cuda_graph_and_compile(monkeypatch):
    monkeypatch.setenv("FASTVAR_BACKEND", "cuda")
    B, l, V = 8, 256, 4096
    logits = torch.randn(2 * B, l, V, device="cuda") * 3
    noise = torch.empty(B * l, V, device="cuda").exponential_()
    S.sample_cfg_top_k_top_p(logits, 1.0, 900, 0.96, noise=noise)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = S.sample_cfg_top_k_top_p(logits, 1.0, 900, 0.96, noise=noise, validate=False)
    for s in (1, 2):
        noise.exponential_(generator=torch.Generator(device="cuda").manual_seed(s))
        graph.replay()
        assert torch.equal(out, S.sample_cfg_top_k_top_p(logits, 1.0, 900, 0.96, noise=noise))

    def step(logits, noise):
        return S.sample_cfg_top_k_top_p(logits, 0.5, 900, 0.96, noise=noise, validate=False)

    assert torch.equal(torch.compile(step, fullgraph=True)(logits, noise), step(logits, noise))


def test_launcher_checks_on_cuda_tensors():
    """The CUDA build's launcher checks like the host build's (an argument it cannot take raises ValueError naming
    the launcher before any launch), and it is the GPU build."""
    ext = cuda_ext._ext(None)
    x = torch.randn(2, 1, 20000, device="cuda")
    with pytest.raises(ValueError, match=r"sample_top_k_top_p: V must be <= 16384"):
        cuda_ext.sample_exact(x, 1, 0.5, 0, 0.0, torch.ones(1, 20000, device="cuda"), False)
    assert not ext.HOST_EMULATION
