"""Residual-quantization ops: codebook lookup, the interpolations, the sampling step between scales, the
multi-scale encode and the teacher-forcing input (functional API, argument checks, backend choice).

See :mod:`fastvar.reference.quantize` for the definitions these ops reproduce, and
``fastvar.triton_kernels.rq_lookup`` / ``fastvar.triton_kernels.upsample`` for the kernels.

Backends: ``eager`` (the reference) and ``triton``. The Triton path reproduces the eager float32 bits
where the eager path's own arithmetic order is known: the lookup's distances (``zz + ee - 2 z.e`` with
the dot product in GEMM micro-kernel order), ``F.interpolate`` bicubic / area (ATen's rounding
sequence), Phi's ``(1-r) u + r conv(u)`` and the accumulations; the 3x3 convolution is ``F.conv2d`` on a
tensor of the same memory format as in the eager path, so it runs the same cuDNN / oneDNN algorithm.

Launches per scale, Triton path: sampling step (``upsample_accumulate_``): gather + bicubic upsample (1),
``F.conv2d`` (1), Phi + ``f_hat +=`` + area downsample of the next scale (1) (``tests/test_upsample.py::
test_sampling_step_launches_per_scale`` holds this). The conv reads the upsampled map and Phi reads the
conv's output, so with cuDNN's conv Triton work sits on both sides of it. ``fused_conv=True`` computes the
conv inside the step's kernel instead (``tl.dot`` per tap over a recomputed halo): the step (1) and the area
downsample (1), which needs the finished f_hat around each cell of the next scale, so a separate launch.
It gives up ``F.conv2d``'s bits (the sums run in another order; tested against float64 with eager's error
as the bound) and is off by default: which design is faster is for a GPU to say (``bench_quantizer.py``
times both; an estimate only, at B = 1, 256 px: the conv is 4.7 MFLOP of float32 spread over H*W/16 = 16
programs, against ~3 us per launch saved).

Encode (``rq_encode``): ``sum(z**2)`` (2 small torch launches, for the eager bits), lookup (1), upsample (1), conv (1),
Phi + ``f_rest -=`` (+ ``f_hat +=``) + next scale's ``z`` (1); the last scale of an index-only encode is
the lookup alone. The sampling-path ops are ``torch.library`` custom ops (``fastvar::rq_lookup``,
``fastvar::upsample_accumulate_``) with fake implementations, so ``torch.compile`` and CUDA graphs see
one node per call.

No autograd through the Triton path: when gradients are needed (grad mode on and an input that
requires grad), every op here runs the eager reference.
"""
# No ``from __future__ import annotations``: torch.library reads the custom ops' annotations as types.
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from fastvar.reference import quantize as ref
from fastvar.ops import cuda_ext
from fastvar.ops._backend import select
from fastvar.ops._checks import capturing as _capturing, check_finite_scalar, check_same, check_tensor
from fastvar.schedule import scale_hws

PhiParams = Optional[Tuple[torch.Tensor, Optional[torch.Tensor], float]]   # (weight, bias, resi_ratio) or None


# ------------------------------------------------------------------------------------------ checks
def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _check_codebook(codebook, C: Optional[int] = None, name: str = "codebook", finite: bool = True) -> None:
    check_tensor(name, codebook, ndim=2, dtypes=(torch.float32,))
    if codebook.shape[0] == 0:
        raise ValueError(f"{name} must have at least one row (V >= 1), got shape {tuple(codebook.shape)}")
    if C is not None and codebook.shape[1] != C:
        raise ValueError(f"{name} must have C={C} channels (shape (V, {C})), got shape {tuple(codebook.shape)}")
    if finite and not _capturing(codebook) and not bool(torch.isfinite(codebook).all()):
        raise ValueError(f"{name} must be finite; it holds NaN or inf")


def _check_indices(name: str, idx: torch.Tensor, V: int) -> None:
    if idx.numel() and not _capturing(idx):
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= V:
            raise ValueError(f"{name} must hold codebook indices in [0, {V}) (V={V}), got values in [{lo}, {hi}]")


def _check_hw(name: str, hw) -> Tuple[int, int]:
    try:
        h, w = (int(v) for v in hw)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair of positive ints (h, w), got {hw!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"{name} must be a pair of positive ints (h, w), got {hw!r}")
    return h, w


