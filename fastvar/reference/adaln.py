"""Eager definitions of VAR's adaptive LayerNorm steps (the official op order, so float32 results
match the official model to the bit).

Shapes: ``x``, ``y`` are ``(N, l, C)`` (batch, tokens, width); the per-sample modulation ``gamma``,
``scale``, ``shift`` is ``(N, 1, C)`` (one value per sample and channel, shared by its tokens).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def adaln_modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale) + shift`` (LayerNorm without affine, over the last dim)."""
    return F.layer_norm(x, x.shape[-1:], eps=eps).mul(scale.add(1)).add_(shift)


def gated_residual_adaln(x: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor, scale: Optional[torch.Tensor],
                         shift: Optional[torch.Tensor], eps: float) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The residual update of a block, then the next adaptive LayerNorm:
    ``x_new = x + y * gamma``; ``h = LayerNorm(x_new) * (1 + scale) + shift`` (None without ``scale``).
    Returns ``(x_new, h)``; ``x`` is not modified."""
    x_new = x + y.mul(gamma)
    h = None if scale is None else adaln_modulate(x_new, scale, shift, eps)
    return x_new, h
