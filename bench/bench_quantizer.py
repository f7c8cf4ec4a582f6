"""Benchmark of the residual quantizer: codebook lookup, the sampling step between scales, the multi-scale
encode (``img_to_idxBl`` after the encoder) and the teacher-forcing input.

Providers side by side, VAR's quantizer sizes (V = 4096, Cvae = 32, share_quant_resi = 4), batch
1, 16, 64, 256, both schedules (256 px: 1..16, 512 px: 1..32):

* ``eager``: the official computation (``fastvar.reference.quantize``): ``sum(z**2) + sum(e**2)``,
  ``addmm_``, ``argmin`` (an ``N x V`` float32 matrix); ``F.interpolate`` bicubic / area, Phi as
  ``h.mul(1-r) + conv(h).mul_(r)``, ``f_hat.add_``;
* ``compile``: the eager lookup under ``torch.compile`` (``--compile``);
* ``fastvar``: ``fastvar.ops`` on the Triton kernels (``FASTVAR_BACKEND=triton``): fused distance + argmin
  tiled over the codebook; gather + bicubic upsample, ``F.conv2d``, Phi + accumulate + area downsample;
* ``fastvar-fused`` (``step`` / ``step_idx``): the step with Phi's convolution inside the Triton kernel
  (``fused_conv=True``): gather + bicubic upsample + conv + Phi + accumulate, then area downsample.
* ``fastvar-cuda`` (``step`` / ``step_idx``, when the CUDA extension ``fastvar._C`` is built:
  ``scripts/build_cuda.sh``): the step on ``csrc/upsample_step.cu`` (``FASTVAR_BACKEND=cuda`` for the call):
  gather + bicubic upsample into a shared-memory tile with its halo, Phi's conv from it, accumulate; then area
  downsample.

Cases (``--ops``):

* ``lookup``: one lookup of the last scale's rows, ``N = B * H * W`` against the codebook;
* ``step`` / ``step_idx``: the sampling step (``get_next_autoregressive_input``) of every scale of the
  schedule, in order, from the code maps VAR's sampler builds (``step``) or from the token indices
  (``step_idx``: codes gathered inside the upsample kernel);
* ``encode``: ``f_to_idxBl_or_fhat(f, to_fhat=False)``; ``var_input``: ``idxBl_to_var_input``.

Every provider's output is checked against the eager one before timing (lookup / encode: identical indices,
the disagreement count is recorded; maps: relative error). Times are CUDA-event medians (p20 / p80) of
``triton.testing.do_bench``. ``GB/s`` counts the bytes the fused path must move at least (for every provider,
so the columns compare): lookup ``N*C*4 + V*C*4 + N*8``; step per scale ``7 * B*C*H*W*4`` (upsample write,
conv read + write, the accumulate's 3 reads + 1 write) plus the code and next maps; encode / var_input the same
per scale plus the lookup's. ``pct_hbm`` is that against the HBM ceiling (H100 3.35 TB/s, H200 4.8 TB/s).
For ``fastvar-fused``, which keeps ``u`` and the conv's output on chip (about 3 passes per scale, not 7),
these two columns are an effective rate for the same work, not its traffic.
``gpu_ops`` counts the kernels, memsets and copies of one call (torch.profiler); for ``step`` / ``step_idx``
``gpu_ops_per_scale`` divides it by the scale count (the fastvar call also zeroes f_hat once: +1 per call).
``peak_MB`` is the peak of ``torch.cuda.max_memory_allocated`` during one call, above what was allocated
before it (the eager lookup holds the ``N x V`` float32 distances). Results go to
``bench/results/quantizer_<gpu>_<date>.csv`` with the GPU, date, commit and shapes, and a plot when
matplotlib is installed.

    python bench/bench_quantizer.py
    python bench/bench_quantizer.py --ops lookup step --batches 1 64 --schedules 256
"""
import argparse
import csv
import os
import sys

import torch

from fastvar.utils.benchmarking import (ceiling, device_ops_per_call, metadata, pyplot, rel_err, require_cuda,
                                     results_path, save_plot, timing_options)

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
SCHEDULES = {"256": (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), "512": (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)}
OPS = ("lookup", "step", "step_idx", "encode", "var_input")
V, CVAE = 4096, 32
DEVICE = "cuda"


def quantizer(patch_nums, device):
    from fastvar.nn import VectorQuantizer2
    q = VectorQuantizer2(V, CVAE, v_patch_nums=patch_nums, share_quant_resi=4, quant_resi=0.5)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in q.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return q.to(device).eval()


