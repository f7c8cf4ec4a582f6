"""A test double of the official Infinity transformer (t2i, bitwise tokens), written from ../shared/INFINITY_SPEC.md.

It has the official class names, attribute names, forward signatures and algorithm: SDPA with a dense padded
mask in teacher forcing; in sampling a KV cache re-concatenated at every scale, RoPE rows looked up in a dict of
tables keyed by the schedule's string, the sort-based top-k/top-p filter and ``torch.multinomial``; the
cross-attention's float32 -> bfloat16 -> float32 varlen call. It holds no fastvar module: it is what
``fastvar.patch`` must recognise and swap. Its outputs are checked against the golden files, so it stands in for
the official code in the patch tests. The BSQ VAE and the step between scales (codes, trilinear resizes) are
fastvar's (not patched); ``recorded`` keeps each scale's logits and bits for the tests.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvar import dynamic_resolution as schedules
from fastvar.reference import infinity as ref_inf

PNS = ("0.06M", "0.25M", "0.60M", "1M")


def varlen_kvpacked_bf16(q, kv, cu_seqlens_q, cu_seqlens_k, scale):
    """Stand-in for flash-attn's varlen call (the golden files' definition): per sequence and head, float32
    softmax(q k^T * scale) v from the given (bf16) inputs, rounded once to q's dtype."""
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(cq) - 1):
        qi = q[cq[i]:cq[i + 1]].float().transpose(0, 1)
        k, v = (kv[ck[i]:ck[i + 1], j].float().transpose(0, 1) for j in (0, 1))
        out[cq[i]:cq[i + 1]] = ((qi @ k.transpose(1, 2)) * scale).softmax(-1).matmul(v).transpose(0, 1)
    return out.to(q.dtype)


def rope_tables(head_dim, pad_to, h_div_w_list):
    """The official dict of RoPE tables: for each template its 1M schedule's positions on a 128 x 128 grid, cos/sin
    of row and column angles, zero-padded to a multiple of ``pad_to``, viewed (2, 1, 1, 1, L', c/2), under the key
    ``str(tuple(schedule))`` of every pn of the template (spec section 5). Built on CPU, as officially (also when
    the model is built on the meta device, as bench/bench_infinity.py does)."""
    with torch.device("cpu"):
        return _rope_tables(head_dim, pad_to, h_div_w_list)


def _rope_tables(head_dim, pad_to, h_div_w_list):
    half = head_dim // 2
    inv = 1.0 / (10000.0 ** (torch.arange(0, half, 2) / half))
    t = torch.arange(128).float()
    grid = torch.cat((torch.outer(t, inv)[:, None, :].expand(-1, 128, -1),
                      torch.outer(t, inv)[None, :, :].expand(128, -1, -1)), dim=-1)
    grid = torch.stack((grid.cos(), grid.sin()))
    tables = {}
    for r in h_div_w_list:
        full = schedules.scale_schedule(r, "1M")
        _, H1, W1 = full[-1]
        parts = []
        for _, h, w in full:
            rows = (torch.arange(h) * (H1 / h)).round().long()
            cols = (torch.arange(w) * (W1 / w)).round().long()
            parts.append(grid[:, rows[:, None], cols[None, :]].reshape(2, h * w, half))
        table = torch.cat(parts, 1)
        if table.shape[1] % pad_to:
            table = torch.cat((table, torch.zeros(2, pad_to - table.shape[1] % pad_to, half)), 1)
        for pn in PNS:
            tables[str(tuple(schedules.scale_schedule(r, pn)))] = table[:, None, None, None]
    return tables


def rotate(q, k, scale_schedule, tables, scale_ind):
    start = sum(t * h * w for t, h, w in scale_schedule[:scale_ind])
    key = str(tuple(scale_schedule))
    tables[key] = tables[key].to(q.device)                       # moved once and kept there, as officially
    table = tables[key]                                                               # 2, 1, 1, 1, L', c/2
    cs = table[:, 0, 0, 0, start:start + q.shape[2]]
    out = []
    for x in (q, k):
        x = x.reshape(*x.shape[:-1], -1, 2)
        out.append(torch.stack((cs[0] * x[..., 0] - cs[1] * x[..., 1], cs[1] * x[..., 0] + cs[0] * x[..., 1]),
                               dim=-1).flatten(-2))
    return out


def fused_ada_layer_norm(C, eps, x, scale, shift):
    return F.layer_norm(x.float(), (C,), eps=eps).mul(scale.add(1)).add_(shift)


