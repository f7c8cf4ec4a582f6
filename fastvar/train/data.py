"""scikit-learn's 8x8 handwritten digits as VAR training images, and the way back to 8x8 for checks.

- :func:`load_digit_images`: the 1,797 images ``(N, 8, 8)`` with values 0..16 and labels 0..9,
  upsampled to ``(N, 3, S, S)`` in [-1, 1] (the grey value repeated over RGB, ink bright).
- :func:`shift_images`: the training augmentation, whole-pixel shifts with zero (background) fill.
- :func:`to_digits_8x8`: generated ``(B, 3, S, S)`` images in [0, 1] (what ``VAR.autoregressive_infer_cfg``
  returns) -> ``(B, 64)`` features on the 0..16 scale of the raw data, for a classifier trained on it.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

NUM_CLASSES = 10
CLASS_NAMES = tuple(str(d) for d in range(NUM_CLASSES))
RAW_SIZE = 8
RAW_MAX = 16.0
RESAMPLE_MODES = ("bilinear", "bicubic", "nearest")


def load_raw_digits() -> Tuple[np.ndarray, np.ndarray]:
    """``(images (1797, 8, 8) float64 in [0, 16], labels (1797,) int64)`` from scikit-learn (bundled with
    it: no download)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:   # scikit-learn is the `train` / `test` extra
        raise ImportError("the digits data set comes from scikit-learn: pip install scikit-learn "
                          "(or pip install fastvar[train])") from e
    d = load_digits()
    return d.images.astype(np.float64), d.target.astype(np.int64)


def upsample(images_8x8: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """``(N, 8, 8)`` values 0..16 -> ``(N, 3, size, size)`` float32 in [-1, 1]."""
    if mode not in RESAMPLE_MODES:
        raise ValueError(f"mode must be one of {RESAMPLE_MODES}, got {mode!r}")
    if not isinstance(size, int) or size < RAW_SIZE:
        raise ValueError(f"size must be an int >= {RAW_SIZE}, got {size!r}")
    x = images_8x8.float().unsqueeze(1).div(RAW_MAX / 2).sub(1)          # [-1, 1]
    kw = {} if mode == "nearest" else dict(align_corners=False)
    x = F.interpolate(x, size=(size, size), mode=mode, **kw).clamp_(-1, 1)
    return x.expand(-1, 3, -1, -1).contiguous()


def load_digit_images(size: int = 16, mode: str = "bilinear") -> Tuple[torch.Tensor, torch.Tensor]:
    """The whole data set as ``(images (1797, 3, size, size) float32 in [-1, 1], labels (1797,) int64)``."""
    raw, labels = load_raw_digits()
    return upsample(torch.from_numpy(raw), size, mode), torch.from_numpy(labels)


def shift_images(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift every image of ``x`` ``(B, C, H, W)`` by its own whole-pixel offset in
    ``[-max_shift, max_shift]`` along each axis (drawn from ``generator``), filling with -1 (background)."""
    if max_shift <= 0:
        return x
    B, C, H, W = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), value=-1.0)
    d = torch.randint(0, 2 * p + 1, (B, 2), generator=generator)
    rows = (torch.arange(H)[None, :] + d[:, :1])                          # (B, H)
    cols = (torch.arange(W)[None, :] + d[:, 1:])                          # (B, W)
    b = torch.arange(B)[:, None, None, None]
    c = torch.arange(C)[None, :, None, None]
    return padded[b, c, rows[:, None, :, None], cols[:, None, None, :]]


def to_digits_8x8(images: torch.Tensor) -> torch.Tensor:
    """Generated images ``(B, 3 or 1, S, S)`` in [0, 1] -> ``(B, 64)`` float64 on the raw 0..16 scale:
    the channel mean, area-downsampled to 8x8 (``S`` a multiple of 8)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, 1 or 3, S, S) tensor in [0, 1], got {shape}")
    if images.shape[-1] % RAW_SIZE or images.shape[-2] != images.shape[-1]:
        raise ValueError(f"images must be square with a side multiple of {RAW_SIZE}, got {tuple(images.shape[-2:])}")
    g = images.detach().float().cpu().mean(dim=1, keepdim=True)
    g = F.interpolate(g, size=(RAW_SIZE, RAW_SIZE), mode="area")
    return g.reshape(g.shape[0], -1).double().mul(RAW_MAX).clamp(0, RAW_MAX)
