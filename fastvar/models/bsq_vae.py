"""Infinity's BSQ VAE (official ``AutoEncoder`` of ``infinity/models/bsq_vae/flux_vqgan.py``, as
``vae_model`` builds it): a convolutional encoder to a ``d``-channel latent, the multi-scale bitwise (BSQ)
quantizer, a convolutional decoder. State-dict keys equal the official ones (``Conv`` / ``Normalize``
wrappers: ``.conv.`` / ``.norm.``; the quantizer registered twice, as ``quantizer`` and ``quantize``).

The convolution nets are plain PyTorch; the quantizer follows :mod:`fastvar.reference.infinity`.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvar.reference import infinity as ref


def swish(x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(x)`` (not ``F.silu``, which rounds differently)."""
    return x * torch.sigmoid(x)


class Conv(nn.Module):
    """The official 2D ``Conv`` wrapper: an ``nn.Conv2d`` held as ``.conv``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Normalize(nn.Module):
    """The official ``Normalize`` wrapper: GroupNorm (32 groups, or 24 when the channels are not a multiple
    of 32; eps 1e-6, affine) held as ``.norm``."""

    def __init__(self, channels: int):
        super().__init__()
        groups = 32 if channels % 32 == 0 else 24
        self.norm = nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class ResnetBlock(nn.Module):
    """norm1 -> swish -> conv1 -> norm2 -> swish -> conv2, plus a (1x1 ``nin_shortcut`` when the channels
    change) shortcut."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = Conv(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.conv2 = Conv(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = Conv(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a stride-2 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """Image ``(B, 3, H, W)`` -> latent ``(B, z_channels, H / 2^(n-1), W / 2^(n-1))``, n = len(ch_mult)."""

    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, in_channels: int = 3):
        super().__init__()
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        self.conv_in = Conv(in_channels, ch, 3, padding=1)
        in_ch_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for i in range(self.num_resolutions):
            block = nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[i], ch * ch_mult[i]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            down = nn.Module()
            down.block = block
            if i != self.num_resolutions - 1:
                down.downsample = Downsample(block_in)
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        self.norm_out = Normalize(block_in)
        self.conv_out = Conv(block_in, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i, down in enumerate(self.down):
            for blk in down.block:
                h = blk(h)
            if i != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.block_1(h))
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent ``(B, z_channels, h, w)`` -> image ``(B, 3, h * 2^(n-1), w * 2^(n-1))`` (unclamped)."""

    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, out_channels: int = 3):
        super().__init__()
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        block_in = ch * ch_mult[-1]
        self.conv_in = Conv(z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        self.up = nn.ModuleList()
        for i in reversed(range(self.num_resolutions)):
            block = nn.ModuleList()
            block_out = ch * ch_mult[i]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            up = nn.Module()
            up.block = block
            if i != 0:
                up.upsample = Upsample(block_in)
            self.up.insert(0, up)                 # up[i] is level i, up[0] the full resolution
        self.norm_out = Normalize(block_in)
        self.conv_out = Conv(block_in, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.block_1(self.conv_in(z)))
        for i in reversed(range(self.num_resolutions)):
            for blk in self.up[i].block:
                h = blk(h)
            if i != 0:
                h = self.up[i].upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class BSQ(nn.Module):
    """The per-scale binary spherical quantizer (official ``BSQ`` with ``new_quant``, no projections).
    Its only state is the buffer ``mask`` (powers of two, ``(d,)`` int64; unused on the bit path)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = self.codebook_dim = dim
        self.codebook_scale = 1 / math.sqrt(dim)
        self.register_buffer("mask", 2 ** torch.arange(dim - 1, -1, -1))

    def forward(self, x: torch.Tensor):
        """``x`` ``(B, d, 1, h, w)`` -> ``(quantized, None, bits (B, 1, h, w, d) int32, loss 0)``."""
        q, bits = ref.bsq_quantize(x)
        return q, None, bits, x.new_zeros(())

    def indices_to_codes(self, indices: torch.Tensor, label_type: str = "int_label", project_out: bool = True
                         ) -> torch.Tensor:
        """Bits ``(B, 1, h, w, d)`` -> codes ``(B, d, 1, h, w)`` (``label_type='bit_label'``, Infinity's path)."""
        if label_type != "bit_label":
            raise ValueError(f"label_type must be 'bit_label' (Infinity's bitwise tokens), got {label_type!r}")
        if indices.shape[-1] != self.dim:
            raise ValueError(f"indices must end with d={self.dim} bits, got shape {tuple(indices.shape)}")
        return ref.bits_to_codes(indices)


class MultiScaleBSQ(nn.Module):
    """The multi-scale residual BSQ quantizer (official ``MultiScaleBSQ``): ``lfq`` and the interpolation
    modes ``z_interplote_up = 'trilinear'``, ``z_interplote_down = 'area'``."""

    def __init__(self, dim: int):
        super().__init__()
        self.lfq = BSQ(dim)
        self.z_interplote_up, self.z_interplote_down = "trilinear", "area"

    def forward(self, x: torch.Tensor, scale_schedule: Sequence[Sequence[int]], **_):
        """``x`` ``(B, d, H, W)`` -> ``(z (B, d, H, W), indices (S x None), bits (S x (B, 1, h, w, d) int32),
        residual norms ([]), losses (S,) zeros, var_inputs (S-1 x (B, d, 1, h, w)))``."""
        z, bits, var_inputs = ref.multiscale_bsq_encode(x, scale_schedule)
        return z, [None] * len(bits), bits, [], x.new_zeros(len(bits)), var_inputs


class BSQVAE(nn.Module):
    """Infinity's visual tokenizer (official ``AutoEncoder``, image path).

    Args: ``codebook_dim`` d (bits per latent pixel: 32 for Infinity-2B, 14 with patchify for 8B),
    ``base_ch`` (128 released), ``ch_mult`` (``(1, 2, 4, 4, 4)``: stride 16; ``(1, 2, 4, 4)``: stride 8, the
    patchify VAE), ``num_res_blocks`` (2). No attention blocks (``cnn_attention='no'``), no quant_conv.
    """

    family = "bsq_vae"      # how fastvar.Sampler tells the model families apart (no import of this module)

    def __init__(self, codebook_dim: int = 32, base_ch: int = 128, ch_mult: Sequence[int] = (1, 2, 4, 4, 4),
                 num_res_blocks: int = 2, test_mode: bool = True):
        super().__init__()
        self.codebook_dim = self.embed_dim = codebook_dim
        self.codebook_size = self.vocab_size = 2 ** codebook_dim
        self.config = dict(codebook_dim=codebook_dim, base_ch=base_ch, ch_mult=tuple(ch_mult),
                           num_res_blocks=num_res_blocks)
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.encoder = Encoder(base_ch, ch_mult, num_res_blocks, codebook_dim)
        self.decoder = Decoder(base_ch, ch_mult, num_res_blocks, codebook_dim)
        self.quantizer = MultiScaleBSQ(codebook_dim)
        self.quantize = self.quantizer
        if test_mode:
            self.eval()
            for p in self.parameters():
                p.requires_grad_(False)

    def check_image(self, x: torch.Tensor, scale_schedule, name: str = "x") -> None:
        """``ValueError`` unless ``x`` is ``(B, 3, H, W)`` float with ``(H, W)`` = the last scale x the stride."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"{name} must have shape (B, 3, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a float tensor in [-1, 1], got {x.dtype}")
        if scale_schedule is not None:
            _, h, w = scale_schedule[-1]
            want = (h * self.downsample, w * self.downsample)
            if tuple(x.shape[2:]) != want:
                raise ValueError(f"{name} must be {want[0]}x{want[1]} pixels for a last VAE scale of {h}x{w} at "
                                 f"stride {self.downsample}, got {x.shape[2]}x{x.shape[3]}")

    def encode_for_raw_features(self, x: torch.Tensor, scale_schedule=None, return_residual_norm_per_scale=False):
        """The encoder output ``(h (B, d, H/s, W/s) float32, [], [])`` (official triple; no hidden states kept)."""
        self.check_image(x, scale_schedule)
        return self.encoder(x).float(), [], []

    def encode(self, x: torch.Tensor, scale_schedule, return_residual_norm_per_scale=False):
        """``(h, z, indices, bits, residual norms, var_inputs)`` as the official ``encode``: ``h`` the raw
        features, ``z`` ``(B, d, H/s, W/s)`` the quantized latent, ``bits`` one ``(B, 1, h, w, d)`` int32 per
        scale, ``var_inputs`` the encoder's own area-downsampled next-scale inputs."""
        h, _, _ = self.encode_for_raw_features(x, scale_schedule)
        z, indices, bits, norms, _, var_inputs = self.quantizer(h, scale_schedule=scale_schedule)
        return h, z, indices, bits, norms, var_inputs

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent ``(B, d, h, w)`` -> image in [-1, 1]."""
        return torch.clamp(self.decoder(z), min=-1, max=1)

    def decode_from_indices(self, all_indices: List[torch.Tensor], scale_schedule, label_type: str = "bit_label"
                            ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-scale bits ``(B, 1, h, w, d)`` -> ``(summed codes (B, d, 1, h, w), image in [-1, 1])``."""
        if label_type != "bit_label":
            raise ValueError(f"label_type must be 'bit_label' (Infinity's bitwise tokens), got {label_type!r}")
        summed = ref.sum_codes(all_indices, scale_schedule)
        return summed, self.decode(summed.squeeze(-3))

    def extra_repr(self) -> str:
        return f"d={self.codebook_dim}, stride={self.downsample}"
