"""Drop-in multi-scale residual quantizer of VAR (official ``VectorQuantizer2``) on fastvar's ops.

State-dict names equal the official ones: ``embedding.weight`` (the ``(V, Cvae)`` codebook),
``ema_vocab_hit_SV`` and ``quant_resi.*``: ``quant_resi.qresi_ls.{0..K-1}`` for ``share_quant_resi=K``
(K >= 2), ``quant_resi.qresi`` for 1, ``quant_resi.{0..S-1}`` for 0.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvar import ops
from fastvar.reference import quantize as ref
from fastvar.schedule import ScaleSpec, Schedule


class Phi(nn.Conv2d):
    """The residual 3x3 convolution: ``h * (1 - r) + conv(h) * r`` with ``r = |quant_resi|``."""

    def __init__(self, embed_dim: int, quant_resi: float):
        super().__init__(embed_dim, embed_dim, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        return ref.phi(h_BChw, (self.weight, self.bias, self.resi_ratio))


class PhiShared(nn.Module):
    """One Phi for every scale (``share_quant_resi=1``)."""

    def __init__(self, qresi: nn.Module):
        super().__init__()
        self.qresi = qresi
        self.num_phis = 1

    def __getitem__(self, _ratio: float) -> nn.Module:
        return self.qresi


class PhiPartiallyShared(nn.Module):
    """K Phis shared by nearby scales (``share_quant_resi=K``): scale ratio ``r`` uses the nearest tick."""

    def __init__(self, qresi_ls: nn.ModuleList):
        super().__init__()
        self.qresi_ls = qresi_ls
        self.num_phis = len(qresi_ls)
        self.ticks = ref.phi_ticks(self.num_phis)

    def __getitem__(self, ratio: float) -> nn.Module:
        return self.qresi_ls[ref.phi_index_at(ratio, self.num_phis)]

    def extra_repr(self) -> str:
        return f"ticks={self.ticks}"


class PhiNonShared(nn.ModuleList):
    """One Phi per scale (``share_quant_resi=0``), chosen by the same tick rule."""

    def __init__(self, qresi: List[nn.Module]):
        super().__init__(qresi)
        self.num_phis = len(qresi)
        self.ticks = ref.phi_ticks(self.num_phis)

    def __getitem__(self, ratio: float) -> nn.Module:
        return super().__getitem__(ref.phi_index_at(ratio, self.num_phis))


class VectorQuantizer2(nn.Module):
    """Multi-scale residual vector quantizer (official ``VectorQuantizer2``).

    Args:
        vocab_size: codebook size V.
        Cvae: latent channels.
        using_znorm: nearest neighbour by cosine similarity instead of L2 (official option; VAR: False).
        beta: commitment loss weight (VAE training).
        default_qresi_counts: Phi count for ``share_quant_resi=0`` (0: one per scale).
        v_patch_nums: the schedule, ints or ``(h, w)`` pairs; the last scale is the latent size.
        quant_resi: Phi's residual ratio r (``|r| < 1e-6``: Phi is the identity).
        share_quant_resi: 0 (one Phi per scale), 1 (one shared), K >= 2 (K partially shared).
    """

    def __init__(self, vocab_size: int, Cvae: int, using_znorm: bool = False, beta: float = 0.25,
                 default_qresi_counts: int = 0, v_patch_nums: Sequence[ScaleSpec] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
                 quant_resi: float = 0.5, share_quant_resi: int = 4):
        super().__init__()
        self.vocab_size, self.Cvae = vocab_size, Cvae
        self.using_znorm = using_znorm
        self.v_patch_nums = tuple(v_patch_nums)
        self.schedule = Schedule.of(v_patch_nums, "v_patch_nums")
        self.quant_resi_ratio = quant_resi
        self.share_quant_resi = share_quant_resi

        def make_phi():
            return Phi(Cvae, quant_resi) if abs(quant_resi) > 1e-6 else nn.Identity()

        if share_quant_resi == 0:
            self.quant_resi = PhiNonShared([make_phi() for _ in range(default_qresi_counts or len(self.patch_hws))])
        elif share_quant_resi == 1:
            self.quant_resi = PhiShared(make_phi())
        elif share_quant_resi > 1:
            self.quant_resi = PhiPartiallyShared(nn.ModuleList([make_phi() for _ in range(share_quant_resi)]))
        else:
            raise ValueError(f"share_quant_resi must be >= 0, got {share_quant_resi}")
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_hws), vocab_size))
        self.record_hit = 0
        self.beta = beta
        self.embedding = nn.Embedding(vocab_size, Cvae)

    @property
    def patch_hws(self):
        """``(h, w)`` of every scale of the quantizer's schedule."""
        return self.schedule.hws

    def extra_repr(self) -> str:
        return (f"{self.v_patch_nums}, znorm={self.using_znorm}, beta={self.beta} | S={len(self.patch_hws)}, "
                f"quant_resi={self.quant_resi_ratio}")

    # ----- helpers -----
    def phi_params(self, si: int, num_scales: Optional[int] = None) -> ref.PhiParams:
        """Phi of scale ``si`` as ``(weight, bias, resi_ratio)`` for ``fastvar.ops``, or None (identity)."""
        S = len(self.patch_hws) if num_scales is None else num_scales
        mod = self.quant_resi[ref.scale_ratio(si, S)]
        return (mod.weight, mod.bias, mod.resi_ratio) if isinstance(mod, Phi) else None

    def phis(self, num_scales: Optional[int] = None) -> List[ref.PhiParams]:
        """:meth:`phi_params` of every scale of a ``num_scales`` schedule (default: the quantizer's)."""
        S = len(self.patch_hws) if num_scales is None else num_scales
        return [self.phi_params(si, S) for si in range(S)]

    def _hws(self, v_patch_nums) -> Tuple[Tuple[int, int], ...]:
        return self.patch_hws if v_patch_nums is None else Schedule.of(v_patch_nums, "v_patch_nums").hws

    def lookup(self, z_NC: torch.Tensor) -> torch.Tensor:
        """Nearest code index of every row of ``z_NC`` ``(N, Cvae)``."""
        codebook = self.embedding.weight.detach()
        if self.using_znorm:
            return torch.argmax(F.normalize(z_NC, dim=-1) @ F.normalize(codebook.T, dim=0), dim=1)
        return ops.rq_lookup(z_NC.float(), codebook.float())

    # ----- VAE training -----
    def forward(self, f_BChw: torch.Tensor, ret_usages: bool = False):
        """Quantize ``f_BChw`` ``(B, Cvae, H, W)`` at every scale with a straight-through estimator.

        Returns ``(f_hat, usages, vq_loss)``: the quantized latent (gradients flow to ``f_BChw``), the
        percentage of codes in use per scale (if ``ret_usages``) and the VQ loss.
        """
        dtype = f_BChw.dtype
        if dtype != torch.float32:
            f_BChw = f_BChw.float()
        C = f_BChw.shape[1]
        self._check_latent(f_BChw, self.patch_hws)
        f_no_grad = f_BChw.detach()
        S = len(self.patch_hws)
        mean_vq_loss = f_BChw.new_zeros(())
        for si, (_, idx, f_hat) in enumerate(ref.residual_quantize(f_no_grad, self.embedding.weight, self.patch_hws,
                                                                    self.phis(S), self.lookup)):
            if self.training:
                hit = idx.bincount(minlength=self.vocab_size).float()
                ema = self.ema_vocab_hit_SV[si]
                if self.record_hit == 0:
                    ema.copy_(hit)
                elif self.record_hit < 100:
                    ema.mul_(0.9).add_(hit.mul(0.1))
                else:
                    ema.mul_(0.99).add_(hit.mul(0.01))
                self.record_hit += 1
            mean_vq_loss = mean_vq_loss + F.mse_loss(f_hat.data, f_BChw).mul_(self.beta) + F.mse_loss(f_hat, f_no_grad)
        mean_vq_loss = mean_vq_loss * (1.0 / S)
        f_hat = (f_hat.data - f_no_grad).add_(f_BChw)
        usages = None
        if ret_usages:
            margin = (f_BChw.numel() / C) / self.vocab_size * 0.08
            usages = [(self.ema_vocab_hit_SV[si] >= margin).float().mean().item() * 100 for si in range(S)]
        return f_hat.to(dtype), usages, mean_vq_loss

    # ----- encode / decode helpers of the official API -----
    def _check_latent(self, f: torch.Tensor, hws) -> None:
        if not isinstance(f, torch.Tensor) or f.dim() != 4 or f.shape[1] != self.Cvae:
            shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
            raise ValueError(f"f_BChw must be a (B, Cvae={self.Cvae}, H, W) tensor, got {shape}")
        if tuple(f.shape[2:]) != tuple(hws[-1]):
            raise ValueError(f"the last scale of the schedule {tuple(hws[-1])} must equal the latent size "
                             f"(H, W) = {tuple(f.shape[2:])}")

    def f_to_idxBl_or_fhat(self, f_BChw: torch.Tensor, to_fhat: bool,
                           v_patch_nums: Optional[Sequence[ScaleSpec]] = None) -> List[torch.Tensor]:
        """Encode a latent ``(B, Cvae, H, W)`` into per-scale indices ``(B, h*w)`` (or f_hat after each scale)."""
        hws = self._hws(v_patch_nums)
        self._check_latent(f_BChw, hws)
        codebook = self.embedding.weight.detach().float()
        if self.using_znorm:   # cosine lookup: the eager loop (the fused path implements the L2 lookup)
            return ref.encode_multiscale(f_BChw.float(), codebook, hws, self.phis(len(hws)), to_fhat,
                                         lookup=self.lookup)
        return ops.rq_encode(f_BChw.float(), codebook, hws, self.phis(len(hws)), to_fhat=to_fhat)

    def idxBl_to_var_input(self, gt_ms_idx_Bl: List[torch.Tensor]) -> Optional[torch.Tensor]:
        """Teacher-forcing input ``(B, L - first_l, Cvae)`` float32 from per-scale indices."""
        return ops.rq_var_input(gt_ms_idx_Bl, self.embedding.weight, self.patch_hws, self.phis(len(self.patch_hws)),
                                name="gt_ms_idx_Bl")

    def get_next_autoregressive_input(self, si: int, SN: int, f_hat: torch.Tensor, h_BChw: torch.Tensor,
                                      fused_conv: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Sampling step: ``f_hat += Phi(upsample(h))`` in place; returns ``(f_hat, next-scale input map)``.

        ``f_hat`` ``(B, Cvae, H, W)`` float32 contiguous; ``h_BChw`` ``(B, Cvae, h, w)`` float32 code map of scale
        ``si`` (of ``SN``, which picks Phi); the next map is ``(B, Cvae, h', w')``, or ``f_hat`` at the last scale.
        ``fused_conv``: Phi's convolution inside the Triton step (see :func:`fastvar.ops.upsample_accumulate_`).
        """
        # float32 like f_hat: under autocast the official loop hands over fp16/bf16 soft codes
        return f_hat, ops.upsample_accumulate_(f_hat, h_BChw.float(), *self._step_args(si, SN), fused_conv=fused_conv)

    def get_next_autoregressive_input_from_idx(self, si: int, SN: int, f_hat: torch.Tensor, idx_Bl: torch.Tensor,
                                               validate: bool = True, fused_conv: bool = False
                                               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`get_next_autoregressive_input` from the scale's token indices ``(B, h*w)`` int64: the codes are
        gathered inside the upsample kernel (no ``(B, Cvae, h, w)`` map in memory); same values as
        ``get_next_autoregressive_input(si, SN, f_hat, embedding(idx).transpose(1, 2).reshape(B, Cvae, h, w))``.
        ``validate=False`` skips the range check of CUDA indices (a host synchronisation); ``fused_conv``
        as in :meth:`get_next_autoregressive_input`."""
        h, w = self.patch_hws[si]
        if not isinstance(idx_Bl, torch.Tensor) or idx_Bl.dim() != 2 or idx_Bl.shape[1] != h * w:
            shape = tuple(idx_Bl.shape) if isinstance(idx_Bl, torch.Tensor) else type(idx_Bl).__name__
            raise ValueError(f"idx_Bl must be (B, {h * w}) token indices of scale {si} ({h}x{w}), got {shape}")
        codes = idx_Bl.view(idx_Bl.shape[0], h, w)
        return f_hat, ops.upsample_accumulate_(f_hat, codes, *self._step_args(si, SN),
                                               codebook=self.embedding.weight, validate=validate,
                                               fused_conv=fused_conv)

    def _step_args(self, si: int, SN: int):
        p = self.phi_params(si, SN)
        weight, bias, ratio = p if p is not None else (None, None, 0.0)
        next_hw = self.patch_hws[si + 1] if si != len(self.patch_hws) - 1 else None
        return weight, bias, ratio, next_hw

    def embed_to_fhat(self, ms_h_BChw: List[torch.Tensor], all_to_max_scale: bool = True, last_one: bool = False
                      ) -> Union[List[torch.Tensor], torch.Tensor]:
        """Accumulate per-scale code maps into f_hat (after every scale, or only the last one)."""
        B = ms_h_BChw[0].shape[0]
        H, W = self.patch_hws[-1]
        S = len(self.patch_hws)
        out: List[torch.Tensor] = []
        if all_to_max_scale:
            f_hat = ms_h_BChw[0].new_zeros(B, self.Cvae, H, W, dtype=torch.float32)
            for si in range(S):
                weight, bias, ratio, _ = self._step_args(si, S)
                ops.upsample_accumulate_(f_hat, ms_h_BChw[si].float(), weight, bias, ratio)
                out.append(f_hat.clone())
        else:   # the official experimental path: grow f_hat scale by scale
            f_hat = ms_h_BChw[0].new_zeros(B, self.Cvae, *self.patch_hws[0], dtype=torch.float32)
            for si, hw in enumerate(self.patch_hws):
                f_hat = ref.bicubic_upsample(f_hat, hw)
                f_hat.add_(ref.phi(ms_h_BChw[si], self.phi_params(si)))
                out.append(f_hat)
        return out[-1] if last_one else out
