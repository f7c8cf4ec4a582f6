"""Benchmark of the codebook lookup (``rq_lookup``) and the multi-scale encode built on it (``rq_encode``,
``img_to_idxBl`` after the encoder), at the sizes of ``bench_upsample.py``. Providers:

* ``eager``: the official computation (``fastvar.reference.quantize``): ``sum(z**2) + sum(e**2)``, ``addmm_``,
  ``argmin`` (an ``N x V`` float32 matrix); ``compile`` (``--compile``): the eager lookup under ``torch.compile``;
* ``fastvar``: ``fastvar.ops`` on the Triton kernels: distance + argmin tiled over the codebook, no ``N x V``.

Cases (``--ops``): ``lookup``, the last scale's ``N = B * H * W`` rows against the codebook; ``encode``,
``f_to_idxBl_or_fhat(f, to_fhat=False)``. Indices are compared with eager's before timing (the disagreement
count). ``GB/s`` counts the bytes the fused path must move at least: lookup ``N*C*4 + V*C*4 + N*8``, encode the
step's bytes per scale plus the lookup's; ``TFLOP/s`` the distance GEMM ``2*N*V*C`` (fp32 ceiling). Key columns
``schedule``, ``batch``.

    python bench/bench_rq_lookup.py
    python bench/bench_rq_lookup.py --ops lookup --batches 1 64 --schedules 256 --compile
"""
import os
import sys

import torch

from fastvar.utils.benchmarking import Case

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_upsample import CVAE, SCHEDULES, V, quantizer_main, step_bytes  # noqa: E402  (the same quantizer)

DEVICE = "cuda"


def disagree(got, want) -> str:
    """A check column: the indices that differ from the eager provider's."""
    n = sum(int((a != b).sum()) for a, b in zip(got, want))
    return f"disagree={n}/{sum(w.numel() for w in want)}"


def case_lookup(q, B, args):
    from fastvar import ops
    from fastvar.reference import quantize as ref
    H, W = q.patch_hws[-1]
    N = B * H * W
    z = torch.randn(N, CVAE, device=DEVICE)
    codebook = q.embedding.weight.detach()
    providers = {"eager": lambda: ref.rq_lookup(z, codebook), "fastvar": lambda: ops.rq_lookup(z, codebook)}
    if args.compile:
        providers["compile"] = torch.compile(lambda: ref.rq_lookup(z, codebook))
    want = providers["eager"]()
    checks = {name: disagree([fn()], [want]) for name, fn in providers.items()}
    return Case("lookup", providers, checks, f"N={N} V={V} C={CVAE}", nbytes=N * CVAE * 4 + V * CVAE * 4 + N * 8,
                flops=2.0 * N * V * CVAE)


def case_encode(q, B, args):
    from fastvar.reference import quantize as ref
    H, W = q.patch_hws[-1]
    S = len(q.patch_hws)
    f = torch.randn(B, CVAE, H, W, device=DEVICE)
    codebook = q.embedding.weight.detach()
    providers = {"eager": lambda: ref.encode_multiscale(f, codebook, q.patch_hws, q.phis(S), to_fhat=False),
                 "fastvar": lambda: q.f_to_idxBl_or_fhat(f, to_fhat=False)}
    rows = sum(B * h * w for h, w in q.patch_hws)
    checks = {"eager": "ref", "fastvar": disagree(providers["fastvar"](), providers["eager"]())}
    return Case("encode", providers, checks, f"B={B} S={S} HxW={H}x{W} rows={rows}",
                nbytes=step_bytes(q, B) + rows * (CVAE * 4 + 8) + S * V * CVAE * 4, flops=2.0 * rows * V * CVAE)


CASES = {"lookup": case_lookup, "encode": case_encode}
OPS = tuple(CASES)


def main(argv=None):
    return quantizer_main(argv, __doc__, "rq_lookup", CASES, DEVICE, SCHEDULES, compile_option=True)


if __name__ == "__main__":
    sys.exit(main())
