"""The interpolations and the step between scales (functional API, argument checks, backend choice):
``area_downsample``, ``bicubic_upsample``, ``upsample_accumulate_`` (the sampling step) and ``rq_var_input``
(the teacher-forcing input, a loop of that step).

See :mod:`fastvar.reference.quantize` for the definitions (:func:`~fastvar.reference.quantize.rq_step` is the
step) and ``fastvar.triton_kernels.upsample`` for the kernels.

Backends: ``eager`` (the reference) and ``triton``. The Triton path reproduces the eager float32 bits where
the eager path's own arithmetic order is known: ``F.interpolate`` bicubic / area (ATen's rounding sequence),
Phi's ``(1-r) u + r conv(u)`` and the accumulations; the 3x3 convolution is ``F.conv2d`` on a tensor of the
same memory format as in the eager path, so it runs the same cuDNN / oneDNN algorithm.

Launches per step, Triton path (:func:`triton_step`): gather + bicubic upsample (1), ``F.conv2d`` (1),
Phi + ``f_hat +=`` (+ ``f_rest -=``) + the next scale's area downsample (1)
(``tests/test_upsample.py::test_sampling_step_launches_per_scale`` holds this). The conv reads the upsampled
map and Phi reads the conv's output, so with cuDNN's conv Triton work sits on both sides of it.
``fused_conv=True`` (sampling only) computes the conv inside the step's kernel instead (``tl.dot`` per tap
over a recomputed halo): the step (1) and the area downsample (1), which needs the finished f_hat around
each cell of the next scale, so a separate launch. It gives up ``F.conv2d``'s bits (the sums run in another
order; tested against float64 with eager's error as the bound) and is off by default: which design is
faster is for a GPU to say (``bench/bench_upsample.py`` times both).

``upsample_accumulate_`` is a ``torch.library`` custom op (``fastvar::upsample_accumulate_``) with a fake
implementation, so ``torch.compile`` and CUDA graphs see one node per call. No autograd through the Triton
path: when gradients are needed (grad mode on and an input that requires grad), the ops run the reference.
"""
# No ``from __future__ import annotations``: torch.library reads the custom ops' annotations as types.
import functools
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from fastvar.reference import quantize as ref
from fastvar.ops import cuda_ext
from fastvar.ops._backend import select
from fastvar.ops._checks import (PhiParams, check_codebook, check_hw, check_indices, check_map, check_phi,
                                 check_phis, check_same, check_tensor, needs_grad)
from fastvar.schedule import scale_hws


def _kernels():
    """``fastvar.triton_kernels.upsample``, imported on first use (after ``TRITON_INTERPRET`` is set)."""
    from fastvar.triton_kernels import upsample
    return upsample


def memory_format(t: torch.Tensor) -> torch.memory_format:
    """The memory format ATen picks for an interpolation's or a convolution's output (``suggest_memory_format``)."""
    try:
        from torch._prims_common import suggest_memory_format
        return suggest_memory_format(t)
    except Exception:   # private helper moved: the same rule for 4-d tensors
        cl = t.is_contiguous(memory_format=torch.channels_last)
        return torch.channels_last if cl and not t.is_contiguous() else torch.contiguous_format


@functools.lru_cache(maxsize=256)
def _code_map_format(B: int, C: int, h: int, w: int) -> torch.memory_format:
    """The memory format of ``ref.code_map``'s view for ``B`` maps of ``(h, w)`` tokens (meta tensors, once per
    shape: it is a constant of the shape, and the sampler asks at every scale)."""
    return memory_format(ref.code_map(torch.zeros(B, h * w, dtype=torch.long, device="meta"),
                                      torch.empty(1, C, device="meta"), h, w))


# ---------------------------------------------------------------------------------- interpolations
def _triton_area_downsample(x, size, out=None):
    if tuple(size) == (1, 1):        # ATen computes this case with mean(): its reduction order
        small = ref.area_downsample(x, size)
        return small if out is None else out.copy_(small)
    if out is None:
        out = torch.empty(x.shape[0], x.shape[1], *size, dtype=x.dtype, device=x.device,
                          memory_format=memory_format(x))
    return _kernels().area_downsample(x, size, out=out)


