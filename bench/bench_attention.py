"""Benchmark of block-causal multi-scale attention (training) and the KV-cached sampling step.

Providers side by side, all with VAR's q/k L2 norm (``attn_l2_norm=True``) included in what is timed:

* ``sdpa-dense``: the official computation: ``F.normalize`` and ``scaled_dot_product_attention`` with the
  dense ``(L, L)`` block-causal mask (built once);
* ``flex``: ``torch.nn.attention.flex_attention`` with a block mask built once, the whole function
  (normalisation included) under ``torch.compile``;
* ``flash-attn``: one ``flash_attn_func`` call per scale (queries of scale s against keys
  ``[0, end(s))``), if the ``flash_attn`` package is installed;
* ``fastvar``: ``fastvar.ops.block_causal_attention`` on the Triton kernels.

Sampling: at every scale of a schedule, ``fastvar.ops.kv_cached_attention`` (norm, in-place cache append
and attention in one launch) against SDPA on an already concatenated cache (attention only), the
official ``torch.cat`` step (norm + concatenation + SDPA) and flash-attn where installed.

Every provider's output is checked against a float32 reference before timing. Times are CUDA-event
medians from ``triton.testing.do_bench``; TFLOP/s count the useful (unmasked) work only:
forward ``4 * B * H * D * sum_s l_s * end(s)``, backward 2.5x that. Results go to
``bench/results/attention_<gpu>_<date>.csv`` (GPU, date, commit, shapes) and a plot when matplotlib is
installed. Columns: ``q_len`` query rows, ``L`` keys (for a sampling step: the scale's tokens and the
cached prefix including them), ``scale`` the scale index of a sampling step, ``speedup_vs_sdpa`` against
``sdpa-dense`` (training) or ``sdpa-precat`` (sampling step: SDPA on a cache already concatenated),
``speedup_vs_flex`` against ``flex`` (training).

    python bench/bench_attention.py                 # all cases
    python bench/bench_attention.py --cases d16 kv256 --providers sdpa-dense fastvar
"""
import argparse
import csv
import math
import os
import sys

import torch
import torch.nn.functional as F

from fastvar.utils.benchmarking import (ceiling, metadata, pyplot, rel_err, require_cuda, results_path,
                                     save_plot, timing_options)

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

VAR_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
VAR_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
VAR_1024 = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)

# name: (patch_nums, B, H, D)
TRAIN_CASES = {
    "d16": (VAR_256, 32, 16, 64),
    "d30": (VAR_256, 16, 30, 64),
    "d36": (VAR_512, 8, 36, 64),
    "1024px": (VAR_1024, 2, 16, 128),
}
# name: (patch_nums, CFG batch 2B, H, D)
KV_CASES = {
    "kv256": (VAR_256, 2 * 16, 16, 64),
    "kv512": (VAR_512, 2 * 8, 36, 64),
    "kv1024": (VAR_1024, 2 * 2, 16, 128),
}
DEVICE = "cuda"
PROVIDERS = ("sdpa-dense", "flex", "flash-attn", "fastvar")
KV_PROVIDERS = ("sdpa-precat", "sdpa-cat", "flash-attn", "fastvar")


def lens_of(patch_nums):
    return tuple(p * p for p in patch_nums)


def bounds(lens):
    out, start = [], 0
    for n in lens:
        out.append((start, start + n))
        start += n
    return out


def useful_fwd_flops(lens, B, H, D):
    return 4 * B * H * D * sum(n * e for n, (_, e) in zip(lens, bounds(lens)))


# ------------------------------------------------------------------ providers (training)
def l2_norm(q, k, scale_mul):
    """VAR's normalisation on (B, L, H, D): normalize(q) * exp(min(scale_mul, ln 100)), normalize(k)."""
    from fastvar.reference.attention import MAX_SCALE_MUL
    factor = scale_mul.reshape(1, 1, -1, 1).clamp_max(MAX_SCALE_MUL).exp()
    return (F.normalize(q, dim=-1) * factor).to(q.dtype), F.normalize(k, dim=-1)


