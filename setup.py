"""fastvar: fast, lossless kernels and a streaming sampler for VAR.

Install: ``pip install -e .`` (``.[test]`` for the test suite). On a machine without a GPU, install the
CPU build of torch first (here: ``pip install torch==2.13.0``); scripts/setup.sh does both and keeps a
CUDA torch that is already installed. The Triton kernels live in ``triton_kernels/`` and install as
``fastvar.triton_kernels`` (Triton itself ships a top-level ``triton_kernels`` package).
"""
import os

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))
version = {}
with open(os.path.join(here, "fastvar", "_version.py")) as f:
    exec(f.read(), version)

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
        "test": ["pytest>=7", "pytest-benchmark", "scikit-learn"],
        "train": ["scikit-learn"],
    },
    entry_points={"console_scripts": ["fastvar = fastvar.cli:main"]},
)
