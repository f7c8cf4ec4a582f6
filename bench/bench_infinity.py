"""Issue 15's end-to-end Infinity benchmark: the Infinity-2B architecture with random weights at 1024 px (13 scales,
64 x 64 tokens), guided (cfg 3, tau 0.5, top-p 0.97), per batch size: the official loop against ``fastvar.Sampler``
(bf16, CUDA graphs), end to end and per scale, next to the transformer's floors (its matmul FLOPs over the measured
bf16 GEMM rate; its bf16 weights over the measured copy bandwidth, ``fastvar.benchmark.weight_floor_ms``) and the
time over the higher of the two (``over_floor``). The common ``speedup_vs_eager`` column holds the speedup over the
official loop.

The official loop is ``tests/official_infinity_arch.py``: the official architecture and ``autoregressive_infer_cfg``
written from INFINITY_SPEC.md and checked against the golden files (SDPA, a ``torch.cat`` KV cache, AdaLN per scale,
the sort-based top-k/top-p and ``torch.multinomial``), with fastvar's model's own weight tensors, float32 under bf16
autocast as official users run it. Its flash-attn varlen call (flash-attn is not on the GPU image) is one SDPA call
here: every prompt has the same length, so nothing is padded and the cost is one fused kernel, as officially.

    python bench/bench_infinity.py --batches 1 8 --out-dir bench/results      # on a GPU
    python bench/bench_infinity.py --smoke                                     # tiny model on CPU: the code path
"""
import argparse
import contextlib
import os
import sys

import torch
import torch.nn.functional as F

from fastvar import dynamic_resolution as S
from fastvar.benchmark import Marks, copy_gbs, gemm_tflops, scale_breakdown, timed, weight_floor_ms
from fastvar.models import BSQVAE, Infinity
from fastvar.sampler import Sampler
from fastvar.utils.benchmarking import metadata, plot, result_row, results_path, write_csv

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import official_infinity_arch as official  # noqa: E402  (the official architecture, from tests/)

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


def official_model(model, vae):
    """The official architecture holding ``model``'s weight tensors (no copy): built on the meta device, then the
    state dict assigned (the official names, strictly)."""
    with torch.device("meta"):
        twin = official.Infinity(vae, model.Ct5, model.text_maxlen, model.C, model.depth, model.num_heads,
                                 mlp_ratio=model.mlp_ratio, norm_eps=model.norm_eps, cond_drop_rate=0.0,
                                 block_chunks=model.num_block_chunks, pad_to_multiplier=model.pad_to_multiplier)
    twin.load_state_dict(model.state_dict(), assign=True)
    return twin.eval()


def varlen_as_sdpa(q, kv, cu_seqlens_q, cu_seqlens_k, scale):
    """flash-attn's packed varlen call for sequences of equal lengths: q ``(B*Lq, H, D)``, kv ``(B*Lk, 2, H, D)``,
    one SDPA call."""
    B = cu_seqlens_q.numel() - 1
    k, v = (t.transpose(1, 2) for t in kv.view(B, -1, *kv.shape[1:]).unbind(2))
    out = F.scaled_dot_product_attention(q.view(B, -1, *q.shape[1:]).transpose(1, 2), k, v, scale=scale)
    return out.transpose(1, 2).reshape(q.shape)


@contextlib.contextmanager
def flash_attn_as_sdpa():
    """The official loop's cross-attention call is :func:`varlen_as_sdpa` inside (the benchmark's prompts all have
    TEXT_LEN tokens)."""
    saved, official.varlen_kvpacked_bf16 = official.varlen_kvpacked_bf16, varlen_as_sdpa
    try:
        yield
    finally:
        official.varlen_kvpacked_bf16 = saved


