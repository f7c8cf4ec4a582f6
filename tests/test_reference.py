"""The eager reference itself, against independent definitions: every kernel is tested against
these functions, so they are checked here against plain loops and first principles."""

import pytest
import torch
import torch.nn.functional as F

from fastvar import reference as ref
from fastvar.schedule import PATCH_NUMS_256, scale_hws, scale_lens
from tolerances import REL, assert_rel

SCHEDULES = [(1,), (1, 2), (1, 2, 3), ((1, 1), (2, 3), (4, 6), (5, 7)), (2, 3, 1)]


def attention_by_loops(q, k, v, lens, softmax_scale):
    """Block-causal attention as a plain loop over queries (float64, no masks)."""
    B, L, H, D = q.shape
    ends, cur = [], 0
    for n in lens:
        cur += n
        ends += [cur] * n
    out = torch.empty_like(q)
    for i in range(L):
        e = ends[i]
        s = torch.einsum("bhd,bjhd->bhj", q[:, i], k[:, :e]) * softmax_scale
        out[:, i] = torch.einsum("bhj,bjhd->bhd", s.softmax(-1), v[:, :e])
    return out


@pytest.mark.parametrize("patch_nums", SCHEDULES)
@pytest.mark.parametrize("l2", [False, True])
def test_block_causal_attention_matches_loops(patch_nums, l2):
    lens = scale_lens(patch_nums)
    B, H, D, L = 3, 2, 8, sum(lens)
    q, k, v = (torch.randn(B, L, H, D, dtype=torch.float64) for _ in range(3))
    scale_mul = torch.randn(1, H, 1, 1, dtype=torch.float64) + 2.0 if l2 else None
    out = ref.block_causal_attention(q, k, v, lens, scale_mul=scale_mul)
    if l2:
        qn = F.normalize(q, dim=-1) * scale_mul.clamp_max(ref.MAX_SCALE_MUL).exp().view(1, H, 1)   # ln 100 in float32, as official
        expected = attention_by_loops(qn, F.normalize(k, dim=-1), v, lens, 1.0)
    else:
        expected = attention_by_loops(q, k, v, lens, D ** -0.5)
    assert_rel(out, expected, REL[torch.float64], "reference attention")


def test_block_causal_bias_is_the_official_mask():
    lens = scale_lens(PATCH_NUMS_256)
    d = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)]).view(1, -1, 1)
    official = torch.where(d >= d.transpose(1, 2), 0.0, -torch.inf)[0]
    assert torch.equal(ref.block_causal_bias(lens), official)
    assert torch.equal(ref.scale_index(lens), d[0, :, 0])


@pytest.mark.parametrize("patch_nums", [PATCH_NUMS_256, ((1, 1), (2, 3), (4, 6), (5, 7))])
def test_kv_cached_steps_equal_block_causal_forward(patch_nums):
    lens = scale_lens(patch_nums)
    B, H, D, L = 2, 3, 16, sum(lens)
    q, k, v = (torch.randn(B, L, H, D, dtype=torch.float64) for _ in range(3))
    scale_mul = torch.randn(H, dtype=torch.float64)
    full = ref.block_causal_attention(q, k, v, lens, scale_mul=scale_mul)
    k_cache = torch.full((B, L + 5, H, D), float("nan"), dtype=torch.float64)
    v_cache = k_cache.clone()
    cur = 0
    for n in lens:
        out = ref.kv_cached_attention(q[:, cur:cur + n], k[:, cur:cur + n], v[:, cur:cur + n], k_cache, v_cache, cur,
                                      scale_mul=scale_mul)
        assert_rel(out, full[:, cur:cur + n], REL[torch.float64], f"kv step at {cur}")
        cur += n
    assert torch.isnan(k_cache[:, L:]).all() and torch.isnan(v_cache[:, L:]).all(), "cache tail was written"
    assert torch.equal(v_cache[:, :L], v)


def test_rq_lookup_is_nearest_code_with_lowest_index_on_ties():
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(97, 13, generator=g)
    codebook[50] = codebook[7]       # exact duplicate: index 7 must win
    z = torch.randn(301, 13, generator=g)
    z[:20] = codebook[7] + 1e-3 * torch.randn(20, 13, generator=g)
    idx = ref.rq_lookup(z, codebook)
    dist = torch.cdist(z.double(), codebook.double())
    assert torch.equal(idx, dist.argmin(1))
    assert (idx[:20] == 7).all()


