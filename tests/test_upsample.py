"""Interpolations (``fastvar.ops.bicubic_upsample`` / ``area_downsample``) against ``F.interpolate`` and the
sampling step between scales (``fastvar.ops.upsample_accumulate_``, ``VectorQuantizer2.get_next_autoregressive_input``)
against the golden-verified eager reference.

On x86-64 CPUs the Triton kernels (interpreter) must equal PyTorch bit for bit: their rounding sequence is
ATen's CPU build's (see ``triton_kernels/upsample.py``). Elsewhere they are held to ``REL[float32]``."""
from typing import Optional

import pytest
import torch

from builders import random_quantizer
import torch.nn.functional as F

from fastvar import ops
from fastvar.reference import quantize as ref
from fastvar.schedule import PATCH_NUMS_256, PATCH_NUMS_512, scale_hws
from tolerances import REL, assert_like_eager, assert_rel, bit_exact_expected, rel_err


NON_SQUARE = ((1, 2), (2, 3), (3, 5), (4, 4), (5, 7))


def assert_same(out: torch.Tensor, expected: torch.Tensor, what: str, exact: Optional[bool] = None) -> None:
    """Bit-identical where the rounding sequence is known to be ATen's (see ``tolerances.bit_exact_expected``), else
    REL[float32]."""
    assert out.shape == expected.shape, f"{what}: shape {tuple(out.shape)} vs {tuple(expected.shape)}"
    if bit_exact_expected() if exact is None else exact:
        n = int((out != expected).sum())
        assert n == 0, f"{what}: {n} of {out.numel()} values differ (max {(out - expected).abs().max().item():.3g})"
    else:
        assert_rel(out, expected, REL[torch.float32], what)


# ------------------------------------------------------------------------------------ interpolations
@pytest.mark.parametrize("patch_nums", [PATCH_NUMS_256, PATCH_NUMS_512], ids=["256px", "512px"])
def test_interpolations_every_pair_of_scales(cpu_backend, gen, patch_nums):
    g, seed = gen
    hws = scale_hws(patch_nums)
    for i, small in enumerate(hws):
        for big in hws[i + 1:]:
            x = torch.randn(2, 3, *small, generator=g)
            assert_same(ops.bicubic_upsample(x, big), F.interpolate(x, size=big, mode="bicubic"),
                        f"seed {seed}: bicubic {small} -> {big}")
            y = torch.randn(2, 3, *big, generator=g)
            assert_same(ops.area_downsample(y, small), F.interpolate(y, size=small, mode="area"),
                        f"seed {seed}: area {big} -> {small}")


@pytest.mark.parametrize("src,dst", [((3, 4), (7, 9)), ((7, 3), (5, 11)), ((2, 5), (32, 20)), ((16, 17), (16, 18)),
                                     ((1, 1), (13, 6)), ((5, 5), (3, 2)), ((9, 13), (32, 21))])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_interpolations_non_square_any_layout(cpu_backend, gen, src, dst, layout):
    g, seed = gen
    x = torch.randn(2, 6, *src, generator=g)
    y = torch.randn(2, 6, *dst, generator=g)
    if layout == "channels_last":
        x, y = x.contiguous(memory_format=torch.channels_last), y.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x, y = x[:, ::2], y[:, 1::2]
    up, up_ref = ops.bicubic_upsample(x, dst), F.interpolate(x, size=dst, mode="bicubic")
    assert_same(up, up_ref, f"seed {seed}: bicubic {src} -> {dst} ({layout})")
    assert up.stride() == up_ref.stride(), "bicubic output must have the memory format F.interpolate picks"
    down, down_ref = ops.area_downsample(y, src), F.interpolate(y, size=src, mode="area")
    assert_same(down, down_ref, f"seed {seed}: area {dst} -> {src} ({layout})")
    assert down.stride() == down_ref.stride()


