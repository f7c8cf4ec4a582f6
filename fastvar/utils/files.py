"""Output files that are never half-written, paths checked before the work that fills them, and the one reader
of checkpoint files (one ``torch.save`` file, or a Hugging Face sharded checkpoint: an index and its shards)."""
from __future__ import annotations

import json
import math
import os
import stat
import tempfile
from typing import BinaryIO, Callable, Dict, Optional


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


def load_tensors(path, what: str, mmap: bool = False):
    """``torch.load(path, map_location="cpu", weights_only=True)``: tensors and plain values only, never
    arbitrary pickled code. ``FileNotFoundError`` / ``ValueError`` naming ``what`` and the path.

    ``mmap``: a zip file (what ``torch.save`` writes since torch 1.6) is mapped (``torch.load(mmap=True)``), not
    read: its tensors stay pages of the file until the caller casts or copies them, so a cast never holds the
    file's dtype in memory. The caller must not keep them: the file rewritten in place under the mapping (as
    ``torch.save`` to that path does) kills the process with SIGBUS. An older pickle file cannot be mapped and is
    read."""
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
    mmap = mmap and head.startswith(b"PK\x03\x04")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise ValueError(f"{what} {path} could not be read with torch.load(weights_only=True"
                         f"{', mmap=True' if mmap else ''}): {type(e).__name__}: {e}") from e


SHARD_INDEX_SUFFIX = ".index.json"      # pytorch_model.bin.index.json, model.safetensors.index.json


def _show(names, n: int = 8) -> str:
    names = list(names)
    return ", ".join(map(str, names[:n])) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def shard_index(path, what: str) -> Optional[str]:
    """The index file of the sharded checkpoint at ``path`` (a folder holding one ``*.index.json``, or a ``.json``
    file itself), or ``None`` when ``path`` is anything else (one checkpoint file, read by :func:`load_tensors`).
    A folder without an index raises ``FileNotFoundError`` listing what it holds; one with several raises
    ``ValueError`` naming them."""
    path = os.fspath(path)
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        indexes = [n for n in names if n.endswith(SHARD_INDEX_SUFFIX)]
        if not indexes:
            held = _show(names, 20) if names else "nothing"
            raise FileNotFoundError(f"{what} {path} is a folder without a shard index (expected one *{SHARD_INDEX_SUFFIX} "
                                    f"file, e.g. pytorch_model.bin.index.json or model.safetensors.index.json, "
                                    f"beside its shards); it holds: {held}")
        if len(indexes) > 1:
            raise ValueError(f"{what} {path} holds {len(indexes)} shard indexes ({', '.join(indexes)}), expected "
                             f"one: pass the index file to read")
        return os.path.join(path, indexes[0])
    return path if path.endswith(".json") else None


def checkpoint_bytes(path) -> int:
    """Bytes of the checkpoint at ``path``: the file, or for a sharded checkpoint its index and every shard the
    index lists (an identity for manifests; a folder's own size says nothing)."""
    index = shard_index(path, "checkpoint")
    if index is None:
        return os.path.getsize(path)
    folder = os.path.dirname(os.path.abspath(index))
    return os.path.getsize(index) + sum(os.path.getsize(os.path.join(folder, f))
                                        for f in set(_read_index(index, "checkpoint").values()))


def _read_index(index: str, what: str) -> Dict[str, str]:
    if not os.path.isfile(index):
        raise FileNotFoundError(f"{what} shard index not found: {index}")
    layout = 'the Hugging Face layout {"metadata": {...}, "weight_map": {"name": "shard file", ...}}'
    try:
        with open(index, encoding="utf-8") as f:
            obj = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{what} shard index {index} is not JSON ({e}); expected {layout}") from None
    weight_map = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        got = f"keys {sorted(obj)}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        if isinstance(obj, dict) and "weight_map" in obj:
            got = f"a weight_map that is {'empty' if weight_map == {} else type(weight_map).__name__}"
        raise ValueError(f"{what} shard index {index} has no weight_map (got {got}); expected {layout}")
    bad = [k for k, v in weight_map.items() if not isinstance(v, str) or not v or os.path.isabs(v)]
    if bad:
        raise ValueError(f"{what} shard index {index}: the weight_map must give each tensor a shard file name "
                         f"relative to the index's folder; {bad[0]!r} has {weight_map[bad[0]]!r}")
    return weight_map


def _load_shard(path: str, what: str) -> Dict[str, object]:
    import torch
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"{what} shard {path} is a .safetensors file: reading it needs the safetensors package "
                              f"(pip install safetensors)") from None
        try:
            return load_file(path, device="cpu")
        except Exception as e:
            raise ValueError(f"{what} shard {path} could not be read with safetensors: {type(e).__name__}: {e}") from e
    obj = load_tensors(path, f"{what} shard")
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ValueError(f"{what} shard {path} must hold a flat state dict (names -> tensors), got "
                         f"{type(obj).__name__}" + (f" with keys {_show(obj)}" if isinstance(obj, dict) else ""))
    return obj