class FastRMSNorm(nn.Module):
    def __init__(self, C, eps=1e-6, elementwise_affine=True):
        super().__init__()
        self.C, self.eps, self.elementwise_affine = C, eps, elementwise_affine
        self.weight = nn.Parameter(torch.ones(C))

    def forward(self, x):
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(self.eps))) * self.weight


class FFN(nn.Module):
    def __init__(self, in_features, hidden_features=None, out_features=None, drop=0.0, fused_mlp=False):
        super().__init__()
        self.fused_mlp_func = None
        self.fc1 = nn.Linear(in_features, hidden_features or in_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features or in_features, out_features or in_features)
        self.drop = nn.Identity()

    def forward(self, x):
        return self.drop(self.fc2(self.act(self.fc1(x))))


class SelfAttention(nn.Module):
    def __init__(self, embed_dim=768, num_heads=12, proj_drop=0.0, tau=1, cos_attn=True, customized_flash_attn=False,
                 use_flex_attn=False, batch_size=2, pad_to_multiplier=1, rope2d_normalized_by_hw=2):
        super().__init__()
        self.using_flash = customized_flash_attn
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.tau, self.cos_attn, self.scale = tau, cos_attn, 1
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
        self.max_scale_mul = torch.log(torch.tensor(100, device="cpu")).item()       # a float, also on meta
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(embed_dim)), nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Identity()
        self.caching, self.cached_k, self.cached_v = False, None, None
        self.batch_size, self.use_flex_attn, self.pad_to_multiplier = batch_size, use_flex_attn, pad_to_multiplier
        self.rope2d_normalized_by_hw = rope2d_normalized_by_hw

    def kv_caching(self, enable):
        self.caching, self.cached_k, self.cached_v = enable, None, None

    def forward(self, x, attn_bias_or_two_vector, attn_fn=None, scale_schedule=None, rope2d_freqs_grid=None,
                scale_ind=0):
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q = F.normalize(q, dim=-1, eps=1e-12).mul(self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp())
        k = F.normalize(k, dim=-1, eps=1e-12)
        if rope2d_freqs_grid is not None:
            q, k = rotate(q, k, scale_schedule, rope2d_freqs_grid, scale_ind)
        if self.caching:
            if self.cached_k is not None:
                k, v = torch.cat((self.cached_k, k), 2), torch.cat((self.cached_v, v), 2)
            self.cached_k, self.cached_v = k, v
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias_or_two_vector, scale=self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, L, C)))


