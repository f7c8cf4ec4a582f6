"""Loading Infinity + BSQ VAE pairs from official state dicts or checkpoint files (configs inferred from the
tensors), with the official inference settings (``pad_to_multiplier=128``, shared AdaLN, 2D RoPE...)."""
from __future__ import annotations

import os
import re
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from fastvar.models.bsq_vae import BSQVAE
from fastvar.models.build import _load_into_meta, check_state_dict, check_weights_dtype
from fastvar.models.families import reject_other_family
from fastvar.models.infinity import Infinity
from fastvar.utils.files import check_finite_tensors, load_sharded_tensors, load_tensors, shard_index

# The official inference loader's constructor settings (tools/run_infinity.load_infinity)
OFFICIAL_INFERENCE = dict(shared_aln=True, pad_to_multiplier=128, add_lvl_embeding_only_first_block=1,
                          text_maxlen=512, norm_eps=1e-6, drop_path_rate=0.1, cond_drop_rate=0.1)
def _caster(dtype: torch.dtype, what: str):
    """``(name, tensor) -> tensor``: floating tensors in ``dtype`` (the same tensor when it has it already), each
    first checked for NaN and inf as read (``ValueError`` naming ``what`` and the tensor): checked before its cast,
    the message is about the file's value, and a sharded checkpoint is checked shard by shard as it is merged."""
    def cast(name: str, t: torch.Tensor) -> torch.Tensor:
        check_finite_tensors({name: t}, what)
        return t.to(dtype) if t.is_floating_point() else t
    return cast


def _indices(sd: Mapping[str, torch.Tensor], pattern: str) -> list:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd for m in [rx.match(k)] if m})


def _require(sd: Mapping[str, torch.Tensor], key: str, what: str) -> torch.Tensor:
    if key not in sd:
        bare = key.replace(".conv.", ".").replace(".norm.", ".")     # a VAE file without the wrapper names
        if bare in sd:
            return sd[bare]
        raise ValueError(f"{what} state dict has no {key!r}: it is not an official {what} checkpoint")
    return sd[key]