@pytest.mark.interpreter
def test_kernels_write_every_output_element(gen):
    """Outputs poisoned with NaN before the call come back finite and equal to the reference."""
    from fastvar.triton_kernels import upsample as kernels
    g, seed = gen
    B, C, V = 2, 5, 40
    x = torch.randn(B, C, 3, 5, generator=g)
    out = torch.full((B, C, 11, 7), float("nan"))
    kernels.bicubic_upsample(x, (11, 7), out=out)
    assert_same(out, F.interpolate(x, size=(11, 7), mode="bicubic"), f"seed {seed}: bicubic")
    codebook = torch.randn(V, C, generator=g)
    idx = torch.randint(0, V, (B, 3, 5), generator=g)
    out.fill_(float("nan"))
    kernels.bicubic_upsample(None, (11, 7), idx=idx, codebook=codebook, out=out)
    assert_same(out, F.interpolate(codebook[idx].permute(0, 3, 1, 2), size=(11, 7), mode="bicubic"), "from idx")
    small = torch.full((B, C, 3, 5), float("nan"))
    kernels.area_downsample(out, (3, 5), out=small)
    assert_same(small, F.interpolate(out, size=(3, 5), mode="area"), "area")
    # the accumulate step writes f_hat (from f_in), f_rest and the next map entirely
    u, cv = torch.randn(B, C, 11, 7, generator=g), torch.randn(B, C, 11, 7, generator=g)
    f_in, f_rest = torch.randn(B, C, 11, 7, generator=g), torch.randn(B, C, 11, 7, generator=g)
    f_out = torch.full_like(f_in, float("nan"))
    nxt = torch.full((B, C, 4, 3), float("nan"))
    rest0 = f_rest.clone()
    kernels.phi_accumulate(u, cv, 0.3, f_out=f_out, f_in=f_in, f_rest=f_rest, next_size=(4, 3), next_out=nxt)
    h = u.mul(1 - 0.3) + cv.mul(0.3)
    assert_same(f_out, f_in + h, "f_hat")
    assert_same(f_rest, rest0 - h, "f_rest")
    assert_same(nxt, F.interpolate(f_rest, size=(4, 3), mode="area"), "next")


# ------------------------------------------------------------------------------------ sampling step
def _reference_walk(q, codes_per_scale):
    """The golden-verified eager step (``ref.rq_step``) scale by scale: f_hat and every next map (f_hat itself
    after the last scale, as the op returns)."""
    hws = q.patch_hws
    S = len(hws)
    # f_hat in the codes' dtype: a float64 quantizer's walk accumulates in float64 too (the float64 step)
    f_hat = torch.zeros(codes_per_scale[0].shape[0], q.Cvae, *hws[-1], dtype=codes_per_scale[0].dtype,
                        device=codes_per_scale[0].device)
    nexts = []
    for si, h in enumerate(codes_per_scale):
        f_hat, nxt = ref.rq_step(f_hat, h, q.phi_params(si), hws[si + 1] if si < S - 1 else None)
        nexts.append((f_hat if nxt is None else nxt).clone())
    return f_hat, nexts


def _code_map(q, idx, h, w):
    """What VAR's sampler hands the quantizer: embedding -> (B, C, h, w) channels-last view."""
    B = idx.shape[0]
    return q.embedding(idx).transpose_(1, 2).reshape(B, q.Cvae, h, w)


@pytest.mark.parametrize("patch_nums", [PATCH_NUMS_256, PATCH_NUMS_512, NON_SQUARE], ids=["256px", "512px", "non-square"])
@pytest.mark.parametrize("B", [1, 2])     # B = 1: a size-1 batch dim whose stride differs between views
def test_sampling_step_every_scale(cpu_backend, gen, patch_nums, B):
    g, seed = gen
    q = random_quantizer(patch_nums, seed=seed)
    S = len(q.patch_hws)
    idx = [torch.randint(0, q.vocab_size, (B, h * w), generator=g) for h, w in q.patch_hws]
    with torch.no_grad():
        maps = [_code_map(q, i, h, w) for i, (h, w) in zip(idx, q.patch_hws)]
        f_ref, nexts_ref = _reference_walk(q, maps)
        f_hat = torch.zeros_like(f_ref)
        f_idx = torch.zeros_like(f_ref) if patch_nums != PATCH_NUMS_512 else None
        for si in range(S):
            out, nxt = q.get_next_autoregressive_input(si, S, f_hat, maps[si])
            assert out is f_hat, "f_hat must be updated in place"
            assert_same(nxt, nexts_ref[si], f"seed {seed}: next map after scale {si}")
            if f_idx is not None:   # tokens straight into the kernel: the same values as the code-map path
                _, nxt_i = q.get_next_autoregressive_input_from_idx(si, S, f_idx, idx[si])
                assert_same(nxt_i, nexts_ref[si], f"seed {seed}: next map from indices after scale {si}")
    assert_same(f_hat, f_ref, f"seed {seed}: final f_hat")
    if f_idx is not None:
        assert_same(f_idx, f_ref, f"seed {seed}: final f_hat from indices")


