"""The official sampling loop, step for step, in eager PyTorch: the baseline of ``bench/bench_e2e.py``.

``official_autoregressive_infer_cfg`` runs VAR's ``autoregressive_infer_cfg`` as the official code does
(VAR_SPEC.md section 3): the AdaLN projections recomputed for every block at every scale, the KV
cache re-concatenated with ``torch.cat`` at every scale, ``topk`` / ``sort`` / ``multinomial`` for the
draw, ``F.interpolate`` for the scale-to-scale glue. It reads the weights of a fastvar (or patched)
``VAR`` by their official names and is independent of fastvar's ops, so it also checks them.
Optional ``autocast`` dtype: what official users run (float32 weights under ``torch.autocast``).
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from fastvar.labels import sampling_labels
from fastvar.reference.attention import scale_mul_factor
from fastvar.reference.quantize import scale_ratio
from fastvar.reference.sampling import cfg_mix, gumbel_softmax, sample_top_k_top_p_, smooth_tau
from fastvar.schedule import begin_ends, scale_hws


def _block(b, x, cond, cache):
    """One ``AdaLNSelfAttn`` with the official op order; ``cache`` is this block's ``[k, v]`` or Nones."""
    if b.shared_aln:
        g1, g2, s1, s2, sh1, sh2 = (b.ada_gss + cond).unbind(2)
    else:
        g1, g2, s1, s2, sh1, sh2 = b.ada_lin(cond).view(-1, 1, 6, b.C).unbind(2)
    a = b.attn
    B, L, C = x.shape
    h = b.ln_wo_grad(x).mul(s1.add(1)).add_(sh1)
    qkv = F.linear(h, a.mat_qkv.weight, torch.cat((a.q_bias, a.zero_k_bias, a.v_bias)))
    q, k, v = qkv.view(B, L, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    if a.attn_l2_norm:
        q = F.normalize(q, dim=-1).mul(scale_mul_factor(a.scale_mul_1H11, a.num_heads))
        k = F.normalize(k, dim=-1)
    if cache[0] is not None:
        k = torch.cat((cache[0], k), dim=2)
        v = torch.cat((cache[1], v), dim=2)
    cache[0], cache[1] = k, v
    o = F.scaled_dot_product_attention(q, k, v, scale=a.scale).transpose(1, 2).reshape(B, L, C)
    x = x + a.proj(o).mul_(g1)
    return x + b.ffn(b.ln_wo_grad(x).mul(s2.add(1)).add_(sh2)).mul(g2)


@torch.no_grad()
def official_autoregressive_infer_cfg(var, B: int, label_B=None, g_seed: Optional[int] = None, cfg: float = 1.5,
                                      top_k: int = 0, top_p: float = 0.0, more_smooth: bool = False,
                                      autocast: Optional[torch.dtype] = None, decode: bool = True, block_fn=None
                                      ) -> Tuple[Optional[torch.Tensor], List[torch.Tensor], torch.Tensor]:
    """Returns ``(images in [0, 1] or None, tokens per scale, final f_hat)``. ``block_fn`` replaces the
    per-block function (the benchmark passes a ``torch.compile``'d one)."""
    block_fn = block_fn or _block
    dev = var.lvl_1L.device
    rng = None if g_seed is None else torch.Generator(device=dev).manual_seed(int(g_seed))
    label_B = sampling_labels(B, label_B, var.num_classes, rng, dev)
    vae = var.vae_proxy[0]
    quant = vae.quantize
    hws, spans = scale_hws(var.patch_nums), begin_ends(var.patch_nums)
    S, first_l = len(hws), spans[0][1]
    ctx = torch.autocast(dev.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with ctx:
        sos = cond_BD = var.class_emb(torch.cat((label_B, torch.full_like(label_B, var.num_classes))))
        lvl_pos = var.lvl_embed(var.lvl_1L) + var.pos_1LC
        x_next = (sos.unsqueeze(1).expand(2 * B, first_l, -1) + var.pos_start.expand(2 * B, first_l, -1)
                  + lvl_pos[:, :first_l])
        f_hat = sos.new_zeros(B, var.Cvae, *hws[-1], dtype=torch.float32)
        caches = [[None, None] for _ in var.blocks]
        tokens = []
        for si, (ph, pw) in enumerate(hws):
            ratio = scale_ratio(si, S)
            cond = var.shared_ada_lin(cond_BD)
            x = x_next
            for b, cache in zip(var.blocks, caches):
                x = block_fn(b, x, cond, cache)
            logits = var.head(var.head_nm(x.float(), cond_BD).float()).float()
            logits = cfg_mix(logits, cfg * ratio)
            idx = sample_top_k_top_p_(logits, top_k, top_p, rng, num_samples=1)[:, :, 0]
            tokens.append(idx)
            if more_smooth:
                h = gumbel_softmax(logits.mul(1 + ratio), smooth_tau(ratio), rng) @ quant.embedding.weight.unsqueeze(0)
            else:
                h = quant.embedding(idx)
            h = h.transpose_(1, 2).reshape(B, var.Cvae, ph, pw).float()
            if si != S - 1:
                f_hat.add_(quant.quant_resi[ratio](F.interpolate(h, size=hws[-1], mode="bicubic")))
                nxt = F.interpolate(f_hat, size=hws[si + 1], mode="area")
                b0, b1 = spans[si + 1]
                x_next = var.word_embed(nxt.view(B, var.Cvae, -1).transpose(1, 2)) + lvl_pos[:, b0:b1]
                x_next = x_next.repeat(2, 1, 1)
            else:
                f_hat.add_(quant.quant_resi[ratio](h))
        images = vae.fhat_to_img(f_hat).add_(1).mul_(0.5) if decode else None
    return images, tokens, f_hat
