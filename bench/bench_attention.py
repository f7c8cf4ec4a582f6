"""Benchmark of block-causal multi-scale attention (training) and the KV-cached sampling step, all providers
with VAR's q/k L2 norm (``attn_l2_norm=True``) in what is timed. Training (cases d16, d30, d36, 1024px):

* ``sdpa-dense``: the official computation: ``F.normalize`` and ``scaled_dot_product_attention`` with the
  dense ``(L, L)`` block-causal mask (built once);
* ``flex``: ``torch.nn.attention.flex_attention`` with a block mask built once, the whole function
  (normalisation included) under ``torch.compile``;
* ``flash-attn``: one ``flash_attn_func`` call per scale (queries of scale s against keys ``[0, end(s))``),
  if the ``flash_attn`` package is installed;
* ``fastvar``: ``fastvar.ops.block_causal_attention`` on the Triton kernels.

Sampling (cases kv256, kv512, kv1024): at every scale, ``fastvar.ops.kv_cached_attention`` (norm, in-place
cache append and attention in one launch) against ``sdpa-precat`` (SDPA on an already concatenated cache,
attention only), ``sdpa-cat`` (the official ``torch.cat`` step: norm + concatenation + SDPA) and flash-attn.

Outputs are checked against a float32 reference before timing (the relative error). TFLOP/s count the useful
(unmasked) work only: forward ``4 * B * H * D * sum_s l_s * end(s)``, backward 2.5x that, against the bf16
ceiling; ``speedup_vs_eager`` is against ``sdpa-dense`` (training) or ``sdpa-precat`` (sampling). Key columns:
``mode`` (fwd, fwd+bwd, kv-step), ``B``, ``q_len`` query rows, ``L`` keys (a sampling step: the scale's tokens
and the cached prefix), ``H``, ``D``, ``dtype``, ``schedule``, ``scale`` (of a step), ``speedup_vs_flex``.

``--tiles``: fastvar's candidate tiles instead of the providers (``mode`` tiles, ``kernel`` fwd, dkdv, dq or kv;
the provider is the tile ``BLOCK_MxBLOCK_N w<warps> s<stages>``): the forward and each gradient kernel (the
other one pinned; the whole backward timed) of the training cases, and the KV step at the last three scales of
the sampling cases, every candidate checked against the float32 reference; ``speedup_vs_eager`` is against the
pinned tile, the first of its table (``triton_kernels/attention.py``). Results:
``bench/results/attention_tiles_<gpu>_<date>.csv``.

    python bench/bench_attention.py                 # all cases
    python bench/bench_attention.py --cases d16 kv256 --providers sdpa-dense fastvar
    python bench/bench_attention.py --tiles --cases kv256 d30 kv1024 1024px
"""
import argparse
import collections
import functools
import math
import os
import sys

import torch
import torch.nn.functional as F

from fastvar.schedule import PATCH_NUMS_256, PATCH_NUMS_512, Schedule
from fastvar.utils.benchmarking import Case, plot, rel_err, run_cases, timing_options

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PATCH_NUMS_1024 = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)
# name: (patch_nums, B, H, D)
TRAIN_CASES = {"d16": (PATCH_NUMS_256, 32, 16, 64), "d30": (PATCH_NUMS_256, 16, 30, 64),
               "d36": (PATCH_NUMS_512, 8, 36, 64), "1024px": (PATCH_NUMS_1024, 2, 16, 128)}
# name: (patch_nums, CFG batch 2B, H, D)
KV_CASES = {"kv256": (PATCH_NUMS_256, 2 * 16, 16, 64), "kv512": (PATCH_NUMS_512, 2 * 8, 36, 64),
            "kv1024": (PATCH_NUMS_1024, 2 * 2, 16, 128)}
DEVICE = "cuda"
PROVIDERS = ("sdpa-dense", "flex", "flash-attn", "fastvar")
KV_PROVIDERS = ("sdpa-precat", "sdpa-cat", "flash-attn", "fastvar")