@pytest.mark.interpreter
@pytest.mark.parametrize("patch_nums,B,quant_resi", [(PATCH_NUMS_256, 2, 0.5), (NON_SQUARE, 1, 0.5), (NON_SQUARE, 3, -0.3),
                                                     (NON_SQUARE, 2, 0.0)], ids=["256px", "non-square-B1",
                                                                                 "non-square-B3", "phi-identity"])
def test_sampling_step_fused_conv_every_scale(gen, monkeypatch, patch_nums, B, quant_resi):
    """``fused_conv=True``: Phi's convolution inside the Triton step. Its float32 sums run in Triton's order, so
    every next map and the final f_hat are held to the float64 step with eager float32's error as the bound
    (flash-attention's rule); without a convolution (Phi = identity) nothing is reordered and the bits are the
    eager path's. From token indices and from a strided code map."""
    monkeypatch.setenv("FASTVAR_BACKEND", "triton")
    g, seed = gen
    q = random_quantizer(patch_nums, quant_resi=quant_resi, seed=seed)
    q64 = random_quantizer(patch_nums, quant_resi=quant_resi, seed=seed).double()
    S = len(q.patch_hws)
    idx = [torch.randint(0, q.vocab_size, (B, h * w), generator=g) for h, w in q.patch_hws]
    with torch.no_grad():
        maps = [_code_map(q, i, h, w) for i, (h, w) in zip(idx, q.patch_hws)]
        f_eager, nexts_eager = _reference_walk(q, maps)
        f_ref, nexts_ref = _reference_walk(q64, [_code_map(q64, i, h, w) for i, (h, w) in zip(idx, q.patch_hws)])
        f_idx, f_map = torch.zeros_like(f_eager), torch.zeros_like(f_eager)
        for si, (h, w) in enumerate(q.patch_hws):
            _, nxt_i = q.get_next_autoregressive_input_from_idx(si, S, f_idx, idx[si], fused_conv=True)
            strided = torch.empty(B, q.Cvae, h, 2 * w).normal_(generator=g)[..., ::2]   # a non-contiguous map
            strided.copy_(maps[si])
            _, nxt_m = q.get_next_autoregressive_input(si, S, f_map, strided, fused_conv=True)
            for what, nxt in (("indices", nxt_i), ("code map", nxt_m)):
                msg = f"seed {seed}: next map after scale {si} from {what}"
                if quant_resi == 0.0:
                    assert_same(nxt, nexts_eager[si], msg)
                else:
                    assert_like_eager(nxt, nexts_eager[si], nexts_ref[si], msg)
    for what, f in (("indices", f_idx), ("code map", f_map)):
        if quant_resi == 0.0:
            assert_same(f, f_eager, f"seed {seed}: f_hat from {what}")
        else:
            assert_like_eager(f, f_eager, f_ref, f"seed {seed}: f_hat from {what}")


def _round_to_tf32(t: torch.Tensor) -> torch.Tensor:
    """float32 -> TF32 (10-bit mantissa), to nearest, ties away from zero (PTX ``cvt.rna.tf32.f32``)."""
    return ((t.view(torch.int32) + 0x1000) & -0x2000).view(torch.float32)


@pytest.mark.interpreter
@pytest.mark.parametrize("mode", ["fp32", "no bias", "tf32"])
@pytest.mark.parametrize("C,hw,HW,block_p", [(8, (4, 3), (9, 7), 16), (24, (5, 5), (11, 13), 32), (64, (3, 2), (6, 5), 16),
                                             (17, (7, 6), (7, 6), 16)])
