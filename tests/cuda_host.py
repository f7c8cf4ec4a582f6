"""The host build of fastvar's CUDA kernels (``csrc/``): the same sources compiled by the host C++ compiler with
``FASTVAR_HOST_EMULATION`` (``csrc/port.h``: the threads of a block run as loops between barriers) and bound by
``csrc/bindings.cpp`` as the test-only module ``_fastvar_cuda_host``. Built once per source version into a cache
folder (about 30 s on 2 cores), then imported; ``tests/test_cuda_host.py`` runs it against the references.

    python tests/cuda_host.py DIR     # build into DIR and print the module's path
"""
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from typing import Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
SOURCES = ("upsample_step.cu", "sampling.cu", "bindings.cpp")
HEADERS = ("port.h", "launch.h", "fastvar_ext.h")
MODULE = "_fastvar_cuda_host"
# -ffp-contract=off: only the kernels' explicit fmaf() calls fuse (nvcc gets --fmad=false), as csrc/port.h says
FLAGS = ("-O2", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-ffp-contract=off", "-fno-fast-math",
         "-DFASTVAR_HOST_EMULATION", f"-DFASTVAR_MODULE={MODULE}")


def missing_tool() -> Optional[str]:
    """None if the host build can run here, else why not (a sentence for a skip)."""
    if compiler() is None:
        return "no host C++ compiler (set CXX, or install g++)"
    if importlib.util.find_spec("pybind11") is None:
        return "pybind11 is not installed (pip install -e '.[test]' brings it)"
    return None


def compiler() -> Optional[str]:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _includes() -> Tuple[str, ...]:
    import pybind11
    return (f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC}")


def _key(cxx: str) -> str:
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        with open(os.path.join(CSRC, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read())
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    h.update(" ".join(FLAGS + _includes()).encode() + version.encode() + sys.version.encode())
    return h.hexdigest()[:16]


def build(cache_dir: str):
    """Compile (if this version is not in ``cache_dir`` yet) and import the host module."""
    cxx = compiler()
    out_dir = os.path.join(cache_dir, _key(cxx))
    so = os.path.join(out_dir, MODULE + sysconfig.get_config_var("EXT_SUFFIX"))
    if not os.path.exists(so):
        os.makedirs(out_dir, exist_ok=True)
        objs, procs = [], []
        for name in SOURCES:          # one compiler per translation unit, in parallel
            obj = os.path.join(out_dir, name + ".o")
            lang = ("-x", "c++") if name.endswith(".cu") else ()
            cmd = [cxx, *FLAGS, *_includes(), *lang, "-c", os.path.join(CSRC, name), "-o", obj]
            procs.append((cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
            objs.append(obj)
        for cmd, p in procs:
            log = p.communicate()[0]
            if p.returncode != 0:
                raise RuntimeError(f"host build failed: {' '.join(cmd)}\n{log[-6000:]}")
        tmp = so + f".tmp{os.getpid()}"
        link = subprocess.run([cxx, "-shared", *objs, "-o", tmp], capture_output=True, text=True)
        if link.returncode != 0:
            raise RuntimeError(f"host link failed:\n{link.stderr[-6000:]}")
        os.replace(tmp, so)           # atomic: a concurrent run sees the whole module or none
    spec = importlib.util.spec_from_file_location(MODULE, so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "build", "cuda_host")).__file__)