class CrossAttention(nn.Module):
    def __init__(self, for_attn_pool=False, embed_dim=768, kv_dim=4096, num_heads=12, proj_drop=0.0, cos_attn=False):
        super().__init__()
        self.for_attn_pool, self.embed_dim, self.kv_dim = for_attn_pool, embed_dim, kv_dim
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.cos_attn, self.scale = False, 1 / math.sqrt(embed_dim // num_heads)
        if for_attn_pool:
            self.mat_q = nn.Parameter(torch.zeros(1, num_heads, self.head_dim))
        else:
            self.mat_q = nn.Linear(embed_dim, embed_dim)
        self.mat_kv = nn.Linear(kv_dim, 2 * embed_dim, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Identity()

    def forward(self, q, ca_kv):
        kv_compact, cu_seqlens_k, max_seqlen_k = ca_kv
        N = kv_compact.shape[0]
        kv = F.linear(kv_compact, self.mat_kv.weight, torch.cat((self.zero_k_bias, self.v_bias)))
        kv = kv.view(N, 2, self.num_heads, self.head_dim)
        if self.for_attn_pool:
            B, Lq = cu_seqlens_k.shape[0] - 1, 1
            qc = self.mat_q.repeat(B, 1, 1).to(kv.dtype)
        else:
            B, Lq = q.shape[:2]
            qc = self.mat_q(q).view(-1, self.num_heads, self.head_dim)
        cu_q = torch.arange(0, Lq * (B + 1), Lq, dtype=torch.int32, device=qc.device)
        out = varlen_kvpacked_bf16(qc.bfloat16(), kv.bfloat16(), cu_q, cu_seqlens_k, self.scale).float()
        return self.proj_drop(self.proj(out.reshape(B, Lq, -1)))


class TextAttentivePool(nn.Module):
    def __init__(self, Ct5, D):
        super().__init__()
        self.Ct5, self.D = Ct5, D
        self.head_dim = 64 if D > 4096 else 128
        self.num_heads = Ct5 // self.head_dim
        self.ca = CrossAttention(for_attn_pool=True, embed_dim=D, kv_dim=Ct5, num_heads=self.num_heads)

    def forward(self, ca_kv):
        return self.ca(None, ca_kv).squeeze(1)


class SharedAdaLin(nn.Linear):
    def forward(self, cond_BD):
        return super().forward(cond_BD).reshape(-1, 1, 6, self.weight.shape[0] // 6)


class CrossAttnBlock(nn.Module):
    def __init__(self, embed_dim, kv_dim, cond_dim, num_heads, mlp_ratio=4.0, norm_eps=1e-6, pad_to_multiplier=1):
        super().__init__()
        self.C, self.D = embed_dim, cond_dim
        self.drop_path = nn.Identity()
        self.sa = SelfAttention(embed_dim, num_heads, pad_to_multiplier=pad_to_multiplier)
        self.ca = CrossAttention(embed_dim=embed_dim, kv_dim=kv_dim, num_heads=num_heads)
        self.using_swiglu = False
        self.ffn = FFN(embed_dim, round(embed_dim * mlp_ratio / 256) * 256)
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.fused_norm_func, self.norm_eps = fused_ada_layer_norm, norm_eps
        self.ca_norm = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=True)
        self.shared_aln = True
        self.ada_gss = nn.Parameter(torch.zeros(1, 1, 6, embed_dim))
        self.ca_gamma = 1
        self.checkpointing_sa_only = False

    def forward(self, x, cond_BD, ca_kv, attn_bias_or_two_vector, attn_fn=None, scale_schedule=None,
                rope2d_freqs_grid=None, scale_ind=0):
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + cond_BD).unbind(2)
        h = self.fused_norm_func(C=self.C, eps=self.norm_eps, x=x, scale=scale1, shift=shift1)
        x = x + self.drop_path(self.sa(h, attn_bias_or_two_vector, attn_fn, scale_schedule, rope2d_freqs_grid,
                                       scale_ind=scale_ind).mul_(gamma1))
        x = x + self.ca(self.ca_norm(x), ca_kv).mul_(self.ca_gamma)
        h = self.fused_norm_func(C=self.C, eps=self.norm_eps, x=x, scale=scale2, shift=shift2)
        return x + self.drop_path(self.ffn(h).mul(gamma2))


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C, D, norm_eps=1e-6):
        super().__init__()
        self.C, self.D = C, D
        self.ln_wo_grad = nn.LayerNorm(C, eps=norm_eps, elementwise_affine=False)
        self.fused_norm_func, self.norm_eps = fused_ada_layer_norm, norm_eps
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(D, 2 * C))

    def forward(self, x_BLC, cond_BD):
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.fused_norm_func(C=self.C, eps=self.norm_eps, x=x_BLC, scale=scale, shift=shift)


class MultipleLayers(nn.Module):
    def __init__(self, ls, num_blocks_in_a_chunk, index):
        super().__init__()
        self.module = nn.ModuleList(ls[index:index + num_blocks_in_a_chunk])

    def forward(self, x, cond_BD, ca_kv, attn_bias_or_two_vector, attn_fn=None, scale_schedule=None,
                checkpointing_full_block=False, rope2d_freqs_grid=None):
        for m in self.module:
            x = m(x, cond_BD, ca_kv, attn_bias_or_two_vector, attn_fn, scale_schedule, rope2d_freqs_grid)
        return x


def filter_top_k_top_p_(logits, top_k, top_p):
    """The official sort-based filter on (..., 2) bit logits, in place (spec section 7c)."""
    if top_k > 0:
        kth = logits.topk(min(top_k, 2), dim=-1)[0][..., -1:]
        logits.masked_fill_(logits < kth, -torch.inf)
    if top_p > 0:
        srt, idx = logits.sort(dim=-1)
        remove = srt.softmax(-1).cumsum(-1) <= 1 - top_p
        remove[..., -1:] = False
        logits.masked_fill_(remove.scatter(-1, idx, remove), -torch.inf)
    return logits