def test_fused_step_kernel_tiles(gen, C, hw, HW, block_p, mode):
    """``upsample_phi_accumulate`` with several pixel tiles per image (halos across tile edges), channel counts
    padded to the ``tl.dot`` tile (8, 17, 24) or filling it (64), from a strided code map and from indices,
    against the float64 step; f_hat starts random (accumulated into, not overwritten). Phi with a bias, without
    one, and in TF32 (operands rounded to nearest, as cuDNN does; the interpreter's products are then exact, so
    the float64 step on the rounded operands is the reference). Negative controls: f_hat is far from the step
    with one tap dropped, without the bias, or with the weight's (out, in) channels swapped."""
    from fastvar.triton_kernels import upsample as kernels
    g, seed = gen
    B, V, r = 2, 37, 0.375
    codebook = torch.randn(V, C, generator=g)
    idx = torch.randint(0, V, (B, *hw), generator=g)
    w = torch.randn(C, C, 3, 3, generator=g) * 0.2
    b = torch.randn(C, generator=g) if mode != "no bias" else None
    f0 = torch.randn(B, C, *HW, generator=g)
    u = kernels.bicubic_upsample(None, HW, idx=idx, codebook=codebook)    # the kernel's own float32 u (tested above)

    def step64(weight, bias, conv_in=u):
        return f0.double() + u.double() * (1 - r) + F.conv2d(conv_in.double(), weight, bias, padding=1) * r

    b64 = b.double() if b is not None else None
    if mode == "tf32":
        expected = step64(_round_to_tf32(w.clone()).double(), b64, conv_in=_round_to_tf32(u.clone()))
    else:
        expected = step64(w.double(), b64)
    precision = "tf32" if mode == "tf32" else "ieee"
    f_idx, f_map = f0.clone(), f0.clone()
    kernels.upsample_phi_accumulate(f_idx, None, w, b, r, idx=idx, codebook=codebook, block_p=block_p,
                                    dot_precision=precision)
    strided = torch.randn(B, C, hw[0], 2 * hw[1], generator=g)[..., ::2]
    strided.copy_(codebook[idx].permute(0, 3, 1, 2))
    kernels.upsample_phi_accumulate(f_map, strided, w, b, r, block_p=block_p, dot_precision=precision)
    for what, f in (("indices", f_idx), ("code map", f_map)):
        assert_rel(f, expected, REL[torch.float32], f"seed {seed}: {what}")
    if mode == "tf32":
        f_ieee = f0.clone()
        kernels.upsample_phi_accumulate(f_ieee, None, w, b, r, idx=idx, codebook=codebook, block_p=block_p)
        assert not torch.equal(f_idx, f_ieee), "dot_precision='tf32' must round the operands"
        return
    no_tap = w.double().clone()
    no_tap[:, :, 0, 2] = 0
    wrong = [("a dropped tap", step64(no_tap, b64)), ("(in, out) weights", step64(w.double().transpose(0, 1), b64))]
    if b is not None:
        wrong.append(("no bias", step64(w.double(), None)))
    for what, other in wrong:
        assert rel_err(f_idx, other) > 10 * REL[torch.float32], f"seed {seed}: indistinguishable from {what}"


@pytest.mark.interpreter
def test_sampling_step_fused_conv_bad_input(monkeypatch):
    """The fused kernel holds C <= 64 channels; the eager backend (the definition) ignores ``fused_conv``."""
    args = (torch.randn(1, 80, 2, 2), torch.randn(80, 80, 3, 3), torch.randn(80), 0.5, None)
    monkeypatch.setenv("FASTVAR_BACKEND", "triton")
    with pytest.raises(ValueError, match=r"fused_conv=True keeps all channels of f_hat in one tile: C <= 64, got C=80"):
        ops.upsample_accumulate_(torch.zeros(1, 80, 4, 4), *args, fused_conv=True)
    monkeypatch.setenv("FASTVAR_BACKEND", "eager")
    f_fused, f_plain = torch.zeros(1, 80, 4, 4), torch.zeros(1, 80, 4, 4)
    ops.upsample_accumulate_(f_fused, *args, fused_conv=True)
    ops.upsample_accumulate_(f_plain, *args)
    assert torch.equal(f_fused, f_plain)


@pytest.mark.parametrize("patch_nums", [PATCH_NUMS_256, NON_SQUARE], ids=["256px", "non-square"])
def test_sampling_step_more_smooth_soft_codes(cpu_backend, gen, patch_nums):
    """``more_smooth``: softmax-weighted code vectors (a dense code map, not tokens)."""
    g, seed = gen
    q = random_quantizer(patch_nums, seed=seed)
    B, S = 2, len(q.patch_hws)
    with torch.no_grad():
        soft = []
        for h, w in q.patch_hws:
            probs = (torch.randn(B, h * w, q.vocab_size, generator=g) * 3).softmax(-1)
            soft.append((probs @ q.embedding.weight.unsqueeze(0)).transpose_(1, 2).reshape(B, q.Cvae, h, w))
        f_ref, nexts_ref = _reference_walk(q, soft)
        f_hat = torch.zeros_like(f_ref)
        for si in range(S):
            _, nxt = q.get_next_autoregressive_input(si, S, f_hat, soft[si])
            assert_same(nxt, nexts_ref[si], f"seed {seed}: next map after scale {si}")
    assert_same(f_hat, f_ref, f"seed {seed}: final f_hat")