def _check_phi(name: str, weight, bias, resi_ratio, C: int, like: torch.Tensor, like_name: str = "f") -> float:
    if weight is not None:
        check_tensor(f"{name} weight", weight, ndim=4, dtypes=(torch.float32,), shape=(C, C, 3, 3))
        check_same((like_name, f"{name} weight"), (like, weight), what="device")
    if bias is not None:
        if weight is None:
            raise ValueError(f"{name}: a bias needs a weight (Phi is the identity without a weight)")
        check_tensor(f"{name} bias", bias, ndim=1, dtypes=(torch.float32,), shape=(C,))
        check_same((like_name, f"{name} bias"), (like, bias), what="device")
    return check_finite_scalar(f"{name} resi_ratio", resi_ratio)


def _check_phis(phis, S: int, C: int, like: torch.Tensor, like_name: str = "f") -> List[PhiParams]:
    if not isinstance(phis, (list, tuple)) or len(phis) != S:
        n = len(phis) if isinstance(phis, (list, tuple)) else type(phis).__name__
        raise ValueError(f"phis must be a list of {S} entries (one per scale: (weight, bias, resi_ratio) or None), "
                         f"got {n}")
    out = []
    for si, p in enumerate(phis):
        if p is None:
            out.append(None)
            continue
        if not isinstance(p, (list, tuple)) or len(p) != 3:
            raise ValueError(f"phis[{si}] must be (weight, bias, resi_ratio) or None, got {type(p).__name__}")
        r = _check_phi(f"phis[{si}]", p[0], p[1], p[2], C, like, like_name)
        out.append(None if p[0] is None else (p[0], p[1], r))
    return out


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    """The memory format ATen picks for an interpolation's output (``suggest_memory_format``)."""
    try:
        from torch._prims_common import suggest_memory_format
        return suggest_memory_format(t)
    except Exception:   # private helper moved: the same rule for 4-d tensors
        cl = t.is_contiguous(memory_format=torch.channels_last)
        return torch.channels_last if cl and not t.is_contiguous() else torch.contiguous_format


def _kernels():
    """``(rq_lookup, upsample)`` kernel modules, imported on first use (after ``TRITON_INTERPRET`` is set)."""
    from fastvar.triton_kernels import rq_lookup, upsample
    return rq_lookup, upsample


def _sqnorm(x: torch.Tensor) -> torch.Tensor:
    """``sum(x**2, 1)`` by the very torch call of the reference, so the float32 bits are the eager ones."""
    return torch.sum(x.square(), dim=1)


