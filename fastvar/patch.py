"""``fastvar.patch(model)``: swap fastvar's modules into an existing official VAR / VQVAE instance.

The official classes are recognised by name, by their exact parameter and buffer names and shapes and
sub-module types, by their forward's signature and by their output on a small random input (fastvar never
imports the official code); a module named like one but different in any of these is left alone, with a
warning that names it. Every swapped module keeps the very same ``Parameter`` objects (so optimizer
state and weight tying survive), buffers, device, dtype and train/eval mode. The model's own
``forward`` and ``autoregressive_infer_cfg`` then run on fastvar's ops.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from fastvar.nn import attention as fnn
from fastvar.nn import quant as fquant
from fastvar.nn.attention import schedule_of_mask
from fastvar.reference.attention import block_causal_bias
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
             "PhiNonShared": 0}[type(old.quant_resi).__name__]     # one of _PHI_SHARES: checked before
    counts = len(old.quant_resi) if share == 0 else 0
    new = _on_meta(lambda: fquant.VectorQuantizer2(
        vocab_size=old.vocab_size, Cvae=old.Cvae, using_znorm=bool(old.using_znorm), beta=old.beta,
        default_qresi_counts=counts, v_patch_nums=old.v_patch_nums, quant_resi=old.quant_resi_ratio,
        share_quant_resi=share))
    new = _swap(old, new)
    new.record_hit = getattr(old, "record_hit", 0)
    return new


# ---------------------------------------------------------------------------- recognising official modules
# A class name is not enough: a user's own ``FFN`` (say, ReLU and a residual) must keep computing what it
# computes. An official module is recognised by (1) its class name, (2) its exact parameter and buffer names and
# shapes and the types of its sub-modules, (3) its forward's signature and (4) its output: the fastvar
# replacement, built on the same tensors, must compute the same values on a small random input (skipped for
# tensors on the meta device, which hold no values). Anything else is left alone, with a warning naming it.

def _shapes(tensors) -> Dict[str, Tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in tensors}


def _diff(what: str, got: Dict[str, tuple], want: Dict[str, tuple]) -> Optional[str]:
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    wrong = sorted(f"{k} {got[k]} (official {want[k]})" for k in set(got) & set(want) if got[k] != want[k])
    parts = ([f"no {', '.join(missing)}"] if missing else []) + ([f"extra {', '.join(extra)}"] if extra else []) \
        + ([f"shapes {', '.join(wrong)}"] if wrong else [])
    return f"its {what} differ from the official ones ({'; '.join(parts)})" if parts else None


def _tensors(m: nn.Module, params: Dict[str, tuple], buffers: Dict[str, tuple] = None) -> Optional[str]:
    return (_diff("parameters", _shapes(m.named_parameters()), params)
            or _diff("buffers", _shapes((n, b) for n, b in m.named_buffers() if b is not None), buffers or {}))


def _signature(m: nn.Module, method: str, count: int, keywords: Tuple[str, ...] = ()) -> Optional[str]:
    """``method`` takes ``count`` arguments after ``self``, among them ``keywords`` by name (the ones the official
    VAR passes by keyword: ``b(x=..., cond_BD=..., attn_bias=...)``, ``self.attn(..., attn_bias=...)``)."""
    fn = getattr(type(m), method, None)
    if fn is None:
        return f"it has no {method}()"
    try:
        got = [p.name for p in inspect.signature(fn).parameters.values()][1:]
    except (TypeError, ValueError):
        return f"its {method}() has no inspectable signature"
    if len(got) != count or not set(keywords) <= set(got):
        want = f"{count} arguments" + (f" named {', '.join(keywords)}" if keywords else "")
        return f"its {method}({', '.join(got)}) does not take the official {want}"
    return None


def _is_plain_layernorm(ln) -> Optional[str]:
    if not isinstance(ln, nn.LayerNorm) or ln.elementwise_affine or len(ln.normalized_shape) != 1:
        return "its ln_wo_grad is not a LayerNorm without affine parameters"
    return None


def _ada_lin(m: nn.Module, D: int, out: int) -> Optional[str]:
    seq = getattr(m, "ada_lin", None)
    if not (isinstance(seq, nn.Sequential) and len(seq) == 2 and isinstance(seq[0], nn.SiLU)
            and isinstance(seq[1], nn.Linear) and seq[1].bias is not None):
        return "its ada_lin is not Sequential(SiLU, Linear)"
    if (seq[1].in_features, seq[1].out_features) != (D, out):
        return f"its ada_lin maps {seq[1].in_features} -> {seq[1].out_features}, not D={D} -> {out}"
    return None


def _first(*reasons: Optional[str]) -> Optional[str]:
    return next((r for r in reasons if r), None)


def _self_attention_structure(m: nn.Module) -> Optional[str]:
    lin = getattr(m, "mat_qkv", None)
    if not isinstance(lin, nn.Linear) or not isinstance(getattr(m, "proj", None), nn.Linear):
        return "its mat_qkv / proj are not Linear layers"
    C, H = lin.in_features, getattr(m, "num_heads", None)
    if isinstance(H, bool) or not isinstance(H, int) or H < 1 or C % H:
        return f"its num_heads {H!r} does not divide the width {C}"
    params = {"mat_qkv.weight": (3 * C, C), "q_bias": (C,), "v_bias": (C,), "proj.weight": (C, C), "proj.bias": (C,)}
    if getattr(m, "attn_l2_norm", None):
        params["scale_mul_1H11"] = (1, H, 1, 1)
    return _first(_tensors(m, params, {"zero_k_bias": (C,)}),
                  None if callable(getattr(m, "kv_caching", None)) else "it has no kv_caching()",
                  _signature(m, "forward", 2, ("attn_bias",)))


def _ffn_structure(m: nn.Module) -> Optional[str]:
    fc1, fc2, act = getattr(m, "fc1", None), getattr(m, "fc2", None), getattr(m, "act", None)
    if not isinstance(fc1, nn.Linear) or not isinstance(fc2, nn.Linear):
        return "its fc1 / fc2 are not Linear layers"
    if not isinstance(act, nn.GELU) or act.approximate != "tanh":
        return f"its act is {act!r}, not GELU(approximate='tanh')"
    if not isinstance(getattr(m, "drop", None), (nn.Dropout, nn.Identity)):
        return "its drop is not a Dropout or an Identity"
    C, Hd, O = fc1.in_features, fc1.out_features, fc2.out_features
    return _first(_diff("sub-modules", {n: () for n, _ in m.named_children()},
                        {"fc1": (), "act": (), "fc2": (), "drop": ()}),
                  _tensors(m, {"fc1.weight": (Hd, C), "fc1.bias": (Hd,), "fc2.weight": (O, Hd), "fc2.bias": (O,)}),
                  _signature(m, "forward", 1))


def _ada_ln_self_attn_structure(m: nn.Module) -> Optional[str]:
    C, D = getattr(m, "C", None), getattr(m, "D", None)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (C, D)):
        return "it has no integer widths C and D"
    reason = _first(*(None if isinstance(getattr(m, child, None), cls) else
                      f"its {child} was not recognised as the official {cls.__name__} (left as it is)"
                      for child, cls in (("attn", fnn.SelfAttention), ("ffn", fnn.FFN))),
                    _is_plain_layernorm(getattr(m, "ln_wo_grad", None)))
    if reason:
        return reason
    own = {n: tuple(p.shape) for n, p in m.named_parameters() if not n.startswith(("attn.", "ffn."))}
    if bool(getattr(m, "shared_aln", False)):
        want = {"ada_gss": (1, 1, 6, C)}
    else:
        reason = _ada_lin(m, D, 6 * C)
        want = {"ada_lin.1.weight": (6 * C, D), "ada_lin.1.bias": (6 * C,)}
    return _first(reason, _diff("parameters", own, want), _signature(m, "forward", 3, ("x", "cond_BD", "attn_bias")))


def _ada_ln_before_head_structure(m: nn.Module) -> Optional[str]:
    C, D = getattr(m, "C", None), getattr(m, "D", None)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (C, D)):
        return "it has no integer widths C and D"
    return _first(_is_plain_layernorm(getattr(m, "ln_wo_grad", None)), _ada_lin(m, D, 2 * C),
                  _tensors(m, {"ada_lin.1.weight": (2 * C, D), "ada_lin.1.bias": (2 * C,)}),
                  _signature(m, "forward", 2))


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
    return _first(_diff("Phi parameters", phis, want),
                  _tensors(m, {"embedding.weight": (V, Cvae), **phis}, {"ema_vocab_hit_SV": (S, V)}),
                  _signature(m, "get_next_autoregressive_input", 4),
                  None if callable(getattr(m, "f_to_idxBl_or_fhat", None)) else "it has no f_to_idxBl_or_fhat()")


# ------------------------------------------------------------------------ the same output on a random input
# How far the replacement's output may be from the module's own, relative to its largest value: the kernels sum in
# another order (fp32: ~1e-6; a GPU's fp32 attention may run its dot products in TF32, ~1e-3; bf16/fp16 ~1e-2); a
# different function (ReLU for GELU, a residual added, another modulation order) is off by far more (>= 0.1).
_SAME_OUTPUT_REL = {torch.float32: 1e-2, torch.float64: 1e-2, torch.float16: 5e-2, torch.bfloat16: 5e-2}


def _probe_inputs(name: str, m: nn.Module, dtype: torch.dtype, device: torch.device):
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
    mask = block_causal_bias([1, 4], device, dtype)[None, None]       # two scales of 1 and 4 tokens
    if name == "FFN":
        return "forward", (randn(1, 5, m.fc1.in_features),), {}
    if name == "SelfAttention":
        return "forward", (randn(1, 5, m.mat_qkv.in_features),), {"attn_bias": mask}
    if name == "AdaLNSelfAttn":
        cond = randn(1, 1, 6, m.C) if m.shared_aln else randn(1, m.D)
        return "forward", (randn(1, 5, m.C), cond), {"attn_bias": mask}
    if name == "AdaLNBeforeHead":
        return "forward", (randn(1, 5, m.C), randn(1, m.D)), {}
    hws = Schedule.of(m.v_patch_nums).hws
    f = torch.zeros(1, m.Cvae, *hws[-1], device=device)
    h = randn(1, m.Cvae, *hws[0]).float() if len(hws) > 1 else randn(1, m.Cvae, *hws[-1]).float()
    return "get_next_autoregressive_input", (0, len(hws), f, h), {}


def _outputs(out) -> List[torch.Tensor]:
    return [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]


def _same_output(name: str, old: nn.Module, new: nn.Module) -> Optional[str]:
    """None if ``new`` computes what ``old`` does on a small random input (or if that cannot be known: tensors on
    the meta device, or a reference output that is not finite), else why not."""
    t = next((p for p in old.parameters() if p.is_floating_point()), None)
    if t is None or t.device.type == "meta":
        return None
    modes = [(mod, mod.training, getattr(mod, "caching", None)) for mod in (*old.modules(), *new.modules())]
    try:
        for mod, _, caching in modes:     # eval mode (no dropout), and no KV caching (the probe is not a scale)
            mod.training = False
            if caching is True:
                mod.caching = False
        method, args, kwargs = _probe_inputs(name, old, t.dtype, t.device)
        with torch.no_grad(), torch.autocast(t.device.type, enabled=False):
            want = _outputs(getattr(old, method)(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args],
                                                 **kwargs))
            got = _outputs(getattr(new, method)(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args],
                                                **kwargs))
    except Exception as e:      # the module cannot run the official call: it is not the official module
        return f"it fails on the official {name}'s call ({type(e).__name__}: {e})"
    finally:
        for mod, training, caching in modes:
            mod.training = training
            if caching is True:
                mod.caching = True
    if len(got) != len(want) or any(a.shape != b.shape for a, b in zip(got, want)):
        return "its output has other shapes than the official module's"
    for a, b in zip(got, want):
        if not bool(torch.isfinite(b).all()):
            return None                    # weights not loaded yet (e.g. torch.empty): nothing to compare
        scale = float(b.abs().max()) or 1.0
        rel = float((a.float() - b.float()).abs().max()) / scale
        if not rel <= _SAME_OUTPUT_REL.get(t.dtype, 1e-2):
            return f"it computes something else than the official {name} (relative difference {rel:.2g} on a " \
                   f"random input)"
    return None


# official class name -> (structure check, factory of the fastvar replacement)
_RULES: Dict[str, Tuple[Callable[[nn.Module], Optional[str]], Callable[[nn.Module], nn.Module]]] = {
    "SelfAttention": (_self_attention_structure, _self_attention),
    "FFN": (_ffn_structure, _ffn),
    "AdaLNSelfAttn": (_ada_ln_self_attn_structure, _ada_ln_self_attn),
    "AdaLNBeforeHead": (_ada_ln_before_head_structure, _ada_ln_before_head),
    "VectorQuantizer2": (_vector_quantizer_structure, _vector_quantizer),
}
_FASTVAR_TYPES = (fnn.SelfAttention, fnn.FFN, fnn.AdaLNSelfAttn, fnn.AdaLNBeforeHead, fquant.VectorQuantizer2)


def _official_name(module: nn.Module) -> Optional[str]:
    """The official class ``module`` is named like (and is not already fastvar's), or None."""
    name = type(module).__name__
    return name if name in _RULES and not isinstance(module, _FASTVAR_TYPES) else None


def _replace(module: nn.Module, where: str) -> Optional[nn.Module]:
    """The fastvar module that replaces ``module``, or None (it is left alone, with a warning if it is named
    like an official class but is not one)."""
    name = _official_name(module)
    if name is None:
        return None
    structure, factory = _RULES[name]
    try:
        reason = structure(module)
        new = factory(module) if reason is None else None
    except Exception as e:        # an attribute of another kind than the official one
        reason, new = f"it cannot be read as the official {name} ({type(e).__name__}: {e})", None
    reason = reason or _same_output(name, module, new)
    if reason is None:
        return new
    cls = f"{type(module).__module__}.{type(module).__qualname__}"
    warnings.warn(f"fastvar.patch left {where} ({cls}) as it is: it is named like the official {name}, but "
                  f"{reason}; it keeps running its own forward", UserWarning, stacklevel=4)
    return None


def _patch_tree(module: nn.Module, swapped: List[str], prefix: str = "") -> nn.Module:
    for name, child in list(module.named_children()):
        new_child = _patch_tree(child, swapped, f"{prefix}{name}.")
        if new_child is not child:
            setattr(module, name, new_child)
    new = _replace(module, prefix.rstrip(".") or "<root>")
    if new is None:
        return module
    swapped.append(f"{prefix.rstrip('.') or '<root>'}: {type(module).__name__}")
    return new


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
    if _official_name(model) is not None:
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
