"""Build the host-side launchers of recorded Triton launches into a Triton cache, with THIS Python (the one
that will launch them: the module is compiled against its headers), without torch or fastvar.

    PYTHONPATH=<triton for this python> TRITON_CACHE_DIR=D [TRITON_LIBCUDA_PATH=<libcuda stubs>] \\
        python3.12 scripts/build_launchers.py launches.json

``launches.json``: ``tests/sm90_compile.py --json`` output (each row's ``spec`` is Triton's specialization
data). A launcher depends only on the kernel's argument types (NVIDIA backend, Triton 3.6: ``make_launcher``
ignores constexpr values), so kernels share them; its cache key is the source plus the platform, not the
Python version, but the file name carries the Python ABI tag. Part of scripts/build_triton_cache.sh.
"""
import hashlib
import json
import os
import sys
import sysconfig


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    import triton
    from triton.backends.nvidia import driver as nv
    from triton.runtime.build import compile_module_from_src, platform_key
    from triton.runtime.cache import get_cache_manager

    with open(argv[0]) as f:
        rows = json.load(f)["launches"]
    sources = {}
    for r in rows:
        spec = json.loads(r["spec"])
        signature = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["signature"].items()}
        constants = {tuple(k): v for k, v in zip(spec["constant_keys"], spec["constant_vals"])}
        sources.setdefault(nv.make_launcher(constants, signature, None), r["kernel"])
    # the driver's own helper module too, built once per machine on first use
    utils_src = open(os.path.join(os.path.dirname(nv.__file__), "driver.c")).read()
    built = 0
    for src, name in [(src, "__triton_launcher") for src in sources] + [(utils_src, "cuda_utils")]:
        try:
            compile_module_from_src(src=src, name=name, library_dirs=nv.library_dirs(), include_dirs=nv.include_dirs,
                                    libraries=nv.libraries)
        except ImportError:
            pass        # built and cached; loading it needs the real libcuda (the GPU machine's)
        key = hashlib.sha256((src + platform_key()).encode("utf-8")).hexdigest()
        if get_cache_manager(key).get_file(f"{name}{sysconfig.get_config_var('EXT_SUFFIX')}") is None:
            raise RuntimeError(f"{name}: not in the cache after the build")
        built += 1
    print(f"triton {triton.__version__}, python {sys.version.split()[0]}: {built - 1} launchers for "
          f"{len(rows)} kernels, and cuda_utils, in {os.environ.get('TRITON_CACHE_DIR', '~/.triton/cache')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
