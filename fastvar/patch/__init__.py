"""``fastvar.patch(model)``: swap fastvar's modules into an existing official VAR / VQVAE or Infinity instance.

The official classes are recognised by name, by their exact parameter and buffer names and shapes and
sub-module types, by their forward's signature and by their output on a small random input (fastvar never
imports the official code); a module named like one but different in any of these is left alone, with a
warning that names it. Every swapped module keeps the very same ``Parameter`` objects (so optimizer
state and weight tying survive), buffers, device, dtype and train/eval mode. The model's own
``forward`` and ``autoregressive_infer_cfg`` then run on fastvar's ops. The rules of each family live in
:mod:`fastvar.patch.var` and :mod:`fastvar.patch.infinity`.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from fastvar.patch import infinity as _infinity
from fastvar.patch import var as _var
from fastvar.patch.checks import Rule

_FAMILIES = (_var, _infinity)
# official class name -> its rules (VAR's and Infinity's ``SelfAttention`` share a name; ``Rule.claims`` decides)
_RULES: Dict[str, List[Rule]] = {}
for _family in _FAMILIES:
    for _name, _rule in _family.RULES.items():
        _RULES.setdefault(_name, []).append(_rule)
_FASTVAR_TYPES = tuple(t for f in _FAMILIES for t in f.FASTVAR_TYPES)


# ------------------------------------------------------------------------ the same output on a random input
# How far the replacement's output may be from the module's own, relative to its largest value: the kernels sum in
# another order (fp32: ~1e-6; a GPU's fp32 attention may run its dot products in TF32, ~1e-3; bf16/fp16 ~1e-2); a
# different function (ReLU for GELU, a residual added, another modulation order) is off by far more (>= 0.1).
_SAME_OUTPUT_REL = {torch.float32: 1e-2, torch.float64: 1e-2, torch.float16: 5e-2, torch.bfloat16: 5e-2}


def _outputs(out) -> List[torch.Tensor]:
    return [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]


def _same_output(name: str, rule: Rule, old: nn.Module, new: nn.Module) -> Optional[str]:
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
        method, args, kwargs = rule.probe(old, t.dtype, t.device)
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


def _official_rule(module: nn.Module) -> Optional[Tuple[str, Rule]]:
    """The official class ``module`` is named like (and is not already fastvar's) and the rule that judges it,
    or None."""
    name = type(module).__name__
    if name not in _RULES or isinstance(module, _FASTVAR_TYPES):
        return None
    rules = _RULES[name]
    return name, next((r for r in rules if r.claims(module)), rules[0])


def _replace(module: nn.Module, where: str) -> Optional[nn.Module]:
    """The fastvar module that replaces ``module``, or None (it is left alone, with a warning if it is named
    like an official class but is not one)."""
    found = _official_rule(module)
    if found is None:
        return None
    name, rule = found
    try:
        reason = rule.structure(module)
        new = rule.factory(module) if reason is None else None
    except Exception as e:        # an attribute of another kind than the official one
        reason, new = f"it cannot be read as the official {name} ({type(e).__name__}: {e})", None
    reason = reason or _same_output(name, rule, module, new)
    if reason is None:
        return new
    cls = f"{type(module).__module__}.{type(module).__qualname__}"
    warnings.warn(f"fastvar.patch left {where} ({cls}) as it is: it is named like the official {name}, but "
                  f"{reason}; it keeps running its own forward", UserWarning, stacklevel=4)
    return None


def _patch_tree(module: nn.Module, swapped: List[str], replaced: Dict[int, nn.Module], prefix: str = "") -> nn.Module:
    """Patch ``module``'s sub-tree bottom-up; ``replaced`` maps ``id(old)`` to the new module."""
    for name, child in list(module.named_children()):
        new_child = _patch_tree(child, swapped, replaced, f"{prefix}{name}.")
        if new_child is not child:
            setattr(module, name, new_child)
    new = _replace(module, prefix.rstrip(".") or "<root>")
    if new is None:
        return module
    swapped.append(f"{prefix.rstrip('.') or '<root>'}: {type(module).__name__}")
    replaced[id(module)] = new
    return new


def patch(model: nn.Module) -> nn.Module:
    """Swap fastvar's modules into an official VAR / VQVAE or Infinity (or any module containing them), in place.

    Replaced, with the same parameters: for VAR ``SelfAttention`` (attention on fastvar's block-causal and
    KV-cached kernels), ``FFN``, ``AdaLNSelfAttn``, ``AdaLNBeforeHead`` and the quantizer ``VectorQuantizer2``
    (a VAR's reference to its VQVAE, ``vae_proxy`` / ``vae_quant_proxy``, is patched too; the KV caches are
    sized for its schedule); for Infinity ``SelfAttention`` (the KV-cached step with RoPE and the q/k norm fused),
    ``CrossAttention`` (the packed text attention, no flash-attn), ``CrossAttnBlock`` (AdaLN on fastvar's op),
    ``FFN`` and ``AdaLNBeforeHead`` (the model's ``unregistered_blocks`` list follows). Patching twice is
    harmless. Returns ``model``; raises ``ValueError`` when it finds nothing it recognises.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastvar.patch expects a torch.nn.Module, got {type(model).__name__}")
    if _official_rule(model) is not None:
        raise ValueError(f"fastvar.patch: pass the model that contains the {type(model).__name__}, not the module "
                         "itself (it is replaced, not modified)")
    swapped: List[str] = []
    replaced: Dict[int, nn.Module] = {}
    _patch_tree(model, swapped, replaced)
    for family in _FAMILIES:
        family.finish(model, lambda m, prefix: _patch_tree(m, swapped, replaced, prefix), replaced)
    already = any(isinstance(m, _FASTVAR_TYPES) for m in model.modules())
    if not swapped and not already:
        raise ValueError(f"fastvar.patch: {type(model).__name__} holds no official VAR/VQVAE or Infinity module that "
                         f"fastvar recognises ({', '.join(_RULES)}); nothing was patched")
    model.fastvar_patched = swapped
    return model
