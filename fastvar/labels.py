"""Class labels of VAR's sampling, with the official conventions and clear errors."""
from __future__ import annotations

import numbers
from typing import Optional

import torch


def check_labels(labels, num_classes: int, name: str = "label_B", B: Optional[int] = None,
                 device=None) -> torch.Tensor:
    """A ``(B,)`` int64 tensor of class ids in ``[0, num_classes]`` (``num_classes`` = no class), on ``device``."""
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point() \
            or labels.is_complex() or labels.dtype == torch.bool:
        what = f"{labels.dtype} tensor of shape {tuple(labels.shape)}" if isinstance(labels, torch.Tensor) \
            else type(labels).__name__
        raise TypeError(f"{name} must be a 1-D integer tensor of class ids, got {what}")
    if B is not None and labels.shape[0] != B:
        raise ValueError(f"{name} must hold B={B} labels, got {labels.shape[0]}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > num_classes):
        raise ValueError(f"{name} must be class ids in [0, {num_classes}] ({num_classes} = no class), "
                         f"got values in [{int(labels.min())}, {int(labels.max())}]")
    return labels.to(device=device, dtype=torch.long)


def sampling_labels(B: int, labels, num_classes: int, rng: Optional[torch.Generator], device,
                    name: str = "label_B") -> torch.Tensor:
    """The official ``label_B`` conventions of ``autoregressive_infer_cfg``: None -> ``B`` classes drawn
    uniformly (with replacement) from ``rng``; an int -> all ``B`` the same (negative -> no class); a
    tensor -> checked as it is."""
    if isinstance(B, bool) or not isinstance(B, int) or B < 1:
        raise ValueError(f"B must be a positive int (images to sample), got {B!r}")
    if isinstance(labels, torch.Tensor) and labels.dim() == 0 and not labels.is_floating_point() \
            and labels.dtype != torch.bool:
        labels = int(labels)                     # a 0-d tensor is one class id, like an int
    elif isinstance(labels, numbers.Integral) and not isinstance(labels, bool):
        labels = int(labels)                     # numpy integers too
    if labels is None:
        uniform = torch.full((1, num_classes), 1.0 / num_classes, device=device)
        return torch.multinomial(uniform, num_samples=B, replacement=True, generator=rng).reshape(B)
    if isinstance(labels, (list, tuple)):
        labels = torch.as_tensor(labels, dtype=torch.long)
    if isinstance(labels, bool) or not isinstance(labels, (int, torch.Tensor)):
        raise TypeError(f"{name} must be None, an int or a tensor of class ids, got {labels!r}")
    if isinstance(labels, int):
        if labels > num_classes:
            raise ValueError(f"{name} must be a class id in [0, {num_classes}] or negative (no class), got {labels}")
        return torch.full((B,), num_classes if labels < 0 else labels, device=device, dtype=torch.long)
    return check_labels(labels, num_classes, name, B, device)
