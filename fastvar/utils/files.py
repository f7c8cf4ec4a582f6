"""Output files that are never half-written, and paths checked before the work that fills them."""
from __future__ import annotations

import os
import tempfile
from typing import BinaryIO, Callable


def check_writable(path: str, name: str) -> str:
    """Absolute ``path`` if a file can be created there, else ``ValueError`` naming the argument ``name``."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    parent = os.path.dirname(path)
    if os.path.isdir(path):
        raise ValueError(f"{name} must be a file path, got a folder: {path}")
    if not os.path.isdir(parent):
        raise ValueError(f"{name}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{name}: the folder {parent} is not writable")
    return path


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> str:
    """Run ``write(file)`` on a temporary file beside ``path``, then rename it into place: a crash or
    Ctrl-C never leaves a half-written ``path``. Returns the absolute path."""
    path = os.path.abspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)          # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_tensors(path, what: str):
    """``torch.load(path, map_location="cpu", weights_only=True)``: tensors and plain values only, never
    arbitrary pickled code. ``FileNotFoundError`` / ``ValueError`` naming ``what`` and the path."""
    import torch
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{what} {path} could not be read with torch.load(weights_only=True): {e}") from e


def check_finite_tensors(tensors, what: str, allow_neg_inf=("attn_bias_for_masking",)) -> None:
    """``ValueError`` naming the first floating-point tensor of ``tensors`` (name -> tensor) that holds NaN or
    +-inf, and how many such values it holds: a diverged or corrupted checkpoint fails at load, not as a black
    picture. Names ending in one of ``allow_neg_inf`` may hold -inf (the official dense attention mask)."""
    import torch
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not (t.is_floating_point() or t.is_complex()) or t.device.type == "meta":
            continue
        ok = torch.isfinite(t)
        if name.endswith(tuple(allow_neg_inf)):
            ok |= torch.isneginf(t)
        if not bool(ok.all()):
            nan, inf = int(torch.isnan(t).sum()), int((~ok).sum()) - int(torch.isnan(t).sum())
            raise ValueError(f"{what}: tensor {name!r} {tuple(t.shape)} holds {nan} NaN and {inf} infinite values "
                             f"(of {t.numel()}); a diverged or corrupted checkpoint cannot give images")