@pytest.mark.parametrize("share_quant_resi,quant_resi", [(0, 0.5), (1, 0.5), (4, 0.0), (3, -0.37)])
def test_sampling_step_phi_variants(cpu_backend, gen, share_quant_resi, quant_resi):
    """One Phi per scale, one shared, Phi = identity (quant_resi 0), and another ratio."""
    g, seed = gen
    q = random_quantizer(NON_SQUARE, share_quant_resi, quant_resi, seed=seed)
    B, S = 3, len(q.patch_hws)
    with torch.no_grad():
        maps = [torch.randn(B, q.Cvae, h, w, generator=g) for h, w in q.patch_hws]
        f_ref, nexts_ref = _reference_walk(q, maps)
        f_hat = torch.zeros_like(f_ref)
        for si in range(S):
            _, nxt = q.get_next_autoregressive_input(si, S, f_hat, maps[si])
            assert_same(nxt, nexts_ref[si], f"seed {seed}: next after scale {si}")
        assert_same(f_hat, f_ref, f"seed {seed}: f_hat")
        # embed_to_fhat replays the same accumulation
        fh = q.embed_to_fhat(maps, all_to_max_scale=True)
        assert_same(fh[-1], f_ref, f"seed {seed}: embed_to_fhat")


def test_upsample_accumulate_op_against_its_definition(cpu_backend, gen):
    """The functional op on non-contiguous codes and indices, against its definition ``ref.rq_step``."""
    g, seed = gen
    B, C, V = 2, 6, 30
    w, b = torch.randn(C, C, 3, 3, generator=g) * 0.2, torch.randn(C, generator=g)
    codebook = torch.randn(V, C, generator=g)
    f0 = torch.randn(B, C, 9, 7, generator=g)
    for codes, cb in [(torch.randn(B, 2 * C, 3, 4, generator=g)[:, ::2], None),
                      (torch.randint(0, V, (B, 4, 3), generator=g), codebook),
                      (torch.randn(B, C, 9, 7, generator=g).transpose(2, 3).contiguous().transpose(2, 3), None)]:
        for next_hw in [(4, 5), (1, 1), None]:
            f_hat, f_exp = f0.clone(), f0.clone()
            out = ops.upsample_accumulate_(f_hat, codes, w, b, 0.4, next_hw, codebook=cb)
            f_exp, exp = ref.rq_step(f_exp, codes, (w, b, 0.4), next_hw, cb)
            exp = f_exp if exp is None else exp
            assert (out is f_hat) == (next_hw is None)
            assert_same(f_hat, f_exp, f"seed {seed}: f_hat ({tuple(codes.shape)}, next {next_hw})")
            assert_same(out, exp, f"seed {seed}: returned map")


@pytest.mark.interpreter
def test_upsample_accumulate_is_one_custom_op(gen):
    """``fastvar::upsample_accumulate_`` passes torch.library's checks (schema, fake tensor, mutation)."""
    g, _ = gen
    B, C = 2, 4
    f_hat = torch.randn(B, C, 6, 6, generator=g)
    codes = torch.randn(B, C, 2, 3, generator=g)
    w, b = torch.randn(C, C, 3, 3, generator=g), torch.randn(C, generator=g)
    for fused_conv in (False, True):
        torch.library.opcheck(torch.ops.fastvar.upsample_accumulate_.default,
                              (f_hat, codes, w, b, 0.5, [3, 2], None, fused_conv),
                              test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.fastvar.rq_lookup.default, (torch.randn(5, C), torch.randn(7, C), True),
                          test_utils=("test_schema", "test_faketensor"))


# aten ops that allocate or re-describe memory without running a kernel
_NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "view", "_unsafe_view",
              "as_strided", "t", "transpose", "permute", "expand", "reshape", "alias", "detach", "lift_fresh"}


