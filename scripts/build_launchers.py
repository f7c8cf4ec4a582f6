"""Build the host-side launchers of recorded Triton launches into a Triton cache, with THIS Python (the one
that will launch them: the module is compiled against its headers), without torch or fastvar.

    PYTHONPATH=<triton for this python> TRITON_CACHE_DIR=D [TRITON_LIBCUDA_PATH=<libcuda stubs>] \\
        python3.12 scripts/build_launchers.py launches.json

``launches.json``: ``tests/sm90_compile.py --json`` output (each row's ``spec`` is Triton's specialization
data). A launcher depends only on the kernel's argument types (NVIDIA backend, Triton 3.6: ``make_launcher``
ignores constexpr values), so kernels share them; its cache key is the source plus the platform, not the
Python version, but the file name carries the Python ABI tag. Part of scripts/build_triton_cache.sh.
"""
import json
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    import triton
    from triton.backends.nvidia import driver as nv
    from triton.runtime.build import compile_module_from_src

    with open(argv[0]) as f:
        rows = json.load(f)["launches"]
    sources = {}
    for r in rows:
        spec = json.loads(r["spec"])
        signature = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["signature"].items()}
        constants = {tuple(k): v for k, v in zip(spec["constant_keys"], spec["constant_vals"])}
        sources.setdefault(nv.make_launcher(constants, signature, None), r["kernel"])
    for src in sources:
        compile_module_from_src(src=src, name="__triton_launcher", library_dirs=nv.library_dirs(),
                                include_dirs=nv.include_dirs, libraries=nv.libraries)
    # the driver's own helper module, built once per machine on first use
    import os
    utils_src = open(os.path.join(os.path.dirname(nv.__file__), "driver.c")).read()
    compile_module_from_src(src=utils_src, name="cuda_utils", library_dirs=nv.library_dirs(),
                            include_dirs=nv.include_dirs, libraries=nv.libraries)
    print(f"triton {triton.__version__}, python {sys.version.split()[0]}: {len(sources)} launchers for "
          f"{len(rows)} kernels, and cuda_utils")
    return 0


if __name__ == "__main__":
    sys.exit(main())