def l2_norm(q, k, scale_mul):
    """VAR's normalisation on (B, L, H, D): normalize(q) * exp(min(scale_mul, ln 100)), normalize(k)."""
    from fastvar.reference.attention import MAX_SCALE_MUL
    factor = scale_mul.reshape(1, 1, -1, 1).clamp_max(MAX_SCALE_MUL).exp()
    return (F.normalize(q, dim=-1) * factor).to(q.dtype), F.normalize(k, dim=-1)


def load_flash_attn():
    """``flash_attn.flash_attn_func``, or None (and a line saying so) when the package is not installed."""
    try:
        from flash_attn import flash_attn_func as fn
        return fn
    except ImportError:
        print("  flash-attn: not installed, skipped")
        return None


def sdpa(q, k, v):
    """SDPA on (B, L, H, D) tensors, the L2-normalised q already scaled (softmax scale 1)."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          scale=1.0).transpose(1, 2)


def training_providers(sched, dtype, wanted):
    """{name: fn(q, k, v, scale_mul) -> (B, L, H, D)}, for the providers available here."""
    from fastvar import ops
    from fastvar.reference import attention as ref
    lens, providers = sched.lens, {}
    if "sdpa-dense" in wanted:
        bias = ref.block_causal_bias(lens, DEVICE, dtype)      # the dense (L, L) mask, built once
        providers["sdpa-dense"] = lambda q, k, v, sm: ref.block_causal_attention(q, k, v, lens, None, sm,
                                                                                 attn_bias=bias)
    if "flex" in wanted:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError as e:
            print(f"  flex: unavailable ({e})")
        else:
            scale_idx = ref.scale_index(lens, DEVICE)
            block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: scale_idx[kv_idx] <= scale_idx[q_idx],
                                           B=None, H=None, Q_LEN=sched.L, KV_LEN=sched.L, device=DEVICE)

            @torch.compile(dynamic=False)
            def flex(q, k, v, sm):
                qn, kn = l2_norm(q, k, sm)
                return flex_attention(qn.transpose(1, 2), kn.transpose(1, 2), v.transpose(1, 2),
                                      block_mask=block_mask, scale=1.0).transpose(1, 2)
            providers["flex"] = flex
    flash = load_flash_attn() if "flash-attn" in wanted else None
    if flash:       # one call per scale: queries of scale s against keys [0, end(s))
        def flash_per_scale(q, k, v, sm):
            qn, kn = l2_norm(q, k, sm)
            return torch.cat([flash(qn[:, b:e], kn[:, :e], v[:, :e], softmax_scale=1.0) for b, e in sched.spans], 1)
        providers["flash-attn"] = flash_per_scale
    if "fastvar" in wanted:
        providers["fastvar"] = lambda q, k, v, sm: ops.block_causal_attention(q, k, v, lens, None, sm)
    return providers


def scale_mul_param(H):
    """VAR's ``scale_mul_1H11`` around its init ln 4, as a leaf that takes gradients."""
    sm = math.log(4.0) + 0.3 * torch.randn(1, H, 1, 1, device=DEVICE)
    return sm.requires_grad_(True)


# the relative error against the float32 reference above which a result is called wrong (the provider is left
# out, a pinned tile stops the run): a sanity check before timing (the tests hold the kernels to their dtype's
# tolerances)
CHECK_BOUND = {torch.bfloat16: 0.05, torch.float16: 0.05, torch.float32: 1e-4}


def verdict(name, prov, what, err, dtype):
    """The check column ``rel_err=...`` of a result with relative error ``err``; over the dtype's bound (or NaN)
    ``SystemExit`` naming the case, the provider and ``what`` is wrong (a provider is then left out, see
    :func:`left_out`; a wrong pinned tile stops the run)."""
    if not err <= CHECK_BOUND[dtype]:
        raise SystemExit(f"{name}/{prov}: the {what} is off the float32 reference (rel err {err:.3g})")
    return f"rel_err={err:.2e}"


