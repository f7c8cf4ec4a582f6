"""Benchmark of Infinity's cross-attention to the text, ``ops.varlen_cross_attention``: every image's tokens of a
scale attend to its prompt's T5 features (packed sequences of uneven lengths, no mask inside one).

Providers: ``eager`` (the op's eager implementation: one matmul-softmax-matmul per sequence, in float32, the
definition the golden files hold for the official flash-attn call) and ``fastvar`` (the Triton kernel: every
sequence in one launch, online softmax). flash-attn, which the official code calls, is not installed on the
benchmark machine. Sizes: Infinity-2B (16 heads of 128), the last three scales of the 1024-px schedule
(32 x 32, 48 x 48, 64 x 64 tokens per image), B = 1 and 8 with CFG (2B sequences: the prompts, then the empty
prompt), prompts of 77 tokens and of uneven lengths up to 512 (``--text``), in ``bfloat16``. Checked before
timing against float64 (relative error). ``TFLOP/s`` counts ``4 * tokens * text * H * c`` per sequence. Key
columns ``tokens``, ``text``, ``B``, ``N``, ``H``, ``c``, ``dtype``, ``GFLOP``.

    python bench/bench_cross_attention.py
    python bench/bench_cross_attention.py --grids 64 --batches 8 --text uneven
"""
import argparse
import functools
import os
import sys

import torch

from fastvar.utils.benchmarking import Case, plot, rel_err, run_cases, timing_options, with_backend

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
GRIDS = (32, 48, 64)              # h = w of the scale's token map
HEADS, HEAD_DIM = 16, 128         # Infinity-2B
TEXTS = {"77": lambda N: [77] * N,                                        # CLIP-length prompts
         "uneven": lambda N: [(97 * i) % 512 + 1 for i in range(1, N + 1)]}   # 1 .. 512 tokens
DTYPE = "bfloat16"
DEVICE = "cuda"


def case(hw, B, text):
    from fastvar import ops
    from fastvar.reference import infinity as ref
    N, dtype, lq = 2 * B, getattr(torch, DTYPE), hw * hw
    lk = TEXTS[text](N)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(N * lq, HEADS, HEAD_DIM, device=DEVICE, generator=g).to(dtype)
    kv = torch.randn(sum(lk), 2, HEADS, HEAD_DIM, device=DEVICE, generator=g).to(dtype)
    k, v = kv.unbind(1)                       # views of one projection, as the model's kv linear gives them
    cu_q = torch.arange(0, (N + 1) * lq, lq, dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0] + lk, device=DEVICE).cumsum(0).to(torch.int32)
    scale = HEAD_DIM ** -0.5

    def attend():
        return ops.varlen_cross_attention(q, k, v, cu_q, cu_k, scale, max_seqlen_q=lq, max_seqlen_k=max(lk),
                                          validate=False)
    providers = {"eager": functools.partial(with_backend, "eager", attend),
                 "fastvar": functools.partial(with_backend, "triton", attend)}
    want = ref.varlen_attention(q.double(), k.double(), v.double(), cu_q, cu_k, scale)
    checks = {name: f"rel_err={rel_err(fn(), want):.2e}" for name, fn in providers.items()}
    flops = 4 * lq * sum(lk) * HEADS * HEAD_DIM
    return Case("varlen_cross_attention", providers, checks,
                f"N={N} tokens={hw}x{hw} text={text} H={HEADS} c={HEAD_DIM} {DTYPE}", flops=flops,
                peak="bf16_tflops", keys=dict(tokens=f"{hw}x{hw}", text=text, B=B, N=N, H=HEADS, c=HEAD_DIM,
                                              dtype=DTYPE, GFLOP=f"{flops / 1e9:.2f}"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grids", nargs="+", type=int, default=list(GRIDS), help="h = w of the token maps")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--text", nargs="+", default=list(TEXTS), choices=list(TEXTS))
    timing_options(parser, "cross_attention")
    args = parser.parse_args(argv)
    cases = ((f"cross attention {hw}x{hw} B={B} text={t}", functools.partial(case, hw, B, t))
             for t in args.text for hw in args.grids for B in args.batches)
    with torch.no_grad():
        path, _ = run_cases("cross_attention", cases, args, RESULTS)
    plot(path, x="GFLOP", panels=("case", "text"), y="TFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
