"""Argument checks shared by the ops: each error names the argument, what was expected and what came."""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch


def check_tensor(name: str, t, ndim: Optional[int] = None, dtypes: Optional[Iterable[torch.dtype]] = None,
                 shape: Optional[Sequence[Optional[int]]] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if shape is not None:
        if len(shape) != t.dim() or any(s is not None and s != a for s, a in zip(shape, t.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")


def check_same(names: Sequence[str], tensors: Sequence[torch.Tensor], what: str = "dtype,device") -> None:
    first_name, first = names[0], tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if "dtype" in what and t.dtype != first.dtype:
            raise TypeError(f"{name} must have the dtype of {first_name} ({first.dtype}), got {t.dtype}")
        if "device" in what and t.device != first.device:
            raise ValueError(f"{name} must be on the device of {first_name} ({first.device}), got {t.device}")


def check_scale_lens(scale_lens, L: int, name: str = "scale_lens") -> tuple:
    try:
        lens = tuple(int(n) for n in scale_lens)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of ints, got {scale_lens!r}") from None
    if any(n != m for n, m in zip(scale_lens, lens)):      # 2.5 is not a token count, nor is it 2
        raise TypeError(f"{name} must hold whole token counts, got {list(scale_lens)}")
    if not lens or any(n < 1 for n in lens):
        raise ValueError(f"{name} must be a non-empty sequence of positive token counts, got {list(lens)}")
    if sum(lens) != L:
        raise ValueError(f"sum({name}) must equal the sequence length L={L}, got sum={sum(lens)} for {list(lens)}")
    return lens


def check_finite_scalar(name: str, x, low: Optional[float] = None, high: Optional[float] = None) -> float:
    try:
        x = float(x)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {x!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    if (low is not None and x < low) or (high is not None and x > high):
        raise ValueError(f"{name} must be in [{low}, {high}], got {x}")
    return x


def capturing(t: torch.Tensor) -> bool:
    """True while torch.compile traces or a CUDA graph captures work on ``t``'s device: checks that read
    values back to the host (a synchronisation) must be skipped then."""
    if torch.compiler.is_compiling():
        return True
    return t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
