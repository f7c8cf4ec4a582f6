"""Torch-side glue of fastvar's CUDA C++ extension ``fastvar._C`` (``csrc/``): argument checks, ``data_ptr()``,
strides and the current CUDA stream, for the kernels that take raw pointers.

Implementations registered in the ops' ``*_IMPLS`` dicts under ``"cuda"``, with the signatures of the
``"triton"`` ones:

- :func:`upsample_accumulate` (``UPSAMPLE_ACCUMULATE_IMPLS``, ``fastvar/ops/upsample.py``): the sampling step
  between scales, Phi's 3x3 convolution always computed inside the kernel from an upsampled tile held in
  shared memory (``fused_conv`` is accepted and ignored: there is no ``F.conv2d`` variant). Two launches per
  scale: the step and the next scale's area downsample (``next_hw == (1, 1)``: ATen's ``mean()``, from torch).
  Its float32 convolution sums in another order than cuDNN / oneDNN (and never in TF32): held to float64 with
  eager's error as the bound, like the Triton ``fused_conv`` path. C <= 64 with a convolution.
- :func:`sample` (``SAMPLE_IMPLS``, ``fastvar/ops/sampling.py``): CFG + top-k + top-p + the draw in exact mode
  (the caller's Exp(1) noise): the same tokens as the Triton kernel and eager (the caveats of
  ``fastvar/ops/sampling.py``). Not ``mode="fast"``, float64 logits or ``V > 16384``.

Inputs a kernel cannot take (:func:`step_unsupported`, :func:`sample_unsupported`) make the automatic choice skip
it, with one warning; a forced ``FASTVAR_BACKEND=cuda`` raises saying why.

Arguments arrive checked by the ops (``fastvar/ops/upsample.py``, ``sampling.py``), the same checks for every
backend: this glue adds none that reads values back (a synchronisation). So, as on the other backends, int64
codes outside ``[0, V)`` passed with ``validate=False`` on CUDA are undefined behaviour (the kernel reads outside
the codebook), and so is noise that is not positive and finite with ``validate=False``.

The automatic backend order does not pick these yet (``fastvar/ops/_backend.py``: ``CUDA_PREFERRED``);
``FASTVAR_BACKEND=cuda`` opts in. The CPU tests run the same functions on the extension's host build
(``tests/cuda_host.py``), passing that module as ``ext``.
"""
# No ``from __future__ import annotations``: torch.library reads the custom ops' annotations as types.
from typing import List, Optional, Tuple

import numpy as np
import torch

from fastvar.ops._backend import cuda_extension
from fastvar.ops._checks import capturing, raise_for_sample_errors

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MAX_STEP_C = 64          # csrc/fastvar_ext.h: a thread's output channels of Phi's conv live in registers


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _stream(t: torch.Tensor) -> int:
    """The current CUDA stream of ``t``'s device as an integer (0 for CPU tensors: the host build)."""
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def _fp32(x: float) -> float:
    return float(np.float32(x))


def _ext(ext):
    if ext is not None:
        return ext
    mod = cuda_extension()
    if mod is None:
        raise RuntimeError("the CUDA extension fastvar._C is not built (scripts/build_cuda.sh builds it)")
    return mod


