"""Building VAR + VQVAE pairs: from hyper-parameters (``build_vae_var``, the official rules) or from
checkpoint files (``load_vae_var``, everything inferred from the tensors)."""
from __future__ import annotations

import math
import os
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from fastvar.models.families import reject_other_family
from fastvar.models.var import VAR
from fastvar.models.vqvae import VQVAE
from fastvar.utils.files import check_finite_tensors, load_tensors
from fastvar.schedule import PATCH_NUMS_256, PATCH_NUMS_512, ScaleSpec

KNOWN_SCHEDULES = (PATCH_NUMS_256, PATCH_NUMS_512)


def build_vae_var(
    device: Union[str, torch.device] = "cpu",
    patch_nums: Sequence[ScaleSpec] = PATCH_NUMS_256,
    V: int = 4096, Cvae: int = 32, ch: int = 160, share_quant_resi: int = 4,
    num_classes: int = 1000, depth: int = 16, shared_aln: bool = False, attn_l2_norm: bool = True,
    flash_if_available: bool = True, fused_if_available: bool = True,
    init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02, init_std: float = -1,
    *, dtype: Optional[torch.dtype] = None, fast_init: bool = False,
    vae_kwargs: Optional[Mapping[str, Any]] = None, var_kwargs: Optional[Mapping[str, Any]] = None,
) -> Tuple[VQVAE, VAR]:
    """The official ``build_vae_var``: a VQVAE and a VAR of depth ``depth`` with width ``64 * depth``,
    ``depth`` heads, MLP ratio 4 and ``drop_path_rate = 0.1 * depth / 24``, VAR weights initialised
    by the official rule (the VQVAE gets PyTorch's default init: load real weights into it).

    fastvar's extras (keyword-only): ``dtype`` casts the VAR's weights; ``fast_init`` draws uniform
    weights with the official standard deviations (5x faster on CPU, for benchmarks); ``vae_kwargs`` /
    ``var_kwargs`` override constructor arguments (e.g. ``ch_mult`` for a small VQVAE, or
    ``embed_dim`` / ``num_heads`` to leave the official width rule). The VAR is built on the ``meta``
    device and materialised once on ``device``, so released sizes build in seconds.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive int, got {depth!r}")
    device = torch.device(device)
    vae = VQVAE(vocab_size=V, z_channels=Cvae, ch=ch, test_mode=True, share_quant_resi=share_quant_resi,
                v_patch_nums=patch_nums, **dict(vae_kwargs or {})).to(device)
    kw = dict(num_classes=num_classes, depth=depth, embed_dim=64 * depth, num_heads=depth, mlp_ratio=4.0,
              drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.1 * depth / 24, norm_eps=1e-6,
              shared_aln=shared_aln, cond_drop_rate=0.1, attn_l2_norm=attn_l2_norm, patch_nums=patch_nums,
              flash_if_available=flash_if_available, fused_if_available=fused_if_available)
    kw.update(var_kwargs or {})
    with torch.device("meta"):
        var = VAR(vae_local=vae, **kw)
    var = var.to_empty(device=device)
    var.reset_buffers()
    var.init_weights(init_adaln=init_adaln, init_adaln_gamma=init_adaln_gamma, init_head=init_head,
                     init_std=init_std, fast=fast_init)
    if dtype is not None:
        var = var.to(dtype=dtype)
    return vae, var


# ---------------------------------------------------------------------------- checkpoints

def _state_dicts_inside(obj, prefix: str = "", depth: int = 2) -> list:
    """Keys (``a.b``) under which a nested mapping holds a state dict: a training checkpoint of another layout."""
    found = []
    if isinstance(obj, Mapping) and depth > 0:
        for k, v in obj.items():
            if isinstance(v, Mapping) and v and all(isinstance(t, torch.Tensor) for t in v.values()):
                found.append(f"{prefix}{k!r}")
            else:
                found += _state_dicts_inside(v, f"{prefix}{k!r}.", depth - 1)
    return found


def load_checkpoint(path: Union[str, os.PathLike], what: str) -> Dict[str, torch.Tensor]:
    """A state dict from a file, read with ``torch.load(weights_only=True)``: a plain state dict, or a
    training checkpoint that holds one under ``"state_dict"``. ``ValueError`` naming the tensor if one holds NaN
    or inf."""
    obj = load_tensors(path, f"{what} checkpoint")
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inside = _state_dicts_inside(obj)
        hint = f"; it holds state dicts under {', '.join(inside)}: save that one alone" if inside else ""
        raise ValueError(f"{what} checkpoint {path} must hold a state dict (names -> tensors), got "
                         f"{type(obj).__name__}{hint}")
    check_finite_tensors(obj, f"{what} checkpoint {path}")
    return dict(obj)


def check_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str,
                     ignore_shape: Sequence[str] = ()) -> None:
    """``ValueError`` listing the missing, unexpected and wrongly shaped keys of ``state_dict`` for ``module``."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = sorted(f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                   for k in set(own) & set(state_dict)
                   if k not in ignore_shape and tuple(own[k].shape) != tuple(state_dict[k].shape))
    if missing or unexpected or wrong:
        def show(xs):
            return ", ".join(xs[:8]) + (f", ... ({len(xs)} in all)" if len(xs) > 8 else "")
        parts = [f"missing keys: {show(missing)}" if missing else "",
                 f"unexpected keys: {show(unexpected)}" if unexpected else "",
                 f"wrong shapes: {show(wrong)}" if wrong else ""]
        raise ValueError(f"{what} state dict does not match the model; " + "; ".join(p for p in parts if p))