class Infinity(nn.Module):
    def __init__(self, vae_local, text_channels, text_maxlen=512, embed_dim=1024, depth=16, num_heads=16,
                 mlp_ratio=4.0, norm_eps=1e-6, cond_drop_rate=0.1, block_chunks=2, pad_to_multiplier=128,
                 apply_spatial_patchify=0, h_div_w_list=(1.0,)):
        super().__init__()
        C = self.C = self.D = embed_dim
        self.apply_spatial_patchify = apply_spatial_patchify
        self.d_vae = vae_local.embed_dim * (4 if apply_spatial_patchify else 1)
        self.depth, self.num_heads, self.cond_drop_rate = depth, num_heads, cond_drop_rate
        self.pad_to_multiplier, self.add_lvl_embeding_only_first_block = max(1, pad_to_multiplier), 1
        self.rng = torch.Generator()
        self.cfg_uncond = nn.Parameter(torch.zeros(text_maxlen, text_channels))
        self.text_norm = FastRMSNorm(text_channels, eps=norm_eps)
        self.text_proj_for_sos = TextAttentivePool(text_channels, C)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(text_channels, C), nn.GELU(approximate="tanh"),
                                              nn.Linear(C, C))
        self.pos_start = nn.Parameter(torch.zeros(1, 1, C))
        self.rope2d_freqs_grid = rope_tables(C // num_heads, self.pad_to_multiplier, h_div_w_list)
        self.lvl_embed = nn.Embedding(15, C)
        self.word_embed = nn.Linear(self.d_vae, C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(inplace=False), SharedAdaLin(C, 6 * C))
        self.unregistered_blocks = [CrossAttnBlock(C, C, C, num_heads, mlp_ratio, norm_eps, pad_to_multiplier)
                                    for _ in range(depth)]
        self.head_nm = AdaLNBeforeHead(C, C, norm_eps)
        self.head = nn.Linear(C, 2 * self.d_vae)
        self.num_block_chunks, self.num_blocks_in_a_chunk = block_chunks, depth // block_chunks
        self.block_chunks = nn.ModuleList(MultipleLayers(self.unregistered_blocks, depth // block_chunks, i)
                                          for i in range(0, depth, depth // block_chunks))
        self.recorded = {}

    def get_logits(self, h, cond_BD):
        return self.head(self.head_nm(h, cond_BD))

    def _text(self, kv_compact, cu_seqlens_k, max_seqlen_k):
        kv = self.text_norm(kv_compact)
        cond_BD = self.text_proj_for_sos((kv, cu_seqlens_k, max_seqlen_k))
        ca_kv = (self.text_proj_for_ca(kv), cu_seqlens_k, max_seqlen_k)
        return cond_BD, ca_kv, self.shared_ada_lin(cond_BD)

    def forward(self, label_B_or_BLT, x_BLC_wo_prefix, scale_schedule):
        """Teacher forcing (cond_drop_rate must be 0 here: the tests compare deterministic logits)."""
        assert self.cond_drop_rate == 0
        kv_compact, lens, cu_seqlens_k, max_seqlen_k = label_B_or_BLT
        B = x_BLC_wo_prefix.shape[0]
        cond_BD, ca_kv, gss = self._text(kv_compact, cu_seqlens_k, max_seqlen_k)
        x = torch.cat((cond_BD.unsqueeze(1) + self.pos_start, self.word_embed(x_BLC_wo_prefix)), 1)
        L = x.shape[1]
        pad = -L % self.pad_to_multiplier
        d = torch.cat([torch.full((t * h * w,), i) for i, (t, h, w) in enumerate(scale_schedule)]).view(1, L, 1)
        d = d.to(x.device)
        mask = torch.where(d >= d.transpose(1, 2), 0.0, -torch.inf).reshape(1, 1, L, L)
        if pad:
            mask = F.pad(mask, (0, pad, 0, pad), value=-torch.inf)
            mask[0, 0, L:, 0] = 0
            x = F.pad(x, (0, 0, 0, pad))
        lvl = self.lvl_embed(d.view(-1)).unsqueeze(0).expand(B, -1, -1)
        x = torch.cat((x[:, :L] + lvl, x[:, L:]), 1)
        for chunk in self.block_chunks:
            x = chunk(x=x, cond_BD=gss, ca_kv=ca_kv, attn_bias_or_two_vector=mask, attn_fn=None,
                      scale_schedule=scale_schedule, checkpointing_full_block=False,
                      rope2d_freqs_grid=self.rope2d_freqs_grid)
        return self.get_logits(x[:, :L], cond_BD)

    @torch.no_grad()
    def autoregressive_infer_cfg(self, vae=None, scale_schedule=None, label_B_or_BLT=None, B=1, g_seed=None,
                                 cfg_list=(), tau_list=(), top_k=0, top_p=0.0, cfg_insertion_layer=(-5,), vae_type=0,
                                 ret_img=False, gt_leak=0, gt_ls_Bl=None, inference_mode=False):
        if self.rng.device != self.pos_start.device:         # officially made on the model's device
            self.rng = torch.Generator(device=self.pos_start.device)
        rng = None if g_seed is None else self.rng.manual_seed(g_seed)
        vae_schedule = [(t, 2 * h, 2 * w) for t, h, w in scale_schedule] if self.apply_spatial_patchify \
            else scale_schedule
        kv_compact, lens, cu_seqlens_k, max_seqlen_k = label_B_or_BLT
        guided = any(c != 1 for c in cfg_list)
        bs = 2 * B if guided else B
        if guided:
            un = torch.cat([self.cfg_uncond[:n] for n in lens])
            kv_compact = torch.cat((kv_compact, un))
            cu_seqlens_k = torch.cat((cu_seqlens_k, cu_seqlens_k[1:] + cu_seqlens_k[-1]))
        cond_BD, ca_kv, gss = self._text(kv_compact, cu_seqlens_k, max_seqlen_k)
        x = cond_BD.unsqueeze(1).expand(bs, 1, -1) + self.pos_start.expand(bs, 1, -1)
        blocks = self.unregistered_blocks if inference_mode else [m for c in self.block_chunks for m in c.module]
        for b in blocks:
            b.sa.kv_caching(True)
        on_logits = 0 in cfg_insertion_layer
        hidden = [self.depth + i for i in cfg_insertion_layer if i < 0]
        self.recorded = dict(logits=[], sampled_bits=[])
        summed = 0
        for si, (_, h, w) in enumerate(scale_schedule):
            cfg, layer = cfg_list[si], 0
            for ci, chunk in enumerate(self.block_chunks):
                if ci == 0:
                    x[:, :h * w] += self.lvl_embed(torch.full((bs, h * w), si, device=x.device))
                for m in chunk.module:
                    x = m(x=x, cond_BD=gss, ca_kv=ca_kv, attn_bias_or_two_vector=None, attn_fn=None,
                          scale_schedule=scale_schedule, rope2d_freqs_grid=self.rope2d_freqs_grid, scale_ind=si)
                    if cfg != 1 and layer in hidden:
                        x = cfg * x[:B] + (1 - cfg) * x[B:]
                        x = torch.cat((x, x))
                    layer += 1
            if cfg != 1 and on_logits:
                logits = self.get_logits(x, cond_BD).mul(1 / tau_list[si])
                logits = cfg * logits[:B] + (1 - cfg) * logits[B:]
            else:
                logits = self.get_logits(x[:B], cond_BD[:B]).mul(1 / tau_list[si])
            logits = logits.reshape(B, -1, 2)
            self.recorded["logits"].append(logits.clone())
            filter_top_k_top_p_(logits, top_k, top_p)
            bits = torch.multinomial(logits.softmax(-1).view(-1, 2), 1, replacement=True, generator=rng).view(B, -1)
            self.recorded["sampled_bits"].append(bits)
            vae_bits = gt_ls_Bl[si] if si < gt_leak else ref_inf.tokens_to_vae_bits(
                bits.view(B, h, w, -1), bool(self.apply_spatial_patchify))
            summed, nxt = ref_inf.bitwise_step(summed, ref_inf.bits_to_codes(vae_bits), vae_schedule, si,
                                               bool(self.apply_spatial_patchify))
            if nxt is not None:
                x = self.word_embed(nxt).repeat(bs // B, 1, 1)
        for b in blocks:
            b.sa.kv_caching(False)
        self.summed_codes = summed
        return [], [], (ref_inf.image_to_uint8_bgr(vae.decode(summed.squeeze(-3))) if ret_img else [])


def from_golden(g, vae):
    """The test double with the golden weights loaded (strict), float32 on CPU, eval mode, cond_drop_rate 0."""
    c = g["config"]
    model = Infinity(vae, c["text_channels"], c["infinity_kwargs"]["text_maxlen"], c["embed_dim"], c["depth"],
                     c["num_heads"], cond_drop_rate=0.0, block_chunks=c["block_chunks"],
                     pad_to_multiplier=c["infinity_kwargs"]["pad_to_multiplier"],
                     apply_spatial_patchify=c["apply_spatial_patchify"], h_div_w_list=(c["h_div_w"],))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in g["infinity_state_dict"].items()})
    return model.eval()