# ------------------------------------------------------------------------ sampling step between scales
def step(f_hat: torch.Tensor, codes: torch.Tensor, phi_weight: Optional[torch.Tensor],
         phi_bias: Optional[torch.Tensor], resi_ratio: float, next_hw: Optional[Tuple[int, int]],
         codebook: Optional[torch.Tensor], ext=None, aten_cpu: bool = False) -> Optional[torch.Tensor]:
    """``f_hat += Phi(up(codes))`` in place; returns the next scale's ``(B, C, h', w')`` map, or None.

    Arguments as ``fastvar.ops.upsample_accumulate_`` takes them after its checks (f_hat contiguous float32;
    codes a float32 map or int64 indices with ``codebook``). ``ext``: the extension module (default
    ``fastvar._C``); ``aten_cpu``: the bicubic weights in ATen's CPU rounding (the host build's tests)."""
    mod = _ext(ext)
    B, C, H, W = f_hat.shape
    from_idx = codes.dtype == torch.int64
    h, w = codes.shape[1:] if from_idx else codes.shape[2:]
    weight = phi_weight.contiguous() if phi_weight is not None else None
    down = next_hw is not None and tuple(next_hw) != (1, 1)
    nxt = f_hat.new_empty(B, C, *next_hw) if down else None
    mod.upsample_accumulate_step(
        f_hat=f_hat.data_ptr(), f_shape=list(f_hat.shape), f_strides=list(f_hat.stride()),
        src=0 if from_idx else codes.data_ptr(), src_strides=[] if from_idx else list(codes.stride()),
        idx=codes.data_ptr() if from_idx else 0, idx_strides=list(codes.stride()) if from_idx else [],
        codebook=_ptr(codebook) if from_idx else 0,
        codebook_shape=list(codebook.shape) if from_idx else [], codebook_strides=list(codebook.stride()) if from_idx else [],
        code_hw=[int(h), int(w)],
        weight=_ptr(weight), weight_strides=list(weight.stride()) if weight is not None else [],
        bias=_ptr(phi_bias) if weight is not None else 0,
        bias_stride=phi_bias.stride(0) if phi_bias is not None else 0,
        one_minus_r=_fp32(1.0 - resi_ratio), r=_fp32(resi_ratio),
        next_out=_ptr(nxt), next_hw=list(next_hw) if down else [], next_strides=list(nxt.stride()) if down else [],
        aten_cpu=bool(aten_cpu), stream=_stream(f_hat))
    if next_hw is not None and not down:        # ATen computes the (1, 1) area with mean(): its reduction order
        from fastvar.reference.quantize import area_downsample
        return area_downsample(f_hat, (1, 1))
    return nxt


@torch.library.custom_op("fastvar::cuda_upsample_accumulate_", mutates_args=("f_hat",))
def _step_op(f_hat: torch.Tensor, codes: torch.Tensor, phi_weight: Optional[torch.Tensor],
             phi_bias: Optional[torch.Tensor], resi_ratio: float, next_hw: Optional[List[int]],
             codebook: Optional[torch.Tensor]) -> torch.Tensor:
    """The CUDA step as one graph node; returns the next map (empty without ``next_hw``)."""
    nxt = step(f_hat, codes, phi_weight, phi_bias, resi_ratio, next_hw, codebook)
    return nxt if nxt is not None else f_hat.new_empty(0)


@_step_op.register_fake
def _(f_hat, codes, phi_weight, phi_bias, resi_ratio, next_hw, codebook):
    if next_hw is None:
        return f_hat.new_empty(0)
    return f_hat.new_empty(f_hat.shape[0], f_hat.shape[1], int(next_hw[0]), int(next_hw[1]))


def step_unsupported(C: int, has_conv: bool) -> Optional[str]:
    """Why the CUDA step cannot take these inputs (the automatic backend choice then skips it), or None."""
    if has_conv and C > MAX_STEP_C:
        return f"C={C} > {MAX_STEP_C} (the CUDA step keeps a thread's output channels in registers)"
    return None


def upsample_accumulate(f_hat, codes, phi_weight, phi_bias, resi_ratio, next_hw, codebook, fused_conv=False):
    """``UPSAMPLE_ACCUMULATE_IMPLS["cuda"]``: the signature of the Triton implementation (``fused_conv``
    ignored: the convolution is always in the kernel)."""
    why = step_unsupported(f_hat.shape[1], phi_weight is not None)
    if why is not None:
        raise ValueError(f"the CUDA step cannot take these inputs: {why}; FASTVAR_BACKEND=triton can")
    nxt = _step_op(f_hat, codes, phi_weight, phi_bias, float(resi_ratio),
                   None if next_hw is None else [int(v) for v in next_hw], codebook)
    return nxt if next_hw is not None else None


# ---------------------------------------------------------------------------------------- sampling
MAX_SAMPLE_V = 16384     # csrc/fastvar_ext.h kMaxSampleV: the row lives in shared memory