def reference_slice(q, k, v, sched, sm):
    """The float32 reference on batch 0 and 2 heads (cheap even at L ~ 10k): ``(1, L, 2, D)``."""
    from fastvar.reference import attention as ref
    return ref.block_causal_attention(*(t[:1, :, :2].float() for t in (q, k, v)), sched.lens, None, sm[:, :2])


def checker(name, q, k, v, sched, sm):
    """check(provider, out (B, L, H, D), rows=all): :func:`verdict` on ``out``'s error against
    :func:`reference_slice`, ``out`` holding the token rows ``rows`` (a slice) of the schedule."""
    ref32 = reference_slice(q, k, v, sched, sm)

    def check(prov, out, rows=slice(None)):
        return verdict(name, prov, "output", rel_err(out[:1, :, :2], ref32[:, rows]), q.dtype)
    return check


def left_out(args, name, prov, error):
    """A provider that cannot run a case, or fails its check (``SystemExit`` from :func:`verdict`), is reported and
    not timed; the others still are (a stage of the GPU campaign keeps their rows). A wrong result is also listed
    in ``args.wrong``: the run then exits with status 1."""
    print(f"  {prov:12s} left out: {type(error).__name__}: {str(error).splitlines()[0][:160]}")
    if isinstance(error, SystemExit):
        args.wrong.append(f"{name}/{prov}")


def keys(pn, B, q_len, L, H, D, dtype, mode, scale=""):
    return dict(mode=mode, B=B, q_len=q_len, L=L, H=H, D=D, dtype=dtype, schedule="-".join(map(str, pn)), scale=scale)


def training_cases(name, args):
    """A forward case and a forward + backward case: every provider on the same q, k, v."""
    pn, B, H, D = TRAIN_CASES[name]
    sched, dtype = Schedule.of(pn), getattr(torch, args.dtype)
    L = sched.L
    torch.manual_seed(0)
    qkv = torch.randn(B, L, 3, H, D, dtype=dtype, device=DEVICE, requires_grad=True)
    sm = scale_mul_param(H)
    dout = torch.randn(B, L, H, D, dtype=dtype, device=DEVICE)
    flops = 4 * B * H * D * sum(n * e for n, (_, e) in zip(sched.lens, sched.spans))
    print(f"\n{name}: B={B} L={L} H={H} D={D} {args.dtype}, {len(sched)} scales, "
          f"useful fwd {flops / 1e9:.1f} GFLOP ({flops / (4 * B * H * D * L * L):.0%} of dense)")
    q, k, v = qkv.detach().unbind(2)
    check = checker(name, q, k, v, sched, sm.detach())
    fwd, fwd_bwd, checks = {}, {}, {}
    for prov, fn in training_providers(sched, dtype, args.providers).items():
        try:
            checks[prov] = check(prov, fn(q, k, v, sm.detach()))
        except (Exception, SystemExit) as e:      # cannot run this shape, or a wrong output: see left_out
            left_out(args, name, prov, e)
            continue
        fwd[prov] = functools.partial(fn, q, k, v, sm.detach())

        def backward(fn=fn):
            qkv.grad = sm.grad = None
            fn(*qkv.unbind(2), sm).backward(dout)
        fwd_bwd[prov] = backward
    modes = (("fwd", fwd, 1.0),) + ((("fwd+bwd", fwd_bwd, 3.5),) if not args.no_backward else ())
    return [Case(name, providers, checks, f"B={B} L={L} H={H} D={D}", keys(pn, B, L, L, H, D, args.dtype, mode),
                 flops=mult * flops, peak="bf16_tflops", eager="sdpa-dense", also_vs=("flex",))
            for mode, providers, mult in modes]