def _indices(sd: Mapping[str, torch.Tensor], pattern: str) -> list:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd for m in [rx.match(k)] if m})


def _require(sd: Mapping[str, torch.Tensor], key: str, what: str) -> torch.Tensor:
    if key not in sd:
        raise ValueError(f"{what} state dict has no {key!r}: it is not an official VAR/VQVAE checkpoint")
    return sd[key]


def infer_schedule(sd: Mapping[str, torch.Tensor]) -> Tuple[ScaleSpec, ...]:
    """The schedule of a VAR state dict: from ``lvl_1L`` (tokens per scale) or the length of ``pos_1LC``."""
    if "lvl_1L" in sd:
        counts = torch.bincount(sd["lvl_1L"].reshape(-1).long()).tolist()
        pns = [math.isqrt(n) for n in counts]
        if all(p * p == n and n > 0 for p, n in zip(pns, counts)):
            return tuple(pns)
        raise ValueError(f"VAR state dict: lvl_1L has scales of {counts} tokens, not all squares; pass the "
                         f"schedule as load_vae_var(..., patch_nums=[(h, w), ...])")
    L = _require(sd, "pos_1LC", "VAR").shape[1]
    for pn in KNOWN_SCHEDULES:
        if sum(p * p for p in pn) == L:
            return pn
    raise ValueError(f"VAR state dict: cannot infer the schedule of L={L} tokens; pass it as "
                     f"load_vae_var(..., patch_nums=...)")


