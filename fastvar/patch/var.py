"""``fastvar.patch`` rules for the official VAR (``models/basic_var.py``, ``models/quant.py``): ``SelfAttention``,
``FFN``, ``AdaLNSelfAttn``, ``AdaLNBeforeHead``, ``VectorQuantizer2``, and what a patched VAR needs besides (its
VQVAE proxies, KV caches sized for its schedule). ``FFN`` and ``AdaLNBeforeHead`` serve Infinity too (the same
official classes)."""
from __future__ import annotations

import warnings
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

from fastvar.nn import attention as fnn
from fastvar.nn import quant as fquant
from fastvar.nn.attention import schedule_of_mask
from fastvar.patch.checks import (Rule, adaln_block, ada_lin_check, attention_tensors, attention_widths, diff, first,
                                  forward_arguments, is_plain_layernorm, modulation_tensors, on_meta, positive_ints,
                                  probe_mask, seeded_randn, signature, swap, take_modulation, tensors)
from fastvar.schedule import Schedule


def _self_attention(old: nn.Module) -> nn.Module:
    C = old.mat_qkv.weight.shape[1]
    attn_drop = float(getattr(old, "attn_drop", 0.0))
    if attn_drop > 0:
        warnings.warn(f"the model's attention dropout (attn_drop={attn_drop:g}) is not supported by "
                      "fastvar's kernels: evaluation and sampling are unaffected, a training-mode forward will "
                      "raise NotImplementedError (build the model with attn_drop_rate=0 to train it)", stacklevel=3)
    new = on_meta(lambda: fnn.SelfAttention(block_idx=getattr(old, "block_idx", 0), embed_dim=C,
                                             num_heads=old.num_heads, attn_drop=attn_drop,
                                             attn_l2_norm=bool(old.attn_l2_norm)))
    new = swap(old, new)
    new.proj_drop = old.proj_drop
    new.scale = old.scale
    return new


def _ffn(old: nn.Module) -> nn.Module:
    new = on_meta(lambda: fnn.FFN(old.fc1.in_features, old.fc1.out_features, old.fc2.out_features))
    new = swap(old, new)
    new.drop = old.drop
    return new


def _ada_ln_self_attn(old: nn.Module) -> nn.Module:
    ln = old.ln_wo_grad
    new = on_meta(lambda: fnn.AdaLNSelfAttn(
        block_idx=old.block_idx, last_drop_p=getattr(old, "last_drop_p", 0.0), embed_dim=old.C, cond_dim=old.D,
        shared_aln=bool(old.shared_aln), norm_layer=lambda c, elementwise_affine: nn.LayerNorm(c, eps=ln.eps,
                                                                                               elementwise_affine=False),
        num_heads=old.attn.num_heads, mlp_ratio=old.ffn.fc1.out_features / old.C,
        attn_l2_norm=bool(old.attn.attn_l2_norm)))
    # the children were swapped first (bottom-up): take them over as they are
    new.attn, new.ffn, new.drop_path, new.ln_wo_grad = old.attn, old.ffn, old.drop_path, old.ln_wo_grad
    take_modulation(old, new)
    new.train(old.training)
    return new


def _ada_ln_before_head(old: nn.Module) -> nn.Module:
    new = on_meta(lambda: fnn.AdaLNBeforeHead(old.C, old.D, norm_layer=lambda c, elementwise_affine: nn.LayerNorm(
        c, eps=old.ln_wo_grad.eps, elementwise_affine=False)))
    new.ln_wo_grad, new.ada_lin = old.ln_wo_grad, old.ada_lin
    new.train(old.training)
    return new


def _vector_quantizer(old: nn.Module) -> nn.Module:
    share = {"PhiShared": 1, "PhiPartiallyShared": len(getattr(old.quant_resi, "qresi_ls", ())),
             "PhiNonShared": 0}[type(old.quant_resi).__name__]     # one of _PHI_SHARES: checked before
    counts = len(old.quant_resi) if share == 0 else 0
    new = on_meta(lambda: fquant.VectorQuantizer2(
        vocab_size=old.vocab_size, Cvae=old.Cvae, using_znorm=bool(old.using_znorm), beta=old.beta,
        default_qresi_counts=counts, v_patch_nums=old.v_patch_nums, quant_resi=old.quant_resi_ratio,
        share_quant_resi=share))
    new = swap(old, new)
    new.record_hit = getattr(old, "record_hit", 0)
    return new