def kv_cases(name, args):
    """One case per scale of the schedule: the sampling step at that scale, the cache holding the prefix.
    ``sdpa-precat``: SDPA on a cache already concatenated (attention only); ``sdpa-cat``: the official step
    (normalise, re-concatenate the cache, attend); ``fastvar``: norm, in-place cache append and attention."""
    from fastvar import ops
    pn, B, H, D = KV_CASES[name]
    sched, dtype = Schedule.of(pn), getattr(torch, args.dtype)
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, sched.L, H, D, dtype=dtype, device=DEVICE) for _ in range(3))
    sm = scale_mul_param(H).detach()
    qn, kn = l2_norm(q, k, sm)
    k_cache, v_cache = torch.empty_like(k), torch.empty_like(v)
    flash = load_flash_attn() if "flash-attn" in args.providers else None
    print(f"\n{name}: sampling step per scale, CFG batch {B}, H={H} D={D} {args.dtype}, L={sched.L}")

    def official(q, k, v, k_prefix, v_prefix):
        qn, kn = l2_norm(q, k, sm)
        return sdpa(qn, torch.cat((k_prefix, kn), dim=1), torch.cat((v_prefix, v), dim=1))

    def at(b, e):        # the providers of the scale of tokens [b, e), on views sliced once
        qs, ks, vs, qns, k_upto, v_upto = q[:, b:e], k[:, b:e], v[:, b:e], qn[:, b:e], kn[:, :e], v[:, :e]
        qn_h, k_h, v_h = qns.transpose(1, 2), k_upto.transpose(1, 2), v_upto.transpose(1, 2)
        every = {"sdpa-precat": lambda: F.scaled_dot_product_attention(qn_h, k_h, v_h, scale=1.0),   # (B, H, l, D)
                 "sdpa-cat": functools.partial(official, qs, ks, vs, kn[:, :b], v[:, :b]),
                 "flash-attn": lambda: flash(qns, k_upto, v_upto, softmax_scale=1.0),
                 "fastvar": lambda: ops.kv_cached_attention(qs, ks, vs, k_cache, v_cache, b, None, sm)}
        return {p: every[p] for p in KV_PROVIDERS if p in args.providers and (p != "flash-attn" or flash)}
    steps = [at(b, e) for b, e in sched.spans]
    check = checker(name, q, k, v, sched, sm)
    # each provider runs the whole schedule once in order (fills fastvar's cache), checked against the reference
    checks = {}
    for p in list(steps[0]):
        try:
            checks[p] = check(p, torch.cat([step[p]().transpose(1, 2) if p == "sdpa-precat" else
                                            step[p]().reshape(B, -1, H, D) for step in steps], dim=1))
        except (Exception, SystemExit) as e:
            left_out(args, name, p, e)
            for step in steps:
                del step[p]
    return [Case(name, step, checks, f"B={B} l={e - b} L={e} H={H} D={D}",
                 keys(pn, B, e - b, e, H, D, args.dtype, "kv-step", s), flops=4 * B * H * D * (e - b) * e,
                 peak="bf16_tflops", eager="sdpa-precat") for s, (step, (b, e)) in enumerate(zip(steps, sched.spans))]


def tile_label(tile):
    """A tile ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` as a provider name."""
    bm, bn, warps, stages = tile
    return f"{bm}x{bn} w{warps} s{stages}"


