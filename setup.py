"""fastvar: fast, lossless kernels and a streaming sampler for VAR.

Install: ``pip install -e .`` (``.[test]`` for the test suite). On a machine without a GPU, install the
CPU build of torch first (here: ``pip install torch==2.13.0``); scripts/setup.sh does both and keeps a
CUDA torch that is already installed. The Triton kernels live in ``triton_kernels/`` and install as
``fastvar.triton_kernels`` (Triton itself ships a top-level ``triton_kernels`` package).

The CUDA C++ extension ``fastvar._C`` (csrc/, CMakeLists.txt) is built when nvcc and a CUDA GPU are found
(``nvidia-smi`` lists one) or ``FASTVAR_BUILD_CUDA=1`` (``0`` never builds it); otherwise fastvar installs
without it and says so in one line. It needs CMake >= 3.24, pybind11 and (optionally) ninja;
``scripts/build_cuda.sh`` builds it in place without pip.
"""
import os
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

here = os.path.dirname(os.path.abspath(__file__))
version = {}
with open(os.path.join(here, "fastvar", "_version.py")) as f:
    exec(f.read(), version)



def _cuda_build():
    """(build fastvar._C?, forced?, why) from FASTVAR_BUILD_CUDA, nvcc and nvidia-smi."""
    flag = os.environ.get("FASTVAR_BUILD_CUDA", "").strip()
    if flag in ("0", "1"):
        return flag == "1", flag == "1", f"FASTVAR_BUILD_CUDA={flag}"
    if shutil.which("nvcc") is None:
        return False, False, "no nvcc on PATH"
    try:
        gpus = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        gpus = ""
    if "GPU" not in gpus:
        return False, False, "no CUDA GPU (nvidia-smi lists none)"
    return True, False, "nvcc and a CUDA GPU found"


class CMakeBuild(build_ext):
    """Builds fastvar._C with CMake (CMakeLists.txt) into the path setuptools expects."""

    def build_extension(self, ext):
        out_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        tmp = os.path.join(os.path.abspath(self.build_temp), "cuda")
        cfg = ["cmake", "-S", here, "-B", tmp, f"-DFASTVAR_OUTPUT_DIR={out_dir}", f"-DPython_EXECUTABLE={sys.executable}"]
        if shutil.which("ninja"):
            cfg += ["-G", "Ninja"]
        if os.environ.get("FASTVAR_CUDA_ARCHS"):
            cfg.append(f"-DFASTVAR_CUDA_ARCHS={os.environ['FASTVAR_CUDA_ARCHS']}")
        try:
            import pybind11
            cfg.append(f"-Dpybind11_DIR={pybind11.get_cmake_dir()}")
        except ImportError:
            pass                                    # CMake looks for an installed pybind11 itself
        try:
            subprocess.run(cfg, check=True)
            subprocess.run(["cmake", "--build", tmp, "-j", str(os.cpu_count() or 1)], check=True)
        except (OSError, subprocess.CalledProcessError) as e:
            if _FORCED:
                raise
            print(f"fastvar: building the CUDA extension fastvar._C failed ({e}); installing without it", flush=True)


_BUILD, _FORCED, _WHY = _cuda_build()
if _BUILD:
    print(f"fastvar: building the CUDA extension fastvar._C ({_WHY})", flush=True)
else:
    print(f"fastvar: not building the CUDA extension fastvar._C ({_WHY}); the Triton kernels and eager paths "
          "work without it", flush=True)

setup(
    name="fastvar",
    version=version["__version__"],
    description="Fused Triton/CUDA kernels, drop-in modules and a streaming sampler for VAR (next-scale prediction)",
    long_description=open(os.path.join(here, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["fastvar", "fastvar.*"]) + ["fastvar.triton_kernels"],
    package_dir={"fastvar.triton_kernels": "triton_kernels"},
    package_data={"fastvar": ["weights/*.pt"]},
    install_requires=[
        "torch>=2.4",   # torch.library.custom_op; install the CPU or CUDA build you want first: this never replaces it
        "numpy",
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        # pybind11: the cuda_host tests; pillow: image formats; safetensors: .safetensors checkpoint shards
        "test": ["pytest>=7", "pytest-benchmark", "scikit-learn", "pybind11>=2.10", "pillow", "safetensors"],
        "train": ["scikit-learn"],
    },
    entry_points={"console_scripts": ["fastvar = fastvar.cli:main"]},
    ext_modules=[Extension("fastvar._C", sources=[])] if _BUILD else [],
    cmdclass={"build_ext": CMakeBuild},
)
