"""Backend choice: CUDA extension -> Triton -> eager by device and availability, FASTVAR_BACKEND forcing,
one warning per fallback that says why."""
import os
import shutil
import warnings

import pytest
import torch

from fastvar import ops
from fastvar.ops import _backend


def _impls():
    return {"eager": lambda: "eager", "triton": lambda: "triton", "cuda": lambda: "cuda"}


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.delenv("FASTVAR_BACKEND", raising=False)


def test_cpu_tensors_use_eager_by_default():
    assert _backend.select("op", _impls(), torch.device("cpu"))() == "eager"
    for name, impls in ops.OPS.items():
        assert "eager" in impls, f"{name} has no eager implementation"
        assert _backend.selected_backend(name, impls, "cpu") == "eager"


def test_forcing_eager_and_unknown_names(backend):
    backend("eager")
    assert _backend.select("op", _impls(), torch.device("cpu"))() == "eager"
    backend("fast")
    with pytest.raises(ValueError, match=r"FASTVAR_BACKEND must be one of cuda, triton, eager .*got 'fast'"):
        _backend.select("op", _impls(), torch.device("cpu"))


def test_forced_backend_that_cannot_run_says_why(backend, monkeypatch):
    backend("cuda")
    with pytest.raises(RuntimeError, match=r"FASTVAR_BACKEND=cuda but op cannot run on it here: the CUDA extension needs CUDA tensors, got cpu"):
        _backend.select("op", _impls(), torch.device("cpu"))
    backend("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"TRITON_INTERPRET=1"):
        _backend.select("op", _impls(), torch.device("cpu"))


def test_forced_triton_runs_in_the_interpreter(backend, monkeypatch):
    if _backend._triton_import_error():
        pytest.skip(f"triton unavailable: {_backend._triton_import_error()}")
    backend("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.select("op", _impls(), torch.device("cpu"))() == "triton"


def test_op_without_the_forced_implementation_falls_back_once_with_a_warning(backend, monkeypatch):
    if _backend._triton_import_error():
        pytest.skip(f"triton unavailable: {_backend._triton_import_error()}")
    backend("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    eager_only = {"eager": lambda: "eager"}
    with pytest.warns(RuntimeWarning, match="FASTVAR_BACKEND=triton but op has no triton implementation; using eager"):
        assert _backend.select("op", eager_only, torch.device("cpu"))() == "eager"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.select("op", eager_only, torch.device("cpu"))() == "eager"   # no second warning


def test_auto_on_cuda_falls_back_with_one_warning(monkeypatch):
    """On a CUDA tensor without the extension, auto picks Triton for an op whose CUDA implementation is
    preferred, and warns once saying why."""
    monkeypatch.setattr(_backend, "CUDA_PREFERRED", frozenset({"op", "other_op"}))
    monkeypatch.setattr(_backend, "_cuda_extension", lambda: (None, "the CUDA extension fastvar._C is not built"))
    monkeypatch.setattr(_backend, "_triton_import_error", lambda: None)
    dev = torch.device("cuda")
    with pytest.warns(RuntimeWarning, match="falls back from cuda to triton: the CUDA extension fastvar._C is not built"):
        assert _backend.select("op", _impls(), dev)() == "triton"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.select("other_op", _impls(), dev)() == "triton"   # same reason: warned once
    # an op that has no cuda implementation is not a fallback: no warning
    monkeypatch.setattr(_backend, "_warned", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.select("op", {"eager": lambda: "e", "triton": lambda: "t"}, dev)() == "t"


def test_auto_on_cuda_without_triton_uses_eager_and_says_why(monkeypatch):
    monkeypatch.setattr(_backend, "_cuda_extension", lambda: (None, "not built"))
    monkeypatch.setattr(_backend, "_triton_import_error", lambda: "the triton package is not installed")
    with pytest.warns(RuntimeWarning, match="falls back from triton to eager: the triton package is not installed"):
        assert _backend.select("op", {"eager": lambda: "e", "triton": lambda: "t"}, torch.device("cuda"))() == "e"


def test_unavailable_reasons_are_sentences():
    assert _backend.unavailable_reason("eager", "cpu") is None
    assert "CUDA tensors" in _backend.unavailable_reason("cuda", "cpu")
    with pytest.raises(ValueError, match="unknown backend"):
        _backend.unavailable_reason("metal", "cpu")


def test_auto_choice_skips_a_backend_that_cannot_take_these_inputs(monkeypatch):
    monkeypatch.setattr(_backend, "_cuda_extension", lambda: (None, "not built"))
    monkeypatch.setattr(_backend, "_triton_import_error", lambda: None)
    impls = {"eager": lambda: "e", "triton": lambda: "t"}
    why = "the Triton attention kernels need head dim D in (16, 32, 64, 128), got D=24"
    with pytest.warns(RuntimeWarning, match=r"falls back from triton to eager: the Triton attention kernels need head dim"):
        assert _backend.select("op", impls, torch.device("cuda"), {"triton": why})() == "e"
    assert _backend.select("op", impls, torch.device("cuda"), {"triton": None})() == "t"


def test_auto_order_picks_cuda_only_for_preferred_ops(monkeypatch, backend):
    """Until a GPU benchmark shows a CUDA kernel faster, the automatic order skips the extension (silently: it
    is not a fallback); ``CUDA_PREFERRED`` lists the ops where it wins, ``FASTVAR_BACKEND=cuda`` opts in."""
    monkeypatch.setattr(_backend, "_cuda_extension", lambda: (object(), None))
    monkeypatch.setattr(_backend, "_triton_import_error", lambda: None)
    dev = torch.device("cuda")
    assert _backend.CUDA_PREFERRED == frozenset(), "a CUDA-preferred op needs a recorded GPU benchmark"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.select("op", _impls(), dev)() == "triton"
    monkeypatch.setattr(_backend, "CUDA_PREFERRED", frozenset({"op"}))
    assert _backend.select("op", _impls(), dev)() == "cuda"
    assert _backend.select("other", _impls(), dev)() == "triton"
    monkeypatch.setattr(_backend, "CUDA_PREFERRED", frozenset())
    backend("cuda")
    assert _backend.select("op", _impls(), dev)() == "cuda"
    for name in ("upsample_accumulate_", "sample_top_k_top_p", "sample_cfg_top_k_top_p"):
        assert "cuda" in ops.OPS[name], f"{name} has no CUDA implementation registered"


def test_an_extension_built_from_other_sources_is_refused(monkeypatch, tmp_path):
    """``fastvar._C`` carries the fingerprint of the sources it was built from (CMakeLists.txt); where the checkout
    beside the package holds other ones (an editable install edited since its build), the extension is not used
    and the reason says to rebuild; an installed wheel (no csrc/) has nothing to compare with."""
    import sys
    import types
    import fastvar
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    current = _backend.sources_sha256(root)
    assert current is not None and len(current) == 64

    def probe(fingerprint):
        module = types.ModuleType("fastvar._C")
        module.__file__ = "fastvar/_C.so"
        if fingerprint is not None:
            module.SOURCES_SHA256 = fingerprint
        monkeypatch.setitem(sys.modules, "fastvar._C", module)
        monkeypatch.delattr(fastvar, "_C", raising=False)
        monkeypatch.setattr(_backend, "_probes", {})
        return module, _backend._cuda_extension()
    module, (ext, why) = probe(current)
    assert ext is module and why is None
    for fingerprint in ("0" * 64, "", None):          # another build, or one from before the fingerprint
        _, (ext, why) = probe(fingerprint)
        assert ext is None and "built from other sources" in why and "scripts/build_cuda.sh" in why, why
    # one byte more in any source is another fingerprint
    copy = tmp_path / "checkout"
    shutil.copytree(os.path.join(root, "csrc"), copy / "csrc")
    shutil.copy(os.path.join(root, "CMakeLists.txt"), copy)
    assert _backend.sources_sha256(str(copy)) == current
    os.symlink("nowhere", copy / "csrc" / ".#bindings.cpp")       # an editor's lock file: a dangling link
    (copy / "csrc" / ".hidden.h").write_text("// not a source")
    assert _backend.sources_sha256(str(copy)) == current
    with open(copy / "csrc" / "sampling.cu", "a") as f:
        f.write("\n")
    assert _backend.sources_sha256(str(copy)) != current
    assert _backend.sources_sha256(str(tmp_path)) is None           # no csrc/: an installed wheel
    os.remove(copy / "CMakeLists.txt")
    assert _backend.sources_sha256(str(copy)) is None
    monkeypatch.setattr(_backend, "sources_sha256", lambda root: None)
    module, (ext, why) = probe("0" * 64)
    assert ext is module and why is None