# ------------------------------------------------------------------------------------------ lookup
@torch.library.custom_op("fastvar::rq_lookup", mutates_args=())
def _rq_lookup_op(z: torch.Tensor, codebook: torch.Tensor, return_codes: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton lookup: ``(idx (N,) int64, codes (N, C))`` (codes empty without ``return_codes``)."""
    k_lookup, _ = _kernels()
    idx, codes = k_lookup.rq_lookup(z, codebook, _sqnorm(z), _sqnorm(codebook), return_codes=return_codes)
    return idx, (codes if codes is not None else z.new_empty(0))


@_rq_lookup_op.register_fake
def _(z, codebook, return_codes):
    N, C = z.shape
    return z.new_empty(N, dtype=torch.int64), (z.new_empty(N, C) if return_codes else z.new_empty(0))


def _eager_rq_lookup(z, codebook, return_codes):
    idx = ref.rq_lookup(z, codebook)
    return idx, (F.embedding(idx, codebook) if return_codes else None)


def _triton_rq_lookup(z, codebook, return_codes):
    idx, codes = _rq_lookup_op(z, codebook, bool(return_codes))
    return idx, (codes if return_codes else None)


RQ_LOOKUP_IMPLS = {"eager": _eager_rq_lookup, "triton": _triton_rq_lookup}


def rq_lookup(z: torch.Tensor, codebook: torch.Tensor, return_codes: bool = False
              ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Nearest codebook entry of every row.

    Args:
        z: ``(N, C)`` float32, finite, any strides.
        codebook: ``(V, C)`` float32, finite, ``V >= 1``.
        return_codes: also return the chosen code vectors ``codebook[idx]``.
    Returns:
        ``idx`` ``(N,)`` int64 = ``argmin_v ||z||^2 + ||e_v||^2 - 2 z.e_v`` in float32, ties to the lowest
        index; with ``return_codes``, ``(idx, codes)`` with codes ``(N, C)``.

    Exactness of the Triton path: the float32 distances are those of the eager formula when the eager
    GEMM accumulates ``z.e`` in channel order with FMAs (MKL / cuBLAS ``sgemm`` do for ``N >= 2``;
    single-row GEMVs may use another order), so the indices are identical, exact ties included; a
    differently ordered eager dot product can only differ on rows whose two best distances are within
    a few float32 ulps of each other (see ``tests/test_rq_lookup.py`` for the measured rates).
    """
    check_tensor("z", z, ndim=2, dtypes=(torch.float32,))
    _check_codebook(codebook, z.shape[1])
    check_same(("z", "codebook"), (z, codebook), what="device")
    if not _capturing(z) and not bool(torch.isfinite(z).all()):
        raise ValueError("z must be finite; it holds NaN or inf")
    impl = RQ_LOOKUP_IMPLS["eager"] if _needs_grad(z, codebook) or z.shape[0] == 0 else \
        select("rq_lookup", RQ_LOOKUP_IMPLS, z.device)
    idx, codes = impl(z, codebook, return_codes)
    return (idx, codes) if return_codes else idx


# ---------------------------------------------------------------------------------- interpolations
def _triton_area_downsample(x, size):
    if tuple(size) == (1, 1):        # ATen computes this case with mean(): its reduction order
        return ref.area_downsample(x, size)
    out = torch.empty(x.shape[0], x.shape[1], *size, dtype=x.dtype, device=x.device,
                      memory_format=_memory_format(x))
    return _kernels()[1].area_downsample(x, size, out=out)


def _triton_bicubic_upsample(x, size):
    out = torch.empty(x.shape[0], x.shape[1], *size, dtype=x.dtype, device=x.device,
                      memory_format=_memory_format(x))
    return _kernels()[1].bicubic_upsample(x, size, out=out)


AREA_DOWNSAMPLE_IMPLS = {"eager": ref.area_downsample, "triton": _triton_area_downsample}
BICUBIC_UPSAMPLE_IMPLS = {"eager": ref.bicubic_upsample, "triton": _triton_bicubic_upsample}


def _check_map(name: str, x) -> None:
    check_tensor(name, x, ndim=4, dtypes=(torch.float32,))
    if x.numel() == 0:
        raise ValueError(f"{name} must be a non-empty (B, C, H, W) tensor, got shape {tuple(x.shape)}")


def area_downsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``F.interpolate(x, size, mode='area')`` (adaptive average pooling), bit for bit.

    Args:
        x: ``(B, C, H, W)`` float32, any strides; size: ``(h, w)``.
    Returns:
        ``(B, C, h, w)`` float32 in the memory format ATen would choose.
    """
    _check_map("x", x)
    size = _check_hw("size", size)
    impl = ref.area_downsample if _needs_grad(x) else select("area_downsample", AREA_DOWNSAMPLE_IMPLS, x.device)
    return impl(x, size)


def bicubic_upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``F.interpolate(x, size, mode='bicubic', align_corners=False)`` (a = -0.75, border taps clamped).

    Args:
        x: ``(B, C, h, w)`` float32, any strides; size: ``(H, W)`` (any size, up or down).
    Returns:
        ``(B, C, H, W)`` float32 in the memory format ATen would choose.
    """
    _check_map("x", x)
    size = _check_hw("size", size)
    impl = ref.bicubic_upsample if _needs_grad(x) else select("bicubic_upsample", BICUBIC_UPSAMPLE_IMPLS, x.device)
    return impl(x, size)


# ------------------------------------------------------------------ sampling step between scales
def _upsampled_codes(codes: torch.Tensor, codebook: Optional[torch.Tensor], H: int, W: int,
                     memory_format: torch.memory_format) -> torch.Tensor:
    """``u`` = the scale's code map brought to ``(H, W)``: gathered from indices and/or bicubic-upsampled."""
    _, k_up = _kernels()
    B = codes.shape[0]
    if codes.dtype == torch.int64:
        C = codebook.shape[1]
        out = torch.empty(B, C, H, W, dtype=torch.float32, device=codes.device, memory_format=memory_format)
        return k_up.bicubic_upsample(None, (H, W), idx=codes, codebook=codebook, out=out)
    if tuple(codes.shape[-2:]) == (H, W):
        return codes
    out = torch.empty(B, codes.shape[1], H, W, dtype=torch.float32, device=codes.device, memory_format=memory_format)
    return k_up.bicubic_upsample(codes, (H, W), out=out)


_TOKEN_MAP_FORMATS: dict = {}


def _token_map_format(B: int, C: int, h: int, w: int) -> torch.memory_format:
    """The memory format of ``ref.code_map``'s view for ``B`` maps of ``(h, w)`` tokens, worked out once per
    shape on meta tensors (it ran every scale before: ~4 host-side dispatches per step for a constant)."""
    key = (B, C, h, w)
    if key not in _TOKEN_MAP_FORMATS:
        meta_map = ref.code_map(torch.zeros(B, h * w, dtype=torch.long, device="meta"),
                                torch.empty(1, C, device="meta"), h, w)
        _TOKEN_MAP_FORMATS[key] = _memory_format(meta_map)
    return _TOKEN_MAP_FORMATS[key]


def _triton_upsample_accumulate(f_hat, codes, phi_weight, phi_bias, resi_ratio, next_hw, codebook,
                                fused_conv=False):
    _, k_up = _kernels()
    B, C, H, W = f_hat.shape
    if fused_conv:
        from_idx = codes.dtype == torch.int64
        # the convolution at eager's precision: cuDNN runs float32 convs in TF32 under this flag (default on)
        tf32 = f_hat.is_cuda and torch.backends.cudnn.allow_tf32
        k_up.upsample_phi_accumulate(f_hat, None if from_idx else codes, phi_weight, phi_bias, resi_ratio,
                                     idx=codes if from_idx else None, codebook=codebook if from_idx else None,
                                     dot_precision="tf32" if tf32 else "ieee")
        return None if next_hw is None else _triton_area_downsample(f_hat, tuple(next_hw))
    # the eager path's conv input has the layout of its code map
    fmt = _token_map_format(B, C, *codes.shape[1:]) if codes.dtype == torch.int64 else _memory_format(codes)
    u = _upsampled_codes(codes, codebook, H, W, fmt)
    cv = F.conv2d(u, phi_weight, phi_bias, stride=1, padding=1) if phi_weight is not None else None
    down = next_hw is not None and tuple(next_hw) != (1, 1)
    nxt = f_hat.new_empty(B, C, *next_hw) if down else None
    k_up.phi_accumulate(u, cv, resi_ratio, f_out=f_hat, f_in=f_hat, next_size=tuple(next_hw) if down else None,
                        next_out=nxt)
    if next_hw is not None and not down:
        nxt = ref.area_downsample(f_hat, (1, 1))
    return nxt


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
    nxt = ref.upsample_accumulate_step(f_hat, codes, phi_weight, phi_bias, resi_ratio, next_hw, codebook)
    return nxt if next_hw is not None else None


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
        validate: check that int64 ``codes`` are in ``[0, V)`` (reads them back to the host: a
            synchronisation on CUDA; skipped anyway during CUDA-graph capture). The sampler, whose
            tokens are in range by construction, passes False.
        fused_conv: Triton backend only (the eager backend, the definition, ignores it, as does the eager
            fallback when gradients are needed): compute Phi's 3x3 convolution inside the step's kernel (two
            launches per scale: the step and the next scale's area downsample) instead of ``F.conv2d``
            between two kernels (three launches, and the eager path's bits); ``C <= 64``. Its float32 sums
            run in another order than cuDNN's / oneDNN's (a few ulp apart) and, on CUDA, in TF32 when
            ``torch.backends.cudnn.allow_tf32`` is set, as eager's conv does (read at each call; a captured
            CUDA graph keeps the choice it was captured with). Off by default until a GPU benchmark
            (``bench/bench_quantizer.py``, provider ``fastvar-fused``) shows it pays.
    Returns:
        ``(B, C, h', w')`` float32 next-scale map, or ``f_hat``.
    """
    _check_map("f_hat", f_hat)
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
        _check_codebook(codebook, C, finite=False)
        check_same(("f_hat", "codebook"), (f_hat, codebook), what="device")
        if validate:
            _check_indices("codes", codes, codebook.shape[0])
    elif codes.dim() != 4 or codes.shape[0] != B or codes.shape[1] != C:
        raise ValueError(f"codes (a float32 code map) must have shape (B={B}, C={C}, h, w), got {tuple(codes.shape)}")
    r = _check_phi("phi", phi_weight, phi_bias, resi_ratio, C, f_hat, "f_hat")
    nhw = None if next_hw is None else _check_hw("next_hw", next_hw)
    if _needs_grad(f_hat, codes, phi_weight, phi_bias, codebook):
        impl = _eager_upsample_accumulate
    else:
        impl = select("upsample_accumulate_", UPSAMPLE_ACCUMULATE_IMPLS, f_hat.device)
    if fused_conv and C > 64 and impl is not _eager_upsample_accumulate:
        raise ValueError(f"fused_conv=True keeps all channels of f_hat in one tile: C <= 64, got C={C}")
    nxt = impl(f_hat, codes, phi_weight, phi_bias, r, nhw, codebook, fused_conv)
    return f_hat if nhw is None else nxt


# ------------------------------------------------------------------------- multi-scale encode
def _z_rows(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` -> ``(B*h*w, C)`` contiguous, as the reference's ``permute(0, 2, 3, 1).reshape``."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _triton_rq_encode(f, codebook, patch_hws, phis, to_fhat):
    k_lookup, k_up = _kernels()
    B, C, H, W = f.shape
    S = len(patch_hws)
    f_rest = f.detach().clone(memory_format=torch.contiguous_format)
    codebook_t, ee = codebook.t().contiguous(), _sqnorm(codebook)
    fh_all = torch.empty(S, B, C, H, W, dtype=torch.float32, device=f.device) if to_fhat else None
    ph, pw = patch_hws[0]
    z = f_rest if S == 1 else _triton_area_downsample(f_rest, (ph, pw))
    z = _z_rows(z)
    out: List[torch.Tensor] = []
    for si, (ph, pw) in enumerate(patch_hws):
        last = si == S - 1
        idx, _ = k_lookup.rq_lookup(z, codebook, _sqnorm(z), ee, codebook_t=codebook_t)
        if not to_fhat:
            out.append(idx.view(B, ph * pw))
            if last:
                break
        u = k_up.bicubic_upsample(None, (H, W), idx=idx.view(B, ph, pw), codebook=codebook)
        p = phis[si]
        cv = F.conv2d(u, p[0], p[1], stride=1, padding=1) if p is not None else None
        r = p[2] if p is not None else 0.0
        f_out = fh_all[si] if to_fhat else None
        f_in = fh_all[si - 1] if to_fhat and si > 0 else None
        if last:
            k_up.phi_accumulate(u, cv, r, f_out=f_out, f_in=f_in)
            break
        nh, nw = patch_hws[si + 1]
        if (nh, nw) == (1, 1):
            k_up.phi_accumulate(u, cv, r, f_out=f_out, f_in=f_in, f_rest=f_rest)
            z = _z_rows(ref.area_downsample(f_rest, (1, 1)))
        else:
            z = torch.empty(B * nh * nw, C, dtype=torch.float32, device=f.device)
            k_up.phi_accumulate(u, cv, r, f_out=f_out, f_in=f_in, f_rest=f_rest, next_size=(nh, nw), next_out=z,
                                next_strides=(nh * nw * C, 1, nw * C, C))
    return list(fh_all.unbind(0)) if to_fhat else out


def _eager_rq_encode(f, codebook, patch_hws, phis, to_fhat):
    return ref.encode_multiscale(f, codebook, patch_hws, ref.phi_fn_from_params(phis), to_fhat)


RQ_ENCODE_IMPLS = {"eager": _eager_rq_encode, "triton": _triton_rq_encode}


def rq_encode(f: torch.Tensor, codebook: torch.Tensor, patch_hws, phis: Sequence[PhiParams],
              to_fhat: bool = False) -> List[torch.Tensor]:
    """Multi-scale residual quantization of a latent (official ``f_to_idxBl_or_fhat``).

    Args:
        f: ``(B, C, H, W)`` float32, finite; ``(H, W)`` must be the last scale.
        codebook: ``(V, C)`` float32.
        patch_hws: the schedule (ints or ``(h, w)`` pairs).
        phis: per scale, Phi's ``(weight, bias, resi_ratio)`` or None (identity).
        to_fhat: return f_hat after every scale instead of the indices.
    Returns:
        per scale, ``(B, h*w)`` int64 indices, or the ``(B, C, H, W)`` f_hat after that scale.
    """
    _check_map("f", f)
    hws = scale_hws(patch_hws, "patch_hws")
    B, C, H, W = f.shape
    if tuple(hws[-1]) != (H, W):
        raise ValueError(f"the last scale of patch_hws {tuple(hws[-1])} must equal the latent size (H, W) = {(H, W)}")
    _check_codebook(codebook, C)
    check_same(("f", "codebook"), (f, codebook), what="device")
    if not _capturing(f) and not bool(torch.isfinite(f).all()):
        raise ValueError("f must be finite; it holds NaN or inf")
    phis = _check_phis(phis, len(hws), C, f)
    params = [t for p in phis if p is not None for t in p[:2]]
    if _needs_grad(f, codebook, *params):
        return _eager_rq_encode(f, codebook, hws, phis, to_fhat)
    return select("rq_encode", RQ_ENCODE_IMPLS, f.device)(f, codebook, hws, phis, bool(to_fhat))


# ------------------------------------------------------------------------ teacher-forcing input
def _triton_rq_var_input(idx_list, codebook, patch_hws, phis):
    _, k_up = _kernels()
    S = len(patch_hws)
    if S == 1:
        return None
    B = idx_list[0].shape[0]
    C = codebook.shape[1]
    H, W = patch_hws[-1]
    f_hat = torch.empty(B, C, H, W, dtype=torch.float32, device=codebook.device)
    L1 = sum(h * w for h, w in patch_hws[1:])
    x = torch.empty(B, L1, C, dtype=torch.float32, device=codebook.device)
    tok = 0
    for si in range(S - 1):
        ph, pw = patch_hws[si]
        nh, nw = patch_hws[si + 1]
        # the eager path's code map is a channels-last view (embedding -> transpose -> reshape): same conv layout
        u = torch.empty(B, C, H, W, dtype=torch.float32, device=codebook.device, memory_format=torch.channels_last)
        k_up.bicubic_upsample(None, (H, W), idx=idx_list[si].view(B, ph, pw), codebook=codebook, out=u)
        p = phis[si]
        cv = F.conv2d(u, p[0], p[1], stride=1, padding=1) if p is not None else None
        f_in = f_hat if si > 0 else None
        if (nh, nw) == (1, 1):
            k_up.phi_accumulate(u, cv, p[2] if p is not None else 0.0, f_out=f_hat, f_in=f_in)
            x[:, tok:tok + 1] = ref.area_downsample(f_hat, (1, 1)).view(B, 1, C)
        else:
            k_up.phi_accumulate(u, cv, p[2] if p is not None else 0.0, f_out=f_hat, f_in=f_in, next_size=(nh, nw),
                                next_out=x, next_offset=tok * C, next_strides=(L1 * C, 1, nw * C, C))
        tok += nh * nw
    return x


def _eager_rq_var_input(idx_list, codebook, patch_hws, phis):
    return ref.idx_to_var_input(idx_list, codebook, patch_hws, ref.phi_fn_from_params(phis))


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
    _check_codebook(codebook, finite=False)
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
        _check_indices(f"{name}[{si}]", idx, V)
    phis = _check_phis(phis, len(hws), C, codebook, "codebook")
    params = [t for p in phis if p is not None for t in p[:2]]
    if _needs_grad(codebook, *params):
        return _eager_rq_var_input(idx_list, codebook, hws, phis)
    return select("rq_var_input", RQ_VAR_INPUT_IMPLS, codebook.device)(idx_list, codebook, hws, phis)


# Implementations by backend, per op: `fastvar info` reports them and the tests sweep them.
OPS = {
    "rq_lookup": RQ_LOOKUP_IMPLS,
    "area_downsample": AREA_DOWNSAMPLE_IMPLS,
    "bicubic_upsample": BICUBIC_UPSAMPLE_IMPLS,
    "upsample_accumulate_": UPSAMPLE_ACCUMULATE_IMPLS,
    "rq_encode": RQ_ENCODE_IMPLS,
    "rq_var_input": RQ_VAR_INPUT_IMPLS,
}
__all__ = ["rq_lookup", "area_downsample", "bicubic_upsample", "upsample_accumulate_", "rq_encode", "rq_var_input"]
