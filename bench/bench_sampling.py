"""Benchmark of the sampling kernel (``sample_cfg_top_k_top_p``) at every scale of a schedule: one step = CFG
mix of ``(2B, l, V)`` float32 head logits, top-k (900), top-p (0.96) and one draw per row, ``rows = B * l``,
``l = pn**2``. Providers:

- ``eager``: the official chain (``cfg_mix``, ``topk``, ``sort``, ``softmax``, ``cumsum``, ``scatter``,
  ``softmax``, ``torch.multinomial`` on a CUDA generator; multinomial's own input checks sync);
- ``compile``: the same chain under ``torch.compile`` with the draw written as
  ``argmax(probs / exponential_noise)`` (what multinomial computes, without its syncs);
- ``fastvar-exact``: ``exponential_`` noise from the generator + the fused kernel (official tokens);
- ``fastvar-exact-kernel``: the fused kernel alone on a pre-drawn noise tensor;
- ``fastvar-fast``: the fused kernel with in-kernel Philox uniforms (no noise tensor);
- ``fastvar-cuda`` (where ``fastvar._C`` is built: ``scripts/build_cuda.sh``): the CUDA extension's kernel
  (``csrc/sampling.cu``, radix select) on the same pre-drawn noise, beside ``fastvar-exact-kernel``.

fastvar providers run with ``validate=False`` (no device sync, as inside the sampler's CUDA graphs). Checked
before timing: exact tokens vs the eager chain on the same noise, fast tokens inside the support. GB/s counts
the bytes the fused kernel must move (both logit halves, the noise in exact mode, the tokens), for every
provider. Key columns ``B``, ``pn``, ``l``, ``rows``, ``V``, ``top_k``, ``top_p``, ``cfg_t``.

``--study N``: exact-mode agreement between the fused kernel and torch's ``argmax(softmax / q)`` on N random
rows (fresh logits and noise per batch): token disagreements, and how many rows have their two best ``p / q``
ratios within 2^-20 relative (the only rows where float32 rounding can flip the winner); results in
``bench/results/sampling_study_<device>_<date>.csv``.

    python bench/bench_sampling.py                        # B = 1, 8, 64 at every VAR-256 scale, V = 4096
    python bench/bench_sampling.py --batches 64 --scales 16 --no-compile
    python bench/bench_sampling.py --study 20000000        # exact-mode agreement study (GPU)
    TRITON_INTERPRET=1 python bench/bench_sampling.py --study 1000000 --V 64   # the study on CPU
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import torch

from fastvar.ops import sampling as S
from fastvar.reference import sampling as ref
from fastvar.schedule import PATCH_NUMS_256
from fastvar.utils.benchmarking import (Case, cuda_extension_built, metadata, plot, require_cuda, results_path,
                                        run_cases, timing_options, with_backend, write_csv)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DEVICE = "cuda"


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


def exact_differences(logits, t, top_k, top_p, noise, cuda: bool) -> int:
    """Tokens of the fused kernel (Triton, or the CUDA extension's) that differ from the official chain's on the
    same noise; more than float32 near-ties explain (1 in 10^4) stops the run: no timing of a wrong kernel."""
    want = official_chain_noise(logits, t, top_k, top_p, noise)
    run = functools.partial(S.sample_cfg_top_k_top_p, logits, t, top_k, top_p, noise=noise)
    got = with_backend("cuda", run) if cuda else run()
    diff = int((got != want).sum())
    if diff > max(1, got.numel() // 10000):
        raise SystemExit(f"correctness: fastvar{'-cuda' if cuda else ' exact'} differs from the official chain in "
                         f"{diff} of {got.numel()} tokens (shape {tuple(got.shape)}): not timing a wrong kernel")
    return diff


def check_fast_support(logits, t, top_k, top_p) -> None:
    V = logits.shape[-1]
    kept = ref.top_k_top_p_filter_(ref.cfg_mix(logits, t).reshape(-1, V), top_k, top_p, stable=True) > -float("inf")
    fast = S.sample_cfg_top_k_top_p(logits, t, top_k, top_p, mode="fast", seed=1).reshape(-1)
    if not kept[torch.arange(fast.numel(), device=logits.device), fast].all():
        raise SystemExit("correctness: fastvar fast sampled outside the top-k/top-p support")


def case(B, pn, args, gen, compiled, with_cuda) -> Case:
    """One step of ``B`` images at a ``pn x pn`` scale: every provider on the same logits."""
    l, V, t = pn * pn, args.V, args.cfg * 0.5                  # a mid-schedule guidance strength
    logits = torch.randn(2 * B, l, V, device=DEVICE, generator=gen) * 3
    noise = torch.empty(B * l, V, device=DEVICE).exponential_(generator=gen)
    note = f"{exact_differences(logits, t, args.top_k, args.top_p, noise, False)} exact-token differences of {B * l}"
    check_fast_support(logits, t, args.top_k, args.top_p)
    if with_cuda:
        note += f"; cuda: {exact_differences(logits, t, args.top_k, args.top_p, noise, True)} differences"
    kw = dict(cfg_t=t, top_k=args.top_k, top_p=args.top_p, validate=False)
    providers = {
        "eager": lambda: official_chain(logits, t, args.top_k, args.top_p, gen),
        "fastvar-exact": lambda: S.sample_cfg_top_k_top_p(logits, generator=gen, **kw),
        "fastvar-exact-kernel": lambda: S.sample_cfg_top_k_top_p(logits, noise=noise, **kw),
        "fastvar-fast": lambda: S.sample_cfg_top_k_top_p(logits, mode="fast", seed=7, **kw),
    }
    if with_cuda:
        providers["fastvar-cuda"] = lambda: with_backend("cuda", lambda: S.sample_cfg_top_k_top_p(
            logits, noise=noise, **kw))
    if compiled is not None:
        providers["compile"] = lambda: compiled(logits, t, args.top_k, args.top_p,
                                                torch.empty_like(noise).exponential_(generator=gen))
    # both logit halves, the noise (exact mode), the tokens
    nbytes = {p: B * l * ((2 if p == "fastvar-fast" else 3) * V * 4 + 8) for p in providers}
    return Case("step", providers, {p: note for p in providers}, f"B={B} l={l} V={V}", nbytes=nbytes,
                keys=dict(B=B, pn=pn, l=l, rows=B * l, V=V, top_k=args.top_k, top_p=args.top_p, cfg_t=t))


def bench(args) -> int:
    compiled = None if args.no_compile else torch.compile(official_chain_noise)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    with_cuda = cuda_extension_built(DEVICE)
    if not with_cuda:
        print("fastvar-cuda: skipped, the CUDA extension fastvar._C is not built (scripts/build_cuda.sh)")
    cases = ((f"B={B} pn={pn}", functools.partial(case, B, pn, args, gen, compiled, with_cuda))
             for B in args.batches for pn in args.scales)
    path, _ = run_cases("sampling", cases, args, RESULTS)
    plot(path, x="rows", panels=("B",))
    return 0


def study(args) -> int:
    """Exact-mode agreement of the fused kernel with torch's own softmax / argmax on random rows."""
    on_cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if on_cuda else "cpu")
    if not on_cuda:
        from fastvar.ops._backend import triton_interpret
        if not triton_interpret():
            print("--study needs a CUDA GPU, or TRITON_INTERPRET=1 to run the kernel in the CPU interpreter")
            return 2
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
            got = with_backend("triton", functools.partial(S.sample_cfg_top_k_top_p, logits, args.cfg * 0.5, top_k,
                                                           top_p, noise=noise))[0]
            diffs += int((got != want).sum())
            n += rows
        rec = dict(metadata(dev), device=name, bench="sampling_study", V=V, rows=n, top_k=top_k, top_p=top_p,
                   logit_scale=args.study_scale, token_differences=diffs, rows_gap_below_2e_20=near,
                   seconds=f"{time.time() - t0:.1f}")
        out.append(rec)
        print(rec)
    write_csv(out, args.out or results_path(RESULTS, "sampling_study", out[0]))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--scales", type=int, nargs="+", default=list(PATCH_NUMS_256), help="pn of each scale (l = pn^2)")
    p.add_argument("--V", type=int, default=4096)
    p.add_argument("--top-k", type=int, default=900)
    p.add_argument("--top-p", type=float, default=0.96)
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    timing_options(p, "sampling")
    p.add_argument("--study", type=int, default=0, help="run the exact-mode agreement study on this many rows")
    p.add_argument("--study-batch", type=int, default=16384, help="rows per study batch")
    p.add_argument("--study-scale", type=float, default=3.0, help="std of the study's random logits")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.study:
        return study(args)
    if not require_cuda("bench_sampling.py"):
        print("(The exactness study runs on CPU: TRITON_INTERPRET=1 python bench/bench_sampling.py --study N.)",
              file=sys.stderr)
        return 2
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
