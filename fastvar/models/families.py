"""Which model family a state dict belongs to, so a loader given a checkpoint of another family says so by
name instead of listing a hundred missing keys."""
from __future__ import annotations

from typing import Mapping, Optional

# (family, marker keys: any one identifies it, the loader to use)
FAMILIES = (
    ("VAR", ("class_emb.weight", "pos_1LC", "blocks.0.attn.mat_qkv.weight"), "fastvar.load_vae_var"),
    ("VQVAE", ("quantize.embedding.weight", "quant_conv.weight"), "fastvar.load_vae_var"),
    ("Infinity", ("text_norm.weight", "cfg_uncond", "text_proj_for_sos.ca.mat_q"), "fastvar.load_infinity"),
    ("BSQ VAE", ("quantizer.lfq.mask", "quantize.lfq.mask", "encoder.conv_in.conv.weight"), "fastvar.load_infinity"),
)


def checkpoint_family(sd: Mapping[str, object]) -> Optional[str]:
    """``'VAR'``, ``'VQVAE'``, ``'Infinity'``, ``'BSQ VAE'`` or None (unknown)."""
    for family, markers, _ in FAMILIES:
        if any(k in sd for k in markers):
            return family
    return None


def _a(family: str) -> str:
    return f"{'an' if family[0] in 'AEIOU' else 'a'} {family}"


def reject_other_family(sd: Mapping[str, object], expected: str, what: str) -> None:
    """``ValueError`` naming the family when ``sd`` is a checkpoint of a family other than ``expected``."""
    family = checkpoint_family(sd)
    if family is not None and family != expected:
        loader = next(loader for f, _, loader in FAMILIES if f == family)
        marker = next(k for f, markers, _ in FAMILIES if f == family for k in markers if k in sd)
        raise ValueError(f"{what}: this is {_a(family)} checkpoint (it has {marker!r}), not {_a(expected)} one; "
                         f"load it with {loader}")
