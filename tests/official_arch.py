"""A test double of the official VAR transformer and quantizer, written from ../shared/VAR_SPEC.md.

It has the official class names, attribute names and algorithm (dense-mask attention in training,
a KV cache re-concatenated at every scale in sampling), and no fastvar module: it is what
``fastvar.patch`` must recognise and swap. Its outputs are checked against the golden files, so it
stands in for the official code in the patch tests. The VQVAE's conv nets are taken from fastvar
(plain PyTorch, not patched).
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvar.reference import sampling as rs


class SelfAttention(nn.Module):
    def __init__(self, block_idx, embed_dim, num_heads, attn_l2_norm):
        super().__init__()
        self.block_idx, self.num_heads, self.head_dim = block_idx, num_heads, embed_dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        self.scale = 1 if attn_l2_norm else 0.25 / math.sqrt(self.head_dim)
        if attn_l2_norm:
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            self.max_scale_mul = torch.log(torch.tensor(100)).item()
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(embed_dim)), nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Identity()
        self.attn_drop = 0.0
        self.caching, self.cached_k, self.cached_v = False, None, None

    def kv_caching(self, enable):
        self.caching, self.cached_k, self.cached_v = enable, None, None

    def forward(self, x, attn_bias):
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.attn_l2_norm:
            q = F.normalize(q, dim=-1).mul(self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp())
            k = F.normalize(k, dim=-1)
        if self.caching:
            if self.cached_k is not None:
                k = torch.cat((self.cached_k, k), dim=2)
                v = torch.cat((self.cached_v, v), dim=2)
            self.cached_k, self.cached_v = k, v
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, L, C)))


class FFN(nn.Module):
    def __init__(self, C, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(C, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, C)
        self.drop = nn.Identity()

    def forward(self, x):
        return self.drop(self.fc2(self.act(self.fc1(x))))


class AdaLNSelfAttn(nn.Module):
    def __init__(self, block_idx, C, heads, shared_aln, attn_l2_norm):
        super().__init__()
        self.block_idx, self.C, self.D, self.shared_aln = block_idx, C, C, shared_aln
        self.drop_path = nn.Identity()
        self.attn = SelfAttention(block_idx, C, heads, attn_l2_norm)
        self.ffn = FFN(C, 4 * C)
        self.ln_wo_grad = nn.LayerNorm(C, eps=1e-6, elementwise_affine=False)
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C ** 0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

    def forward(self, x, cond_BD, attn_bias):
        mod = (self.ada_gss + cond_BD) if self.shared_aln else self.ada_lin(cond_BD).view(-1, 1, 6, self.C)
        g1, g2, s1, s2, sh1, sh2 = mod.unbind(2)
        x = x + self.drop_path(self.attn(self.ln_wo_grad(x).mul(s1.add(1)).add_(sh1), attn_bias=attn_bias).mul_(g1))
        return x + self.drop_path(self.ffn(self.ln_wo_grad(x).mul(s2.add(1)).add_(sh2)).mul(g2))


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C, D):
        super().__init__()
        self.C, self.D = C, D
        self.ln_wo_grad = nn.LayerNorm(C, eps=1e-6, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * C))

    def forward(self, x, cond_BD):
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x).mul(scale.add(1)).add_(shift)


class Phi(nn.Conv2d):
    def __init__(self, C, r):
        super().__init__(C, C, 3, 1, 1)
        self.resi_ratio = abs(r)

    def forward(self, h):
        return h.mul(1 - self.resi_ratio) + super().forward(h).mul_(self.resi_ratio)


class PhiPartiallyShared(nn.Module):
    def __init__(self, qresi_ls):
        super().__init__()
        self.qresi_ls = qresi_ls
        K = len(qresi_ls)
        self.ticks = np.linspace(1 / 3 / K, 1 - 1 / 3 / K, K) if K == 4 else np.linspace(1 / 2 / K, 1 - 1 / 2 / K, K)

    def __getitem__(self, at):
        return self.qresi_ls[np.argmin(np.abs(self.ticks - at)).item()]


class VectorQuantizer2(nn.Module):
    def __init__(self, vocab_size, Cvae, v_patch_nums, quant_resi=0.5, share_quant_resi=4):
        super().__init__()
        self.vocab_size, self.Cvae, self.v_patch_nums = vocab_size, Cvae, v_patch_nums
        self.using_znorm, self.beta, self.quant_resi_ratio = False, 0.25, quant_resi
        self.quant_resi = PhiPartiallyShared(nn.ModuleList([Phi(Cvae, quant_resi) for _ in range(share_quant_resi)]))
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(v_patch_nums), vocab_size))
        self.embedding = nn.Embedding(vocab_size, Cvae)

    def f_to_idxBl_or_fhat(self, f, to_fhat, v_patch_nums=None):
        raise NotImplementedError("not needed by the patch tests")

    def get_next_autoregressive_input(self, si, SN, f_hat, h):
        HW = self.v_patch_nums[-1]
        if si != SN - 1:
            f_hat.add_(self.quant_resi[si / (SN - 1)](F.interpolate(h, size=(HW, HW), mode="bicubic")))
            return f_hat, F.interpolate(f_hat, size=(self.v_patch_nums[si + 1],) * 2, mode="area")
        f_hat.add_(self.quant_resi[si / (SN - 1)](h))
        return f_hat, f_hat


class QuantHolder(nn.Module):
    """Stands in for the official VQVAE: its quantizer plus fastvar's (unpatched) conv decoder."""

    def __init__(self, quantize, conv_vae):
        super().__init__()
        self.quantize = quantize
        self.conv_vae = conv_vae

    def fhat_to_img(self, f_hat):
        return self.conv_vae.fhat_to_img(f_hat)