def var_config_from_state_dict(sd: Mapping[str, torch.Tensor], patch_nums=None) -> Dict[str, Any]:
    """Constructor arguments of the VAR that produced ``sd``."""
    reject_other_family(sd, "VAR", "VAR state dict")
    w = _require(sd, "word_embed.weight", "VAR")
    depth_ids = _indices(sd, r"blocks\.(\d+)\.")
    if not depth_ids:
        raise ValueError("VAR state dict has no blocks.* keys")
    C = w.shape[0]
    attn_l2_norm = "blocks.0.attn.scale_mul_1H11" in sd
    heads = sd["blocks.0.attn.scale_mul_1H11"].shape[1] if attn_l2_norm else max(1, C // 64)
    depth = max(depth_ids) + 1
    return dict(num_classes=_require(sd, "class_emb.weight", "VAR").shape[0] - 1, depth=depth, embed_dim=C,
                num_heads=heads, mlp_ratio=_require(sd, "blocks.0.ffn.fc1.weight", "VAR").shape[0] / C,
                drop_path_rate=0.1 * depth / 24, norm_eps=1e-6, shared_aln="shared_ada_lin.1.weight" in sd,
                attn_l2_norm=attn_l2_norm,
                patch_nums=tuple(patch_nums) if patch_nums is not None else infer_schedule(sd))


def vae_config_from_state_dict(sd: Mapping[str, torch.Tensor], patch_nums) -> Dict[str, Any]:
    """Constructor arguments of the VQVAE that produced ``sd`` (``quant_resi`` ratio: the official 0.5)."""
    reject_other_family(sd, "VQVAE", "VQVAE state dict")
    emb = _require(sd, "quantize.embedding.weight", "VQVAE")
    conv_in = _require(sd, "encoder.conv_in.weight", "VQVAE")
    ch = conv_in.shape[0]
    levels = _indices(sd, r"encoder\.down\.(\d+)\.")
    if not levels:
        raise ValueError("VQVAE state dict has no encoder.down.* keys")
    ch_mult = tuple(_require(sd, f"encoder.down.{i}.block.0.conv1.weight", "VQVAE").shape[0] // ch for i in levels)
    cfg = dict(vocab_size=emb.shape[0], z_channels=emb.shape[1], ch=ch, ch_mult=ch_mult,
               num_res_blocks=len(_indices(sd, r"encoder\.down\.0\.block\.(\d+)\.")), in_channels=conv_in.shape[1],
               quant_conv_ks=_require(sd, "quant_conv.weight", "VQVAE").shape[-1], v_patch_nums=tuple(patch_nums),
               using_sa=f"encoder.down.{levels[-1]}.attn.0.qkv.weight" in sd,
               using_mid_sa="encoder.mid.attn_1.qkv.weight" in sd)
    if "quantize.quant_resi.qresi.weight" in sd:
        cfg["share_quant_resi"] = 1
    elif _indices(sd, r"quantize\.quant_resi\.qresi_ls\.(\d+)\."):
        cfg["share_quant_resi"] = len(_indices(sd, r"quantize\.quant_resi\.qresi_ls\.(\d+)\."))
    elif _indices(sd, r"quantize\.quant_resi\.(\d+)\."):
        cfg["share_quant_resi"] = 0
        cfg["default_qresi_counts"] = len(_indices(sd, r"quantize\.quant_resi\.(\d+)\."))
    else:
        cfg["quant_resi"] = 0.0
    return cfg


def _verify_buffers(var: VAR, sd: Mapping[str, torch.Tensor]) -> None:
    """The checkpoint's ``lvl_1L`` / ``attn_bias_for_masking`` must be the ones of the model's schedule."""
    from fastvar.ops.attention import scale_lens_from_bias
    from fastvar.reference.attention import scale_index
    if "lvl_1L" in sd and not torch.equal(sd["lvl_1L"].long().reshape(-1).cpu(), scale_index(var.schedule.lens)):
        raise ValueError("VAR state dict: lvl_1L does not match the schedule's scale index")
    if "attn_bias_for_masking" in sd:
        try:
            lens = scale_lens_from_bias(sd["attn_bias_for_masking"].float())
        except ValueError as e:
            raise ValueError(f"VAR state dict: attn_bias_for_masking: {e}") from None
        if lens != var.schedule.lens:
            raise ValueError(f"VAR state dict: attn_bias_for_masking is the mask of scales {list(lens)}, "
                             f"the model's schedule has {list(var.schedule.lens)}")


WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_weights_dtype(dtype: Optional[torch.dtype]) -> torch.dtype:
    """The dtype a loader casts the transformer's weights to: one of :data:`WEIGHT_DTYPES` (``None``: float32)."""
    if dtype is None:
        return torch.float32
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype (torch.float32, torch.bfloat16, ...), got "
                        f"{type(dtype).__name__} {dtype!r}")
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"dtype must be a floating-point dtype ({', '.join(str(d) for d in WEIGHT_DTYPES)}), "
                         f"got {dtype}")
    return dtype


