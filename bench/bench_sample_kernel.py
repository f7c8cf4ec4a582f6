"""The per-scale sampling step: official eager chain vs torch.compile vs fastvar's fused kernel.

    python bench/bench_sample_kernel.py                        # B = 1, 8, 64 at every VAR-256 scale, V = 4096
    python bench/bench_sample_kernel.py --batches 64 --scales 16 --no-compile
    python bench/bench_sample_kernel.py --study 20000000        # exact-mode agreement study (GPU)
    TRITON_INTERPRET=1 python bench/bench_sample_kernel.py --study 1000000 --V 64   # the study on CPU

One step = CFG mix of ``(2B, l, V)`` float32 head logits, top-k (900), top-p (0.96) and one draw per
row, ``rows = B * l`` with ``l = pn**2``. Providers:

- ``eager``: the official chain (``cfg_mix``, ``topk``, ``sort``, ``softmax``, ``cumsum``, ``scatter``,
  ``softmax``, ``torch.multinomial`` on a CUDA generator; multinomial's own input checks sync);
- ``compile``: the same chain under ``torch.compile`` with the draw written as
  ``argmax(probs / exponential_noise)`` (what multinomial computes, without its syncs);
- ``fastvar-exact``: ``exponential_`` noise from the generator + the fused kernel (official tokens);
- ``fastvar-exact-kernel``: the fused kernel alone on a pre-drawn noise tensor;
- ``fastvar-fast``: the fused kernel with in-kernel Philox uniforms (no noise tensor).
- ``fastvar-cuda``: the CUDA extension's kernel (``csrc/sampling.cu``, radix select; ``FASTVAR_BACKEND=cuda``
  for the call) on the same pre-drawn noise, beside ``fastvar-exact-kernel`` (Triton); only when
  ``fastvar._C`` is built (``scripts/build_cuda.sh``).

fastvar providers run with ``validate=False`` (no device sync, as inside the sampler's CUDA graphs).
Correctness is checked before timing (exact tokens vs the eager chain on the same noise, fast tokens
inside the support). Times: ``triton.testing.do_bench`` medians (CUDA events). GB/s counts the bytes
the fused kernel must move (both logit halves, the noise in exact mode, the tokens) for every
provider, next to the device's HBM ceiling. Results: ``bench/results/sample_kernel_<gpu>_<date>.csv``
(+ ``.png`` when matplotlib is installed).

``--study N``: exact-mode agreement between the fused kernel and torch's ``argmax(softmax / q)`` on N
random rows (fresh logits and noise per batch): token disagreements, and how many rows have their two
best ``p / q`` ratios within 2^-20 relative (the only rows where float32 rounding can flip the winner).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch

from fastvar.ops import sampling as S
from fastvar.reference import sampling as ref
from fastvar.utils.benchmarking import (ceiling, git_commit, metadata, pyplot, require_cuda, results_path, save_plot,
                                       write_csv)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SCALES_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def official_chain(logits_2B, t, top_k, top_p, generator):
    """The official per-scale code: (B, l) tokens."""
    mixed = ref.cfg_mix(logits_2B, t)
    return ref.sample_top_k_top_p_(mixed, top_k, top_p, generator, num_samples=1)[..., 0]


def official_chain_noise(logits_2B, t: float, top_k: int, top_p: float, noise):
    """The same with the draw as multinomial computes it (compile-friendly: no host syncs)."""
    mixed = ref.cfg_mix(logits_2B, t)
    ref.top_k_top_p_filter_(mixed, top_k, top_p)
    probs = mixed.softmax(dim=-1).view(-1, mixed.shape[-1])
    return ref.sample_with_noise(probs, noise).view(mixed.shape[:-1])


def kernel_bytes(B: int, l: int, V: int, exact: bool) -> int:
    rows = B * l
    return 2 * rows * V * 4 + (rows * V * 4 if exact else 0) + rows * 8


def check_correctness(logits, t, top_k, top_p, noise) -> str:
    B, l, V = logits.shape[0] // 2, logits.shape[1], logits.shape[2]
    want = official_chain_noise(logits, t, top_k, top_p, noise)
    got = S.sample_cfg_top_k_top_p(logits, t, top_k, top_p, noise=noise)
    diff = int((got != want).sum())
    if diff > max(1, got.numel() // 10000):
        raise SystemExit(f"correctness: fastvar exact differs from the official chain in {diff} of {got.numel()} "
                         f"tokens (B={B}, l={l}): not timing a wrong kernel")
    kept = ref.top_k_top_p_filter_(ref.cfg_mix(logits, t).reshape(-1, V), top_k, top_p, stable=True) > -float("inf")
    fast = S.sample_cfg_top_k_top_p(logits, t, top_k, top_p, mode="fast", seed=1).reshape(-1)
    if not kept[torch.arange(B * l, device=logits.device), fast].all():
        raise SystemExit("correctness: fastvar fast sampled outside the top-k/top-p support")
    return f"{diff} exact-token differences of {got.numel()}"


def _with_backend(name, fn):
    """``fn()`` with ``FASTVAR_BACKEND=name`` (read by each op call; a few microseconds of host time)."""
    old = os.environ.get("FASTVAR_BACKEND")
    os.environ["FASTVAR_BACKEND"] = name
    try:
        return fn()
    finally:
        if old is None:
            del os.environ["FASTVAR_BACKEND"]
        else:
            os.environ["FASTVAR_BACKEND"] = old


def check_cuda_ext(logits, t, top_k, top_p, noise) -> str:
    """The CUDA extension's tokens against the official chain on the same noise, before timing it."""
    want = official_chain_noise(logits, t, top_k, top_p, noise)
    got = _with_backend("cuda", lambda: S.sample_cfg_top_k_top_p(logits, t, top_k, top_p, noise=noise))
    diff = int((got != want).sum())
    if diff > max(1, got.numel() // 10000):
        raise SystemExit(f"correctness: fastvar-cuda differs from the official chain in {diff} of {got.numel()} tokens")
    return f"; cuda: {diff} differences"


def bench(args) -> int:
    import triton.testing

    dev = torch.device("cuda")
    meta = metadata(dev)
    name, commit = meta["device"], meta["commit"]
    hbm_gb_s = 1e3 * ceiling(name, "hbm_tbs")                    # the table is in TB/s, this benchmark in GB/s
    rows_out = []
    t = args.cfg * 0.5                                           # a mid-schedule guidance strength
    compiled = None if args.no_compile else torch.compile(official_chain_noise)
    gen = torch.Generator(device=dev).manual_seed(0)
    from fastvar.ops._backend import cuda_extension
    with_cuda = cuda_extension() is not None
    if not with_cuda:
        print("fastvar-cuda: skipped, the CUDA extension fastvar._C is not built (scripts/build_cuda.sh)")
    print(f"{name}  HBM ceiling {hbm_gb_s:g} GB/s  commit {commit}  V={args.V} top_k={args.top_k} top_p={args.top_p}")
    print(f"{'B':>3} {'pn':>3} {'rows':>6} {'provider':>22} {'ms':>9} {'GB/s':>8} {'%HBM':>6}")
    for B in args.batches:
        for pn in args.scales:
            l, V = pn * pn, args.V
            logits = torch.randn(2 * B, l, V, device=dev, generator=gen) * 3
            noise = torch.empty(B * l, V, device=dev).exponential_(generator=gen)
            note = check_correctness(logits, t, args.top_k, args.top_p, noise)
            if with_cuda:
                note += check_cuda_ext(logits, t, args.top_k, args.top_p, noise)
            providers = {
                "eager": lambda: official_chain(logits, t, args.top_k, args.top_p, gen),
                "fastvar-exact": lambda: S.sample_cfg_top_k_top_p(logits, t, args.top_k, args.top_p,
                                                                  generator=gen, validate=False),
                "fastvar-exact-kernel": lambda: S.sample_cfg_top_k_top_p(logits, t, args.top_k, args.top_p,
                                                                         noise=noise, validate=False),
                "fastvar-fast": lambda: S.sample_cfg_top_k_top_p(logits, t, args.top_k, args.top_p, mode="fast",
                                                                 seed=7, validate=False),
            }
            if with_cuda:
                providers["fastvar-cuda"] = lambda: _with_backend("cuda", lambda: S.sample_cfg_top_k_top_p(
                    logits, t, args.top_k, args.top_p, noise=noise, validate=False))
            if compiled is not None:
                providers["compile"] = lambda: compiled(logits, t, args.top_k, args.top_p,
                                                        torch.empty_like(noise).exponential_(generator=gen))
            for provider, fn in providers.items():
                ms = triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")
                nbytes = kernel_bytes(B, l, V, exact=provider != "fastvar-fast")
                gbs = nbytes / (ms * 1e-3) / 1e9
                rows_out.append(dict(meta, provider=provider, B=B, pn=pn, l=l, rows=B * l, V=V,
                                     top_k=args.top_k, top_p=args.top_p, cfg_t=t, ms=f"{ms:.5f}", gb_s=f"{gbs:.1f}",
                                     hbm_gb_s=hbm_gb_s, pct_hbm=f"{100 * gbs / hbm_gb_s:.1f}", bytes=nbytes, note=note))
                print(f"{B:>3} {pn:>3} {B * l:>6} {provider:>22} {ms:>9.4f} {gbs:>8.1f} {100 * gbs / hbm_gb_s:>6.1f}")
    write_results(rows_out, args.out or results_path(RESULTS, "sample_kernel", meta))
    return 0


def write_results(rows, path: str) -> None:
    write_csv(rows, path)
    if "provider" not in rows[0]:
        return
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len({r["B"] for r in rows}), figsize=(5 * len({r["B"] for r in rows}), 4),
                             squeeze=False)
    for ax, B in zip(axes[0], sorted({r["B"] for r in rows})):
        for provider in sorted({r["provider"] for r in rows}):
            pts = [(r["rows"], float(r["ms"])) for r in rows if r["B"] == B and r["provider"] == provider]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
        ax.set(xscale="log", yscale="log", xlabel="rows = B * pn^2", ylabel="ms", title=f"B={B}, V={rows[0]['V']}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"VAR sampling step, {rows[0]['device']}, {rows[0]['date']}, {rows[0]['commit']}")
    print(f"wrote {save_plot(fig, path)}")


def study(args) -> int:
    """Exact-mode agreement of the fused kernel with torch's own softmax / argmax on random rows."""
    on_cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if on_cuda else "cpu")
    if not on_cuda:
        from fastvar.ops._backend import triton_interpret
        if not triton_interpret():
            print("--study needs a CUDA GPU, or TRITON_INTERPRET=1 to run the kernel in the CPU interpreter")
            return 2
        os.environ["FASTVAR_BACKEND"] = "triton"
    name = torch.cuda.get_device_name(dev) if on_cuda else "cpu (Triton interpreter)"
    V, per_batch = args.V, args.study_batch
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    out = []
    for top_k, top_p in ((0, 0.0), (min(args.top_k, V // 4), args.top_p)):
        n = diffs = near = 0
        t0 = time.time()
        while n < args.study:
            rows = min(per_batch, args.study - n)
            logits = torch.randn(2, rows, V, device=dev, generator=gen) * args.study_scale
            noise = torch.empty(rows, V, device=dev).exponential_(generator=gen)
            mixed = ref.cfg_mix(logits, args.cfg * 0.5)[0]
            ref.top_k_top_p_filter_(mixed, top_k, top_p)
            ratio = mixed.softmax(-1) / noise
            want = ratio.argmax(-1)
            top2 = ratio.topk(2, dim=-1).values
            near += int(((top2[:, 0] - top2[:, 1]) < top2[:, 0] * 2.0 ** -20).sum())
            got = S.sample_cfg_top_k_top_p(logits, args.cfg * 0.5, top_k, top_p, noise=noise)[0]
            diffs += int((got != want).sum())
            n += rows
        rec = dict(device=name, date=datetime.date.today().isoformat(), commit=git_commit(), V=V, rows=n,
                   top_k=top_k, top_p=top_p, logit_scale=args.study_scale, token_differences=diffs,
                   rows_gap_below_2e_20=near, seconds=f"{time.time() - t0:.1f}")
        out.append(rec)
        print(rec)
    write_results(out, args.out or results_path(RESULTS, "sample_kernel_study", out[0]))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--scales", type=int, nargs="+", default=list(SCALES_256), help="pn of each scale (l = pn^2)")
    p.add_argument("--V", type=int, default=4096)
    p.add_argument("--top-k", type=int, default=900)
    p.add_argument("--top-p", type=float, default=0.96)
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
    p.add_argument("--out", default=None, help="CSV path (default bench/results/...)")
    p.add_argument("--study", type=int, default=0, help="run the exact-mode agreement study on this many rows")
    p.add_argument("--study-batch", type=int, default=16384, help="rows per study batch")
    p.add_argument("--study-scale", type=float, default=3.0, help="std of the study's random logits")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.study:
        return study(args)
    if not require_cuda("bench_sample_kernel.py"):
        print("(The exactness study runs on CPU: TRITON_INTERPRET=1 python bench/bench_sample_kernel.py --study N.)",
              file=sys.stderr)
        return 2
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