def official_scale_ms(twin, vae, run, device):
    """Milliseconds of every scale of one official sample, counted as :func:`fastvar.benchmark.scale_breakdown`
    counts fastvar's: a scale ends where the next one starts (its ``lvl_embed`` call), the first includes the
    conditioning, the last ends where the VAE decode starts."""
    marks, calls = Marks(device), []

    def next_scale(*_):
        calls.append(None)
        if len(calls) > 1:
            marks.mark()

    hooks = [twin.lvl_embed.register_forward_pre_hook(next_scale), vae.decoder.register_forward_pre_hook(marks.mark)]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return marks.intervals_ms()


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
    twin = official_model(model, vae)
    floor_rate = gemm_tflops(device, torch.bfloat16)[0]
    weights_ms = weight_floor_ms(model, len(sched), torch.bfloat16, copy_gbs(device)[0])
    meta = metadata(device)
    rows = []
    for B in args.batches:
        t = text(B, model.Ct5, device)

        def official_loop():
            with flash_attn_as_sdpa(), torch.autocast(device.type, torch.bfloat16):
                return twin.autoregressive_infer_cfg(label_B_or_BLT=t, B=B, g_seed=0, **official_kw)[2]

        def fast():
            return sampler.sample(t, 0, **kw)

        # one provider at a time: at B = 8 each holds a 44 GB bf16 KV cache (32 blocks x 2 x 16 rows x 10521 tokens
        # x 2048) next to the weights (8.8 GB float32, 4.4 GB of the Sampler's bf16 copies, 4.4 GB of autocast's):
        # about 62 GB and the activations, estimated (not measured), within an H100's 80 GB
        a = official_loop()                           # warm-up
        ms_official, mem_official = timed(official_loop, device, args.reps, warmup=0)
        per_scale = {"official": official_scale_ms(twin, vae, official_loop, device)}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        b = fast()                                    # warm-up: Triton compiles, CUDA-graph capture
        check = f"images {tuple(b.shape)} finite={bool(torch.isfinite(b).all())}"
        assert a.shape[0] == b.shape[0] == B and torch.isfinite(b).all()
        del a, b
        ms_fast, mem_fast = timed(fast, device, args.reps, warmup=0)
        per_scale["fastvar"] = scale_breakdown(sampler, t, kw, device)
        sampler.free()                               # the next batch size's official run needs the memory
        work = flops(model, sched, B)
        floor_ms = work / (floor_rate * 1e12) * 1e3
        keys = dict(model="infinity-2b-random" if not args.smoke else "smoke", px=S.image_size(sched)[0], batch=B,
                    flop_floor_ms=round(floor_ms, 3), weight_floor_ms=round(weights_ms, 3))
        floor = max(floor_ms, weights_ms)
        shape = f"B={B} {keys['px']}px"
        for name, ms, mem in (("official", ms_official, mem_official), ("fastvar", ms_fast, mem_fast)):
            rows.append(result_row(meta, "infinity_e2e", keys["model"], name, shape, ms, flops=work, peak="bf16_tflops",
                                   peak_mb=mem, speedup=ms_official[0] / ms[0], check=check if name == "fastvar" else "",
                                   scale="", over_floor=round(ms[0] / floor, 2), **keys))
            print(f"B={B} {name:8s} {ms[0]:10.1f} ms  x{rows[-1]['speedup_vs_eager']}  ({rows[-1]['over_floor']} x the "
                  f"floor: FLOPs {floor_ms:.1f} ms, weights {weights_ms:.1f} ms)", flush=True)
        for name, times in per_scale.items():
            for si, t_ms in enumerate(times):
                rows.append(result_row(meta, "infinity_e2e", keys["model"], name, shape, (t_ms, None, None),
                                       scale=si, **keys))
            print(f"  per scale ({name}, ms): {' '.join(f'{t_ms:.2f}' for t_ms in times)}", flush=True)
    if args.out_dir:
        path = results_path(args.out_dir, "infinity_e2e", meta)
        write_csv(rows, path)
        plot(path, x="batch", panels=("case",), where=lambda r: not r["scale"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