def sample_exact(logits: torch.Tensor, n_cond: int, cfg_t: Optional[float], top_k: int, top_p: float,
                 noise: torch.Tensor, return_filtered: bool, ext=None
                 ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """One launch of the CUDA sampler: ``(tokens (rows,) int64, err (rows,) int32, filtered (rows, V) or
    None)`` for logits ``(N, l, V)`` (float32 / float16 / bfloat16, any strides) and the Exp(1) ``noise``
    ``(rows, V)`` (unit column stride). Errors per row are the Triton kernel's codes (1 NaN, 2 all -inf,
    4 +inf; token -1)."""
    mod = _ext(ext)
    N, l, V = logits.shape
    rows = n_cond * l
    dev = logits.device
    tokens = torch.empty(rows, dtype=torch.int64, device=dev)
    err = torch.empty(rows, dtype=torch.int32, device=dev)
    filtered = torch.empty(rows, V, dtype=torch.float32, device=dev) if return_filtered else None
    if rows == 0:
        return tokens, err, filtered
    if noise.stride(-1) != 1:
        noise = noise.contiguous()
    t = 0.0 if cfg_t is None else float(cfg_t)
    mod.sample_top_k_top_p(
        logits=logits.data_ptr(), dtype=_DTYPE_CODES[logits.dtype], logits_shape=list(logits.shape),
        logits_strides=list(logits.stride()), n_cond=int(n_cond), has_cfg=cfg_t is not None,
        cfg_a=_fp32(1.0 + t), cfg_t=_fp32(t), top_k=int(top_k), top_p_thr=_fp32(1.0 - top_p), has_top_p=top_p > 0,
        noise=noise.data_ptr(), noise_shape=list(noise.shape), noise_stride=noise.stride(0),
        tokens=tokens.data_ptr(), err=err.data_ptr(), filtered=_ptr(filtered), stream=_stream(logits))
    return tokens, err, filtered


@torch.library.custom_op("fastvar::cuda_sample_top_k_top_p", mutates_args=())
def _sample_op(logits: torch.Tensor, noise: torch.Tensor, n_cond: int, has_cfg: bool, cfg_t: float, top_k: int,
               top_p: float, return_filtered: bool, validate: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The CUDA sampler as one graph node: ``(tokens, filtered or (0, V))``; raises on bad rows when
    ``validate`` (not while a CUDA graph is captured)."""
    tokens, err, filtered = sample_exact(logits, n_cond, cfg_t if has_cfg else None, top_k, top_p, noise,
                                         return_filtered)
    if validate and not capturing(logits):
        raise_for_sample_errors(err, has_cfg)
    return tokens, (filtered if filtered is not None else logits.new_empty(0, logits.shape[-1], dtype=torch.float32))


@_sample_op.register_fake
def _(logits, noise, n_cond, has_cfg, cfg_t, top_k, top_p, return_filtered, validate):
    rows, V = n_cond * logits.shape[1], logits.shape[2]
    return (logits.new_empty(rows, dtype=torch.int64),
            logits.new_empty((rows if return_filtered else 0), V, dtype=torch.float32))


def sample_unsupported(logits: torch.Tensor, noise: Optional[torch.Tensor]) -> Optional[str]:
    """Why the CUDA sampler cannot take these inputs (the automatic backend choice then skips it), or None."""
    if noise is None:
        return "mode='fast' (the CUDA sampler implements the exact draw only)"
    if logits.dtype not in _DTYPE_CODES:
        return f"{logits.dtype} logits (the kernel reads float32, float16 and bfloat16)"
    if logits.shape[-1] > MAX_SAMPLE_V:
        return f"V={logits.shape[-1]} > {MAX_SAMPLE_V} (the row lives in shared memory)"
    return None


def sample(logits, n_cond, cfg_t, top_k, top_p, noise, seed_offset, return_filtered, validate):
    """``SAMPLE_IMPLS["cuda"]``: the signature of the Triton implementation (``fastvar/ops/sampling.py``)."""
    why = sample_unsupported(logits, noise)
    if why is not None:
        raise ValueError(f"the CUDA sampler cannot take these inputs: {why}; FASTVAR_BACKEND=triton can")
    tokens, filtered = _sample_op(logits, noise, n_cond, cfg_t is not None, 0.0 if cfg_t is None else float(cfg_t),
                                  top_k, top_p, return_filtered, validate)
    return tokens, (filtered if return_filtered else None)