def test_top_k_keeps_ties_and_top_p_keeps_the_largest():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.5, 2.0]])
    out = ref.top_k_top_p_filter_(logits.clone(), top_k=2)
    assert torch.isfinite(out).tolist() == [[True, False, True, True, False, True]]   # 2.0 tied at the 2nd place
    peaked = torch.tensor([[10.0, 0.0, -1.0, -2.0]])
    out = ref.top_k_top_p_filter_(peaked.clone(), top_p=1e-6)
    assert torch.isfinite(out).tolist() == [[True, False, False, False]]
    # top-p drops the smallest entries whose cumulative probability is <= 1 - p
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = ref.top_k_top_p_filter_(probs.log(), top_p=0.9)
    assert torch.isfinite(out).tolist() == [[True, True, True, False]]


def test_sample_with_noise_is_torch_multinomial():
    probs = torch.randn(64, 1000).softmax(-1)
    g = torch.Generator().manual_seed(5)
    expected = torch.multinomial(probs, 1, replacement=True, generator=g)[:, 0]
    g.manual_seed(5)
    assert torch.equal(ref.sample_with_noise(probs, ref.exponential_noise(64, 1000, g)), expected)


def test_phi_index_official_float64_rule():
    assert [ref.phi_index(si, 10, 4) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    # scales 2 and 7 are exact ties: float64 rounding settles them (exact arithmetic would pick 0 and 2)
    from fractions import Fraction as Fr
    ticks = [Fr(1, 12) + i * Fr(5, 18) for i in range(4)]          # linspace(1/12, 11/12, 4), exactly
    assert (ticks[0] + ticks[1]) / 2 == Fr(2, 9) and (ticks[2] + ticks[3]) / 2 == Fr(7, 9)
    assert [ref.phi_index(si, 10, 1) for si in range(10)] == [0] * 10
    assert [ref.phi_index(si, 5, 5) for si in range(5)] == [0, 1, 2, 3, 4]
    assert ref.phi_index(0, 1, 4) == 0     # a one-scale schedule sits at r = 0


@pytest.mark.parametrize("patch_nums", [PATCH_NUMS_256, ((1, 2), (2, 3), (3, 5))])
def test_rq_step(patch_nums):
    hws = scale_hws(patch_nums)
    B, C = 2, 5
    w, b = torch.randn(C, C, 3, 3), torch.randn(C)
    f_hat = torch.randn(B, C, *hws[-1])
    for si, (h_, w_) in enumerate(hws):
        h = torch.randn(B, C, h_, w_)
        expected = f_hat.clone()
        up = F.interpolate(h, size=hws[-1], mode="bicubic") if si < len(hws) - 1 else h
        expected += 0.5 * up + 0.5 * F.conv2d(up, w, b, padding=1)
        out, nxt = ref.rq_step(f_hat, h, (w, b, 0.5), hws[si + 1] if si < len(hws) - 1 else None)
        assert out is f_hat, "f_hat must be updated in place"
        assert_rel(f_hat, expected, REL[torch.float32], f"f_hat at scale {si}")
        if si < len(hws) - 1:
            assert_rel(nxt, F.adaptive_avg_pool2d(f_hat, hws[si + 1]), REL[torch.float32], "next input")


def test_encode_then_replay_reaches_same_fhat():
    hws = scale_hws((1, 2, 4, (5, 6)))
    C, V = 4, 33
    codebook = torch.randn(V, C)
    w, b = torch.randn(C, C, 3, 3) * 0.1, torch.randn(C) * 0.1
    phis = [(w, b, 0.5)] * len(hws)
    f = torch.randn(3, C, 5, 6)
    idx = ref.encode_multiscale(f, codebook, hws, phis, to_fhat=False)
    fhat = ref.encode_multiscale(f, codebook, hws, phis, to_fhat=True)
    assert [tuple(i.shape) for i in idx] == [(3, h * w) for h, w in hws]
    # replaying the indices scale by scale rebuilds the same f_hat
    replay = torch.zeros_like(f)
    for si, (ph, pw) in enumerate(hws):
        codes = F.embedding(idx[si], codebook).transpose(1, 2).reshape(3, C, ph, pw)
        ref.rq_step(replay, codes, phis[si], None)
        assert_rel(replay, fhat[si], REL[torch.float32], f"replayed f_hat at {si}")
    x = ref.idx_to_var_input(idx, codebook, hws, phis)
    assert x.shape == (3, sum(h * w for h, w in hws[1:]), C)


def test_cfg_mix():
    logits = torch.randn(6, 3, 7)
    out = ref.cfg_mix(logits, 0.7)
    assert torch.allclose(out, 1.7 * logits[:3] - 0.7 * logits[3:])
