"""Issue 15's end-to-end Infinity benchmark (a stopgap until bench/ has an Infinity provider): the Infinity-2B
architecture with random weights at 1024 px (13 scales, 64 x 64 tokens), guided (cfg 3, tau 0.5, top-p 0.97), per
batch size: the eager loop (``Infinity.autoregressive_infer_cfg`` under bf16 autocast with
``FASTVAR_BACKEND=eager``: the official algorithm on eager PyTorch ops: SDPA attention, per-scale AdaLN, sort-based
top-p; unlike the official code its KV cache is written in place, not concatenated, and its cross-attention is a
per-prompt loop, not flash-attn) against ``fastvar.Sampler`` (bf16, CUDA graphs), end to end and per scale, next to
the transformer's bf16 FLOP floor (its matmul FLOPs over the measured dense GEMM rate).

    python bench/bench_infinity.py --batches 1 8 --out-dir bench/results      # on a GPU
    python bench/bench_infinity.py --smoke                                     # tiny model on CPU: the code path
"""
import argparse
import os
import sys
import time

import torch

from fastvar import dynamic_resolution as S
from fastvar.benchmark import gemm_tflops, timed
from fastvar.models import BSQVAE, Infinity
from fastvar.sampler import Sampler
from fastvar.utils.benchmarking import metadata, result_row, results_path, write_csv

TEXT_LEN = 77          # tokens per prompt (stand-in T5 features)


def build(device, smoke: bool):
    """Infinity-2B (depth 32, C 2048, 16 heads of 128, 8 chunks, d 32, text 2048) with random weights, built on
    the meta device and filled in place on ``device`` (the constructor's CPU init of 2.2B parameters takes minutes)."""
    if smoke:
        cfg, vae_cfg = dict(depth=2, embed_dim=256, num_heads=2, text_channels=256, block_chunks=2), (4, 24, (1, 1, 1, 1, 1), 1)
    else:
        cfg, vae_cfg = dict(depth=32, embed_dim=2048, num_heads=16, text_channels=2048, block_chunks=8), (32, 128, (1, 2, 4, 4, 4), 2)
    vae = BSQVAE(*vae_cfg).to(device)
    with torch.device("meta"):
        model = Infinity(vae, text_maxlen=512, pad_to_multiplier=128, cond_drop_rate=0.0, **cfg)
    model = model.to_empty(device=device).eval()
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.02, generator=g)
            if name.endswith("scale_mul_1H11"):
                p.fill_(float(torch.tensor(4.0).log()))
        for name, b in model.named_buffers():
            b.zero_()                               # zero_k_bias
    return vae, model


def text(B, C_t5, device):
    lens = [TEXT_LEN] * B
    kv = torch.randn(sum(lens), C_t5, device=device)
    cu = torch.arange(0, (B + 1) * TEXT_LEN, TEXT_LEN, dtype=torch.int32, device=device)
    return kv, lens, cu, TEXT_LEN


def flops(model, sched, B):
    """Matmul FLOPs of one guided sample (2B rows): projections, self- and cross-attention, head."""
    C, rows2, total, prefix = model.C, 2 * B, 0.0, 0
    for _, h, w in sched:
        n = h * w
        prefix += n
        rows = rows2 * n
        total += model.depth * (2 * rows * 14 * C * C + 4 * rows * prefix * C + 4 * rows * TEXT_LEN * C)
        total += 2 * rows * C * model.V
    return total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out-dir", default=None)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    vae, model = build(device, args.smoke)
    sched = S.scale_schedule(1.0, "0.06M" if args.smoke else "1M")
    kw = dict(scale_schedule=sched, cfg=3.0, tau=0.5, top_k=900, top_p=0.97, cfg_insertion_layer=[0])
    S_ = len(sched)
    official_kw = dict(vae=vae, scale_schedule=sched, cfg_list=[3.0] * S_, tau_list=[0.5] * S_, top_k=900,
                       top_p=0.97, cfg_insertion_layer=[0], vae_type=vae.codebook_dim, ret_img=True)
    sampler = Sampler(model, vae, dtype=torch.bfloat16, cuda_graphs=device.type == "cuda")
    floor_rate = gemm_tflops(device, torch.bfloat16)
    meta = metadata(device)
    rows = []
    for B in args.batches:
        t = text(B, model.Ct5, device)

        def eager():
            os.environ["FASTVAR_BACKEND"] = "eager"
            try:
                with torch.autocast(device.type, torch.bfloat16):
                    return model.autoregressive_infer_cfg(label_B_or_BLT=t, B=B, g_seed=0, **official_kw)[2]
            finally:
                os.environ.pop("FASTVAR_BACKEND")      # the Sampler picks its backend by device again

        def fast():
            return sampler.sample(t, 0, **kw)

        # one provider at a time: at B = 8 each holds a 44 GB bf16 KV cache (32 blocks x 2 x 16 rows x 10521 tokens
        # x 2048) next to the weights (8.8 GB float32 + 4.4 GB of bf16 casts for the Sampler)
        a = eager()                                   # warm-up
        ms_eager, mem_eager = timed(eager, device, args.reps, warmup=0)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        b = fast()                                    # warm-up: Triton compiles, CUDA-graph capture
        check = f"images {tuple(b.shape)} finite={bool(torch.isfinite(b).all())}"
        assert a.shape[0] == b.shape[0] == B and torch.isfinite(b).all()
        del a, b
        ms_fast, mem_fast = timed(fast, device, args.reps, warmup=0)
        per_scale, last = [], None
        if device.type == "cuda":
            torch.cuda.synchronize()
        last = time.perf_counter()
        for _ in sampler.stream(t, 0, **kw):
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            per_scale.append((now - last) * 1e3)
            last = now
        sampler.free()                               # the next batch size's eager run needs the memory
        work = flops(model, sched, B)
        floor_ms = work / (floor_rate * 1e12) * 1e3
        keys = dict(model="infinity-2b-random" if not args.smoke else "smoke", px=S.image_size(sched)[0], batch=B,
                    flop_floor_ms=round(floor_ms, 3))
        shape = f"B={B} {keys['px']}px"
        for name, ms, mem in (("eager", ms_eager, mem_eager), ("fastvar", ms_fast, mem_fast)):
            rows.append(result_row(meta, "infinity_e2e", keys["model"], name, shape, ms, flops=work, peak="bf16_tflops",
                                   peak_mb=mem, speedup=ms_eager[0] / ms[0], check=check if name == "fastvar" else "",
                                   scale="", over_floor=round(ms[0] / floor_ms, 2), **keys))
            print(f"B={B} {name:8s} {ms[0]:10.1f} ms  x{rows[-1]['speedup_vs_eager']}  "
                  f"({rows[-1]['over_floor']} x the FLOP floor {floor_ms:.1f} ms)", flush=True)
        for si, t_ms in enumerate(per_scale):
            rows.append(result_row(meta, "infinity_e2e", keys["model"], "fastvar", shape, (t_ms, None, None),
                                   scale=si, **keys))
    if args.out_dir:
        write_csv(rows, results_path(args.out_dir, "infinity_e2e", meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