def _self_attention_structure(m: nn.Module) -> Optional[str]:
    reason, C, H = attention_widths(m)
    if reason:
        return reason
    return first(attention_tensors(m, C, H, bool(getattr(m, "attn_l2_norm", None))),
                 signature(m, "forward", 2, ("attn_bias",)))


def _ffn_structure(m: nn.Module) -> Optional[str]:
    fc1, fc2, act = getattr(m, "fc1", None), getattr(m, "fc2", None), getattr(m, "act", None)
    if not isinstance(fc1, nn.Linear) or not isinstance(fc2, nn.Linear):
        return "its fc1 / fc2 are not Linear layers"
    if not isinstance(act, nn.GELU) or act.approximate != "tanh":
        return f"its act is {act!r}, not GELU(approximate='tanh')"
    if not isinstance(getattr(m, "drop", None), (nn.Dropout, nn.Identity)):
        return "its drop is not a Dropout or an Identity"
    C, Hd, O = fc1.in_features, fc1.out_features, fc2.out_features
    return first(diff("sub-modules", {n: () for n, _ in m.named_children()},
                        {"fc1": (), "act": (), "fc2": (), "drop": ()}),
                  tensors(m, {"fc1.weight": (Hd, C), "fc1.bias": (Hd,), "fc2.weight": (O, Hd), "fc2.bias": (O,)}),
                  signature(m, "forward", 1))


def _ada_ln_self_attn_structure(m: nn.Module) -> Optional[str]:
    reason = adaln_block(m, (("attn", fnn.SelfAttention), ("ffn", fnn.FFN)))
    if reason:
        return reason
    own = {n: tuple(p.shape) for n, p in m.named_parameters() if not n.startswith(("attn.", "ffn."))}
    reason, want = modulation_tensors(m, m.C, m.D)
    return first(reason, diff("parameters", own, want), signature(m, "forward", 3, ("x", "cond_BD", "attn_bias")))


def _ada_ln_before_head_structure(m: nn.Module) -> Optional[str]:
    C, D = getattr(m, "C", None), getattr(m, "D", None)
    if not positive_ints(C, D):
        return "it has no integer widths C and D"
    return first(is_plain_layernorm(getattr(m, "ln_wo_grad", None)), ada_lin_check(m, D, 2 * C),
                  tensors(m, {"ada_lin.1.weight": (2 * C, D), "ada_lin.1.bias": (2 * C,)}),
                  signature(m, "forward", 2))


_PHI_SHARES = ("PhiShared", "PhiPartiallyShared", "PhiNonShared")


def _vector_quantizer_structure(m: nn.Module) -> Optional[str]:
    emb = getattr(m, "embedding", None)
    V, Cvae = getattr(m, "vocab_size", None), getattr(m, "Cvae", None)
    if not isinstance(emb, nn.Embedding) or tuple(emb.weight.shape) != (V, Cvae):
        return f"its embedding is not an Embedding(vocab_size={V}, Cvae={Cvae})"
    if type(getattr(m, "quant_resi", None)).__name__ not in _PHI_SHARES:
        return f"its quant_resi is a {type(getattr(m, 'quant_resi', None)).__name__}, not one of {', '.join(_PHI_SHARES)}"
    try:
        S = len(Schedule.of(m.v_patch_nums, "v_patch_nums"))
    except (AttributeError, ValueError, TypeError):
        return "it has no valid v_patch_nums"
    phis = {n: tuple(p.shape) for n, p in m.named_parameters() if n.startswith("quant_resi.")}
    want = {n: ((Cvae, Cvae, 3, 3) if n.endswith(".weight") else (Cvae,)) for n in phis}
    return first(diff("Phi parameters", phis, want),
                  tensors(m, {"embedding.weight": (V, Cvae), **phis}, {"ema_vocab_hit_SV": (S, V)}),
                  signature(m, "get_next_autoregressive_input", 4),
                  None if callable(getattr(m, "f_to_idxBl_or_fhat", None)) else "it has no f_to_idxBl_or_fhat()")


def _ffn_probe(m, dtype, device):
    return "forward", (seeded_randn(dtype, device)(1, 5, m.fc1.in_features),), {}


