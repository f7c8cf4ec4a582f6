"""Cold start of sampling: the first and second sample's wall time, how many Triton kernels the first one
compiles, whether a new batch size compiles anything, and whether a Triton cache is hit.

    python scripts/gpu_coldstart.py --work DIR --out coldstart.csv [--shipped CACHE_DIR]   # a GPU
    python scripts/gpu_coldstart.py --work DIR --out coldstart.csv --smoke                 # CPU code path

Each measurement runs in a fresh process (Triton's in-memory kernels gone) on a d16 model (random
weights, bf16, CUDA graphs as ``fastvar.Sampler`` uses by default), ``shipped`` first, the CSV rewritten after
each:

* ``cold``: an empty ``TRITON_CACHE_DIR``: sample 1 (compiles every kernel, captures the graphs), sample 2,
  then a sample at B = 8 (new graphs; a new batch size must compile nothing: ``compiled`` of that row);
* ``disk``: a new process on the cache ``cold`` filled: the first sample loads every kernel from disk;
* ``shipped`` (with ``--shipped``): a new process on a copy of a cache built elsewhere (e.g. on a CPU
  machine by ``tests/sm90_compile.py`` with the GPU's Triton and Python): its hits and misses.

``variants`` counts the kernels a process loaded (Triton's post-compile hook: disk hits and compiles alike),
``compiled`` the new entries in the cache folder (real compiles); hits = variants - compiled.
"""
import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _entries(cache_dir):
    return set(os.listdir(cache_dir)) if os.path.isdir(cache_dir) else set()


def child(mode: str, smoke: bool, batches):
    """One process: sample at each batch size (the first twice); prints one JSON line per sample."""
    import torch

    from fastvar import build_vae_var
    from fastvar.benchmark import SMOKE_MODEL
    from fastvar.sampler import Sampler

    loaded = []
    try:
        from triton import knobs

        def post_compile(*args, **kwargs):
            loaded.append(kwargs.get("key"))
        knobs.runtime.jit_post_compile_hook = post_compile
    except Exception:                  # no Triton (or no knobs): counts stay 0
        pass
    cache = os.environ.get("TRITON_CACHE_DIR", "")
    device = "cpu" if smoke else "cuda"
    if smoke:
        _, depth, shared, schedule, ch, V, Cvae = SMOKE_MODEL
        vae, var = build_vae_var(device, patch_nums=schedule, depth=depth, shared_aln=shared, ch=ch, V=V, Cvae=Cvae,
                                 fast_init=True, vae_kwargs=dict(ch_mult=(1, 2, 2)))
        dtype = torch.float32
    else:
        vae, var = build_vae_var(device, depth=16, fast_init=True)
        dtype = torch.bfloat16
    sampler = Sampler(var, vae, dtype=dtype)
    runs = [(batches[0], 1), (batches[0], 2)] + [(B, 1) for B in batches[1:]]
    for B, nth in runs:
        before_entries, before_loaded = _entries(cache), len(loaded)
        labels = torch.arange(B, device=device) % var.num_classes
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        sampler.tokens(labels, seed=0, cfg=1.5, top_k=min(900, var.V), top_p=0.96)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        print(json.dumps(dict(mode=mode, batch=B, sample=nth, seconds=round(seconds, 3),
                              variants=len(loaded) - before_loaded,
                              compiled=len(_entries(cache) - before_entries))), flush=True)


def run_child(mode, cache_dir, smoke, batches, log):
    env = dict(os.environ, TRITON_CACHE_DIR=cache_dir)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--batches", *map(str, batches)]
    if smoke:
        cmd.append("--smoke")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    log.write(proc.stdout + proc.stderr)
    log.flush()
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0:
        print(f"{mode}: exit {proc.returncode}\n{proc.stderr[-2000:]}", file=sys.stderr)
    for r in rows:
        r["process_s"] = round(time.perf_counter() - t0, 1)
    return rows, proc.returncode


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=None, help="folder for the caches and the log (default: a temp folder)")
    p.add_argument("--out", default=None, help="CSV path")
    p.add_argument("--shipped", default=None, help="a Triton cache built elsewhere (default: .triton_cache_sm90 "
                                                  "in the repository root, if present)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--smoke", action="store_true", help="CPU, the tiny smoke model: the code path only")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.smoke, args.batches)
        return 0
    if not args.smoke:
        import torch
        if not torch.cuda.is_available():
            print("gpu_coldstart.py needs a CUDA GPU (or --smoke)", file=sys.stderr)
            return 2
    work = args.work or __import__("tempfile").mkdtemp(prefix="coldstart")
    os.makedirs(work, exist_ok=True)
    cold = os.path.join(work, "coldstart_cache_cold")
    shutil.rmtree(cold, ignore_errors=True)
    shipped = args.shipped or os.path.join(os.path.dirname(HERE), ".triton_cache_sm90")
    rows, rc = [], 0
    # the shipped cache first (whether it hits is what the campaign's budget depends on), and the CSV rewritten
    # after every child: a stage cut off by its budget keeps what it measured
    modes = (["shipped"] if os.path.isdir(shipped) else []) + ["cold", "disk"]
    if "shipped" not in modes:
        print(f"no shipped cache at {shipped}: the shipped-cache check did not run")
    with open(os.path.join(work, "coldstart_children.log"), "w") as log:
        for mode in modes:
            if mode == "shipped":
                cache = os.path.join(work, "coldstart_cache_shipped")
                try:
                    shutil.rmtree(cache, ignore_errors=True)
                    shutil.copytree(shipped, cache)
                    sys.path.insert(0, HERE)
                    from relocate_triton_cache import relocate
                    relocate(cache)          # the cache records its files by absolute path
                except Exception as e:       # a broken shipped cache must not cost the cold and disk rows
                    print(f"shipped cache {shipped} unusable: {type(e).__name__}: {e}", file=sys.stderr)
                    rc = 1
                    continue
            else:
                cache = cold
            got, code = run_child(mode, cache, args.smoke, args.batches if mode == "cold" else args.batches[:1], log)
            rows += got
            rc = rc or code
            for r in got:
                print(f"{r['mode']:8s} B={r['batch']:<3d} sample {r['sample']}: {r['seconds']:8.2f} s  "
                      f"kernels loaded {r['variants']:3d}, compiled {r['compiled']:3d}", flush=True)
            if args.out and rows:
                with open(args.out, "w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                    writer.writeheader()
                    writer.writerows(rows)
    return rc


if __name__ == "__main__":
    sys.exit(main())
