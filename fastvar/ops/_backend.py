"""Which implementation of an op runs: the CUDA extension, a Triton kernel, or the eager reference.

Order of preference for CUDA tensors: ``cuda`` (fastvar's compiled extension, only for the ops in
``CUDA_PREFERRED``) -> ``triton`` -> ``eager``. CPU tensors use ``eager``: Triton compiles for GPUs only, and its CPU interpreter is for
testing. ``FASTVAR_BACKEND=eager|triton|cuda`` forces one backend (read at every call, so tests
can switch it); with ``TRITON_INTERPRET=1`` set before Triton is imported, ``triton`` runs on CPU
tensors through the interpreter, which is how CI tests the kernels.

A forced backend that cannot run here raises a ``RuntimeError`` that says why. An op that has no
implementation for the chosen backend, or an automatic choice that cannot use a faster backend,
falls back along the order above and warns once per (op, reason).
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch

BACKENDS = ("cuda", "triton", "eager")
ENV_VAR = "FASTVAR_BACKEND"

_warned: set = set()

# Ops whose CUDA-extension implementation the automatic order prefers to Triton. Empty: no GPU number yet shows
# a CUDA kernel faster than its Triton one. Adding an op here needs that number (bench/, provider fastvar-cuda,
# recorded in bench/results/ with the GPU, date and commit); until then FASTVAR_BACKEND=cuda opts in.
CUDA_PREFERRED: frozenset = frozenset()


def forced_backend() -> Optional[str]:
    """The backend named by ``FASTVAR_BACKEND``, or None; raises ``ValueError`` on an unknown name."""
    name = os.environ.get(ENV_VAR, "").strip().lower()
    if not name or name == "auto":
        return None
    if name not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {', '.join(BACKENDS)} (or unset), got {name!r}")
    return name


def triton_interpret() -> bool:
    """True when Triton's CPU interpreter is on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Probed once per process. Plain module-level memos rather than functools.lru_cache, which
# torch.compile cannot trace through when an op is called inside a compiled region.
_probes: dict = {}


def _triton_import_error() -> Optional[str]:
    if "triton" not in _probes:
        if importlib.util.find_spec("triton") is None:
            _probes["triton"] = "the triton package is not installed"
        else:
            try:
                import triton  # noqa: F401
                import triton.language  # noqa: F401
                _probes["triton"] = None
            except Exception as e:  # a broken install must not break the eager path
                _probes["triton"] = f"importing triton failed: {type(e).__name__}: {e}"
    return _probes["triton"]


def sources_sha256(root: str) -> Optional[str]:
    """The fingerprint CMakeLists.txt compiles into ``fastvar._C`` (``SOURCES_SHA256``), of the build files under
    the checkout ``root``: the SHA-256 of the concatenated hex SHA-256 of ``CMakeLists.txt``, then of ``csrc/``'s
    ``*.cu``, ``*.cpp`` and ``*.h`` files by name, hidden ones left out. None where ``root`` holds no such build
    (an installed wheel)."""
    import hashlib
    csrc, cmake = os.path.join(root, "csrc"), os.path.join(root, "CMakeLists.txt")
    if not (os.path.isdir(csrc) and os.path.isfile(cmake)):
        return None
    names = sorted(n for n in os.listdir(csrc) if n.endswith((".cu", ".cpp", ".h")) and not n.startswith(".")
                   and os.path.isfile(os.path.join(csrc, n)))      # not an editor's lock file or a dangling link
    digests = ""
    for path in [cmake] + [os.path.join(csrc, n) for n in names]:
        with open(path, "rb") as f:
            digests += hashlib.sha256(f.read()).hexdigest()
    return hashlib.sha256(digests.encode()).hexdigest()


def _stale_build(module) -> Optional[str]:
    """Why ``module`` (``fastvar._C``) must not be used: built from other sources than the checkout beside the
    package holds; None if it matches, or where there is no checkout to compare with."""
    current = sources_sha256(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    built = getattr(module, "SOURCES_SHA256", "")
    if current is None or built == current:
        return None
    return (f"the CUDA extension fastvar._C ({module.__file__}) was built from other sources than csrc/ and "
            f"CMakeLists.txt now hold (fingerprint {built[:12] or 'none'}, sources {current[:12]}); "
            "rebuild it: scripts/build_cuda.sh")


def _cuda_extension() -> Tuple[Optional[object], Optional[str]]:
    if "cuda" not in _probes:
        try:
            from fastvar import _C  # type: ignore[attr-defined]
        except ImportError as e:
            _probes["cuda"] = (None, f"the CUDA extension fastvar._C is not built ({e}); "
                                     "scripts/build_cuda.sh builds it (nvcc, CMake, pybind11)")
        else:
            stale = _stale_build(_C)
            _probes["cuda"] = (None, stale) if stale else (_C, None)
    return _probes["cuda"]


def cuda_extension():
    """The compiled extension module ``fastvar._C``, or None."""
    return _cuda_extension()[0]


def unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    """None if ``backend`` can run on tensors of ``device``, else a sentence saying why not."""
    device = torch.device(device)
    if backend == "eager":
        return None
    if backend == "triton":
        err = _triton_import_error()
        if err:
            return err
        if device.type == "cuda":
            return None
        if device.type == "cpu":
            return None if triton_interpret() else (
                "Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 set before triton is imported "
                "to run them on CPU through the interpreter")
        return f"Triton does not support {device.type} tensors"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the CUDA extension needs CUDA tensors, got {device.type}"
        return _cuda_extension()[1]
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def warn_once(key, message: str) -> None:
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def select(op: str, implementations: Dict[str, Callable], device: torch.device,
           unsupported: Optional[Dict[str, Optional[str]]] = None) -> Callable:
    """The implementation of ``op`` to run on tensors of ``device``.

    ``implementations`` maps backend names to callables; it always has ``eager``. ``unsupported`` maps a
    backend to the reason it cannot take these particular inputs (e.g. a head dim a kernel lacks), or
    None: the automatic choice skips such a backend with one warning; a forced backend is used anyway,
    and its implementation raises its own clear error.
    """
    device = torch.device(device)
    unsupported = unsupported or {}
    forced = forced_backend()
    if forced is not None:
        reason = unavailable_reason(forced, device)
        if reason is not None:
            raise RuntimeError(f"{ENV_VAR}={forced} but {op} cannot run on it here: {reason}")
        for backend in BACKENDS[BACKENDS.index(forced):]:
            if backend in implementations and unavailable_reason(backend, device) is None:
                if backend != forced:
                    warn_once((op, forced), f"fastvar: {ENV_VAR}={forced} but {op} has no {forced} "
                                            f"implementation; using {backend}")
                return implementations[backend]
    skipped = None
    for backend in (BACKENDS if device.type == "cuda" else ("eager",)):
        if backend not in implementations or (backend == "cuda" and op not in CUDA_PREFERRED):
            continue
        why = unavailable_reason(backend, device) or unsupported.get(backend)
        if why is None:
            if skipped is not None:
                warn_once(skipped, f"fastvar: {op} (and any other op in the same case) falls back from "
                                   f"{skipped[0]} to {backend}: {skipped[1]}")
            return implementations[backend]
        skipped = skipped or (backend, why)
    raise AssertionError("unreachable: eager is always available")


def selected_backend(op: str, implementations: Dict[str, Callable], device) -> str:
    """Name of the backend :func:`select` picks (for ``fastvar info`` and tests)."""
    chosen = select(op, implementations, device)
    return next(name for name, fn in implementations.items() if fn is chosen)
