"""``fastvar.patch`` rules for the official Infinity (``infinity/models/basic.py``): ``SelfAttention``,
``CrossAttention``, ``CrossAttnBlock`` (its ``FFN`` and the head's ``AdaLNBeforeHead`` are VAR's classes, with
VAR's rules), and the model's ``unregistered_blocks`` list, which the official sampler switches the KV caches
through. The official model's own ``forward`` / ``autoregressive_infer_cfg`` then call fastvar's modules with
the official arguments (its dict of RoPE tables included, :func:`fastvar.nn.infinity.rope_rows`)."""
from __future__ import annotations

import types
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

from fastvar.models.build_infinity import infinity_config_from_state_dict
from fastvar.models.infinity import Infinity
from fastvar.nn import attention as fnn
from fastvar.nn import infinity as finf
from fastvar.nn.attention import FFN
from fastvar.patch.checks import (Rule, adaln_block, attention_tensors, attention_widths, diff, first,
                                  forward_arguments, modulation_tensors, on_meta, positive_ints, probe_mask,
                                  seeded_randn, signature, swap, take_modulation, tensors)

_BLOCK_ARGS = ("x", "cond_BD", "ca_kv", "attn_bias_or_two_vector", "attn_fn", "scale_schedule", "rope2d_freqs_grid",
               "scale_ind")


# ------------------------------------------------------------------------------------------ factories
def _self_attention(old: nn.Module) -> nn.Module:
    C = old.mat_qkv.in_features
    new = swap(old, on_meta(lambda: finf.SelfAttention(embed_dim=C, num_heads=old.num_heads, cos_attn=True)))
    new.proj_drop = old.proj_drop
    return new


def _cross_attention(old: nn.Module) -> nn.Module:
    new = swap(old, on_meta(lambda: finf.CrossAttention(for_attn_pool=bool(old.for_attn_pool), embed_dim=old.embed_dim,
                                                        kv_dim=old.kv_dim, num_heads=old.num_heads)))
    new.proj_drop = old.proj_drop
    return new


def _cross_attn_block(old: nn.Module) -> nn.Module:
    gamma = old.ca_gamma
    new = on_meta(lambda: finf.CrossAttnBlock(
        embed_dim=old.C, kv_dim=old.ca.kv_dim, cond_dim=old.D, num_heads=old.sa.num_heads, norm_eps=old.norm_eps,
        shared_aln=bool(old.shared_aln), cross_attn_layer_scale=1.0 if isinstance(gamma, nn.Parameter) else -1.0))
    # the children were swapped first (bottom-up): take them over as they are, with the block's own tensors
    new.sa, new.ca, new.ffn, new.drop_path = old.sa, old.ca, old.ffn, old.drop_path
    new.ln_wo_grad, new.ca_norm, new.ca_gamma = old.ln_wo_grad, old.ca_norm, gamma
    new.drop_path_rate = getattr(old, "drop_path_rate", 0.0)
    take_modulation(old, new)
    new.train(old.training)
    return new


# ------------------------------------------------------------------------------------------ structure
def _self_attention_structure(m: nn.Module) -> Optional[str]:
    reason, C, H = attention_widths(m)
    if reason:
        return reason
    if not getattr(m, "cos_attn", False):
        return "it does not use cosine attention (cos_attn=False; every released Infinity model uses it)"
    if getattr(m, "using_flash", False):
        return "it runs the customized flash-attention kernel (customized_flash_attn=True), whose scale_mul and " \
               "training mask have other shapes"
    return first(attention_tensors(m, C, H, scale_mul=True), signature(m, "forward", 6, ("x",) + _BLOCK_ARGS[3:]))


def _cross_attention_structure(m: nn.Module) -> Optional[str]:
    C, kv_dim, H = getattr(m, "embed_dim", None), getattr(m, "kv_dim", None), getattr(m, "num_heads", None)
    if not positive_ints(C, kv_dim, H) or C % H:
        return "it has no integer embed_dim, kv_dim and num_heads dividing embed_dim"
    if getattr(m, "cos_attn", False):
        return "it uses cosine attention (cos_attn=True), which the official code never does here"
    c = C // H
    params = {"mat_kv.weight": (2 * C, kv_dim), "v_bias": (C,), "proj.weight": (C, C), "proj.bias": (C,)}
    if getattr(m, "for_attn_pool", False):
        params["mat_q"] = (1, H, c)
    else:
        params.update({"mat_q.weight": (C, C), "mat_q.bias": (C,)})
    return first(tensors(m, params, {"zero_k_bias": (C,)}), signature(m, "forward", 2, ("q", "ca_kv")))


def _cross_attn_block_structure(m: nn.Module) -> Optional[str]:
    reason = adaln_block(m, (("sa", finf.SelfAttention), ("ca", finf.CrossAttention), ("ffn", FFN)))
    if reason:
        return reason
    C, D = m.C, m.D
    if getattr(m, "using_swiglu", False):
        return "its FFN is SwiGLU (swiglu=True; no released Infinity model uses it)"
    if getattr(m, "fused_norm_func", None) is None:
        # the official non-fused path calls sa without the scale index, so its KV-cached sampling rotates every
        # scale from RoPE row 0 (INFINITY_SPEC.md section 13); fastvar's block reproduces the fused path only
        return "it is the non-fused block (fused_norm=False), which passes no scale index to RoPE when sampling"
    ca_norm = getattr(m, "ca_norm", None)
    if not isinstance(ca_norm, nn.LayerNorm) or not ca_norm.elementwise_affine or tuple(ca_norm.normalized_shape) != (C,):
        return "its ca_norm is not a LayerNorm(C) with affine parameters"
    if not isinstance(getattr(m, "norm_eps", None), float):
        return "it has no float norm_eps"
    own = {n: tuple(p.shape) for n, p in m.named_parameters() if not n.startswith(("sa.", "ca.", "ffn.", "ca_norm."))}
    reason, want = modulation_tensors(m, C, D)
    gamma = getattr(m, "ca_gamma", None)
    if isinstance(gamma, nn.Parameter):
        want["ca_gamma"] = (C,)
    elif not (isinstance(gamma, (int, float)) and gamma == 1):
        return f"its ca_gamma is {gamma!r}, not the constant 1 or a (C,) parameter"
    return first(reason, diff("parameters", own, want), signature(m, "forward", 8, _BLOCK_ARGS))