def make_training_providers(lens, wanted):
    """{name: fn(q, k, v, scale_mul) -> (B, L, H, D)}, for the providers available here."""
    from fastvar import ops
    from fastvar.reference import attention as ref
    L = sum(lens)
    providers = {}
    bias = {}

    if "sdpa-dense" in wanted:
        def sdpa_dense(q, k, v, sm):
            key = (q.dtype, q.device)
            if key not in bias:
                bias[key] = ref.block_causal_bias(lens, q.device, q.dtype)
            return ref.block_causal_attention(q, k, v, lens, None, sm, attn_bias=bias[key])
        providers["sdpa-dense"] = sdpa_dense

    if "flex" in wanted:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError as e:
            print(f"  flex: unavailable ({e})")
        else:
            scale_idx = ref.scale_index(lens, DEVICE)

            def mask_mod(b, h, q_idx, kv_idx):
                return scale_idx[kv_idx] <= scale_idx[q_idx]
            block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=L, KV_LEN=L, device=DEVICE)

            @torch.compile(dynamic=False)
            def flex(q, k, v, sm):
                qn, kn = l2_norm(q, k, sm)
                out = flex_attention(qn.transpose(1, 2), kn.transpose(1, 2), v.transpose(1, 2),
                                     block_mask=block_mask, scale=1.0)
                return out.transpose(1, 2)
            providers["flex"] = flex

    if "flash-attn" in wanted:
        try:
            from flash_attn import flash_attn_func
        except ImportError:
            print("  flash-attn: not installed, skipped")
        else:
            spans = bounds(lens)

            def flash_per_scale(q, k, v, sm):
                qn, kn = l2_norm(q, k, sm)
                return torch.cat([flash_attn_func(qn[:, b:e], kn[:, :e], v[:, :e], softmax_scale=1.0)
                                  for b, e in spans], dim=1)
            providers["flash-attn"] = flash_per_scale

    if "fastvar" in wanted:
        def fastvar(q, k, v, sm):
            return ops.block_causal_attention(q, k, v, lens, None, sm)
        providers["fastvar"] = fastvar
    return providers


# ------------------------------------------------------------------ providers (KV step)
def make_kv_providers(wanted):
    """{name: fn(state, s) -> out}: ``state`` holds inputs and caches of every scale."""
    from fastvar import ops
    providers = {}
    if "sdpa-precat" in wanted:
        def precat(st, s):
            b, e = st["spans"][s]
            return F.scaled_dot_product_attention(st["qn_t"][s], st["k_all_t"][:, :, :e], st["v_all_t"][:, :, :e],
                                                  scale=1.0)
        providers["sdpa-precat"] = precat
    if "sdpa-cat" in wanted:
        def cat(st, s):      # the official step: normalise, re-concatenate the cache, attend
            b, e = st["spans"][s]
            q, k, v = st["q"][s], st["k"][s], st["v"][s]
            qn, kn = l2_norm(q, k, st["sm"])
            kc = torch.cat((st["k_all"][:, :b], kn), dim=1)
            vc = torch.cat((st["v_all"][:, :b], v), dim=1)
            return F.scaled_dot_product_attention(qn.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2),
                                                  scale=1.0).transpose(1, 2)
        providers["sdpa-cat"] = cat
    if "flash-attn" in wanted:
        try:
            from flash_attn import flash_attn_func
        except ImportError:
            print("  flash-attn: not installed, skipped")
        else:
            def flash(st, s):
                b, e = st["spans"][s]
                return flash_attn_func(st["qn"][s], st["k_all"][:, :e], st["v_all"][:, :e], softmax_scale=1.0)
            providers["flash-attn"] = flash
    if "fastvar" in wanted:
        def fastvar(st, s):
            b, e = st["spans"][s]
            return ops.kv_cached_attention(st["q"][s], st["k"][s], st["v"][s], st["k_cache"], st["v_cache"], b,
                                           None, st["sm"])
        providers["fastvar"] = fastvar
    return providers


# ------------------------------------------------------------------ runs
def record(writer, meta, ms, tflops, **fields):
    """One CSV row: the run's metadata, the case's fields, median and 20/80 % quantiles of ``ms``."""
    writer.writerow({**meta["row"], **fields, "ms": f"{ms[0]:.4f}", "ms_p20": f"{ms[1]:.4f}",
                     "ms_p80": f"{ms[2]:.4f}", "tflops": f"{tflops:.2f}"})


def scale_mul_param(H):
    """VAR's ``scale_mul_1H11`` around its init ln 4, as a leaf that takes gradients."""
    sm = math.log(4.0) + 0.3 * torch.randn(1, H, 1, 1, device=DEVICE)
    return sm.requires_grad_(True)


