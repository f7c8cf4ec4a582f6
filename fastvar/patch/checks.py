"""The pieces ``fastvar.patch`` recognises official modules with, for every model family: tensor names and shapes,
forward signatures, sub-module types; and the swap that hands a module's tensors to its fastvar replacement."""
from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

from fastvar.reference.attention import block_causal_bias


@dataclasses.dataclass(frozen=True)
class Rule:
    """How one official class is recognised and replaced. ``structure(m)``: None if ``m`` has the official
    tensors, sub-modules and signature, else why not; ``factory(m)``: the fastvar replacement holding ``m``'s
    tensors; ``probe(m, dtype, device)``: ``(method, args, kwargs)`` of a small official call whose output the
    replacement must reproduce; ``claims(m)``: whether this rule (of several for one class name, e.g. VAR's and
    Infinity's ``SelfAttention``) is the one to judge ``m``."""

    structure: Callable[[nn.Module], Optional[str]]
    factory: Callable[[nn.Module], nn.Module]
    probe: Callable[[nn.Module, torch.dtype, torch.device], tuple]
    claims: Callable[[nn.Module], bool] = lambda m: True


def forward_arguments(m: nn.Module, method: str = "forward") -> Tuple[str, ...]:
    """The names of ``method``'s arguments after ``self`` (empty when it has none or cannot be inspected)."""
    fn = getattr(type(m), method, None)
    try:
        return tuple(p.name for p in inspect.signature(fn).parameters.values())[1:]
    except (TypeError, ValueError):
        return ()


def seeded_randn(dtype: torch.dtype, device: torch.device):
    """A seeded ``randn(*shape)`` in the module's dtype and device, for probe inputs."""
    g = torch.Generator().manual_seed(0)
    return lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def positive_ints(*values) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)


def swap(old: nn.Module, new: nn.Module) -> nn.Module:
    """Give ``new`` the parameters and buffers of ``old`` (the same tensor objects) and its mode."""
    frozen = {name: not p.requires_grad for name, p in old.named_parameters()}
    # assign=True hands the old Parameter objects over but sets their requires_grad from new's (True)
    new.load_state_dict(old.state_dict(keep_vars=True), strict=True, assign=True)
    for name, p in new.named_parameters():
        p.requires_grad_(not frozen[name])
    new.train(old.training)
    return new


def on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    with torch.device("meta"):
        return factory()


def shapes(tensors) -> Dict[str, Tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in tensors}


def diff(what: str, got: Dict[str, tuple], want: Dict[str, tuple]) -> Optional[str]:
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    wrong = sorted(f"{k} {got[k]} (official {want[k]})" for k in set(got) & set(want) if got[k] != want[k])
    parts = ([f"no {', '.join(missing)}"] if missing else []) + ([f"extra {', '.join(extra)}"] if extra else []) \
        + ([f"shapes {', '.join(wrong)}"] if wrong else [])
    return f"its {what} differ from the official ones ({'; '.join(parts)})" if parts else None


def tensors(m: nn.Module, params: Dict[str, tuple], buffers: Dict[str, tuple] = None) -> Optional[str]:
    return (diff("parameters", shapes(m.named_parameters()), params)
            or diff("buffers", shapes((n, b) for n, b in m.named_buffers() if b is not None), buffers or {}))


def signature(m: nn.Module, method: str, count: int, keywords: Tuple[str, ...] = ()) -> Optional[str]:
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


def is_plain_layernorm(ln) -> Optional[str]:
    if not isinstance(ln, nn.LayerNorm) or ln.elementwise_affine or len(ln.normalized_shape) != 1:
        return "its ln_wo_grad is not a LayerNorm without affine parameters"
    return None


def ada_lin_check(m: nn.Module, D: int, out: int) -> Optional[str]:
    seq = getattr(m, "ada_lin", None)
    if not (isinstance(seq, nn.Sequential) and len(seq) == 2 and isinstance(seq[0], nn.SiLU)
            and isinstance(seq[1], nn.Linear) and seq[1].bias is not None):
        return "its ada_lin is not Sequential(SiLU, Linear)"
    if (seq[1].in_features, seq[1].out_features) != (D, out):
        return f"its ada_lin maps {seq[1].in_features} -> {seq[1].out_features}, not D={D} -> {out}"
    return None


def first(*reasons: Optional[str]) -> Optional[str]:
    return next((r for r in reasons if r), None)



def attention_widths(m: nn.Module):
    """``(reason, C, H)`` of an official self-attention: ``reason`` None when ``mat_qkv`` and ``proj`` are Linear
    layers and ``num_heads`` divides the width ``C``."""
    lin = getattr(m, "mat_qkv", None)
    if not isinstance(lin, nn.Linear) or not isinstance(getattr(m, "proj", None), nn.Linear):
        return "its mat_qkv / proj are not Linear layers", 0, 0
    C, H = lin.in_features, getattr(m, "num_heads", None)
    if not positive_ints(H) or C % H:
        return f"its num_heads {H!r} does not divide the width {C}", C, 0
    return None, C, H


def attention_tensors(m: nn.Module, C: int, H: int, scale_mul: bool) -> Optional[str]:
    """None if ``m`` holds the official self-attention's tensors for width ``C`` and ``H`` heads (``mat_qkv``
    without bias, ``q_bias``, ``v_bias``, ``proj``, the ``zero_k_bias`` buffer, and ``scale_mul_1H11`` with
    cosine attention) and a ``kv_caching()``; VAR's and Infinity's share them."""
    params = {"mat_qkv.weight": (3 * C, C), "q_bias": (C,), "v_bias": (C,), "proj.weight": (C, C), "proj.bias": (C,)}
    if scale_mul:
        params["scale_mul_1H11"] = (1, H, 1, 1)
    return first(tensors(m, params, {"zero_k_bias": (C,)}),
                 None if callable(getattr(m, "kv_caching", None)) else "it has no kv_caching()")


def probe_mask(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The ``(1, 1, 5, 5)`` block-causal mask of the probe calls: two scales of 1 and 4 tokens."""
    return block_causal_bias([1, 4], device, dtype)[None, None]


def adaln_block(m: nn.Module, children) -> Optional[str]:
    """None if ``m`` is an official AdaLN block so far: integer widths ``C``, ``D``, each ``(name, class)`` of
    ``children`` already swapped for fastvar's (they are patched first), and a plain ``ln_wo_grad``."""
    if not positive_ints(getattr(m, "C", None), getattr(m, "D", None)):
        return "it has no integer widths C and D"
    return first(*(None if isinstance(getattr(m, child, None), cls) else
                   f"its {child} was not recognised as the official {cls.__name__} (left as it is)"
                   for child, cls in children),
                 is_plain_layernorm(getattr(m, "ln_wo_grad", None)))


def modulation_tensors(m: nn.Module, C: int, D: int):
    """``(reason, parameters)`` of an AdaLN block's modulation: the shared ``ada_gss`` (``shared_aln``) or its own
    ``ada_lin`` = Sequential(SiLU, Linear(D, 6C))."""
    if bool(getattr(m, "shared_aln", False)):
        return None, {"ada_gss": (1, 1, 6, C)}
    return ada_lin_check(m, D, 6 * C), {"ada_lin.1.weight": (6 * C, D), "ada_lin.1.bias": (6 * C,)}


def take_modulation(old: nn.Module, new: nn.Module) -> None:
    """Hand ``old``'s modulation module or parameter to ``new`` (the same object)."""
    if old.shared_aln:
        new.ada_gss = old.ada_gss
    else:
        new.ada_lin = old.ada_lin