def tile_case(name, kind, candidates, run, check, shape, keys_, flops, dtype):
    """A :class:`Case` of one kernel's candidate tiles: ``run(tile)`` -> its result, ``check(label, result)`` -> the
    check column. The pinned tile (the first: what every launch uses) is the baseline and must pass; another
    candidate that fails to compile or to launch, or fails its check, is reported and left out."""
    pinned = tile_label(candidates[0])
    providers, checks = {}, {}
    for tile in candidates:
        label = tile_label(tile)
        try:
            checks[label] = check(label, run(tile))
        except (Exception, SystemExit) as e:        # SystemExit: a failed check (verdict)
            if label == pinned:
                raise
            print(f"  {name} {kind} {label}: left out: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            continue
        providers[label] = functools.partial(run, tile)
    return Case(name, providers, checks, shape, dict(keys_, kernel=kind, pinned=pinned), flops=flops,
                peak="fp32_tflops" if dtype == torch.float32 else "bf16_tflops", eager=pinned)


def training_tile_cases(name, args):
    """``--tiles`` on a training case: the forward kernel's candidates (output against the reference, saved
    statistics against the pinned tile's), then each gradient kernel's with the other one pinned (the whole
    backward timed, so its TFLOP/s count 2.5x the forward's work)."""
    from fastvar.reference import attention as ref
    from fastvar.triton_kernels import attention as A
    pn, B, H, D = TRAIN_CASES[name]
    sched, dtype = Schedule.of(pn), getattr(torch, args.dtype)
    lens, L = sched.lens, sched.L
    torch.manual_seed(0)
    q, k, v = torch.randn(B, L, 3, H, D, dtype=dtype, device=DEVICE).unbind(2)     # VAR's strided qkv view
    sm = scale_mul_param(H).detach()
    dout = torch.randn(B, L, H, D, dtype=dtype, device=DEVICE)
    # the float32 reference on 2 heads (all of the batch: dscale_mul sums over it) and its gradients
    ref_in = [t.float().requires_grad_(True) for t in (q[:, :, :2], k[:, :, :2], v[:, :, :2], sm[:, :2])]
    ref_out = ref.block_causal_attention(*ref_in[:3], lens, None, ref_in[3])
    ref_out.backward(dout[:, :, :2].float())
    out, stats = A.block_causal_attention_fwd(q, k, v, lens, 1.0, sm)     # the pinned forward: the backward's input

    def check_fwd(label, result):
        o, st = result
        return verdict(name, label, "forward", max(rel_err(o[:, :, :2], ref_out), rel_err(st, stats)), dtype)

    def check_bwd(label, grads):        # dq, dk, dv, dscale_mul
        errs = [rel_err(g[:, :, :2], r.grad) for g, r in zip(grads[:3], ref_in)]
        return verdict(name, label, "backward", max(errs + [rel_err(grads[3][:2], ref_in[3].grad.reshape(-1))]),
                       dtype)
    flops = 4 * B * H * D * sum(n * e for n, (_, e) in zip(lens, sched.spans))
    print(f"\n{name}: candidate tiles, B={B} L={L} H={H} D={D} {args.dtype}")
    cases = []
    for kind in ("fwd", "dkdv", "dq"):
        if kind == "fwd":
            run, check, work = (lambda tile: A.block_causal_attention_fwd(q, k, v, lens, 1.0, sm, config=tile),
                                check_fwd, flops)
        else:
            run, check, work = (lambda tile, kind=kind: A.block_causal_attention_bwd(
                dout, q, k, v, out, stats, lens, 1.0, sm, config={kind: tile}), check_bwd, 2.5 * flops)
        cases.append(tile_case(name, kind, A._configs(kind, D, dtype, "cuda", L), run, check,
                               f"B={B} L={L} H={H} D={D}", keys(pn, B, L, L, H, D, args.dtype, "tiles"), work, dtype))
    return cases


def tile_scales(sched):
    """The scales whose KV steps ``--tiles`` times: the last three, where the step's time goes
    (tests/sm90_compile.py compiles the same launches for the campaign's tiles stage)."""
    return range(max(0, len(sched) - 3), len(sched))


def kv_tile_cases(name, args):
    """``--tiles`` on a sampling case: the KV step's candidate tiles at the schedule's last three scales (where
    its time goes), the caches holding the prefix; each candidate's output against the reference and the cache
    rows it wrote against the pinned steps' (then put back, so that no candidate sees another's)."""
    from fastvar.triton_kernels import attention as A
    pn, B, H, D = KV_CASES[name]
    sched, dtype = Schedule.of(pn), getattr(torch, args.dtype)
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, sched.L, H, D, dtype=dtype, device=DEVICE) for _ in range(3))
    sm = scale_mul_param(H).detach()
    caches = torch.empty_like(k), torch.empty_like(v)
    for b, e in sched.spans:           # the pinned steps, in order, fill the caches
        A.kv_cached_attention_fwd(q[:, b:e], k[:, b:e], v[:, b:e], *caches, b, 1.0, sm)
    written = [c.clone() for c in caches]
    ref32 = reference_slice(q, k, v, sched, sm)
    print(f"\n{name}: the KV step's candidate tiles, CFG batch {B}, H={H} D={D} {args.dtype}")
    cases = []
    for s in tile_scales(sched):
        b, e = sched.spans[s]

        def run(tile, b=b, e=e):
            return A.kv_cached_attention_fwd(q[:, b:e], k[:, b:e], v[:, b:e], *caches, b, 1.0, sm, config=tile)

        def check(label, out, b=b, e=e):
            try:
                errs = [rel_err(out[:1, :, :2], ref32[:, b:e])] + [rel_err(c[:, b:e], w[:, b:e])
                                                                   for c, w in zip(caches, written)]
                return verdict(name, label, "step (output or cache write)", max(errs), dtype)
            finally:
                for c, w in zip(caches, written):
                    c[:, b:e] = w[:, b:e]
        cases.append(tile_case(name, "kv", A._kv_candidates(e - b, D, dtype), run, check,
                               f"B={B} l={e - b} L={e} H={H} D={D}",
                               keys(pn, B, e - b, e, H, D, args.dtype, "tiles", s), 4 * B * H * D * (e - b) * e, dtype))
    return cases


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(TRAIN_CASES) + list(KV_CASES),
                        choices=list(TRAIN_CASES) + list(KV_CASES))
    parser.add_argument("--providers", nargs="+", choices=sorted(set(PROVIDERS) | set(KV_PROVIDERS)),
                        help="default: all")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="float32: --tiles only (the fp32 tile tables)")
    parser.add_argument("--no-backward", action="store_true", help="time the forward only")
    parser.add_argument("--tiles", action="store_true",
                        help="time fastvar's candidate tiles instead of the providers (mode 'tiles')")
    timing_options(parser, "attention")
    args = parser.parse_args(argv)
    if args.tiles and (args.no_backward or args.providers):
        parser.error("--tiles times fastvar's tiles of every kernel: it takes no --providers or --no-backward")
    args.providers = args.providers or sorted(set(PROVIDERS) | set(KV_PROVIDERS))
    if args.dtype == "float32" and not args.tiles:
        parser.error("--dtype float32 is for --tiles (the providers are compared in bf16 and fp16)")

    args.wrong = []
    builders = (training_tile_cases, kv_tile_cases) if args.tiles else (training_cases, kv_cases)
    cases = ((name, functools.partial(builders[name in KV_CASES], name, args)) for name in args.cases)
    if args.tiles:
        run_cases("attention", cases, args, RESULTS, default_name="attention_tiles")
        return 0
    path, rows = run_cases("attention", cases, args, RESULTS)
    totals = collections.Counter()     # (case, provider): ms of the steps of a whole schedule
    for r in rows:
        if r["mode"] == "kv-step":
            totals[r["case"], r["provider"]] += float(r["ms"])
    for (case, prov), t in totals.items():
        vs = "  ".join(f"x{totals[case, p] / t:.2f} vs {p}" for p in ("sdpa-precat", "sdpa-cat") if (case, p) in totals)
        print(f"{case}: {prov:12s} all scales {t:8.3f} ms  {vs}  (sdpa-cat: the official step)")
    plot(path, x="case", panels=("mode",), y="TFLOP/s", where=lambda r: r["mode"] != "kv-step")
    if args.wrong:
        print(f"wrong results, not timed: {', '.join(args.wrong)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