@pytest.mark.interpreter
@pytest.mark.parametrize("fused_conv", [False, True], ids=["conv2d", "fused-conv"])
@pytest.mark.parametrize("codes_kind", ["indices", "code map"])
def test_sampling_step_launches_per_scale(gen, monkeypatch, codes_kind, fused_conv):
    """The Triton step runs, per scale, two Triton kernels (gather + bicubic upsample; Phi + accumulate +
    area downsample) and one torch kernel (Phi's 3x3 convolution), and nothing else; with ``fused_conv``, two
    Triton kernels (the whole step; the area downsample) and no torch kernel: the structure the module
    docstring of ``fastvar.ops.upsample`` states and the benchmark's launch count assumes."""
    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
    from triton.runtime.interpreter import InterpretedFunction
    from fastvar.ops import upsample as upsample_ops
    monkeypatch.setenv("FASTVAR_BACKEND", "triton")
    triton_launches, torch_kernels = [], []

    class CountKernels(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "fastvar":          # the custom op: count what its implementation runs
                assert func.overloadpacket.__name__ == "upsample_accumulate_" and not kwargs
                with self:
                    nxt = upsample_ops._triton_upsample_accumulate(*args)
                return nxt if nxt is not None else args[0].new_empty(0)
            out = func(*args, **(kwargs or {}))
            on_meta = any(isinstance(t, torch.Tensor) and t.is_meta
                          for t in torch.utils._pytree.tree_leaves((args, kwargs, out)))
            if func.overloadpacket.__name__ not in _NO_KERNEL and not on_meta:   # meta ops run no kernel
                torch_kernels.append(func.overloadpacket.__name__)
            return out

    real_run = InterpretedFunction.run

    def counted_run(self, *args, **kwargs):
        triton_launches.append(self.__name__)
        with _disable_current_modes():          # the interpreter's own host copies are not kernels
            return real_run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", counted_run)
    g, seed = gen
    q = random_quantizer(NON_SQUARE, seed=seed)
    S, B = len(q.patch_hws), 2
    f_hat = torch.zeros(B, q.Cvae, *q.patch_hws[-1])
    with torch.no_grad():
        for si, (h, w) in enumerate(q.patch_hws):
            idx = torch.randint(0, q.vocab_size, (B, h, w), generator=g)
            codes = idx if codes_kind == "indices" else q.embedding(idx).permute(0, 3, 1, 2)
            weight, bias, r = q.phi_params(si, S)
            triton_launches.clear(), torch_kernels.clear()
            with CountKernels():
                ops.upsample_accumulate_(f_hat, codes, weight, bias, r, q.patch_hws[si + 1] if si + 1 < S else None,
                                         codebook=q.embedding.weight, validate=False, fused_conv=fused_conv)
            last = si == S - 1
            # host tensors: the range check of the indices (min, max, read back) runs even with validate=False,
            # there being no synchronisation to save; on CUDA validate=False skips it
            check = ["min", "_local_scalar_dense", "max", "_local_scalar_dense"] if codes_kind == "indices" else []
            if fused_conv:      # the whole step, then the next scale's area downsample
                assert len(triton_launches) == (1 if last else 2), f"scale {si}: {triton_launches}"
                assert torch_kernels == check, f"scale {si}: torch kernels {torch_kernels}"
            else:
                already_full = codes_kind == "code map" and (h, w) == tuple(q.patch_hws[-1])
                assert len(triton_launches) == (1 if already_full else 2), f"scale {si}: {triton_launches}"
                assert torch_kernels == check + ["conv2d"], f"scale {si}: torch kernels {torch_kernels}"


@pytest.mark.interpreter
def test_sampling_step_compiles_to_one_graph(gen, monkeypatch):
    """``torch.compile(fullgraph=True)`` traces the step without a graph break (the custom op is one node)
    and gives the same f_hat and next map."""
    monkeypatch.setenv("FASTVAR_BACKEND", "triton")
    g, _ = gen
    B, C = 2, 4
    codes = torch.randn(B, C, 2, 3, generator=g)
    w, b = torch.randn(C, C, 3, 3, generator=g), torch.randn(C, generator=g)

    def step(f_hat, codes):
        return ops.upsample_accumulate_(f_hat, codes, w, b, 0.5, (3, 2))

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    f1, f2 = torch.zeros(B, C, 6, 6), torch.zeros(B, C, 6, 6)
    out = compiled(f1, codes)
    assert torch.equal(out, step(f2, codes)) and torch.equal(f1, f2)


@pytest.mark.parametrize("kw,err,match", [
    (dict(f_hat=torch.randn(2, 4, 6, 6).transpose(2, 3)), ValueError, r"f_hat must be contiguous"),
    (dict(f_hat=torch.randn(2, 4, 6, 6).double()), TypeError, r"f_hat must have dtype in \['torch.float32'\]"),
    (dict(codes=torch.randn(2, 5, 3, 3)), ValueError, r"codes \(a float32 code map\) must have shape \(B=2, C=4, h, w\), got \(2, 5, 3, 3\)"),
    (dict(codes=torch.randint(0, 9, (2, 9))), ValueError, r"codes \(int64 token indices\) must have shape \(B=2, h, w\), got \(2, 9\)"),
    (dict(codes=torch.randint(0, 9, (2, 3, 3))), ValueError, r"codebook is required"),
    (dict(codes=torch.full((2, 3, 3), 9), codebook=torch.randn(9, 4)), ValueError, r"codes must hold codebook indices in \[0, 9\) \(V=9\), got values in \[9, 9\]"),
    (dict(codes=torch.full((2, 3, 3), -1), codebook=torch.randn(9, 4)), ValueError, r"got values in \[-1, -1\]"),
    (dict(codes=torch.randint(0, 9, (2, 3, 3)), codebook=torch.randn(9, 5)), ValueError, r"codebook must have C=4 channels"),
    (dict(codes=torch.randint(0, 9, (2, 3, 3)), codebook=torch.randn(0, 4)), ValueError, r"codebook must have at least one row"),
    (dict(phi_weight=torch.randn(4, 4, 1, 1)), ValueError, r"phi weight must have shape \(4, 4, 3, 3\), got \(4, 4, 1, 1\)"),
    (dict(phi_bias=torch.randn(3)), ValueError, r"phi bias must have shape \(4\), got \(3,\)"),
    (dict(resi_ratio=float("nan")), ValueError, r"phi resi_ratio must be finite"),
    (dict(next_hw=(0, 2)), ValueError, r"next_hw must be a pair of positive ints"),
    (dict(next_hw=3), TypeError, r"next_hw must be a pair of positive ints"),
])
def test_upsample_accumulate_bad_input(cpu_backend, kw, err, match):
    args = dict(f_hat=torch.randn(2, 4, 6, 6), codes=torch.randn(2, 4, 3, 3), phi_weight=torch.randn(4, 4, 3, 3),
                phi_bias=torch.randn(4), resi_ratio=0.5, next_hw=(4, 4), codebook=None)
    args.update(kw)
    with pytest.raises(err, match=match):
        ops.upsample_accumulate_(**args)


@pytest.mark.parametrize("fn,args,err,match", [
    ("bicubic_upsample", (torch.randn(2, 3, 4), (8, 8)), ValueError, r"x must have 4 dims, got shape \(2, 3, 4\)"),
    ("bicubic_upsample", (torch.randn(2, 3, 4, 4), (8, 0)), ValueError, r"size must be a pair of positive ints"),
    ("area_downsample", (torch.randn(2, 3, 4, 4).half(), (2, 2)), TypeError, r"x must have dtype in \['torch.float32'\]"),
    ("area_downsample", (torch.randn(2, 3, 4, 4), "ab"), TypeError, r"size must be a pair of positive ints"),
])
def test_interpolation_bad_input(cpu_backend, fn, args, err, match):
    with pytest.raises(err, match=match):
        getattr(ops, fn)(*args)


# ------------------------------------------------------------------------------------------- GPU lane
@pytest.mark.gpu
@pytest.mark.parametrize("patch_nums", [PATCH_NUMS_256, PATCH_NUMS_512, NON_SQUARE], ids=["256px", "512px", "non-square"])
def test_interpolations_gpu_against_cuda_aten(gen, patch_nums):
    """Against ATen's CUDA kernels. Area: bit-identical (same order, IEEE division). Bicubic: bit-identical
    if nvcc contracted ATen's polynomials as assumed (``TORCH_CPU=False`` in the kernel) — the first thing
    to look at on a new GPU image; within REL[float32] in any case."""
    g, seed = gen
    hws = scale_hws(patch_nums)
    mismatched = []
    for i, small in enumerate(hws):
        for big in hws[i + 1:]:
            x = torch.randn(16, 32, *small, generator=g).cuda()
            up, up_ref = ops.bicubic_upsample(x, big), F.interpolate(x, size=big, mode="bicubic")
            assert_rel(up, up_ref, REL[torch.float32], f"seed {seed}: bicubic {small} -> {big}")
            if not torch.equal(up, up_ref):
                mismatched.append((small, big, int((up != up_ref).sum())))
            y = torch.randn(16, 32, *big, generator=g).cuda()
            assert_same(ops.area_downsample(y, small), F.interpolate(y, size=small, mode="area"),
                        f"seed {seed}: area {big} -> {small}", exact=True)
    assert not mismatched, f"bicubic differs from ATen CUDA in the last bits: {mismatched}"


@pytest.mark.gpu
@pytest.mark.parametrize("patch_nums", [PATCH_NUMS_256, PATCH_NUMS_512], ids=["256px", "512px"])
@pytest.mark.parametrize("B", [1, 16])
def test_sampling_step_gpu(gen, patch_nums, B):
    """VAR's sizes (Cvae 32, V 4096) on the GPU against the eager step, then replayed in a CUDA graph."""
    g, seed = gen
    q = random_quantizer(patch_nums, C=32, V=4096, seed=seed).cuda()
    S = len(q.patch_hws)
    idx = [torch.randint(0, 4096, (B, h * w), generator=g).cuda() for h, w in q.patch_hws]
    with torch.no_grad():
        maps = [_code_map(q, i, h, w) for i, (h, w) in zip(idx, q.patch_hws)]
        f_ref, nexts_ref = _reference_walk(q, maps)
        f_hat = torch.zeros_like(f_ref)
        f_idx = torch.zeros_like(f_ref)
        for si in range(S):
            _, nxt = q.get_next_autoregressive_input(si, S, f_hat, maps[si])
            _, nxt_i = q.get_next_autoregressive_input_from_idx(si, S, f_idx, idx[si])
            assert_rel(nxt, nexts_ref[si], REL[torch.float32], f"seed {seed}: next after scale {si}")
            assert torch.equal(nxt_i, nxt), "the index path must equal the code-map path"
        assert_rel(f_hat, f_ref, REL[torch.float32], f"seed {seed}: f_hat")
        # CUDA graph: the whole per-scale chain captured once and replayed
        f_g = torch.zeros_like(f_ref)
        static_idx = [i.clone() for i in idx]
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for si in range(S):
                q.get_next_autoregressive_input_from_idx(si, S, f_g, static_idx[si])
        f_g.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(f_g, f_idx), "CUDA-graph replay differs from the eager launches"


@pytest.mark.gpu
@pytest.mark.parametrize("patch_nums", [PATCH_NUMS_256, PATCH_NUMS_512], ids=["256px", "512px"])
@pytest.mark.parametrize("B", [1, 16])
@pytest.mark.parametrize("tf32", [False, True], ids=["fp32", "tf32"])
def test_sampling_step_fused_conv_gpu(gen, monkeypatch, patch_nums, B, tf32):
    """``fused_conv=True`` at VAR's sizes on the GPU: every next map and f_hat at most 2x as far from the float64
    step as the eager float32 step under the same ``cudnn.allow_tf32`` (float32 FMAs or TF32 tensor cores in
    both); then the whole walk captured in a CUDA graph and replayed, bit for bit."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    g, seed = gen
    q = random_quantizer(patch_nums, C=32, V=4096, seed=seed).cuda()
    q64 = random_quantizer(patch_nums, C=32, V=4096, seed=seed).double().cuda()
    S = len(q.patch_hws)
    idx = [torch.randint(0, 4096, (B, h * w), generator=g).cuda() for h, w in q.patch_hws]
    with torch.no_grad():
        f_eager, nexts_eager = _reference_walk(q, [_code_map(q, i, h, w) for i, (h, w) in zip(idx, q.patch_hws)])
        f_ref, nexts_ref = _reference_walk(q64, [_code_map(q64, i, h, w) for i, (h, w) in zip(idx, q.patch_hws)])
        f_hat = torch.zeros_like(f_eager)
        for si in range(S):
            _, nxt = q.get_next_autoregressive_input_from_idx(si, S, f_hat, idx[si], fused_conv=True)
            assert_like_eager(nxt, nexts_eager[si], nexts_ref[si], f"seed {seed}: next after scale {si}")
        assert_like_eager(f_hat, f_eager, f_ref, f"seed {seed}: f_hat")
        f_g = torch.zeros_like(f_hat)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for si in range(S):
                q.get_next_autoregressive_input_from_idx(si, S, f_g, idx[si], validate=False, fused_conv=True)
        f_g.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(f_g, f_hat), "CUDA-graph replay differs from the eager launches"


# ------------------------------------------------------------ teacher-forcing input (rq_var_input)
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