def _triton_bicubic_upsample(x, size):
    out = torch.empty(x.shape[0], x.shape[1], *size, dtype=x.dtype, device=x.device,
                      memory_format=memory_format(x))
    return _kernels().bicubic_upsample(x, size, out=out)


AREA_DOWNSAMPLE_IMPLS = {"eager": ref.area_downsample, "triton": _triton_area_downsample}
BICUBIC_UPSAMPLE_IMPLS = {"eager": ref.bicubic_upsample, "triton": _triton_bicubic_upsample}


def area_downsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``F.interpolate(x, size, mode='area')`` (adaptive average pooling), bit for bit.

    Args:
        x: ``(B, C, H, W)`` float32, any strides; size: ``(h, w)``.
    Returns:
        ``(B, C, h, w)`` float32 in the memory format ATen would choose.
    """
    check_map("x", x)
    size = check_hw("size", size)
    impl = ref.area_downsample if needs_grad(x) else select("area_downsample", AREA_DOWNSAMPLE_IMPLS, x.device)
    return impl(x, size)


def bicubic_upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``F.interpolate(x, size, mode='bicubic', align_corners=False)`` (a = -0.75, border taps clamped).

    Args:
        x: ``(B, C, h, w)`` float32, any strides; size: ``(H, W)`` (any size, up or down).
    Returns:
        ``(B, C, H, W)`` float32 in the memory format ATen would choose.
    """
    check_map("x", x)
    size = check_hw("size", size)
    impl = ref.bicubic_upsample if needs_grad(x) else select("bicubic_upsample", BICUBIC_UPSAMPLE_IMPLS, x.device)
    return impl(x, size)


