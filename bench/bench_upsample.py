"""Benchmark of the sampling step between scales (``upsample_accumulate_``) and the teacher-forcing input
(``rq_var_input``), at VAR's quantizer sizes (V = 4096, Cvae = 32, share_quant_resi = 4), batch 1, 16, 64,
256, both schedules (256 px: 1..16, 512 px: 1..32). Providers:

* ``eager``: the official computation (``fastvar.reference.quantize``): ``F.interpolate`` bicubic / area, Phi
  as ``h.mul(1-r) + conv(h).mul_(r)``, ``f_hat.add_``;
* ``fastvar``: ``fastvar.ops`` on the Triton kernels: gather + bicubic upsample, ``F.conv2d``, Phi +
  accumulate + area downsample;
* ``fastvar-fused`` (steps): Phi's convolution inside the Triton kernel (``fused_conv=True``): gather + bicubic
  upsample + conv + Phi + accumulate, then area downsample;
* ``fastvar-cuda`` (steps, where ``fastvar._C`` is built: ``scripts/build_cuda.sh``): ``csrc/upsample_step.cu``
  (gather + bicubic upsample into a shared-memory tile with its halo, Phi's conv from it, accumulate; then
  area downsample).

Cases (``--ops``): ``step`` / ``step_idx``, the sampling step (``get_next_autoregressive_input``) of every scale
of the schedule, in order, from the code maps VAR's sampler builds or from the token indices (codes gathered
in the upsample kernel); ``var_input``, ``idxBl_to_var_input``. Outputs are checked against eager's before
timing (relative error, bit equality). ``GB/s`` counts the bytes the fused path must move at least, for every
provider: per scale ``7 * B*C*H*W*4`` (upsample write, conv read + write, the accumulate's 3 reads + 1 write)
plus the code and next maps; ``fastvar-fused`` keeps ``u`` and the conv's output on chip (about 3 passes per
scale, not 7), so its ``GB/s`` is an effective rate. ``gpu_ops_per_scale``: ``gpu_ops`` over the scale count
(fastvar also zeroes f_hat once per call). Key columns ``schedule``, ``batch``.

    python bench/bench_upsample.py
    python bench/bench_upsample.py --ops step --batches 1 64 --schedules 256
"""
import argparse
import functools
import os
import sys

import torch

from fastvar.schedule import PATCH_NUMS_256, PATCH_NUMS_512
from fastvar.utils.benchmarking import (Case, compare, cuda_extension_built, plot, run_cases,
                                        timing_options, with_backend)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SCHEDULES = {"256": PATCH_NUMS_256, "512": PATCH_NUMS_512}
V, CVAE = 4096, 32
DEVICE = "cuda"


def quantizer(patch_nums, device):
    """VAR's quantizer at the released sizes, random weights (speed does not depend on their values)."""
    from fastvar.nn import VectorQuantizer2
    q = VectorQuantizer2(V, CVAE, v_patch_nums=patch_nums, share_quant_resi=4, quant_resi=0.5)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in q.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return q.to(device).eval()


def step_inputs(q, B, device):
    """Random token indices of every scale and their code maps ``(B, Cvae, h, w)``."""
    g = torch.Generator(device=device).manual_seed(1)
    idx = [torch.randint(0, V, (B, h * w), device=device, generator=g) for h, w in q.patch_hws]
    maps = [q.embedding(i).transpose_(1, 2).reshape(B, CVAE, h, w) for i, (h, w) in zip(idx, q.patch_hws)]
    return idx, maps


def step_bytes(q, B):
    """The bytes every scale's step must move at least (see the module docstring)."""
    H, W = q.patch_hws[-1]
    return len(q.patch_hws) * 7 * B * CVAE * H * W * 4 + 2 * sum(B * CVAE * h * w * 4 for h, w in q.patch_hws)


def case_step(q, B, args, from_idx=False):
    from fastvar.reference import quantize as ref
    H, W = q.patch_hws[-1]
    S = len(q.patch_hws)
    idx, maps = step_inputs(q, B, DEVICE)
    f = {name: torch.zeros(B, CVAE, H, W, device=DEVICE) for name in ("eager", "fastvar", "fastvar-fused",
                                                                       "fastvar-cuda")}

    def eager():
        f["eager"].zero_()
        for si in range(S):
            ref.rq_step(f["eager"], maps[si], q.phi_params(si), q.patch_hws[si + 1] if si + 1 < S else None)

    def walk(name, fused_conv):
        f[name].zero_()
        for si in range(S):
            if from_idx:
                q.get_next_autoregressive_input_from_idx(si, S, f[name], idx[si], validate=False, fused_conv=fused_conv)
            else:
                q.get_next_autoregressive_input(si, S, f[name], maps[si], fused_conv=fused_conv)

    providers = {"eager": eager, "fastvar": lambda: walk("fastvar", False),
                 "fastvar-fused": lambda: walk("fastvar-fused", True)}
    if cuda_extension_built(DEVICE):
        providers["fastvar-cuda"] = lambda: with_backend("cuda", lambda: walk("fastvar-cuda", False))
    for fn in providers.values():
        fn()
    checks = {name: "ref" if name == "eager" else compare(f[name], f["eager"]) for name in providers}
    return Case("step_idx" if from_idx else "step", providers, checks, f"B={B} S={S} HxW={H}x{W}",
                nbytes=step_bytes(q, B), scales=S)


def case_var_input(q, B, args):
    from fastvar.reference import quantize as ref
    idx, _ = step_inputs(q, B, DEVICE)
    S = len(q.patch_hws)
    providers = {"eager": lambda: ref.idx_to_var_input(idx, q.embedding.weight, q.patch_hws, q.phis(S)),
                 "fastvar": lambda: q.idxBl_to_var_input(idx)}
    checks = {"eager": "ref", "fastvar": compare(providers["fastvar"](), providers["eager"]())}
    return Case("var_input", providers, checks, f"B={B} S={S}", nbytes=step_bytes(q, B))


CASES = {"step": case_step, "step_idx": functools.partial(case_step, from_idx=True), "var_input": case_var_input}
OPS = tuple(CASES)


def quantizer_main(argv, doc, bench, cases, device, schedules, compile_option=False):
    """The command line of this benchmark and of ``bench_rq_lookup.py``: ``cases[op](q, B, args)`` for every
    schedule, op and batch, keyed by schedule and batch, one quantizer per schedule."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--ops", nargs="+", default=list(cases), choices=list(cases))
    parser.add_argument("--schedules", nargs="+", default=list(schedules), choices=list(schedules))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64, 256])
    if compile_option:
        parser.add_argument("--compile", action="store_true", help="add torch.compile of the eager lookup")
    timing_options(parser, bench)
    args = parser.parse_args(argv)
    # the official float32 semantics: no TF32 in the eager GEMM / convolutions (fastvar's lookup never uses it)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    def build(q, op, sched, B):
        case = cases[op](q, B, args)
        case.keys.update(schedule=sched, batch=B)
        return case

    def every_case():
        for sched in args.schedules:
            q = quantizer(schedules[sched], device)
            for op in args.ops:
                for B in args.batches:
                    yield f"{op} {sched}px B={B}", functools.partial(build, q, op, sched, B)
    with torch.no_grad():
        path, _ = run_cases(bench, every_case(), args, RESULTS)
    plot(path, x="batch", panels=("case", "schedule"))
    return 0


def main(argv=None):
    return quantizer_main(argv, __doc__, "upsample", CASES, DEVICE, SCHEDULES)


if __name__ == "__main__":
    sys.exit(main())
