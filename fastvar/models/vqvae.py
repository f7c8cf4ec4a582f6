"""The VQVAE of VAR (official ``VQVAE``): a convolutional encoder/decoder ("vq-f16" layout) around
the multi-scale residual quantizer. State-dict keys equal the official ones.

The convolution nets are plain PyTorch (cuDNN is already fast there); the quantizer runs on fastvar's ops.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvar.nn.quant import VectorQuantizer2
from fastvar.schedule import ScaleSpec, scale_hws


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class Upsample2x(nn.Module):
    """Nearest-neighbour x2, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Downsample2x(nn.Module):
    """Pad right and bottom by one, then a stride-2 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, pad=(0, 1, 0, 1), mode="constant", value=0))


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus a (1x1-projected when channels change) shortcut."""

    def __init__(self, *, in_channels: int, out_channels: Optional[int] = None, dropout: float = 0.0,
                 norm_groups: int = 32):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = _group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = _group_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.nin_shortcut = (nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels
                             else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=True)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a residual: ``x + proj_out(softmax(q^T k / sqrt(C)) v)``."""

    def __init__(self, in_channels: int, norm_groups: int = 32):
        super().__init__()
        self.C = in_channels
        self.norm = _group_norm(in_channels, norm_groups)
        self.qkv = nn.Conv2d(in_channels, 3 * in_channels, kernel_size=1)
        self.w_ratio = int(in_channels) ** (-0.5)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(self.norm(x))
        B, _, H, W = qkv.shape
        C = self.C
        q, k, v = qkv.reshape(B, 3, C, H, W).unbind(1)
        q = q.reshape(B, C, H * W).permute(0, 2, 1).contiguous()     # B, HW, C
        k = k.reshape(B, C, H * W).contiguous()                      # B, C, HW
        w = torch.bmm(q, k).mul_(self.w_ratio).softmax(dim=2)        # B, HW(q), HW(k)
        v = v.reshape(B, C, H * W).contiguous()
        h = torch.bmm(v, w.permute(0, 2, 1).contiguous())            # B, C, HW(q)
        return x + self.proj_out(h.view(B, C, H, W))


class Encoder(nn.Module):
    """Image ``(B, in_channels, H, W)`` -> latent ``(B, z_channels, H/2^(n-1), W/2^(n-1))``, n = len(ch_mult)."""

    def __init__(self, *, ch: int = 128, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int = 2,
                 dropout: float = 0.0, in_channels: int = 3, z_channels: int, double_z: bool = False,
                 using_sa: bool = True, using_mid_sa: bool = True, norm_groups: int = 32):
        super().__init__()
        self.ch, self.num_resolutions, self.num_res_blocks = ch, len(ch_mult), num_res_blocks
        self.downsample_ratio = 2 ** (self.num_resolutions - 1)
        self.in_channels = in_channels
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        in_ch_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, dropout=dropout,
                                         norm_groups=norm_groups))
                block_in = block_out
                if i_level == self.num_resolutions - 1 and using_sa:
                    attn.append(AttnBlock(block_in, norm_groups))
            down = nn.Module()
            down.block, down.attn = block, attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample2x(block_in)
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout, norm_groups=norm_groups)
        self.mid.attn_1 = AttnBlock(block_in, norm_groups) if using_mid_sa else nn.Identity()
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout, norm_groups=norm_groups)
        self.norm_out = _group_norm(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i_level, down in enumerate(self.down):
            for i_block in range(self.num_res_blocks):
                h = down.block[i_block](h)
                if len(down.attn) > 0:
                    h = down.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class Decoder(nn.Module):
    """Latent ``(B, z_channels, h, w)`` -> image ``(B, in_channels, h*2^(n-1), w*2^(n-1))``."""

    def __init__(self, *, ch: int = 128, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int = 2,
                 dropout: float = 0.0, in_channels: int = 3, z_channels: int, using_sa: bool = True,
                 using_mid_sa: bool = True, norm_groups: int = 32):
        super().__init__()
        self.ch, self.num_resolutions, self.num_res_blocks = ch, len(ch_mult), num_res_blocks
        self.in_channels = in_channels
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout, norm_groups=norm_groups)
        self.mid.attn_1 = AttnBlock(block_in, norm_groups) if using_mid_sa else nn.Identity()
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout, norm_groups=norm_groups)
        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, dropout=dropout,
                                         norm_groups=norm_groups))
                block_in = block_out
                if i_level == self.num_resolutions - 1 and using_sa:
                    attn.append(AttnBlock(block_in, norm_groups))
            up = nn.Module()
            up.block, up.attn = block, attn
            if i_level != 0:
                up.upsample = Upsample2x(block_in)
            self.up.insert(0, up)   # up[i] is level i, up[0] the full resolution
        self.norm_out = _group_norm(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = up.block[i_block](h)
                if len(up.attn) > 0:
                    h = up.attn[i_block](h)
            if i_level != 0:
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class VQVAE(nn.Module):
    """VAR's multi-scale VQVAE (official ``VQVAE``).

    Args (official): ``vocab_size`` V, ``z_channels`` Cvae, ``ch`` base width, ``dropout``, ``beta``,
    ``using_znorm``, ``quant_conv_ks``, ``quant_resi``, ``share_quant_resi``, ``default_qresi_counts``,
    ``v_patch_nums`` (the schedule; its last scale is the latent size), ``test_mode`` (eval mode, no
    gradients). Keyword-only extras for small models: ``ch_mult`` (one entry per resolution level:
    the image is downsampled by ``2**(len(ch_mult) - 1)``), ``num_res_blocks``, ``in_channels``,
    ``norm_groups``, ``using_sa``, ``using_mid_sa``; their defaults are the official layout.
    """

    def __init__(self, vocab_size: int = 4096, z_channels: int = 32, ch: int = 128, dropout: float = 0.0,
                 beta: float = 0.25, using_znorm: bool = False, quant_conv_ks: int = 3, quant_resi: float = 0.5,
                 share_quant_resi: int = 4, default_qresi_counts: int = 0,
                 v_patch_nums: Sequence[ScaleSpec] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), test_mode: bool = True,
                 *, ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2, in_channels: int = 3,
                 norm_groups: int = 32, using_sa: bool = True, using_mid_sa: bool = True):
        super().__init__()
        self.test_mode = test_mode
        self.V, self.Cvae = vocab_size, z_channels
        self.vocab_size = vocab_size
        self.config = dict(vocab_size=vocab_size, z_channels=z_channels, ch=ch, dropout=dropout, beta=beta,
                           using_znorm=using_znorm, quant_conv_ks=quant_conv_ks, quant_resi=quant_resi,
                           share_quant_resi=share_quant_resi, default_qresi_counts=default_qresi_counts,
                           v_patch_nums=tuple(v_patch_nums), ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks,
                           in_channels=in_channels, norm_groups=norm_groups, using_sa=using_sa,
                           using_mid_sa=using_mid_sa)
        dd = dict(dropout=dropout, ch=ch, z_channels=z_channels, in_channels=in_channels, ch_mult=tuple(ch_mult),
                  num_res_blocks=num_res_blocks, using_sa=using_sa, using_mid_sa=using_mid_sa, norm_groups=norm_groups)
        self.encoder = Encoder(double_z=False, **dd)
        self.decoder = Decoder(**dd)
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.quantize = VectorQuantizer2(vocab_size=vocab_size, Cvae=z_channels, using_znorm=using_znorm, beta=beta,
                                         default_qresi_counts=default_qresi_counts, v_patch_nums=v_patch_nums,
                                         quant_resi=quant_resi, share_quant_resi=share_quant_resi)
        self.quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, stride=1, padding=quant_conv_ks // 2)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, stride=1, padding=quant_conv_ks // 2)
        if test_mode:
            self.eval()
            for p in self.parameters():
                p.requires_grad_(False)

    @property
    def image_hw(self) -> Tuple[int, int]:
        """Image size ``(H, W)`` the schedule's last scale corresponds to."""
        h, w = self.quantize.patch_hws[-1]
        return h * self.downsample, w * self.downsample

    def check_image(self, img: torch.Tensor, name: str = "img", v_patch_nums=None) -> None:
        """``ValueError`` unless ``img`` is ``(B, in_channels, H, W)`` with ``(H, W)`` the schedule's image size."""
        c = self.encoder.in_channels
        if not isinstance(img, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(img).__name__}")
        if img.dim() != 4 or img.shape[1] != c:
            raise ValueError(f"{name} must have shape (B, {c}, H, W), got {tuple(img.shape)}")
        if not img.is_floating_point():
            raise TypeError(f"{name} must be a float tensor in [-1, 1], got {img.dtype}")
        hws = self.quantize.patch_hws if v_patch_nums is None else scale_hws(v_patch_nums, "v_patch_nums")
        want = (hws[-1][0] * self.downsample, hws[-1][1] * self.downsample)
        if tuple(img.shape[2:]) != want:
            raise ValueError(f"{name} must be {want[0]}x{want[1]} pixels (last scale {hws[-1]} x downsample "
                             f"{self.downsample}), got {img.shape[2]}x{img.shape[3]}")

    def forward(self, inp: torch.Tensor, ret_usages: bool = False):
        """VAE training: ``(reconstruction, usages, vq_loss)``."""
        self.check_image(inp, "inp")
        f_hat, usages, vq_loss = self.quantize(self.quant_conv(self.encoder(inp)), ret_usages=ret_usages)
        return self.decoder(self.post_quant_conv(f_hat)), usages, vq_loss

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Decode ``f_hat`` ``(B, Cvae, h, w)`` to an image in [-1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp_(-1, 1)

    def img_to_idxBl(self, inp_img_no_grad: torch.Tensor,
                     v_patch_nums: Optional[Sequence[ScaleSpec]] = None) -> List[torch.Tensor]:
        """Image ``(B, 3, H, W)`` in [-1, 1] -> per-scale token indices ``(B, h*w)``."""
        self.check_image(inp_img_no_grad, "inp_img_no_grad", v_patch_nums)
        f = self.quant_conv(self.encoder(inp_img_no_grad))
        return self.quantize.f_to_idxBl_or_fhat(f, to_fhat=False, v_patch_nums=v_patch_nums)

    def idxBl_to_img(self, ms_idx_Bl: List[torch.Tensor], same_shape: bool, last_one: bool = False):
        """Per-scale indices -> decoded image(s) in [-1, 1]."""
        B = ms_idx_Bl[0].shape[0]
        ms_h = [self.quantize.embedding(idx).transpose(1, 2).reshape(B, self.Cvae, h, w)
                for idx, (h, w) in zip(ms_idx_Bl, self.quantize.patch_hws)]
        return self.embed_to_img(ms_h, all_to_max_scale=same_shape, last_one=last_one)

    def embed_to_img(self, ms_h_BChw: List[torch.Tensor], all_to_max_scale: bool, last_one: bool = False):
        """Per-scale code maps -> decoded image(s) in [-1, 1]."""
        f = self.quantize.embed_to_fhat(ms_h_BChw, all_to_max_scale=all_to_max_scale, last_one=last_one)
        return self.fhat_to_img(f) if last_one else [self.fhat_to_img(x) for x in f]

    def img_to_reconstructed_img(self, x: torch.Tensor, v_patch_nums: Optional[Sequence[ScaleSpec]] = None,
                                 last_one: bool = False):
        """Encode, quantize and decode: the reconstruction after every scale (or the last)."""
        self.check_image(x, "x", v_patch_nums)
        f = self.quant_conv(self.encoder(x))
        fhats = self.quantize.f_to_idxBl_or_fhat(f, to_fhat=True, v_patch_nums=v_patch_nums)
        return self.fhat_to_img(fhats[-1]) if last_one else [self.fhat_to_img(f_hat) for f_hat in fhats]

    def load_state_dict(self, state_dict: Dict[str, Any], strict: bool = True, assign: bool = False):
        """As ``nn.Module.load_state_dict``; like the official VQVAE, an ``ema_vocab_hit_SV`` recorded for
        another number of scales is replaced by this model's (it is a training statistic)."""
        key = "quantize.ema_vocab_hit_SV"
        if key in state_dict and state_dict[key].shape[0] != self.quantize.ema_vocab_hit_SV.shape[0]:
            state_dict = dict(state_dict)
            state_dict[key] = self.quantize.ema_vocab_hit_SV
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
