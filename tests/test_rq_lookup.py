"""Codebook lookup (``fastvar.ops.rq_lookup``) against the eager reference: identical indices, exact ties
to the lowest index, near ties, every tiling / split path of the kernel, bad input; and the multi-scale
encode (``fastvar.ops.rq_encode`` / ``VectorQuantizer2.f_to_idxBl_or_fhat``, with the teacher-forcing input
replayed from its indices) against the golden-verified eager loop, and the official golden outputs through
the Triton path.

The eager reference is the official float32 formula (``addmm_``), so "identical" is the claim: the kernel
forms the same float32 distances (see ``triton_kernels/rq_lookup.py``), and the encode's steps the same
float32 values as the eager ones, so on x86-64 CPUs its indices and f_hat are bit-identical; elsewhere
f_hat is held to ``REL[float32]``."""
import os

import pytest
import torch
import torch.nn.functional as F

from builders import random_quantizer

from fastvar import ops
from fastvar.reference import quantize as ref
from fastvar.schedule import PATCH_NUMS_256, scale_hws
from tolerances import GOLDEN_FHAT_ABS, REL, assert_rel, bit_exact_expected


def assert_indices(idx, expected, z, codebook, what, rare: bool = True):
    """Identical indices. Where the kernel's float32 arithmetic may differ from eager's (Triton 3.6's
    interpreter rounds ``tl.fma`` twice; a GPU whose cuBLAS sums in another order), a differing row must be a
    near tie: its two candidates' exact distances within 64 float32 ulps of the distance scale (and, with
    ``rare``, at most 1 row in 1000 may differ)."""
    from fastvar.triton_kernels.upsample import interpreter_fma_is_exact
    strict = os.environ.get("FASTVAR_BACKEND") == "eager" or (z.device.type == "cpu" and interpreter_fma_is_exact())
    differ = (idx != expected).nonzero()[:, 0]
    if strict or not len(differ):
        assert not len(differ), f"{what}: {len(differ)} rows differ from the eager reference"
        return
    zd, cb = z[differ].double(), codebook.double()
    d64 = (zd[:, None, :] - cb[None]).square().sum(-1)
    gap = (d64.gather(1, idx[differ, None]) - d64.gather(1, expected[differ, None])).abs()[:, 0]
    scale = d64.gather(1, expected[differ, None])[:, 0] + zd.square().sum(1) + cb[expected[differ]].square().sum(1)
    assert (gap <= 64 * 2.0 ** -24 * scale).all(), f"{what}: a row that differs from eager is not a near tie"
    assert not rare or len(differ) <= max(2, len(idx) // 1000), \
        f"{what}: {len(differ)} of {len(idx)} rows differ from eager"


def _noncontig(x: torch.Tensor) -> torch.Tensor:
    """The same values in a transposed layout."""
    return x.t().contiguous().t()


@pytest.mark.parametrize("N,V,C", [(2, 300, 8), (37, 257, 17), (130, 1000, 32), (19, 160, 64)])
@pytest.mark.parametrize("noncontig", [False, True])
def test_lookup_matches_reference(cpu_backend, gen, N, V, C, noncontig):
    g, seed = gen
    z = torch.randn(N, C, generator=g)
    codebook = torch.randn(V, C, generator=g)
    if noncontig:
        z, codebook = _noncontig(z), _noncontig(codebook)
    idx, codes = ops.rq_lookup(z, codebook, return_codes=True)
    expected = ref.rq_lookup(z, codebook)
    assert idx.dtype == torch.int64 and idx.shape == (N,)
    assert_indices(idx, expected, z, codebook, f"seed {seed}")
    assert torch.equal(codes, F.embedding(idx, codebook))
    assert torch.equal(ops.rq_lookup(z, codebook), idx)


def test_lookup_exact_ties_go_to_the_lowest_index(cpu_backend, gen):
    g, seed = gen
    V, C = 700, 32
    codebook = torch.randn(V, C, generator=g)
    src = torch.randperm(V // 2, generator=g)[:40]
    dst = V // 2 + torch.randperm(V - V // 2, generator=g)[:40]
    codebook[dst] = codebook[src]                 # duplicated rows, some in later tiles of the codebook
    codebook[V - 1] = codebook[3]                 # a duplicate in the very last (masked) tile
    pick = torch.cat([src, torch.tensor([3])])
    z = torch.cat([codebook[pick], codebook[pick] + 1e-3 * torch.randn(len(pick), C, generator=g)])
    idx = ops.rq_lookup(z, codebook)
    assert_indices(idx, ref.rq_lookup(z, codebook), z, codebook, f"seed {seed}")
    assert torch.equal(idx[:len(pick)], pick), f"seed {seed}: an exact tie did not go to the lowest index"


def test_lookup_near_ties(cpu_backend, gen):
    """z halfway between two codes (plus a few ulps of noise): the float32 distances nearly tie."""
    g, seed = gen
    V, C, N = 512, 32, 96
    codebook = torch.randn(V, C, generator=g)
    a, b = torch.randint(0, V, (N,), generator=g), torch.randint(0, V, (N,), generator=g)
    z = (codebook[a] + codebook[b]) * 0.5
    z = z * (1 + 4e-7 * torch.randn(N, C, generator=g))
    idx = ops.rq_lookup(z, codebook)
    assert_indices(idx, ref.rq_lookup(z, codebook), z, codebook, f"seed {seed}", rare=False)


@pytest.mark.interpreter
@pytest.mark.parametrize("split,block_n,block_v", [(1, 16, 32), (3, 16, 32), (7, 32, 16), (100, 16, 64)])
def test_lookup_kernel_tiles_and_splits(gen, split, block_n, block_v):
    """Every path of the launcher: several row blocks and codebook tiles, masked tails, codebook splits
    combined by the atomic (distance, index) minimum; duplicated rows across splits."""
    from fastvar.triton_kernels import rq_lookup as kernel
    g, seed = gen
    N, V, C = 45, 203, 24
    z = torch.randn(N, C, generator=g)
    codebook = torch.randn(V, C, generator=g)
    codebook[150:160] = codebook[5:15]
    z[:10] = codebook[5:15]
    zz, ee = torch.sum(z.square(), dim=1), torch.sum(codebook.square(), dim=1)
    idx, codes = kernel.rq_lookup(z, codebook, zz, ee, return_codes=True, split=split, block_n=block_n,
                                  block_v=block_v)
    expected = ref.rq_lookup(z, codebook)
    assert_indices(idx, expected, z, codebook, f"seed {seed}")
    assert torch.equal(idx[:10], torch.arange(5, 15))
    assert torch.equal(codes, codebook[idx])


@pytest.mark.interpreter
@pytest.mark.parametrize("C", [8, 17, 32, 40, 64])
def test_lookup_kernel_gpu_dot_path_in_the_interpreter(gen, C):
    """The GPU code path (16-channel ``tl.dot`` chunks chained through the accumulator, zero-padded) run by
    the interpreter, whose ``tl.dot`` is numpy's matmul: the same nearest codes (a different order could only
    flip a near tie, about 1 row in 10^5 here)."""
    from fastvar.triton_kernels import rq_lookup as kernel
    g, seed = gen
    N, V = 40, 300
    z = torch.randn(N, C, generator=g)
    codebook = torch.randn(V, C, generator=g)
    zz, ee = torch.sum(z.square(), dim=1), torch.sum(codebook.square(), dim=1)
    idx, _ = kernel.rq_lookup(z, codebook, zz, ee, loop_dot=False, block_n=16, block_v=64, split=2)
    expected = ref.rq_lookup(z, codebook)
    assert torch.equal(idx, expected) or (idx != expected).sum() <= 1, f"seed {seed}"


@pytest.mark.parametrize("kw,err,match", [
    (dict(z=torch.randn(4, 8), codebook=torch.randn(10, 9)), ValueError, r"codebook must have C=8 channels \(shape \(V, 8\)\), got shape \(10, 9\)"),
    (dict(z=torch.randn(4, 8), codebook=torch.randn(0, 8)), ValueError, r"codebook must have at least one row"),
    (dict(z=torch.tensor([[0.0, float("nan")]]), codebook=torch.randn(3, 2)), ValueError, r"z must be finite"),
    (dict(z=torch.tensor([[0.0, float("inf")]]), codebook=torch.randn(3, 2)), ValueError, r"z must be finite"),
    (dict(z=torch.randn(2, 2), codebook=torch.tensor([[0.0, float("inf")]])), ValueError, r"codebook must be finite"),
    (dict(z=torch.randn(4, 8).double(), codebook=torch.randn(10, 8)), TypeError, r"z must have dtype in \['torch.float32'\], got torch.float64"),
    (dict(z=torch.randn(4, 8, 1), codebook=torch.randn(10, 8)), ValueError, r"z must have 2 dims, got shape \(4, 8, 1\)"),
    (dict(z=[[0.0]], codebook=torch.randn(10, 1)), TypeError, r"z must be a torch.Tensor, got list"),
])
def test_lookup_bad_input(cpu_backend, kw, err, match):
    with pytest.raises(err, match=match):
        ops.rq_lookup(**kw)


def test_lookup_keeps_autograd_on_the_eager_path():
    z = torch.randn(5, 4, requires_grad=True)
    codebook = torch.randn(9, 4, requires_grad=True)
    idx, codes = ops.rq_lookup(z, codebook, return_codes=True)
    codes.sum().backward()
    assert codebook.grad is not None and torch.equal(idx, ref.rq_lookup(z.detach(), codebook.detach()))


# ------------------------------------------------------------------------------------------- GPU lane
@pytest.mark.gpu
@pytest.mark.parametrize("N,V,C", [(1, 4096, 32), (2, 4096, 32), (64 * 256, 4096, 32), (16 * 1024, 16384, 64),
                                   (4 * 1024, 4096, 8), (3000, 1000, 17)])
def test_lookup_gpu_against_eager_cuda(gen, N, V, C):
    """Against eager PyTorch on the GPU (cuBLAS, TF32 off). Identical indices expected; any row that differs
    must be a near tie of the eager float32 distances (a different dot-product order in cuBLAS), and rare."""
    g, seed = gen
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        z = torch.randn(N, C, generator=g).cuda()
        codebook = torch.randn(V, C, generator=g).cuda()
        n_ties = min(8, N)
        codebook[V // 2:V // 2 + n_ties] = codebook[:n_ties]
        z[:n_ties] = codebook[:n_ties]
        idx = ops.rq_lookup(z, codebook)
        expected = ref.rq_lookup(z, codebook)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    assert torch.equal(idx[:n_ties], torch.arange(n_ties, device="cuda")), f"seed {seed}: exact ties"
    assert_indices(idx, expected, z, codebook, f"seed {seed} (vs eager cuBLAS)")


# ----------------------------------------------------------------- multi-scale encode (rq_encode)
def _reference_encode(q, f, to_fhat, hws=None):
    """The eager loop the golden tests verified (``ref.encode_multiscale`` with the module's Phi)."""
    hws = q.patch_hws if hws is None else hws
    return ref.encode_multiscale(f, q.embedding.weight.detach(), hws, q.phis(len(hws)), to_fhat)


def _assert_maps(out, expected, what):
    assert len(out) == len(expected)
    for si, (a, b) in enumerate(zip(out, expected)):
        if bit_exact_expected():
            assert torch.equal(a, b), f"{what} after scale {si}: max diff {(a - b).abs().max().item():.3g}"
        else:
            assert_rel(a, b, REL[torch.float32], f"{what} after scale {si}")


@pytest.mark.parametrize("patch_nums,share,quant_resi", [
    (PATCH_NUMS_256, 4, 0.5),
    (((1, 1), (2, 3), (3, 4), (5, 6), (6, 7)), 0, 0.5),
    ((1, 2, 3, 5, 7), 1, -0.25),
    ((2, 4, 1, 7), 4, 0.0),            # Phi = identity; a 1x1 scale after larger ones (torch mean path)
])
def test_encode_matches_reference(cpu_backend, gen, patch_nums, share, quant_resi):
    g, seed = gen
    q = random_quantizer(patch_nums, share, quant_resi, seed=seed)
    H, W = q.patch_hws[-1]
    f = torch.randn(2, q.Cvae, H, W, generator=g)
    with torch.no_grad():
        idx = q.f_to_idxBl_or_fhat(f, to_fhat=False)
        fhat = q.f_to_idxBl_or_fhat(f, to_fhat=True)
        idx_ref, fhat_ref = _reference_encode(q, f, False), _reference_encode(q, f, True)
    for si, (a, b) in enumerate(zip(idx, idx_ref)):
        assert a.dtype == torch.int64 and torch.equal(a, b), f"seed {seed}: indices differ at scale {si}"
    _assert_maps(fhat, fhat_ref, f"seed {seed}: f_hat")
    # the teacher-forcing input replays the same accumulation from the indices
    with torch.no_grad():
        x = q.idxBl_to_var_input(idx)
        x_ref = ref.idx_to_var_input(idx, q.embedding.weight, q.patch_hws, q.phis(len(q.patch_hws)))
    if x_ref is None:
        assert x is None
    else:
        _assert_maps([x], [x_ref], f"seed {seed}: idxBl_to_var_input")


def test_encode_other_schedule_and_noncontiguous_latent(cpu_backend, gen):
    """``v_patch_nums`` overrides the schedule (Phi chosen among its scales); f may be non-contiguous."""
    g, seed = gen
    q = random_quantizer(PATCH_NUMS_256, seed=seed)
    hws = scale_hws((1, 3, 6, 9, 12))
    f = torch.randn(3, 12, 12, q.Cvae, generator=g).permute(0, 3, 1, 2)
    with torch.no_grad():
        idx = q.f_to_idxBl_or_fhat(f, to_fhat=False, v_patch_nums=(1, 3, 6, 9, 12))
        idx_ref = _reference_encode(q, f, False, hws)
    assert all(torch.equal(a, b) for a, b in zip(idx, idx_ref)), f"seed {seed}"


@pytest.mark.interpreter
def test_golden_encode_through_triton(golden_dir, monkeypatch):
    """The official golden indices / f_hat (256 px file, first image to keep the interpreter fast) and the
    teacher-forcing input, through the Triton kernels in the interpreter."""
    import golden
    monkeypatch.setenv("FASTVAR_BACKEND", "triton")
    name = "var_d2_256.pt"
    g = golden.load(name)
    vae, _ = golden.models(name)
    with torch.no_grad():
        idx = vae.quantize.f_to_idxBl_or_fhat(g["f"][:1], to_fhat=False)
        fhat = vae.quantize.f_to_idxBl_or_fhat(g["f"][:1], to_fhat=True)
        x = vae.quantize.idxBl_to_var_input(g["idx_list"])
    for si, (a, b) in enumerate(zip(idx, g["idx_list"])):
        assert torch.equal(a, b[:1]), f"{name}: idx_list differs at scale {si}"
    for si, (a, b) in enumerate(zip(fhat, g["fhat_list"])):
        err = (a - b[:1]).abs().max().item()
        assert err <= GOLDEN_FHAT_ABS, f"{name}: f_hat after scale {si} off by {err:.3g}"
    err = (x - g["teacher_forcing"]["x_BLCv_wo_first_l"]).abs().max().item()
    assert err <= GOLDEN_FHAT_ABS, f"{name}: idxBl_to_var_input off by {err:.3g}"


@pytest.mark.parametrize("kw,err,match", [
    (dict(f=torch.full((1, 4, 4, 4), float("nan"))), ValueError, r"f must be finite"),
    (dict(f=torch.randn(1, 4, 5, 4)), ValueError, r"last scale of patch_hws \(4, 4\) must equal the latent size \(H, W\) = \(5, 4\)"),
    (dict(codebook=torch.randn(16, 5)), ValueError, r"codebook must have C=4 channels \(shape \(V, 4\)\), got shape \(16, 5\)"),
    (dict(codebook=torch.randn(0, 4)), ValueError, r"codebook must have at least one row"),
    (dict(codebook=torch.full((16, 4), float("inf"))), ValueError, r"codebook must be finite"),
    (dict(phis=[None, None]), ValueError, r"phis must be a list of 3 entries"),
    (dict(phis=[None, (torch.randn(4, 4, 3, 3), None, 0.5), (torch.randn(4, 4, 1, 1), None, 0.5)]), ValueError,
     r"phis\[2\] weight must have shape \(4, 4, 3, 3\), got \(4, 4, 1, 1\)"),
    (dict(f=torch.randn(1, 4, 4, 4).half()), TypeError, r"f must have dtype in \['torch.float32'\], got torch.float16"),
])
def test_encode_bad_input(cpu_backend, kw, err, match):
    args = dict(f=torch.randn(1, 4, 4, 4), codebook=torch.randn(16, 4), patch_hws=(1, 2, 4), phis=[None] * 3)
    args.update(kw)
    with pytest.raises(err, match=match):
        ops.rq_encode(**args)


def test_training_forward_and_grad_keep_the_eager_path(gen):
    """With gradients needed the ops run the eager reference: the VQ loss trains Phi and the codebook."""
    g, seed = gen
    q = random_quantizer((1, 2, 4), seed=seed).train()
    f = torch.randn(2, q.Cvae, 4, 4, generator=g, requires_grad=True)
    f_hat, _, loss = q(f)
    loss.backward()
    assert f.grad is not None and q.embedding.weight.grad is not None
    assert q.quant_resi.qresi_ls[0].weight.grad is not None
    idx = [torch.randint(0, q.vocab_size, (2, n), generator=g) for n in (1, 4, 16)]
    x = q.idxBl_to_var_input(idx)
    assert x.requires_grad, "idxBl_to_var_input must stay differentiable when grad is on"


# ------------------------------------------------------------------------------------------- GPU lane
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["var_d2_256.pt", "var_d2_512_saln.pt"])
def test_golden_encode_gpu(golden_dir, name):
    """Golden indices, f_hat and the teacher-forcing input on the GPU (float32 convolutions: TF32 off), and
    the Triton path bit-identical to eager PyTorch on the same GPU (img_to_idxBl included)."""
    import golden
    from fastvar.models import vae_var_from_state_dicts
    g = golden.load(name)
    vae, _ = vae_var_from_state_dicts(g["var_state_dict"], g["vae_state_dict"])
    vae = vae.cuda().eval()
    prev = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            f = g["f"].cuda()
            out = {}
            for backend in ("triton", "eager"):
                os.environ["FASTVAR_BACKEND"] = backend
                out[backend] = (vae.quantize.f_to_idxBl_or_fhat(f, to_fhat=False),
                                vae.quantize.f_to_idxBl_or_fhat(f, to_fhat=True),
                                vae.quantize.idxBl_to_var_input([i.cuda() for i in g["idx_list"]]),
                                vae.img_to_idxBl(g["image_fp16"].float().cuda()))
    finally:
        os.environ.pop("FASTVAR_BACKEND", None)
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = prev
    idx, fhat, x, img_idx = out["triton"]
    for si, (a, b) in enumerate(zip(idx, g["idx_list"])):
        assert torch.equal(a.cpu(), b), f"{name}: idx_list differs at scale {si}"
    # img_to_idxBl: the encoder's cuDNN convolutions differ from the CPU's in the last bits, which may flip a
    # near tie against the golden (CPU) indices; on this GPU the Triton path must equal eager PyTorch exactly
    e_img_idx = out["eager"][3]
    for si, (a, b) in enumerate(zip(img_idx, e_img_idx)):
        assert torch.equal(a, b), f"{name}: img_to_idxBl differs from eager CUDA at scale {si}"
    for si, (a, b) in enumerate(zip(fhat, g["fhat_list"])):
        assert (a.cpu() - b).abs().max().item() <= GOLDEN_FHAT_ABS, f"{name}: f_hat after scale {si}"
    assert (x.cpu() - g["teacher_forcing"]["x_BLCv_wo_first_l"]).abs().max().item() <= GOLDEN_FHAT_ABS
    e_idx, e_fhat, e_x, _ = out["eager"]
    assert all(torch.equal(a, b) for a, b in zip(idx, e_idx)), "Triton and eager CUDA indices differ"
    for si, (a, b) in enumerate(zip(fhat, e_fhat)):
        assert_rel(a, b, REL[torch.float32], f"{name}: f_hat vs eager CUDA after scale {si}")
    assert_rel(x, e_x, REL[torch.float32], f"{name}: var input vs eager CUDA")