# ------------------------------------------------------------------ the step between scales
def triton_step(f_out: Optional[torch.Tensor], f_in: Optional[torch.Tensor], codes: torch.Tensor,
                codebook: Optional[torch.Tensor], phi: PhiParams, next_hw: Optional[Tuple[int, int]],
                u_format: torch.memory_format, f_rest: Optional[torch.Tensor] = None,
                next_out: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """:func:`fastvar.reference.quantize.rq_step` on the Triton kernels, the one implementation the sampling
    step, the encoder and the teacher-forcing input share.

    ``f_out = f_in + Phi(u)`` (``f_in`` None: zeros; may be ``f_out``), ``f_rest -= Phi(u)`` if given, with ``u``
    the codes (``(B, h, w)`` int64 indices into ``codebook``, or a ``(B, C, h, w)`` map) upsampled to ``(H, W)``
    in ``u_format`` (the eager path's layout of Phi's input, so that ``F.conv2d`` runs its algorithm). Returns the
    next scale's map, the area downsample of ``f_rest`` (if given) or ``f_out``, written into ``next_out`` (any
    strides, e.g. a view of the encoder's lookup rows) or a new tensor; None without ``next_hw``.
    """
    k_up = _kernels()
    B, C, H, W = (f_out if f_out is not None else f_rest).shape
    if codes.dtype == torch.int64:
        u = torch.empty(B, C, H, W, dtype=torch.float32, device=codes.device, memory_format=u_format)
        k_up.bicubic_upsample(None, (H, W), idx=codes, codebook=codebook, out=u)
    elif tuple(codes.shape[-2:]) == (H, W):
        u = codes
    else:
        u = torch.empty(B, C, H, W, dtype=torch.float32, device=codes.device, memory_format=u_format)
        k_up.bicubic_upsample(codes, (H, W), out=u)
    cv = F.conv2d(u, phi[0], phi[1], stride=1, padding=1) if phi is not None else None
    r = phi[2] if phi is not None else 0.0
    down = next_hw is not None and tuple(next_hw) != (1, 1)
    if down and next_out is None:
        next_out = torch.empty(B, C, *next_hw, dtype=torch.float32, device=u.device)
    k_up.phi_accumulate(u, cv, r, f_out=f_out, f_in=f_in, f_rest=f_rest, next_size=tuple(next_hw) if down else None,
                        next_out=next_out if down else None)
    if next_hw is None or down:
        return next_out if down else None
    return _triton_area_downsample(f_rest if f_rest is not None else f_out, (1, 1), out=next_out)


def _triton_upsample_accumulate(f_hat, codes, phi_weight, phi_bias, resi_ratio, next_hw, codebook, fused_conv):
    if fused_conv:
        from_idx = codes.dtype == torch.int64
        # the convolution at eager's precision: cuDNN runs float32 convs in TF32 under this flag (default on)
        tf32 = f_hat.is_cuda and torch.backends.cudnn.allow_tf32
        _kernels().upsample_phi_accumulate(f_hat, None if from_idx else codes, phi_weight, phi_bias, resi_ratio,
                                           idx=codes if from_idx else None, codebook=codebook if from_idx else None,
                                           dot_precision="tf32" if tf32 else "ieee")
        return None if next_hw is None else _triton_area_downsample(f_hat, tuple(next_hw))
    B, C = f_hat.shape[:2]
    # Phi's input has the layout of the eager path's code map
    fmt = _code_map_format(B, C, *codes.shape[1:]) if codes.dtype == torch.int64 else memory_format(codes)
    phi = (phi_weight, phi_bias, resi_ratio) if phi_weight is not None else None
    return triton_step(f_hat, f_hat, codes, codebook, phi, next_hw, fmt)


@torch.library.custom_op("fastvar::upsample_accumulate_", mutates_args=("f_hat",))
def _upsample_accumulate_op(f_hat: torch.Tensor, codes: torch.Tensor, phi_weight: Optional[torch.Tensor],
                            phi_bias: Optional[torch.Tensor], resi_ratio: float, next_hw: Optional[List[int]],
                            codebook: Optional[torch.Tensor], fused_conv: bool) -> torch.Tensor:
    """Triton step: ``f_hat += Phi(up(codes))`` in place; returns the next scale's map (empty without
    ``next_hw``: a custom op cannot return its mutated input)."""
    nxt = _triton_upsample_accumulate(f_hat, codes, phi_weight, phi_bias, resi_ratio, next_hw, codebook,
                                      fused_conv)
    return nxt if nxt is not None else f_hat.new_empty(0)


@_upsample_accumulate_op.register_fake
def _(f_hat, codes, phi_weight, phi_bias, resi_ratio, next_hw, codebook, fused_conv):
    if next_hw is None:
        return f_hat.new_empty(0)
    return f_hat.new_empty(f_hat.shape[0], f_hat.shape[1], int(next_hw[0]), int(next_hw[1]))


def _eager_upsample_accumulate(f_hat, codes, phi_weight, phi_bias, resi_ratio, next_hw, codebook,
                               fused_conv=False):
    phi = (phi_weight, phi_bias, resi_ratio) if phi_weight is not None else None
    f_new, nxt = ref.rq_step(f_hat, codes, phi, next_hw, codebook)
    if f_new is not f_hat:     # autograd kept the old f_hat: the op's contract is in place all the same
        f_hat.copy_(f_new)
    return nxt


def _op_upsample_accumulate(f_hat, codes, phi_weight, phi_bias, resi_ratio, next_hw, codebook,
                            fused_conv=False):
    nxt = _upsample_accumulate_op(f_hat, codes, phi_weight, phi_bias, float(resi_ratio),
                                  None if next_hw is None else [int(v) for v in next_hw], codebook,
                                  bool(fused_conv))
    return nxt if next_hw is not None else None


UPSAMPLE_ACCUMULATE_IMPLS = {"eager": _eager_upsample_accumulate, "triton": _op_upsample_accumulate,
                             "cuda": cuda_ext.upsample_accumulate}


def upsample_accumulate_(
    f_hat: torch.Tensor,
    codes: torch.Tensor,
    phi_weight: Optional[torch.Tensor] = None,
    phi_bias: Optional[torch.Tensor] = None,
    resi_ratio: float = 0.5,
    next_hw: Optional[Sequence[int]] = None,
    codebook: Optional[torch.Tensor] = None,
    validate: bool = True,
    fused_conv: bool = False,
) -> torch.Tensor:
    """The sampling step between two scales (official ``get_next_autoregressive_input``), **in place** on f_hat.

    ``u`` = the scale's code map, bicubic-upsampled to ``(H, W)`` unless it already has that size;
    ``f_hat += Phi(u)`` with ``Phi(u) = (1 - r) u + r (conv3x3(u) + bias)`` (identity without a weight);
    returns ``area_downsample(f_hat, next_hw)``, or ``f_hat`` itself when ``next_hw`` is None (last scale).

    Args:
        f_hat: ``(B, C, H, W)`` float32, contiguous; updated in place.
        codes: the scale's codes: a float32 map ``(B, C, h, w)`` (any strides; e.g. the ``more_smooth``
            soft codes), or int64 token indices ``(B, h, w)`` gathered from ``codebook`` on the fly.
        phi_weight, phi_bias: Phi's ``(C, C, 3, 3)`` weight and ``(C,)`` bias, or None (identity).
        resi_ratio: Phi's r.
        next_hw: the next scale's ``(h', w')``, or None at the last scale.
        codebook: ``(V, C)`` float32, with int64 ``codes``.
        validate: check that int64 ``codes`` are in ``[0, V)`` (``ValueError`` otherwise). On CUDA the check
            reads them back to the host, a synchronisation: ``validate=False`` skips it there (the sampler,
            whose tokens are in range by construction, does), and out-of-range codes are then undefined
            behaviour on every backend (eager's gather asserts on the device, the Triton and CUDA kernels read
            outside the codebook). Tensors on the host are always checked (no synchronisation to save). Skipped
            while a CUDA graph is captured.
        fused_conv: Triton backend only (the eager backend, the definition, ignores it, as does the eager
            fallback when gradients are needed): compute Phi's 3x3 convolution inside the step's kernel (two
            launches per scale: the step and the next scale's area downsample) instead of ``F.conv2d``
            between two kernels (three launches, and the eager path's bits); ``C <= 64``. Its float32 sums
            run in another order than cuDNN's / oneDNN's (a few ulp apart) and, on CUDA, in TF32 when
            ``torch.backends.cudnn.allow_tf32`` is set, as eager's conv does (read at each call; a captured
            CUDA graph keeps the choice it was captured with). Off by default until a GPU benchmark
            (``bench/bench_upsample.py``, provider ``fastvar-fused``) shows it pays.
    Returns:
        ``(B, C, h', w')`` float32 next-scale map, or ``f_hat``.
    """
    check_map("f_hat", f_hat)
    if not f_hat.is_contiguous():
        raise ValueError(f"f_hat must be contiguous (it is updated in place), got strides {f_hat.stride()}")
    B, C, H, W = f_hat.shape
    check_tensor("codes", codes, dtypes=(torch.float32, torch.int64))
    check_same(("f_hat", "codes"), (f_hat, codes), what="device")
    if codes.dtype == torch.int64:
        if codes.dim() != 3 or codes.shape[0] != B:
            raise ValueError(f"codes (int64 token indices) must have shape (B={B}, h, w), got {tuple(codes.shape)}")
        if codebook is None:
            raise ValueError("codebook is required when codes are int64 token indices")
        check_codebook(codebook, C, finite=False)
        check_same(("f_hat", "codebook"), (f_hat, codebook), what="device")
        if validate or codes.device.type != "cuda":     # on the host the check costs no synchronisation
            check_indices("codes", codes, codebook.shape[0])
    elif codes.dim() != 4 or codes.shape[0] != B or codes.shape[1] != C:
        raise ValueError(f"codes (a float32 code map) must have shape (B={B}, C={C}, h, w), got {tuple(codes.shape)}")
    r = check_phi("phi", phi_weight, phi_bias, resi_ratio, C, f_hat, "f_hat")
    nhw = None if next_hw is None else check_hw("next_hw", next_hw)
    if needs_grad(f_hat, codes, phi_weight, phi_bias, codebook):
        impl = _eager_upsample_accumulate
    else:
        impl = select("upsample_accumulate_", UPSAMPLE_ACCUMULATE_IMPLS, f_hat.device,
                      {"cuda": cuda_ext.step_unsupported(C, phi_weight is not None)})
    if fused_conv and C > 64 and impl is not _eager_upsample_accumulate:
        raise ValueError(f"fused_conv=True keeps all channels of f_hat in one tile: C <= 64, got C={C}")
    nxt = impl(f_hat, codes, phi_weight, phi_bias, r, nhw, codebook, fused_conv)
    return f_hat if nhw is None else nxt


# ------------------------------------------------------------------------ teacher-forcing input
def _triton_rq_var_input(idx_list, codebook, patch_hws, phis):
    S = len(patch_hws)
    if S == 1:
        return None
    B, C = idx_list[0].shape[0], codebook.shape[1]
    f_hat = torch.empty(B, C, *patch_hws[-1], dtype=torch.float32, device=codebook.device)
    L1 = sum(h * w for h, w in patch_hws[1:])
    x = torch.empty(B, L1, C, dtype=torch.float32, device=codebook.device)
    tok = 0
    for si in range(S - 1):
        (ph, pw), (nh, nw) = patch_hws[si], patch_hws[si + 1]
        nxt = x[:, tok:tok + nh * nw].view(B, nh, nw, C).permute(0, 3, 1, 2)     # the scale's rows of x
        # the eager path's code map is a channels-last view (embedding -> transpose -> reshape): same conv layout
        triton_step(f_hat, f_hat if si > 0 else None, idx_list[si].view(B, ph, pw), codebook, phis[si], (nh, nw),
                    torch.channels_last, next_out=nxt)
        tok += nh * nw
    return x


def _eager_rq_var_input(idx_list, codebook, patch_hws, phis):
    return ref.idx_to_var_input(idx_list, codebook, patch_hws, phis)


RQ_VAR_INPUT_IMPLS = {"eager": _eager_rq_var_input, "triton": _triton_rq_var_input}


def rq_var_input(idx_list: Sequence[torch.Tensor], codebook: torch.Tensor, patch_hws,
                 phis: Sequence[PhiParams], name: str = "idx_list") -> Optional[torch.Tensor]:
    """Teacher-forcing input from per-scale indices (official ``idxBl_to_var_input``).

    Args:
        idx_list: per scale, ``(B, h*w)`` int64 indices in ``[0, V)``.
        codebook: ``(V, C)`` float32.
        patch_hws: the schedule; phis: per scale, ``(weight, bias, resi_ratio)`` or None.
        name: what errors call ``idx_list`` (the caller's argument name).
    Returns:
        ``(B, L - first_l, C)`` float32: for scales 1 .. S-1, the area-downsampled f_hat after the
        previous scale, flattened row-major; None for a one-scale schedule.
    """
    hws = scale_hws(patch_hws, "patch_hws")
    check_codebook(codebook, finite=False)
    C, V = codebook.shape[1], codebook.shape[0]
    if not isinstance(idx_list, (list, tuple)) or len(idx_list) != len(hws):
        n = len(idx_list) if isinstance(idx_list, (list, tuple)) else type(idx_list).__name__
        raise ValueError(f"{name} must be a list of {len(hws)} index tensors (one per scale), got {n}")
    B = None
    for si, (idx, (h, w)) in enumerate(zip(idx_list, hws)):
        check_tensor(f"{name}[{si}]", idx, ndim=2, dtypes=(torch.int64,))
        B = idx.shape[0] if B is None else B
        if tuple(idx.shape) != (B, h * w):
            raise ValueError(f"{name}[{si}] must have shape (B={B}, {h * w}), got {tuple(idx.shape)}")
        check_same(("codebook", f"{name}[{si}]"), (codebook, idx), what="device")
        check_indices(f"{name}[{si}]", idx, V)
    phis = check_phis(phis, len(hws), C, codebook, "codebook")
    params = [t for p in phis if p is not None for t in p[:2]]
    if needs_grad(codebook, *params):
        return _eager_rq_var_input(idx_list, codebook, hws, phis)
    return select("rq_var_input", RQ_VAR_INPUT_IMPLS, codebook.device)(idx_list, codebook, hws, phis)


OPS = {
    "area_downsample": AREA_DOWNSAMPLE_IMPLS,
    "bicubic_upsample": BICUBIC_UPSAMPLE_IMPLS,
    "upsample_accumulate_": UPSAMPLE_ACCUMULATE_IMPLS,
    "rq_var_input": RQ_VAR_INPUT_IMPLS,
}
__all__ = ["area_downsample", "bicubic_upsample", "upsample_accumulate_", "rq_var_input"]