def load_sharded_tensors(index, what: str, convert: Optional[Callable] = None) -> Dict[str, object]:
    """One state dict from a Hugging Face sharded checkpoint: ``index`` (``*.index.json``) maps each tensor name
    to its shard file (``"weight_map"``) in the index's folder; ``.safetensors`` shards are read with
    ``safetensors.torch.load_file`` (an optional package), any other with :func:`load_tensors`. Shards are read one
    at a time and their tensors moved into the result, not copied; ``convert(name, tensor)`` (e.g. a dtype cast)
    replaces each tensor as its shard is merged, so a cast never holds more than one shard in the old dtype.

    The index and the shards must agree exactly: a missing shard file is a ``FileNotFoundError``; a tensor the
    index lists that its shard lacks, a tensor no entry of the index lists, one the index puts in another shard,
    the same name in two shards, an index that is not JSON or has no ``weight_map`` are ``ValueError`` naming
    the file and the tensors."""
    index = os.fspath(index)
    weight_map = _read_index(index, what)
    folder = os.path.dirname(os.path.abspath(index))
    by_shard: Dict[str, set] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, set()).add(name)
    absent = [s for s in sorted(by_shard) if not os.path.isfile(os.path.join(folder, s))]
    if absent:                           # said before gigabytes of shards are read in vain
        raise FileNotFoundError(f"{what}: shard {os.path.join(folder, absent[0])} not found (the index {index} puts "
                                f"{len(by_shard[absent[0]])} tensors there; {len(absent)} of its {len(by_shard)} "
                                f"shards are missing: {_show(absent)})")
    out: Dict[str, object] = {}
    origin: Dict[str, str] = {}
    for shard_name in sorted(by_shard):
        path = os.path.join(folder, shard_name)
        shard = _load_shard(path, what)
        held, listed = set(shard), by_shard[shard_name]
        twice = sorted(held & out.keys())
        if twice:
            k = twice[0]
            raise ValueError(f"{what}: tensor {k!r} is in two shards, {os.path.join(folder, origin[k])} and {path} "
                             f"({len(twice)} such: {_show(twice)}); the index {index} puts it in {weight_map[k]}")
        lacking = sorted(listed - held)
        if lacking:
            raise ValueError(f"{what} shard {path} does not hold {len(lacking)} tensors the index {index} puts there: "
                             f"{_show(lacking)}")
        unlisted = sorted(held - weight_map.keys())
        if unlisted:
            raise ValueError(f"{what} shard {path} holds {len(unlisted)} tensors the index {index} does not list: "
                             f"{_show(unlisted)}")
        elsewhere = sorted(held - listed)
        if elsewhere:
            raise ValueError(f"{what} shard {path} holds {len(elsewhere)} tensors the index {index} puts in other "
                             f"shards: " + _show(f"{k} (in {weight_map[k]})" for k in elsewhere))
        for k in list(shard):            # popped: the shard lets go of each tensor as it is merged (or cast)
            out[k] = convert(k, shard.pop(k)) if convert is not None else shard.pop(k)
            origin[k] = shard_name
    return out


def check_finite_tensors(tensors, what: str, allow_neg_inf=("attn_bias_for_masking",)) -> None:
    """``ValueError`` naming the first floating-point tensor of ``tensors`` (name -> tensor) that holds NaN or
    +-inf, and how many such values it holds: a diverged or corrupted checkpoint fails at load, not as a black
    picture. Names ending in one of ``allow_neg_inf`` may hold -inf (the official dense attention mask)."""
    import torch
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not (t.is_floating_point() or t.is_complex()) or t.device.type == "meta":
            continue
        if t.dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            # one reduction with no tensor-sized temporary, 8x faster than isfinite().all() on CPU: NaN propagates
            # into both ends and an infinity is one; the count below runs only on a tensor that fails
            if t.numel() == 0 or all(math.isfinite(float(x)) for x in torch.aminmax(t)):
                continue
        ok = torch.isfinite(t)
        if name.endswith(tuple(allow_neg_inf)):
            ok |= torch.isneginf(t)
        if not bool(ok.all()):
            nan, inf = int(torch.isnan(t).sum()), int((~ok).sum()) - int(torch.isnan(t).sum())
            raise ValueError(f"{what}: tensor {name!r} {tuple(t.shape)} holds {nan} NaN and {inf} infinite values "
                             f"(of {t.numel()}); a diverged or corrupted checkpoint cannot give images")