def _self_attention_probe(m, dtype, device):
    return "forward", (seeded_randn(dtype, device)(1, 5, m.mat_qkv.in_features),), {"attn_bias": probe_mask(dtype, device)}


def _ada_ln_self_attn_probe(m, dtype, device):
    randn = seeded_randn(dtype, device)
    cond = randn(1, 1, 6, m.C) if m.shared_aln else randn(1, m.D)
    return "forward", (randn(1, 5, m.C), cond), {"attn_bias": probe_mask(dtype, device)}


def _ada_ln_before_head_probe(m, dtype, device):
    randn = seeded_randn(dtype, device)
    return "forward", (randn(1, 5, m.C), randn(1, m.D)), {}


def _vector_quantizer_probe(m, dtype, device):
    randn = seeded_randn(dtype, device)
    hws = Schedule.of(m.v_patch_nums).hws
    f = torch.zeros(1, m.Cvae, *hws[-1], device=device)
    h = randn(1, m.Cvae, *hws[0]).float() if len(hws) > 1 else randn(1, m.Cvae, *hws[-1]).float()
    return "get_next_autoregressive_input", (0, len(hws), f, h), {}


def _is_var_attention(m: nn.Module) -> bool:
    """VAR's ``SelfAttention.forward(x, attn_bias)``; Infinity's takes ``rope2d_freqs_grid`` (its own rule)."""
    return "rope2d_freqs_grid" not in forward_arguments(m)


RULES: Dict[str, Rule] = {
    "SelfAttention": Rule(_self_attention_structure, _self_attention, _self_attention_probe, _is_var_attention),
    "FFN": Rule(_ffn_structure, _ffn, _ffn_probe),
    "AdaLNSelfAttn": Rule(_ada_ln_self_attn_structure, _ada_ln_self_attn, _ada_ln_self_attn_probe),
    "AdaLNBeforeHead": Rule(_ada_ln_before_head_structure, _ada_ln_before_head, _ada_ln_before_head_probe),
    "VectorQuantizer2": Rule(_vector_quantizer_structure, _vector_quantizer, _vector_quantizer_probe),
}
FASTVAR_TYPES = (fnn.SelfAttention, fnn.FFN, fnn.AdaLNSelfAttn, fnn.AdaLNBeforeHead, fquant.VectorQuantizer2)


def finish(model: nn.Module, patch_tree: Callable[[nn.Module, str], nn.Module], replaced: Dict[int, nn.Module]) -> None:
    """After the tree: the VQVAE a VAR holds outside its modules (``vae_proxy``) is patched and re-linked, and every
    VAR's KV caches are sized for its schedule (checked against its mask)."""
    for holder in [m for m in model.modules() if hasattr(m, "vae_proxy")]:
        vae = holder.vae_proxy[0]
        if isinstance(vae, nn.Module):
            patch_tree(vae, "vae_proxy[0].")
            if hasattr(holder, "vae_quant_proxy") and hasattr(vae, "quantize"):
                holder.vae_quant_proxy = (vae.quantize,)
    for holder in [m for m in model.modules() if hasattr(m, "patch_nums") and hasattr(m, "blocks")]:
        holder.schedule = _schedule(holder)
        for blk in holder.blocks:
            if isinstance(getattr(blk, "attn", None), fnn.SelfAttention):
                blk.attn.cache_capacity = holder.schedule.L


def _schedule(var: nn.Module) -> Schedule:
    """An official VAR's schedule: its ``patch_nums``, checked against the dense mask it carries (the one place
    fastvar reads that mask for its schedule)."""
    schedule = Schedule.of(var.patch_nums)
    mask = getattr(var, "attn_bias_for_masking", None)
    if isinstance(mask, torch.Tensor) and mask.device.type != "meta":
        try:
            lens = schedule_of_mask(mask)
        except ValueError as e:
            raise ValueError(f"fastvar.patch: {type(var).__name__}.attn_bias_for_masking: {e}") from None
        if lens != schedule.lens:
            raise ValueError(f"fastvar.patch: {type(var).__name__}.attn_bias_for_masking is the mask of scales "
                             f"{list(lens)} (tokens), its patch_nums {list(schedule.patch_nums)} give "
                             f"{list(schedule.lens)}")
    return schedule
