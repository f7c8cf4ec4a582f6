"""The multi-scale encode (``fastvar.ops.rq_encode`` / ``VectorQuantizer2.f_to_idxBl_or_fhat``) and the
teacher-forcing input (``rq_var_input`` / ``idxBl_to_var_input``) against the golden-verified eager loops,
and the official golden outputs through the Triton path.

The Triton path forms the same float32 values as the eager one (see ``fastvar/ops/quantize.py``), so on
x86-64 CPUs indices and f_hat must be bit-identical; elsewhere f_hat is held to ``REL[float32]``."""
import os
import platform

import pytest
import torch

from builders import random_quantizer

from fastvar import ops
from fastvar.reference import quantize as ref
from fastvar.schedule import PATCH_NUMS_256, scale_hws
from tolerances import GOLDEN_FHAT_ABS, REL, assert_rel

X86 = platform.machine().lower() in ("x86_64", "amd64")


def _bit_exact_expected() -> bool:
    """Eager is exact by definition; the interpreter when it rounds ``tl.fma`` once (Triton >= 3.7) on x86-64,
    where the kernels' rounding sequence is ATen's CPU build's."""
    if os.environ.get("FASTVAR_BACKEND") == "eager":
        return True
    from fastvar.triton_kernels.upsample import interpreter_fma_is_exact
    return X86 and interpreter_fma_is_exact()


@pytest.fixture
def gen():
    seed = int.from_bytes(os.urandom(4), "little")
    return torch.Generator().manual_seed(seed), seed


def _reference_encode(q, f, to_fhat, hws=None):
    """The eager loop the golden tests verified (``ref.encode_multiscale`` with the module's Phi)."""
    hws = q.patch_hws if hws is None else hws
    return ref.encode_multiscale(f, q.embedding.weight.detach(), hws, lambda si, h: q.phi(si, h, len(hws)), to_fhat)


def _assert_maps(out, expected, what):
    assert len(out) == len(expected)
    for si, (a, b) in enumerate(zip(out, expected)):
        if _bit_exact_expected():
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
        x_ref = ref.idx_to_var_input(idx, q.embedding.weight, q.patch_hws, q.phi)
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


@pytest.mark.parametrize("idx_list,err,match", [
    ([torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)], ValueError, r"idx_list must be a list of 3"),
    ([torch.zeros(2, 1, dtype=torch.long), torch.full((2, 4), 16), torch.zeros(2, 16, dtype=torch.long)], ValueError,
     r"idx_list\[1\] must hold codebook indices in \[0, 16\) \(V=16\), got values in \[16, 16\]"),
    ([torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 15, dtype=torch.long)],
     ValueError, r"idx_list\[2\] must have shape \(B=2, 16\), got \(2, 15\)"),
    ([torch.zeros(2, 1), torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 16, dtype=torch.long)], TypeError,
     r"idx_list\[0\] must have dtype in \['torch.int64'\], got torch.float32"),
])
def test_var_input_bad_input(cpu_backend, idx_list, err, match):
    with pytest.raises(err, match=match):
        ops.rq_var_input(idx_list, torch.randn(16, 4), (1, 2, 4), [None] * 3)


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
