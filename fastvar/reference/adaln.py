"""Eager definitions of VAR's adaptive LayerNorm steps (the official op order, so float32 results
match the official model to the bit).

Shapes: ``x``, ``y`` are ``(N, l, C)`` (batch, tokens, width); the per-sample modulation ``gamma``,
``scale``, ``shift`` is ``(N, 1, C)`` (one value per sample and channel, shared by its tokens).

Dtypes: the residual stream ``x`` may be float32 while ``y`` and the modulation are in the compute
dtype (bf16/fp16), as under the official ``torch.autocast`` sampling: the sums promote to float32 and
``h``, the input of the next matmul, comes back in the compute dtype.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def adaln_modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale) + shift`` (LayerNorm without affine, over the last dim), in the dtype
    of ``scale``."""
    return F.layer_norm(x, x.shape[-1:], eps=eps).mul(scale.add(1)).add_(shift).to(scale.dtype)


def gated_residual_adaln(x: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor, scale: Optional[torch.Tensor],
                         shift: Optional[torch.Tensor], eps: float) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The residual update of a block, then the next adaptive LayerNorm:
    ``x_new = x + y * gamma`` (dtype of ``x``); ``h = LayerNorm(x_new) * (1 + scale) + shift`` (dtype of
    ``scale``; None without ``scale``). Returns ``(x_new, h)``; ``x`` is not modified."""
    x_new = (x + y.mul(gamma)).to(x.dtype)
    h = None if scale is None else adaln_modulate(x_new, scale, shift, eps)
    return x_new, h