# ------------------------------------------------------------------------------------------ probes
# a call over probe_mask's two scales of 1 and 4 tokens: the schedule [(1, 1, 1), (1, 2, 2)] with its RoPE table,
# in the official dict form (the form the official model hands its blocks)
_PROBE_SCHEDULE = [(1, 1, 1), (1, 2, 2)]


def _probe_rope(head_dim: int, device) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    angles = torch.rand(5, head_dim // 2, generator=g) * 6.3
    table = torch.stack((angles.cos(), angles.sin()))[:, None, None, None].to(device)
    return {str(tuple(_PROBE_SCHEDULE)): table}


def _probe_text(kv_dim: int, randn) -> tuple:
    kv = randn(3, kv_dim)
    return kv, torch.tensor([0, 3], dtype=torch.int32, device=kv.device), 3


def _self_attention_probe(m, dtype, device):
    randn = seeded_randn(dtype, device)
    C = m.mat_qkv.in_features
    return "forward", (randn(1, 5, C), probe_mask(dtype, device), None, _PROBE_SCHEDULE, _probe_rope(C // m.num_heads, device), 0), {}


def _cross_attention_probe(m, dtype, device):
    randn = seeded_randn(dtype, device)
    return "forward", (None if m.for_attn_pool else randn(1, 5, m.embed_dim), _probe_text(m.kv_dim, randn)), {}


def _cross_attn_block_probe(m, dtype, device):
    randn = seeded_randn(dtype, device)
    cond = randn(1, 1, 6, m.C) if m.shared_aln else randn(1, m.D)
    return "forward", (randn(1, 5, m.C), cond, _probe_text(m.ca.kv_dim, randn), probe_mask(dtype, device), None, _PROBE_SCHEDULE,
                       _probe_rope(m.C // m.sa.num_heads, device), 0), {}


def _is_infinity_attention(m: nn.Module) -> bool:
    return "rope2d_freqs_grid" in forward_arguments(m)


RULES: Dict[str, Rule] = {
    "SelfAttention": Rule(_self_attention_structure, _self_attention, _self_attention_probe, _is_infinity_attention),
    "CrossAttention": Rule(_cross_attention_structure, _cross_attention, _cross_attention_probe),
    "CrossAttnBlock": Rule(_cross_attn_block_structure, _cross_attn_block, _cross_attn_block_probe),
}
FASTVAR_TYPES = (finf.SelfAttention, finf.CrossAttention, finf.CrossAttnBlock)


def finish(model: nn.Module, patch_tree: Callable[[nn.Module, str], nn.Module], replaced: Dict[int, nn.Module]) -> None:
    """The official Infinity keeps its blocks twice: in ``block_chunks`` (modules) and in the plain list
    ``unregistered_blocks``, through which its sampler turns the KV caches on; the list gets the new blocks. A
    fully patched official Infinity also gets ``fastvar_proxy``: a fastvar ``Infinity`` made of its very modules
    and parameters, which ``fastvar.Sampler`` samples (kept in a tuple, so it is neither a sub-module nor in the
    state dict)."""
    for holder in model.modules():
        blocks = getattr(holder, "unregistered_blocks", None)
        if isinstance(blocks, list) and not isinstance(holder, Infinity):
            holder.unregistered_blocks = [replaced.get(id(b), b) for b in blocks]
            view = _fastvar_view(holder)
            if view is not None:
                holder.fastvar_proxy = (view,)


def _fastvar_view(official: nn.Module) -> Optional[Infinity]:
    """A fastvar ``Infinity`` whose sub-modules and parameters are ``official``'s own objects (so a later ``.to()``,
    an optimizer step or ``load_state_dict`` on either is seen by both), or None when ``official`` is not a fully
    patched official Infinity (a block or the head left as it was)."""
    blocks = official.unregistered_blocks
    if not blocks or not all(isinstance(b, finf.CrossAttnBlock) for b in blocks) \
            or not isinstance(getattr(official, "head_nm", None), fnn.AdaLNBeforeHead):
        return None
    try:
        patchify = int(bool(getattr(official, "apply_spatial_patchify", 0)))
        d = official.d_vae // (4 if patchify else 1)
        cfg = infinity_config_from_state_dict(official.state_dict(), d)
        cfg.update(norm_eps=blocks[0].norm_eps, cond_drop_rate=official.cond_drop_rate,
                   pad_to_multiplier=official.pad_to_multiplier, top_k=getattr(official, "top_k", 0),
                   top_p=getattr(official, "top_p", 0.0),
                   add_lvl_embeding_only_first_block=official.add_lvl_embeding_only_first_block)
        view = on_meta(lambda: Infinity(types.SimpleNamespace(embed_dim=d), **cfg))
    except (AttributeError, ValueError, TypeError):
        return None
    if set(view._modules) - set(official._modules) or set(view._parameters) - set(official._parameters):
        return None
    for name in view._modules:
        view._modules[name] = official._modules[name]
    for name in view._parameters:
        view._parameters[name] = official._parameters[name]
    view.unregistered_blocks = blocks
    return view.train(official.training)