class VAR(nn.Module):
    def __init__(self, vae_local, depth, shared_aln, attn_l2_norm, patch_nums, num_classes=1000):
        super().__init__()
        C, q = 64 * depth, vae_local.quantize
        self.Cvae, self.V, self.C, self.D, self.num_classes = q.Cvae, q.vocab_size, C, C, num_classes
        self.patch_nums, self.num_stages_minus_1 = patch_nums, len(patch_nums) - 1
        self.L, self.first_l, self.cond_drop_rate = sum(p * p for p in patch_nums), patch_nums[0] ** 2, 0.0
        self.vae_proxy, self.vae_quant_proxy = (vae_local,), (q,)
        self.word_embed = nn.Linear(self.Cvae, C)
        self.class_emb = nn.Embedding(num_classes + 1, C)
        self.pos_start = nn.Parameter(torch.zeros(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, self.L, C))
        self.lvl_embed = nn.Embedding(len(patch_nums), C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C)) if shared_aln else nn.Identity()
        self.blocks = nn.ModuleList([AdaLNSelfAttn(i, C, depth, shared_aln, attn_l2_norm) for i in range(depth)])
        d = torch.cat([torch.full((p * p,), i) for i, p in enumerate(patch_nums)]).view(1, self.L, 1)
        self.register_buffer("lvl_1L", d.transpose(1, 2)[:, 0].contiguous())
        self.register_buffer("attn_bias_for_masking",
                             torch.where(d >= d.transpose(1, 2), 0.0, -torch.inf).reshape(1, 1, self.L, self.L))
        self.head_nm = AdaLNBeforeHead(C, C)
        self.head = nn.Linear(C, self.V)

    def _adaln(self, cond_BD):
        if isinstance(self.shared_ada_lin, nn.Identity):
            return cond_BD
        return self.shared_ada_lin(cond_BD).view(-1, 1, 6, self.C)

    def get_logits(self, h, cond_BD):
        return self.head(self.head_nm(h.float(), cond_BD).float()).float()

    def forward(self, label_B, x):
        B = x.shape[0]
        sos = cond_BD = self.class_emb(label_B)
        sos = sos.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)
        h = torch.cat((sos, self.word_embed(x.float())), dim=1)
        h = h + self.lvl_embed(self.lvl_1L.expand(B, -1)) + self.pos_1LC
        cond = self._adaln(cond_BD)
        # as the official forward: a slice of the mask buffer, cast to the compute dtype, every call
        main_type = torch.matmul(h.new_ones(8, 8), h.new_ones(8, 8)).dtype
        attn_bias = self.attn_bias_for_masking[:, :, :self.L, :self.L].to(main_type)
        h, cond = h.to(main_type), cond.to(main_type)
        for b in self.blocks:
            h = b(x=h, cond_BD=cond, attn_bias=attn_bias)
        return self.get_logits(h, cond_BD)

    @torch.no_grad()
    def autoregressive_infer_cfg(self, B, label_B, g_seed=None, cfg=1.5, top_k=0, top_p=0.0, more_smooth=False):
        rng = torch.Generator(device=self.lvl_1L.device).manual_seed(g_seed)
        quant = self.vae_quant_proxy[0]
        sos = cond_BD = self.class_emb(torch.cat((label_B, torch.full_like(label_B, self.num_classes))))
        lvl_pos = self.lvl_embed(self.lvl_1L) + self.pos_1LC
        nxt = sos.unsqueeze(1).expand(2 * B, self.first_l, -1) + self.pos_start.expand(2 * B, self.first_l, -1) \
            + lvl_pos[:, :self.first_l]
        cur, H = 0, self.patch_nums[-1]
        f_hat = sos.new_zeros(B, self.Cvae, H, H)
        self.sampled = []
        for b in self.blocks:
            b.attn.kv_caching(True)
        for si, pn in enumerate(self.patch_nums):
            ratio = si / self.num_stages_minus_1
            cur += pn * pn
            x = nxt
            for b in self.blocks:
                x = b(x=x, cond_BD=self._adaln(cond_BD), attn_bias=None)
            logits = self.get_logits(x, cond_BD)
            t = cfg * ratio
            logits = (1 + t) * logits[:B] - t * logits[B:]
            idx = rs.sample_top_k_top_p_(logits, top_k, top_p, rng, 1)[:, :, 0]
            self.sampled.append(idx)
            if more_smooth:
                h = rs.gumbel_softmax(logits.mul(1 + ratio), rs.smooth_tau(ratio), rng) @ quant.embedding.weight.unsqueeze(0)
            else:
                h = quant.embedding(idx)
            h = h.transpose_(1, 2).reshape(B, self.Cvae, pn, pn)
            f_hat, nxt = quant.get_next_autoregressive_input(si, len(self.patch_nums), f_hat, h)
            if si != self.num_stages_minus_1:
                nxt = self.word_embed(nxt.view(B, self.Cvae, -1).transpose(1, 2)) + lvl_pos[:, cur:cur + self.patch_nums[si + 1] ** 2]
                nxt = nxt.repeat(2, 1, 1)
        for b in self.blocks:
            b.attn.kv_caching(False)
        self.f_hat = f_hat
        return self.vae_proxy[0].fhat_to_img(f_hat).add_(1).mul_(0.5)


def from_golden(g, conv_vae):
    """The test double with the golden weights loaded (strict), float32 on CPU, eval mode."""
    kw = g["build_kwargs"]
    quant = VectorQuantizer2(kw["V"], kw["Cvae"], tuple(kw["patch_nums"]), share_quant_resi=kw["share_quant_resi"])
    quant.load_state_dict({k[len("quantize."):]: v.float() for k, v in g["vae_state_dict"].items()
                           if k.startswith("quantize.")})
    holder = QuantHolder(quant, conv_vae)
    var = VAR(holder, kw["depth"], kw["shared_aln"], kw["attn_l2_norm"], tuple(kw["patch_nums"]), kw["num_classes"])
    var.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in g["var_state_dict"].items()})
    return var.eval()