def bench_training(name, args, writer, meta):
    import triton.testing
    pn, B, H, D = TRAIN_CASES[name]
    lens = lens_of(pn)
    L = sum(lens)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    qkv = torch.randn(B, L, 3, H, D, dtype=dtype, device=DEVICE, requires_grad=True)
    sm = scale_mul_param(H)
    dout = torch.randn(B, L, H, D, dtype=dtype, device=DEVICE)
    flops = useful_fwd_flops(lens, B, H, D)
    print(f"\n{name}: B={B} L={L} H={H} D={D} {args.dtype}, {len(lens)} scales, "
          f"useful fwd {flops / 1e9:.1f} GFLOP ({flops / (4 * B * H * D * L * L):.0%} of dense)")

    # float32 reference on a slice (batch 0, 2 heads): cheap even at L ~ 10k
    from fastvar.reference import attention as ref
    q, k, v = qkv.detach().unbind(2)
    ref32 = ref.block_causal_attention(*(t[:1, :, :2].float() for t in (q, k, v)), lens, None, sm.detach()[:, :2])
    providers = make_training_providers(lens, args.providers)
    base = {}
    for prov, fn in providers.items():
        try:
            out = fn(q, k, v, sm.detach())
        except Exception as e:         # a provider that cannot run this shape is reported, not fatal
            print(f"  {prov:12s} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            continue
        err = rel_err(out[:1, :, :2], ref32)
        if err > 0.05:
            raise SystemExit(f"{name}/{prov}: output differs from the float32 reference (rel err {err:.3g})")

        def fwd():
            fn(q, k, v, sm.detach())

        def fwd_bwd():
            qkv.grad = None
            sm.grad = None
            qq, kk, vv = qkv.unbind(2)
            fn(qq, kk, vv, sm).backward(dout)
        for mode, f, mult in (("fwd", fwd, 1.0), ("fwd+bwd", fwd_bwd, 3.5)):
            if mode == "fwd+bwd" and args.no_backward:
                continue
            ms = triton.testing.do_bench(f, warmup=args.warmup, rep=args.rep, quantiles=[0.5, 0.2, 0.8])
            tflops = mult * flops / (ms[0] * 1e-3) / 1e12
            if prov in ("sdpa-dense", "flex"):
                base[prov, mode] = ms[0]
            speedup, vs_flex = (base[p, mode] / ms[0] if (p, mode) in base else float("nan")
                                for p in ("sdpa-dense", "flex"))
            print(f"  {prov:12s} {mode:8s} {ms[0]:8.3f} ms [{ms[1]:.3f}, {ms[2]:.3f}]  {tflops:6.1f} TFLOP/s "
                  f"({tflops / meta['peak']:.0%} of peak)  x{speedup:.2f} vs sdpa-dense  x{vs_flex:.2f} vs flex  "
                  f"err {err:.2e}")
            record(writer, meta, ms, tflops, case=name, mode=mode, provider=prov, B=B, q_len=L, L=L, H=H, D=D,
                   dtype=args.dtype, schedule="-".join(map(str, pn)), scale="", speedup_vs_sdpa=f"{speedup:.3f}",
                   speedup_vs_flex=f"{vs_flex:.3f}", rel_err=f"{err:.3e}")


def bench_kv(name, args, writer, meta):
    import triton.testing
    pn, B, H, D = KV_CASES[name]
    lens = lens_of(pn)
    L = sum(lens)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    spans = bounds(lens)
    q, k, v = (torch.randn(B, L, H, D, dtype=dtype, device=DEVICE) for _ in range(3))
    sm = scale_mul_param(H).detach()
    qn, kn = l2_norm(q, k, sm)
    st = {"spans": spans, "sm": sm,
          "q": [q[:, b:e] for b, e in spans], "k": [k[:, b:e] for b, e in spans], "v": [v[:, b:e] for b, e in spans],
          "qn": [qn[:, b:e] for b, e in spans], "qn_t": [qn[:, b:e].transpose(1, 2) for b, e in spans],
          "k_all": kn, "v_all": v, "k_all_t": kn.transpose(1, 2), "v_all_t": v.transpose(1, 2),
          "k_cache": torch.empty(B, L, H, D, dtype=dtype, device=DEVICE),
          "v_cache": torch.empty(B, L, H, D, dtype=dtype, device=DEVICE)}
    print(f"\n{name}: sampling step per scale, CFG batch {B}, H={H} D={D} {args.dtype}, L={L}")
    from fastvar.reference import attention as ref
    ref32 = ref.block_causal_attention(*(t[:1, :, :2].float() for t in (q, k, v)), lens, None, sm[:, :2])
    providers = make_kv_providers(args.providers)
    totals, precat_ms = {}, {}
    for prov, fn in providers.items():
        # run the whole schedule once in order (fills fastvar's cache), check it against the reference
        out = torch.cat([fn(st, s).reshape(B, -1, H, D) if prov != "sdpa-precat" else fn(st, s).transpose(1, 2)
                         for s in range(len(lens))], dim=1)
        err = rel_err(out[:1, :, :2], ref32)
        if err > 0.05:
            raise SystemExit(f"{name}/{prov}: output differs from the float32 reference (rel err {err:.3g})")
        for s, (b, e) in enumerate(spans):
            ms = triton.testing.do_bench(lambda: fn(st, s), warmup=args.warmup, rep=args.rep,
                                         quantiles=[0.5, 0.2, 0.8])
            flops = 4 * B * H * D * (e - b) * e
            tflops = flops / (ms[0] * 1e-3) / 1e12
            totals[prov] = totals.get(prov, 0.0) + ms[0]
            if prov == "sdpa-precat":
                precat_ms[s] = ms[0]
            speedup = precat_ms[s] / ms[0] if s in precat_ms else float("nan")
            record(writer, meta, ms, tflops, case=name, mode="kv-step", provider=prov, B=B, q_len=e - b, L=e, H=H,
                   D=D, dtype=args.dtype, schedule="-".join(map(str, pn)), scale=s, speedup_vs_sdpa=f"{speedup:.3f}",
                   speedup_vs_flex="", rel_err=f"{err:.3e}")
    for prov, t in totals.items():
        vs = "  ".join(f"x{totals[p] / t:.2f} vs {p}" for p in ("sdpa-precat", "sdpa-cat") if p in totals)
        print(f"  {prov:12s} all {len(lens)} scales {t:8.3f} ms  {vs}  (sdpa-cat: the official step)")


def plot(csv_path):
    plt = pyplot()
    if plt is None:
        return
    with open(csv_path) as f:
        rows = [r for r in csv.DictReader(f) if r["mode"] in ("fwd", "fwd+bwd")]
    if not rows:
        return
    groups = sorted({(r["case"], r["mode"]) for r in rows}, key=lambda x: (x[0], x[1]))
    provs = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    fig, ax = plt.subplots(figsize=(1.6 * len(groups) + 2, 4))
    width = 0.8 / max(len(provs), 1)
    for i, p in enumerate(provs):
        vals = [next((float(r["tflops"]) for r in rows if (r["case"], r["mode"]) == g and r["provider"] == p), 0.0)
                for g in groups]
        ax.bar([j + i * width for j in range(len(groups))], vals, width, label=p)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels([f"{c}\n{m}" for c, m in groups])
    ax.set_ylabel("useful TFLOP/s")
    ax.set_title(f"block-causal attention, {rows[0]['device']}")
    ax.legend()
    print(f"plot: {save_plot(fig, csv_path)}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(TRAIN_CASES) + list(KV_CASES),
                        choices=list(TRAIN_CASES) + list(KV_CASES))
    parser.add_argument("--providers", nargs="+", default=sorted(set(PROVIDERS) | set(KV_PROVIDERS)),
                        choices=sorted(set(PROVIDERS) | set(KV_PROVIDERS)))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--no-backward", action="store_true", help="time the forward only")
    timing_options(parser, "attention")
    args = parser.parse_args(argv)

    if not require_cuda("bench_attention.py"):
        return 2
    os.environ.setdefault("FASTVAR_BACKEND", "triton")   # fastvar's provider must be the Triton kernels

    row = metadata()
    meta = {"peak": ceiling(row["device"], "bf16_tflops"), "row": row}
    os.makedirs(RESULTS, exist_ok=True)
    path = args.out or results_path(RESULTS, "attention", row)
    fields = list(row) + ["case", "mode", "provider", "B", "q_len", "L", "H", "D", "dtype", "schedule", "scale",
                          "ms", "ms_p20", "ms_p80", "tflops", "speedup_vs_sdpa", "speedup_vs_flex", "rel_err"]
    print(f"{row['device']}, torch {row['torch']}, triton {row['triton']}, commit {row['commit']}; "
          f"bf16 peak {meta['peak']} TFLOP/s")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for name in args.cases:
            (bench_training if name in TRAIN_CASES else bench_kv)(name, args, writer, meta)
            f.flush()
    print(f"\nresults: {path}")
    plot(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
