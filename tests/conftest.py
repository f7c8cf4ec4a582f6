"""Test configuration: devices, markers and skips that say why.

On a machine without a CUDA GPU, Triton kernels are tested through its CPU interpreter, which must
be switched on before triton is first imported: this file does it, before any test module loads.
No CUDA call happens at import time beyond ``torch.cuda.is_available()``.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastvar.ops._backend import unavailable_reason  # noqa: E402  (after TRITON_INTERPRET)


def _cuda_ext_reason():
    return unavailable_reason("cuda", torch.device("cuda")) if HAS_CUDA else "no CUDA GPU on this machine"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    ext_reason = _cuda_ext_reason()
    skip_ext = pytest.mark.skip(reason=f"needs the CUDA extension: {ext_reason}") if ext_reason else None
    triton_reason = unavailable_reason("triton", torch.device("cpu"))
    skip_interp = None
    if HAS_CUDA:
        skip_interp = pytest.mark.skip(reason="interpreter lane: this machine has a GPU, where the compiled "
                                              "kernels are tested instead (gpu marker)")
    elif triton_reason:
        skip_interp = pytest.mark.skip(reason=f"interpreter lane: {triton_reason}")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "cuda_ext" in item.keywords and skip_ext is not None:
            item.add_marker(skip_ext)
        if "interpreter" in item.keywords and skip_interp is not None:
            item.add_marker(skip_interp)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    """Every device of this machine: cpu always, cuda where there is a GPU."""
    return torch.device(request.param)


@pytest.fixture
def backend(monkeypatch):
    """``backend(name)`` forces ``FASTVAR_BACKEND`` for the rest of the test."""
    def force(name):
        monkeypatch.setenv("FASTVAR_BACKEND", name)
    return force


@pytest.fixture(params=["eager", pytest.param("triton", marks=pytest.mark.interpreter)])
def cpu_backend(request, monkeypatch):
    """The backends that can run on CPU tensors here: eager, and Triton through the interpreter."""
    monkeypatch.setenv("FASTVAR_BACKEND", request.param)
    return request.param


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every ``torch.empty`` holds garbage: NaN for floats, 77 for integers, so that a kernel that leaves part of
    an output unwritten fails."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            return t.fill_(float("nan"))
        return t if t.dtype == torch.bool else t.fill_(77)
    monkeypatch.setattr(torch, "empty", empty)


@pytest.fixture
def gen():
    """A generator seeded at random every run; the seed is in every failure message."""
    seed = int.from_bytes(os.urandom(4), "little")
    return torch.Generator().manual_seed(seed), seed


@pytest.fixture(scope="session")
def golden_dir():
    from golden import golden_dir as find
    return find()
