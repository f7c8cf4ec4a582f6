"""``fastvar.patch(model)``: swap fastvar's modules into an existing official VAR / VQVAE instance.

The official classes are recognised by name and by their parameter names (fastvar never imports
the official code). Every swapped module keeps the very same ``Parameter`` objects (so optimizer
state and weight tying survive), buffers, device, dtype and train/eval mode. The model's own
``forward`` and ``autoregressive_infer_cfg`` then run on fastvar's ops.
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn as nn

from fastvar.nn import attention as fnn
from fastvar.nn import quant as fquant
from fastvar.nn.attention import schedule_of_mask
from fastvar.schedule import Schedule


def _swap(old: nn.Module, new: nn.Module) -> nn.Module:
    """Give ``new`` the parameters and buffers of ``old`` (the same tensor objects) and its mode."""
    frozen = {name: not p.requires_grad for name, p in old.named_parameters()}
    # assign=True hands the old Parameter objects over but sets their requires_grad from new's (True)
    new.load_state_dict(old.state_dict(keep_vars=True), strict=True, assign=True)
    for name, p in new.named_parameters():
        p.requires_grad_(not frozen[name])
    new.train(old.training)
    return new


def _on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    with torch.device("meta"):
        return factory()


def _self_attention(old: nn.Module) -> nn.Module:
    C = old.mat_qkv.weight.shape[1]
    attn_drop = float(getattr(old, "attn_drop", 0.0))
    if attn_drop > 0:
        warnings.warn(f"the model's attention dropout (attn_drop={attn_drop:g}) is not supported by "
                      "fastvar's kernels: evaluation and sampling are unaffected, a training-mode forward will "
                      "raise NotImplementedError (build the model with attn_drop_rate=0 to train it)", stacklevel=3)
    new = _on_meta(lambda: fnn.SelfAttention(block_idx=getattr(old, "block_idx", 0), embed_dim=C,
                                             num_heads=old.num_heads, attn_drop=attn_drop,
                                             attn_l2_norm=bool(old.attn_l2_norm)))
    new = _swap(old, new)
    new.proj_drop = old.proj_drop
    new.scale = old.scale
    return new


def _ffn(old: nn.Module) -> nn.Module:
    new = _on_meta(lambda: fnn.FFN(old.fc1.in_features, old.fc1.out_features, old.fc2.out_features))
    new = _swap(old, new)
    new.drop = old.drop
    return new


def _ada_ln_self_attn(old: nn.Module) -> nn.Module:
    ln = old.ln_wo_grad
    new = _on_meta(lambda: fnn.AdaLNSelfAttn(
        block_idx=old.block_idx, last_drop_p=getattr(old, "last_drop_p", 0.0), embed_dim=old.C, cond_dim=old.D,
        shared_aln=bool(old.shared_aln), norm_layer=lambda c, elementwise_affine: nn.LayerNorm(c, eps=ln.eps,
                                                                                               elementwise_affine=False),
        num_heads=old.attn.num_heads, mlp_ratio=old.ffn.fc1.out_features / old.C,
        attn_l2_norm=bool(old.attn.attn_l2_norm)))
    # the children were swapped first (bottom-up): take them over as they are
    new.attn, new.ffn, new.drop_path, new.ln_wo_grad = old.attn, old.ffn, old.drop_path, old.ln_wo_grad
    if old.shared_aln:
        new.ada_gss = old.ada_gss
    else:
        new.ada_lin = old.ada_lin
    new.train(old.training)
    return new


def _ada_ln_before_head(old: nn.Module) -> nn.Module:
    new = _on_meta(lambda: fnn.AdaLNBeforeHead(old.C, old.D, norm_layer=lambda c, elementwise_affine: nn.LayerNorm(
        c, eps=old.ln_wo_grad.eps, elementwise_affine=False)))
    new.ln_wo_grad, new.ada_lin = old.ln_wo_grad, old.ada_lin
    new.train(old.training)
    return new


def _vector_quantizer(old: nn.Module) -> nn.Module:
    share = {"PhiShared": 1, "PhiPartiallyShared": len(getattr(old.quant_resi, "qresi_ls", ())),
             "PhiNonShared": 0}.get(type(old.quant_resi).__name__)
    if share is None:
        raise ValueError(f"fastvar.patch: unknown quant_resi type {type(old.quant_resi).__name__} in VectorQuantizer2")
    counts = len(old.quant_resi) if share == 0 else 0
    new = _on_meta(lambda: fquant.VectorQuantizer2(
        vocab_size=old.vocab_size, Cvae=old.Cvae, using_znorm=bool(old.using_znorm), beta=old.beta,
        default_qresi_counts=counts, v_patch_nums=old.v_patch_nums, quant_resi=old.quant_resi_ratio,
        share_quant_resi=share))
    new = _swap(old, new)
    new.record_hit = getattr(old, "record_hit", 0)
    return new


# official class name -> (attributes that identify it, factory of the fastvar replacement)
_RULES: Dict[str, Tuple[Tuple[str, ...], Callable[[nn.Module], nn.Module]]] = {
    "SelfAttention": (("mat_qkv", "q_bias", "v_bias", "zero_k_bias", "proj", "kv_caching"), _self_attention),
    "FFN": (("fc1", "fc2"), _ffn),
    "AdaLNSelfAttn": (("attn", "ffn", "ln_wo_grad", "shared_aln"), _ada_ln_self_attn),
    "AdaLNBeforeHead": (("ada_lin", "ln_wo_grad"), _ada_ln_before_head),
    "VectorQuantizer2": (("embedding", "quant_resi", "f_to_idxBl_or_fhat", "get_next_autoregressive_input"),
                         _vector_quantizer),
}
_FASTVAR_TYPES = (fnn.SelfAttention, fnn.FFN, fnn.AdaLNSelfAttn, fnn.AdaLNBeforeHead, fquant.VectorQuantizer2)


def _replacement(module: nn.Module):
    if isinstance(module, _FASTVAR_TYPES):
        return None
    rule = _RULES.get(type(module).__name__)
    if rule is None or not all(hasattr(module, a) for a in rule[0]):
        return None
    return rule[1]


def _patch_tree(module: nn.Module, swapped: List[str], prefix: str = "") -> nn.Module:
    for name, child in list(module.named_children()):
        new_child = _patch_tree(child, swapped, f"{prefix}{name}.")
        if new_child is not child:
            setattr(module, name, new_child)
    factory = _replacement(module)
    if factory is None:
        return module
    swapped.append(f"{prefix.rstrip('.') or '<root>'}: {type(module).__name__}")
    return factory(module)


def patch(model: nn.Module) -> nn.Module:
    """Swap fastvar's modules into an official VAR / VQVAE (or any module containing them), in place.

    Replaced: ``SelfAttention`` (attention on fastvar's block-causal and KV-cached kernels),
    ``FFN``, ``AdaLNSelfAttn``, ``AdaLNBeforeHead`` and the quantizer ``VectorQuantizer2``, with the
    same parameters. A VAR's reference to its VQVAE (``vae_proxy`` / ``vae_quant_proxy``) is patched
    too. Patching twice is harmless. Returns ``model``; raises ``ValueError`` when it finds nothing it
    recognises. With a VAR at the root, the KV caches are sized for its whole schedule.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastvar.patch expects a torch.nn.Module, got {type(model).__name__}")
    if _replacement(model) is not None:
        raise ValueError(f"fastvar.patch: pass the model that contains the {type(model).__name__}, not the module "
                         "itself (it is replaced, not modified)")
    swapped: List[str] = []
    _patch_tree(model, swapped)
    for holder in [m for m in model.modules() if hasattr(m, "vae_proxy")]:
        vae = holder.vae_proxy[0]
        if isinstance(vae, nn.Module):
            _patch_tree(vae, swapped, "vae_proxy[0].")
            if hasattr(holder, "vae_quant_proxy") and hasattr(vae, "quantize"):
                holder.vae_quant_proxy = (vae.quantize,)
    already = any(isinstance(m, _FASTVAR_TYPES) for m in model.modules())
    if not swapped and not already:
        raise ValueError(f"fastvar.patch: {type(model).__name__} holds no official VAR/VQVAE module that fastvar "
                         f"recognises ({', '.join(_RULES)}); nothing was patched")
    for holder in [m for m in model.modules() if hasattr(m, "patch_nums") and hasattr(m, "blocks")]:
        holder.schedule = _schedule(holder)
        for blk in holder.blocks:
            if isinstance(getattr(blk, "attn", None), fnn.SelfAttention):
                blk.attn.cache_capacity = holder.schedule.L
    model.fastvar_patched = swapped
    return model


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
