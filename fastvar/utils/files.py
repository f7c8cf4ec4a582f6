"""Output files that are never half-written, and paths checked before the work that fills them."""
from __future__ import annotations

import os
import stat
import tempfile
from typing import BinaryIO, Callable


def check_writable(path: str, name: str, probe: bool = False) -> str:
    """Absolute ``path`` if a file can be created there, else ``ValueError`` naming the argument ``name``.
    ``probe``: also create and remove a file beside it (what :func:`atomic_write` will do), which catches what
    permission bits do not tell (a read-only file system, a root-squashed share, no free inode)."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    parent = os.path.dirname(path)
    if os.path.isdir(path):
        raise ValueError(f"{name} must be a file path, got a folder: {path}")
    if os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode):
        # the file is replaced by a rename: a device (/dev/null), a FIFO or a socket would be replaced, not written
        raise ValueError(f"{name} must be a regular file path, got a special file: {path}")
    if not os.path.isdir(parent):
        raise ValueError(f"{name}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{name}: the folder {parent} is not writable")
    if probe:
        try:
            fd, tmp = tempfile.mkstemp(dir=parent, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
            os.close(fd)
            os.unlink(tmp)
        except OSError as e:
            raise ValueError(f"{name}: cannot create a file in {parent}: {e.strerror or e}") from None
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
    if os.path.isdir(path):
        raise FileNotFoundError(f"{what} must be a file, got a folder: {path}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path, "rb") as f:
        head = f.read(8)
    # torch.save writes a zip archive (PK..) or, before torch 1.6, a pickle (protocol byte 0x80); anything else
    # would fail inside the unpickler with a bare byte value ("...: 101") as its message
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        kind = "it is empty" if not head else f"it starts with {head!r}"
        raise ValueError(f"{what} {path} is not a checkpoint written by torch.save ({kind}; torch.save writes a zip "
                         f"archive)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{what} {path} could not be read with torch.load(weights_only=True): "
                         f"{type(e).__name__}: {e}") from e


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