def bsq_vae_config_from_state_dict(sd: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """Constructor arguments of the :class:`BSQVAE` that produced ``sd``."""
    reject_other_family(sd, "BSQ VAE", "BSQ VAE state dict")
    conv_in = _require(sd, "encoder.conv_in.conv.weight", "BSQ VAE")
    ch = conv_in.shape[0]
    levels = _indices(sd, r"encoder\.down\.(\d+)\.")
    if not levels:
        raise ValueError("BSQ VAE state dict has no encoder.down.* keys")
    ch_mult = tuple(_require(sd, f"encoder.down.{i}.block.0.conv1.conv.weight", "BSQ VAE").shape[0] // ch
                    for i in levels)
    return dict(codebook_dim=_require(sd, "encoder.conv_out.conv.weight", "BSQ VAE").shape[0], base_ch=ch,
                ch_mult=ch_mult, num_res_blocks=len(_indices(sd, r"encoder\.down\.0\.block\.(\d+)\.")))


def infinity_config_from_state_dict(sd: Mapping[str, torch.Tensor], codebook_dim: int) -> Dict[str, Any]:
    """Constructor arguments of the :class:`Infinity` that produced ``sd`` (besides ``vae_local``), with the
    official inference settings; ``codebook_dim`` is the VAE's d (patchify when the tokens carry 4d bits)."""
    reject_other_family(sd, "Infinity", "Infinity state dict")
    we = _require(sd, "word_embed.weight", "Infinity")
    C, d_t = we.shape
    chunks = _indices(sd, r"block_chunks\.(\d+)\.")
    if chunks:
        per_chunk = len(_indices(sd, r"block_chunks\.0\.module\.(\d+)\."))
        depth, block_chunks = len(chunks) * per_chunk, len(chunks)
        first = "block_chunks.0.module.0."
    else:
        depth, block_chunks = len(_indices(sd, r"blocks\.(\d+)\.")), 1
        first = "blocks.0."
    if depth == 0:
        raise ValueError("Infinity state dict has no block_chunks.* or blocks.* keys")
    if d_t == codebook_dim:
        patchify = 0
    elif d_t == 4 * codebook_dim:
        patchify = 1
    else:
        raise ValueError(f"Infinity state dict: word_embed takes {d_t} bits per token, but the VAE has d={codebook_dim} "
                         f"(expected d, or 4d with spatial patchify): the two checkpoints do not belong together")
    hidden = _require(sd, first + "ffn.fc1.weight", "Infinity").shape[0]
    mlp_ratio = 4.0 if round(C * 4 / 256) * 256 == hidden else hidden / C
    cfg = dict(OFFICIAL_INFERENCE)
    cfg.update(text_channels=_require(sd, "text_norm.weight", "Infinity").shape[0],
               text_maxlen=_require(sd, "cfg_uncond", "Infinity").shape[0], embed_dim=C, depth=depth,
               num_heads=_require(sd, first + "sa.scale_mul_1H11", "Infinity").shape[1], mlp_ratio=mlp_ratio,
               block_chunks=block_chunks, shared_aln=first + "ada_gss" in sd, apply_spatial_patchify=patchify,
               cross_attn_layer_scale=1.0 if first + "ca_gamma" in sd else -1.0)
    return cfg


def _unwrap(obj, what: str, keys=("state_dict",)) -> Dict[str, torch.Tensor]:
    for k in keys:
        if isinstance(obj, Mapping) and isinstance(obj.get(k), Mapping):
            obj = obj[k]
            break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{what} checkpoint must hold a state dict (names -> tensors), got {type(obj).__name__}")
    return dict(obj)


def _add_wrapper_names(vae: nn.Module, sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Map ``x.weight`` to ``x.conv.weight`` / ``x.norm.weight`` where only the wrapped name exists, as the
    official ``load_cnn`` accepts names without the ``Conv``/``Normalize`` wrappers."""
    own = vae.state_dict()
    out = {}
    for k, v in sd.items():
        if k not in own:
            head, _, leaf = k.rpartition(".")
            for wrap in ("conv", "norm"):
                if f"{head}.{wrap}.{leaf}" in own:
                    k = f"{head}.{wrap}.{leaf}"
                    break
        out[k] = v
    for k in ("quantizer.lfq.mask", "quantize.lfq.mask"):       # a buffer the file may lack: 2^(d-1) ... 1
        if k not in out and k in own:
            out[k] = 2 ** torch.arange(own[k].shape[0] - 1, -1, -1)
    return out


def infinity_from_state_dicts(infinity_sd: Mapping[str, torch.Tensor], vae_sd: Mapping[str, torch.Tensor], *,
                              device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None,
                              infinity_config: Optional[Mapping[str, Any]] = None,
                              vae_config: Optional[Mapping[str, Any]] = None) -> Tuple[BSQVAE, Infinity]:
    """Build the models that match two official state dicts (configs inferred unless given) and load them
    strictly. The transformer's floating-point tensors are loaded in ``dtype`` (float32, bfloat16, float16 or
    float64; ``None``: float32), each cast once, and a tensor that has that dtype already becomes the model's
    own (no copy); the BSQ VAE is always float32 (its decoder is small, and the golden parity is float32).
    Returns ``(vae, infinity)`` in eval mode."""
    dtype = check_weights_dtype(dtype)
    vae_cfg = dict(vae_config or bsq_vae_config_from_state_dict(vae_sd))
    with torch.device("meta"):
        vae = BSQVAE(**vae_cfg)
    vae_sd = _add_wrapper_names(vae, vae_sd)
    check_state_dict(vae, vae_sd, "BSQ VAE")
    _load_into_meta(vae, vae_sd, torch.float32)
    vae = vae.to(device).eval()
    inf_cfg = dict(infinity_config or infinity_config_from_state_dict(infinity_sd, vae.codebook_dim))
    with torch.device("meta"):
        model = Infinity(vae, **inf_cfg)
    sd = dict(infinity_sd)
    if "cfg_uncond" in sd and sd["cfg_uncond"].shape != model.cfg_uncond.shape:
        raise ValueError(f"Infinity state dict: cfg_uncond is {tuple(sd['cfg_uncond'].shape)}, the model's "
                         f"{tuple(model.cfg_uncond.shape)}; pass infinity_config with that text_maxlen")
    check_state_dict(model, sd, "Infinity")
    _load_into_meta(model, sd, dtype)
    return vae, model.to(device).eval()


def _read_state_dict(path, what: str, keys, convert) -> Dict[str, torch.Tensor]:
    """A state dict from one checkpoint file (unwrapped from ``keys``) or a sharded checkpoint (a folder with an
    index, or the index file), each tensor passed through ``convert(name, tensor)`` once."""
    index = shard_index(path, f"{what} checkpoint")
    if index is not None:
        return load_sharded_tensors(index, f"{what} checkpoint", convert)
    sd = _unwrap(load_tensors(path, f"{what} checkpoint", mmap=True), what, keys)
    for k in sd:
        # replaced one at a time, the mapped file's tensor by its cast: a float32 file loaded in bf16 is never in
        # memory as float32. A tensor the cast keeps is copied, so that the model never holds pages of the file
        t = convert(k, sd[k])
        sd[k] = t.clone() if t is sd[k] else t
    return sd


def load_infinity(infinity_ckpt: Union[str, os.PathLike], vae_ckpt: Union[str, os.PathLike], *,
                  device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None,
                  **infinity_overrides) -> Tuple[BSQVAE, Infinity]:
    """Load official checkpoints (``infinity_2b_reg.pth`` + ``infinity_vae_d32_reg.pth``; the 8B's sharded
    ``infinity_8b_weights/`` + ``infinity_vae_d56_f8_14_patchify.pth``).

    A checkpoint is one file read with ``torch.load(weights_only=True, mmap=True)`` (a transformer file holds the
    state dict, or one under ``"state_dict"``; a VAE file holds it under ``"vae"``, the official layout, or plainly),
    or a Hugging Face sharded checkpoint: a folder holding one ``*.index.json`` (``pytorch_model.bin.index.json``,
    ``model.safetensors.index.json``) and its shards, or that index file; ``.safetensors`` shards need the
    ``safetensors`` package. Shards are merged one at a time without copies (see
    :func:`fastvar.utils.files.load_sharded_tensors` for what must agree between index and shards).

    ``dtype`` (float32, bfloat16, float16 or float64; ``None``: float32) is the transformer's weights dtype: each
    floating tensor is cast once as it is read. One file is mapped, not read (an older, pre-zip ``torch.save`` file
    is read), so a float32 file loaded in bf16 costs the bf16 model in memory, never a float32 copy; a tensor that
    has the dtype already is copied out of the mapping (the model holds no page of the file). Shards are read one at
    a time, a tensor that has the dtype already used as read (a bf16 checkpoint with ``dtype=torch.bfloat16`` costs
    its own size in memory, 16.7 GB for the 8B), so a cast holds at most one shard in the file's dtype. The BSQ VAE
    is always float32 (its decoder is small, and the golden parity is float32). Depth, width, heads, chunks, text
    width, d and spatial patchify are inferred; ``infinity_overrides`` change constructor
    arguments (e.g. ``pad_to_multiplier``). Returns ``(vae, infinity)`` in eval mode. A state dict that does not
    match raises ``ValueError`` listing the keys, a checkpoint of VAR raises one naming the family, a tensor that
    holds NaN or inf one naming the tensor (as :func:`fastvar.load_vae_var` does); a missing file
    ``FileNotFoundError``; ``.safetensors`` shards without the safetensors package ``ImportError``."""
    dtype = check_weights_dtype(dtype)             # before reading gigabytes
    inf_sd = _read_state_dict(infinity_ckpt, "Infinity", ("state_dict",),
                              _caster(dtype, f"Infinity checkpoint {os.fspath(infinity_ckpt)}"))
    vae_sd = _read_state_dict(vae_ckpt, "BSQ VAE", ("vae", "state_dict"),
                              _caster(torch.float32, f"BSQ VAE checkpoint {os.fspath(vae_ckpt)}"))
    vae_cfg = bsq_vae_config_from_state_dict(vae_sd)
    inf_cfg = infinity_config_from_state_dict(inf_sd, vae_cfg["codebook_dim"])
    inf_cfg.update(infinity_overrides)
    return infinity_from_state_dicts(inf_sd, vae_sd, device=device, dtype=dtype, infinity_config=inf_cfg,
                                     vae_config=vae_cfg)