def peak_mb(fn):
    """Peak memory of one call above what was allocated before it, in MB."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


# ------------------------------------------------------------------------------------------ cases
def case_lookup(q, B, args):
    from fastvar import ops
    from fastvar.reference import quantize as ref
    H, W = q.patch_hws[-1]
    N = B * H * W
    z = torch.randn(N, CVAE, device=DEVICE)
    codebook = q.embedding.weight.detach()
    expected = ref.rq_lookup(z, codebook)
    providers = {"eager": lambda: ref.rq_lookup(z, codebook), "fastvar": lambda: ops.rq_lookup(z, codebook)}
    if args.compile:
        providers["compile"] = torch.compile(lambda: ref.rq_lookup(z, codebook))
    checks = {}
    for name, fn in providers.items():
        checks[name] = f"disagree={int((fn() != expected).sum())}/{N}"
    nbytes = N * CVAE * 4 + V * CVAE * 4 + N * 8
    flops = 2.0 * N * V * CVAE
    return providers, checks, nbytes, flops, f"N={N} V={V} C={CVAE}"


def _step_inputs(q, B):
    g = torch.Generator(device=DEVICE).manual_seed(1)
    idx = [torch.randint(0, V, (B, h * w), device=DEVICE, generator=g) for h, w in q.patch_hws]
    maps = [q.embedding(i).transpose_(1, 2).reshape(B, CVAE, h, w) for i, (h, w) in zip(idx, q.patch_hws)]
    return idx, maps


def _step_bytes(q, B):
    H, W = q.patch_hws[-1]
    S = len(q.patch_hws)
    full = B * CVAE * H * W * 4
    small = sum(B * CVAE * h * w * 4 for h, w in q.patch_hws)
    return S * 7 * full + 2 * small


def _cuda_ext_built() -> bool:
    """The fastvar-cuda provider runs where the CUDA extension is built and the tensors are on a GPU."""
    from fastvar.ops._backend import cuda_extension
    return torch.device(DEVICE).type == "cuda" and cuda_extension() is not None


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


def case_step(q, B, args, from_idx=False):
    from fastvar.reference import quantize as ref
    H, W = q.patch_hws[-1]
    S = len(q.patch_hws)
    idx, maps = _step_inputs(q, B)
    f_e, f_f = torch.zeros(B, CVAE, H, W, device=DEVICE), torch.zeros(B, CVAE, H, W, device=DEVICE)

    def eager():
        f_e.zero_()
        for si in range(S):
            ref.rq_step(f_e, maps[si], q.phi_params(si), q.patch_hws[si + 1] if si + 1 < S else None)

    def walk(f, fused_conv):
        f.zero_()
        for si in range(S):
            if from_idx:
                q.get_next_autoregressive_input_from_idx(si, S, f, idx[si], validate=False, fused_conv=fused_conv)
            else:
                q.get_next_autoregressive_input(si, S, f, maps[si], fused_conv=fused_conv)

    providers = {"eager": eager, "fastvar": lambda: walk(f_f, False), "fastvar-fused": lambda: walk(f_fc, True)}
    f_fc, f_cu = torch.zeros_like(f_f), torch.zeros_like(f_f)
    if _cuda_ext_built():
        providers["fastvar-cuda"] = lambda: _with_backend("cuda", lambda: walk(f_cu, False))
    for fn in providers.values():
        fn()
    checks = {"eager": "ref", "fastvar": f"rel_err={rel_err(f_f, f_e):.2e} bitwise={torch.equal(f_f, f_e)}",
              "fastvar-fused": f"rel_err={rel_err(f_fc, f_e):.2e} bitwise={torch.equal(f_fc, f_e)}"}
    if "fastvar-cuda" in providers:
        checks["fastvar-cuda"] = f"rel_err={rel_err(f_cu, f_e):.2e} bitwise={torch.equal(f_cu, f_e)}"
    return providers, checks, _step_bytes(q, B), None, f"B={B} S={S} HxW={H}x{W}"


def case_encode(q, B, args):
    from fastvar.reference import quantize as ref
    H, W = q.patch_hws[-1]
    S = len(q.patch_hws)
    f = torch.randn(B, CVAE, H, W, device=DEVICE)
    codebook = q.embedding.weight.detach()

    def eager():
        return ref.encode_multiscale(f, codebook, q.patch_hws, q.phis(S), to_fhat=False)

    def fastvar():
        return q.f_to_idxBl_or_fhat(f, to_fhat=False)

    e, o = eager(), fastvar()
    n = sum(int((a != b).sum()) for a, b in zip(o, e))
    rows = sum(B * h * w for h, w in q.patch_hws)
    nbytes = _step_bytes(q, B) + rows * (CVAE * 4 + 8) + S * V * CVAE * 4
    flops = 2.0 * rows * V * CVAE
    return {"eager": eager, "fastvar": fastvar}, {"eager": "ref", "fastvar": f"disagree={n}/{rows}"}, nbytes, flops, \
        f"B={B} S={S} HxW={H}x{W} rows={rows}"


def case_var_input(q, B, args):
    from fastvar.reference import quantize as ref
    idx, _ = _step_inputs(q, B)
    S = len(q.patch_hws)

    def eager():
        return ref.idx_to_var_input(idx, q.embedding.weight, q.patch_hws, q.phis(S))

    def fastvar():
        return q.idxBl_to_var_input(idx)

    with torch.no_grad():
        err = rel_err(fastvar(), eager())
    return {"eager": eager, "fastvar": fastvar}, {"eager": "ref", "fastvar": f"rel_err={err:.2e}"}, \
        _step_bytes(q, B), None, f"B={B} S={S}"


CASES = {"lookup": case_lookup, "step": case_step, "step_idx": lambda q, B, a: case_step(q, B, a, from_idx=True),
         "encode": case_encode, "var_input": case_var_input}


def plot(csv_path):
    plt = pyplot()
    if plt is None:
        return
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    groups = sorted({(r["op"], r["schedule"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 3.4), squeeze=False)
    for ax, (op, sched) in zip(axes[0], groups):
        for prov in sorted({r["provider"] for r in rows}):
            pts = sorted((int(r["batch"]), float(r["ms"])) for r in rows
                         if r["op"] == op and r["schedule"] == sched and r["provider"] == prov)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{op} {sched}px", fontsize=9)
        ax.set_xlabel("batch")
    axes[0][0].set_ylabel("ms")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{rows[0]['device']} {rows[0]['date']} {rows[0]['commit']}", fontsize=9)
    print(f"plot: {save_plot(fig, csv_path)}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64, 256])
    parser.add_argument("--compile", action="store_true", help="add torch.compile of the eager lookup")
    timing_options(parser, "quantizer")
    args = parser.parse_args(argv)

    if not require_cuda("bench_quantizer.py"):
        return 2
    from triton.testing import do_bench

    # the official float32 semantics: no TF32 in the eager GEMM / convolutions (fastvar's lookup never uses it)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    os.environ.setdefault("FASTVAR_BACKEND", "triton")    # fastvar's provider must be the Triton kernels
    meta = metadata()
    hbm, fp32 = ceiling(meta["device"], "hbm_tbs", None), ceiling(meta["device"], "fp32_tflops", None)
    os.makedirs(RESULTS, exist_ok=True)
    path = args.out or results_path(RESULTS, "quantizer", meta)
    fields = list(meta) + ["op", "schedule", "batch", "shape", "provider", "ms", "ms_p20", "ms_p80", "GB/s",
                           "pct_hbm", "TFLOP/s", "pct_fp32", "peak_MB", "gpu_ops", "gpu_ops_per_scale", "speedup_vs_eager", "check"]
    print(f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}; "
          f"HBM {hbm} TB/s, fp32 {fp32} TFLOP/s")
    with open(path, "w", newline="") as f, torch.no_grad():
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for sched in args.schedules:
            q = quantizer(SCHEDULES[sched], DEVICE)
            for op in args.ops:
                for B in args.batches:
                    try:
                        providers, checks, nbytes, flops, shape = CASES[op](q, B, args)
                    except torch.cuda.OutOfMemoryError:
                        print(f"{op} {sched}px B={B}: out of memory while checking; skipped")
                        torch.cuda.empty_cache()
                        continue
                    eager_ms = None
                    for name, fn in providers.items():
                        try:
                            ms, p20, p80 = do_bench(fn, warmup=args.warmup, rep=args.rep, quantiles=[0.5, 0.2, 0.8])
                            mem = peak_mb(fn)
                            n_ops = device_ops_per_call(fn)
                        except torch.cuda.OutOfMemoryError:
                            print(f"{op} {sched}px B={B} {name}: out of memory")
                            torch.cuda.empty_cache()
                            continue
                        eager_ms = ms if name == "eager" else eager_ms
                        gbs = nbytes / ms / 1e6
                        row = dict(meta, op=op, schedule=sched, batch=B, shape=shape, provider=name,
                                   ms=f"{ms:.4f}", ms_p20=f"{p20:.4f}", ms_p80=f"{p80:.4f}", **{"GB/s": f"{gbs:.1f}"},
                                   pct_hbm=f"{100 * gbs / (hbm * 1e3):.1f}" if hbm else "",
                                   **{"TFLOP/s": f"{flops / ms / 1e9:.2f}" if flops else ""},
                                   pct_fp32=f"{100 * flops / ms / 1e9 / fp32:.1f}" if flops and fp32 else "",
                                   peak_MB=f"{mem:.1f}", gpu_ops=n_ops or "",
                                   gpu_ops_per_scale=f"{n_ops / len(q.patch_hws):.1f}"
                                   if n_ops and op.startswith("step") else "",
                                   speedup_vs_eager=f"{eager_ms / ms:.2f}" if eager_ms else "",
                                   check=checks.get(name, ""))
                        writer.writerow(row)
                        f.flush()
                        print(f"{op:9s} {sched}px B={B:<4d} {name:8s} {ms:9.4f} ms  {gbs:8.1f} GB/s  "
                              f"peak {mem:8.1f} MB  {row['speedup_vs_eager']:>6s}x  ops {n_ops}  {row['check']}")
                    del providers
                    torch.cuda.empty_cache()
    print(f"\nresults: {path}")
    plot(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
