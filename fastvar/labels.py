"""Class labels of VAR's sampling, with the official conventions and clear errors.

One rule for every form a label comes in (a Python int, a numpy integer, a 0-d or 1-D tensor or numpy array,
a list or tuple of any of these): class ids are integers. Floats (even ``3.0``), bools and complex numbers are
refused with a ``TypeError`` naming the argument and the offending value, never truncated (``[10.5]`` is not
class 10, nor the no-class id). This module is the one place that reads labels.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    dtype = getattr(x, "dtype", None)
    if dtype is not None and hasattr(x, "shape"):         # numpy arrays and scalars
        return f"a {type(x).__module__}.{type(x).__name__} of dtype {dtype}" + (
            f" and shape {tuple(x.shape)}" if getattr(x, "ndim", 0) else f" ({x!r})")
    return f"{x!r} ({type(x).__name__})"


def _tensor_is_integer(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def int_scalar(x) -> Optional[int]:
    """``x`` as a Python int if it is one integer (int, numpy integer, 0-d integer tensor or array), else None.
    Bools are not integers here: ``True`` is not class 1."""
    if isinstance(x, bool) or type(x).__name__ == "bool_":
        return None
    if isinstance(x, numbers.Integral):          # int and the numpy integer types
        return int(x)
    if isinstance(x, torch.Tensor):
        return int(x) if x.dim() == 0 and _tensor_is_integer(x) else None
    if hasattr(x, "__array__") and getattr(x, "ndim", None) == 0:     # a 0-d numpy array or numpy scalar
        return int(x) if getattr(getattr(x, "dtype", None), "kind", "") in ("i", "u") else None
    return None


def as_label_tensor(labels, name: str = "label_B") -> torch.Tensor:
    """A 1-D sequence of class ids (list, tuple, 1-D tensor or numpy array) as a 1-D integer tensor (a tensor
    keeps its device). ``TypeError`` naming ``name`` for anything that is not integers."""
    if isinstance(labels, torch.Tensor):
        if labels.dim() != 1 or not _tensor_is_integer(labels):
            raise TypeError(f"{name} must be a 1-D integer tensor of class ids, got {_describe(labels)}")
        return labels
    if hasattr(labels, "__array__") and not isinstance(labels, (list, tuple)):     # numpy arrays
        arr = labels
        if getattr(arr, "ndim", None) != 1 or getattr(arr.dtype, "kind", "") not in "iu":
            raise TypeError(f"{name} must be class ids (integers), got {_describe(arr)}")
        return torch.as_tensor(arr.astype("int64"))
    if isinstance(labels, (list, tuple)):
        ids = []
        for i, x in enumerate(labels):
            v = int_scalar(x)
            if v is None:
                raise TypeError(f"{name} must be class ids (integers), got {_describe(x)} at {name}[{i}]")
            ids.append(v)
        return torch.tensor(ids, dtype=torch.long)
    raise TypeError(f"{name} must be a sequence of class ids (list, tuple, 1-D tensor or array), got {_describe(labels)}")


def check_labels(labels, num_classes: int, name: str = "label_B", B: Optional[int] = None,
                 device=None) -> torch.Tensor:
    """A ``(B,)`` int64 tensor of class ids in ``[0, num_classes]`` (``num_classes`` = no class), on ``device``,
    from any 1-D form (see :func:`as_label_tensor`)."""
    labels = as_label_tensor(labels, name)
    if B is not None and labels.shape[0] != B:
        raise ValueError(f"{name} must hold B={B} labels, got {labels.shape[0]}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > num_classes):
        raise ValueError(f"{name} must be class ids in [0, {num_classes}] ({num_classes} = no class), "
                         f"got values in [{int(labels.min())}, {int(labels.max())}]")
    return labels.to(device=device, dtype=torch.long)


def batch_size_of(labels) -> int:
    """How many images ``labels`` asks for when no ``B`` is given: its length for a sequence, else 1."""
    if isinstance(labels, (list, tuple)):
        return len(labels)
    ndim = labels.dim() if isinstance(labels, torch.Tensor) else getattr(labels, "ndim", 0)
    return int(labels.shape[0]) if isinstance(ndim, int) and ndim >= 1 else 1


def sampling_labels(B: int, labels, num_classes: int, rng: Optional[torch.Generator], device,
                    name: str = "label_B") -> torch.Tensor:
    """The official ``label_B`` conventions of ``autoregressive_infer_cfg``: None -> ``B`` classes drawn
    uniformly (with replacement) from ``rng``; one integer -> all ``B`` the same (negative -> no class); a
    sequence of integers -> checked as it is (``[0, num_classes]``)."""
    if B == 0 and isinstance(labels, (list, tuple, torch.Tensor)) and batch_size_of(labels) == 0:
        raise ValueError(f"{name} must name at least one class, got an empty {type(labels).__name__}")
    if isinstance(B, bool) or not isinstance(B, numbers.Integral) or B < 1:
        raise ValueError(f"B must be a positive int (images to sample), got {B!r}")
    B = int(B)
    if labels is None:
        uniform = torch.full((1, num_classes), 1.0 / num_classes, device=device)
        return torch.multinomial(uniform, num_samples=B, replacement=True, generator=rng).reshape(B)
    one = int_scalar(labels)
    if one is not None:
        if one > num_classes:
            raise ValueError(f"{name} must be a class id in [0, {num_classes}] or negative (no class), got {one}")
        return torch.full((B,), num_classes if one < 0 else one, device=device, dtype=torch.long)
    ndim = labels.dim() if isinstance(labels, torch.Tensor) else getattr(labels, "ndim", None)
    if not isinstance(labels, (list, tuple)) and not (isinstance(ndim, int) and ndim >= 1):
        raise TypeError(f"{name} must be None, an int or a sequence of class ids (integers: a list, tuple, "
                        f"tensor or numpy array), got {_describe(labels)}")
    return check_labels(labels, num_classes, name, B, device)