def _load_into_meta(module: nn.Module, sd: Mapping[str, torch.Tensor], dtype: Optional[torch.dtype]) -> None:
    """Load ``sd`` into a module built on the meta device, taking the tensors over (no second copy)."""
    own = module.state_dict()
    cast = {}
    for k, v in sd.items():
        want = own[k].dtype if dtype is None or not own[k].is_floating_point() else dtype
        cast[k] = v.to(want)
    nn.Module.load_state_dict(module, cast, strict=True, assign=True)


def vae_var_from_state_dicts(var_sd: Mapping[str, torch.Tensor], vae_sd: Mapping[str, torch.Tensor], *,
                             device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
                             var_config: Optional[Mapping[str, Any]] = None,
                             vae_config: Optional[Mapping[str, Any]] = None) -> Tuple[VQVAE, VAR]:
    """Build the models that match two state dicts (configs inferred unless given) and load them strictly.

    The VAR is cast to ``dtype``; the VQVAE is float32.
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device must be a device of this machine: {device} was asked for, no CUDA device is "
                         f"available")
    dtype = check_weights_dtype(dtype)
    var_cfg = dict(var_config or var_config_from_state_dict(var_sd))
    vae_cfg = dict(vae_config or vae_config_from_state_dict(vae_sd, var_cfg["patch_nums"]))
    with torch.device("meta"):
        vae = VQVAE(test_mode=True, **vae_cfg)
    ema = "quantize.ema_vocab_hit_SV"
    check_state_dict(vae, vae_sd, "VQVAE", ignore_shape=(ema,))
    vae_sd = dict(vae_sd)
    if vae_sd[ema].shape != vae.quantize.ema_vocab_hit_SV.shape:   # a training statistic of another schedule
        vae_sd[ema] = torch.zeros(vae.quantize.ema_vocab_hit_SV.shape)
    _load_into_meta(vae, vae_sd, torch.float32)
    vae = vae.to(device)
    with torch.device("meta"):
        var = VAR(vae_local=vae, **var_cfg)
    check_state_dict(var, var_sd, "VAR")
    _verify_buffers(var, var_sd)
    _load_into_meta(var, var_sd, dtype)
    var = var.to(device).eval()
    var.reset_buffers()   # the exact mask in the compute dtype's -inf, from the verified schedule
    return vae, var


def load_vae_var(var_ckpt: Union[str, os.PathLike], vae_ckpt: Union[str, os.PathLike], *,
                 device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
                 patch_nums: Optional[Sequence[ScaleSpec]] = None) -> Tuple[VQVAE, VAR]:
    """Load released checkpoint files (``var_d16.pth`` ... ``var_d36.pth``, ``vae_ch160v4096z32.pth``).

    Depth, width, heads, ``shared_aln``, ``attn_l2_norm``, the VQVAE layout and the schedule are inferred
    from the tensors (the schedule from ``lvl_1L``, which gives each scale's token count: square scales
    are assumed, as in every released model; pass ``patch_nums`` for a non-square schedule). Files are
    read with ``torch.load(weights_only=True)``. The VAR is cast to ``dtype`` (the VQVAE stays float32:
    the codebook lookup is defined in float32). Returns ``(vae, var)`` in eval mode. A state dict that
    does not match raises ``ValueError`` listing the missing, unexpected or wrongly shaped keys.
    """
    var_sd = load_checkpoint(var_ckpt, "VAR")
    vae_sd = load_checkpoint(vae_ckpt, "VQVAE")
    var_cfg = var_config_from_state_dict(var_sd, patch_nums)
    return vae_var_from_state_dicts(var_sd, vae_sd, device=device, dtype=dtype, var_config=var_cfg)
