"""fastvar's CUDA kernels (``csrc/``) on CPU: their host build (``tests/cuda_host.py``: the same source, the threads
of a block as loops between barriers, warp shuffles emulated) through the op layer's glue
(``fastvar/ops/cuda_ext.py`` with ``ext=`` the host module), against the references on random irregular inputs.

- The sampling step: with Phi the identity, f_hat and the next map are ATen's CPU bits on x86-64 (the host build
  takes ATen's CPU rounding of the bicubic weights, ``aten_cpu=True``); with Phi's convolution (summed in the
  kernel's order), within 2x eager float32's error against the float64 step. Tiles cut by the image border, odd
  and non-square schedules, strided code maps, no bias, identity Phi, C across the register variants.
- The sampler: the official tokens and filtered logits (exact mode, same Exp(1) noise), warp-per-row (V <= 1024)
  and CTA-per-row variants, ties at the k-th value and at the top-p threshold, top-k / top-p edge cases, bad rows.
- Outputs poisoned with NaN / sentinels before the call; bad arguments rejected by the launcher.
"""
import copy
import os
import platform

import pytest
import torch
import torch.nn.functional as F

import cuda_host
from builders import random_quantizer
from fastvar.ops import cuda_ext
from fastvar.reference import quantize as ref
from fastvar.reference import sampling as sref
from fastvar.schedule import PATCH_NUMS_256
from tolerances import REL, assert_like_eager, assert_rel, rel_err

pytestmark = pytest.mark.cuda_host
X86 = platform.machine().lower() in ("x86_64", "amd64")
INF = float("inf")
NON_SQUARE = ((1, 2), (2, 3), (3, 5), (4, 4), (5, 7), (9, 11))     # 9 x 11: two tiles each way, cut by the border


@pytest.fixture(scope="session")
def ext(request, tmp_path_factory):
    why = cuda_host.missing_tool()
    if why:
        pytest.skip(f"cuda_host: cannot build the host module of csrc/: {why}")
    # kept between runs in pytest's cache folder (a fresh build per session when the cache plugin is off)
    cache = getattr(request.config, "cache", None)
    folder = cache.mkdir("fastvar_cuda_host") if cache is not None else tmp_path_factory.mktemp("fastvar_cuda_host")
    return cuda_host.build(str(folder))


def assert_bits(out, expected, what):
    """ATen's CPU bits on x86-64 (the rounding sequence the host build reproduces), else REL[float32]."""
    assert out.shape == expected.shape, f"{what}: shape {tuple(out.shape)} vs {tuple(expected.shape)}"
    if X86:
        n = int((out != expected).sum())
        assert n == 0, f"{what}: {n} of {out.numel()} values differ (max {(out - expected).abs().max().item():.3g})"
    else:
        assert_rel(out, expected, REL[torch.float32], what)


# ------------------------------------------------------------------------------------------ the step
def _strided(x, g):
    """``x`` as a non-contiguous view (every other column of a wider buffer)."""
    buf = torch.randn(*x.shape[:-1], 2 * x.shape[-1], generator=g)[..., ::2]
    return buf.copy_(x)


def _walk(q, ext, idx, B, kind, g, dtypes=(torch.float32,)):
    """The step scale by scale through ``cuda_ext.step`` on the host build (``kind``: "indices" or "map") and the
    eager reference at each of ``dtypes``: ``(kernel next maps, kernel f_hat, {dtype: (next maps, f_hat)})``."""
    hws = q.patch_hws
    S_ = len(hws)
    qs = {dt: q if dt == torch.float32 else copy.deepcopy(q).to(dt) for dt in dtypes}
    f_out = torch.randn(B, q.Cvae, *hws[-1], generator=g)          # accumulated into, not overwritten
    refs = {dt: ([], f_out.to(dt).clone()) for dt in dtypes}
    outs = []
    for si, (h, w) in enumerate(hws):
        weight, bias, r = q.phi_params(si, S_) or (None, None, 0.0)
        nxt_hw = hws[si + 1] if si + 1 < S_ else None
        i3 = idx[si].view(B, h, w)
        codes = i3 if kind == "indices" else _strided(ref.code_map(idx[si], q.embedding.weight, h, w), g)
        o = cuda_ext.step(f_out, codes, weight, bias, r, nxt_hw, q.embedding.weight, ext=ext, aten_cpu=True)
        outs.append(o if nxt_hw is not None else f_out.clone())
        for dt, (nexts, f_ref) in refs.items():
            wd, bd = qs[dt].phi_params(si, S_)[:2] if weight is not None else (None, None)
            f_ref, e = ref.rq_step(f_ref, i3, (wd, bd, r) if wd is not None else None, nxt_hw,
                                   qs[dt].embedding.weight)
            nexts.append((f_ref if e is None else e).clone())
    return outs, f_out, refs


@pytest.mark.parametrize("patch_nums,B", [(PATCH_NUMS_256, 1), (NON_SQUARE, 2), ((1, 2, 3, 5, 7), 3)],
                         ids=["256px-B1", "non-square-B2", "odd-B3"])
@pytest.mark.parametrize("kind", ["indices", "map"])
def test_step_identity_phi_is_aten_bits(ext, gen, patch_nums, B, kind):
    """Phi the identity: ``f_hat += bicubic(codes)`` and the area downsample are ATen's CPU bits, every scale."""
    g, seed = gen
    q = random_quantizer(patch_nums, quant_resi=0.0, C=5, V=37, seed=seed)
    idx = [torch.randint(0, q.vocab_size, (B, h * w), generator=g) for h, w in q.patch_hws]
    with torch.no_grad():
        outs, f_out, refs = _walk(q, ext, idx, B, kind, g)
    nexts, f_ref = refs[torch.float32]
    for si, (o, e) in enumerate(zip(outs, nexts)):
        assert_bits(o, e, f"seed {seed}: next map after scale {si} ({kind})")
    assert_bits(f_out, f_ref, f"seed {seed}: f_hat ({kind})")


@pytest.mark.parametrize("C,quant_resi", [(3, 0.5), (8, -0.3), (17, 0.5), (32, 0.5), (40, 0.25)])
@pytest.mark.parametrize("kind", ["indices", "map"])
def test_step_with_phi_conv_against_float64(ext, gen, C, quant_resi, kind):
    """Phi's convolution inside the kernel (from the shared-memory halo), C across the 4 / 8 / 16 channels-per-
    thread variants, every scale of an irregular schedule with tiles cut by the border: every next map and f_hat
    at most 2x as far from the float64 step as eager float32."""
    g, seed = gen
    B = 2
    q = random_quantizer(NON_SQUARE, quant_resi=quant_resi, C=C, V=29, seed=seed)
    idx = [torch.randint(0, q.vocab_size, (B, h * w), generator=g) for h, w in q.patch_hws]
    with torch.no_grad():
        outs, f_out, refs = _walk(q, ext, idx, B, kind, g, dtypes=(torch.float32, torch.float64))
    (refs32, f_ref32), (refs64, f_ref64) = refs[torch.float32], refs[torch.float64]
    for si, (o, e32, e64) in enumerate(zip(outs, refs32, refs64)):
        assert_like_eager(o, e32, e64, f"seed {seed}: next map after scale {si} ({kind}, C={C})")
    assert_like_eager(f_out, f_ref32, f_ref64, f"seed {seed}: f_hat ({kind}, C={C})")


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_step_single_scale_negative_controls(ext, gen, with_bias):
    """One step with a poisoned next map (every cell written), the float64 step as reference, and the kernel's
    f_hat far from the step computed with a dropped tap, with (in, out) channels swapped, or without the bias."""
    g, seed = gen
    B, C, V, r = 2, 12, 31, 0.375
    codebook = torch.randn(V, C, generator=g)
    idx = torch.randint(0, V, (B, 5, 4), generator=g)
    w = torch.randn(C, C, 3, 3, generator=g) * 0.2
    b = torch.randn(C, generator=g) if with_bias else None
    f0 = torch.randn(B, C, 11, 13, generator=g)
    u = F.interpolate(codebook[idx].permute(0, 3, 1, 2).double(), size=(11, 13), mode="bicubic")
    b64 = b.double() if b is not None else None

    def step64(weight, bias):
        return f0.double() + u * (1 - r) + F.conv2d(u, weight, bias, padding=1) * r

    f = f0.clone()
    nxt = torch.full((B, C, 3, 7), float("nan"))
    ext.upsample_accumulate_step(
        f_hat=f.data_ptr(), f_shape=list(f.shape), f_strides=list(f.stride()), src=0, src_strides=[],
        idx=idx.data_ptr(), idx_strides=list(idx.stride()), codebook=codebook.data_ptr(),
        codebook_shape=list(codebook.shape), codebook_strides=list(codebook.stride()), code_hw=[5, 4],
        weight=w.data_ptr(), weight_strides=list(w.stride()), bias=cuda_ext._ptr(b), bias_stride=1,
        one_minus_r=1 - r, r=r, next_out=nxt.data_ptr(), next_hw=[3, 7], next_strides=list(nxt.stride()),
        aten_cpu=True, stream=0)
    expected = step64(w.double(), b64)
    assert_rel(f, expected, REL[torch.float32], f"seed {seed}: f_hat")
    assert_rel(nxt, F.interpolate(expected, size=(3, 7), mode="area"), REL[torch.float32], f"seed {seed}: next")
    no_tap = w.double().clone()
    no_tap[:, :, 2, 0] = 0
    wrong = [("a dropped tap", step64(no_tap, b64)), ("(in, out) weights", step64(w.double().transpose(0, 1), b64))]
    if b is not None:
        wrong.append(("no bias", step64(w.double(), None)))
    for what, other in wrong:
        assert rel_err(f, other) > 10 * REL[torch.float32], f"seed {seed}: indistinguishable from {what}"


def _step_kwargs(**over):
    f = torch.zeros(2, 4, 6, 6)
    idx = torch.zeros(2, 3, 3, dtype=torch.int64)
    cb = torch.randn(9, 4)
    w = torch.randn(4, 4, 3, 3)
    nxt = torch.empty(2, 4, 3, 3)
    kw = dict(f_hat=f.data_ptr(), f_shape=[2, 4, 6, 6], f_strides=list(f.stride()), src=0, src_strides=[],
              idx=idx.data_ptr(), idx_strides=list(idx.stride()), codebook=cb.data_ptr(), codebook_shape=[9, 4],
              codebook_strides=[4, 1], code_hw=[3, 3], weight=w.data_ptr(), weight_strides=list(w.stride()),
              bias=0, bias_stride=0, one_minus_r=0.5, r=0.5, next_out=nxt.data_ptr(), next_hw=[3, 3],
              next_strides=list(nxt.stride()), aten_cpu=True, stream=0)
    kw.update(over)
    return kw, (f, idx, cb, w, nxt)


@pytest.mark.parametrize("over,match", [
    (dict(f_hat=0), r"f_hat must be a non-null pointer, got 0"),
    ("misaligned", r"f_hat must be aligned to 4 bytes \(its element size\), got address 0x[0-9a-f]+ \(2 bytes off\)"),
    (dict(f_strides=[144, 36, 1, 6]), r"f_hat must be contiguous over \(H, W\) \(strides \(\*, \*, 6, 1\)\), got strides \(144, 36, 1, 6\)"),
    (dict(f_shape=[2, 0, 6, 6]), r"f_shape entries \(B, C, H, W\) must be >= 1, got 0"),
    (dict(src=64), r"pass exactly one of src .* and idx .*, got both"),
    (dict(idx=0), r"pass exactly one of src .* and idx .*, got neither"),
    (dict(codebook_shape=[9, 5]), r"codebook must have C=4 columns \(shape \(V, 4\)\), got \(9, 5\)"),
    (dict(weight_strides=[36, 1, 12, 4]), r"weight must be contiguous \(strides \(36, 9, 3, 1\)\), got strides \(36, 1, 12, 4\)"),
    (dict(weight=0, bias=64), r"a bias needs a weight"),
    (dict(next_hw=[1, 1]), r"next_hw \(1, 1\) is ATen's mean\(\)"),
    (dict(next_hw=[3]), r"next_hw must have 2 entries, got 1"),
    (dict(r=float("nan")), r"one_minus_r and r must be finite"),
])
def test_step_launcher_rejects_bad_arguments(ext, over, match):
    if over == "misaligned":
        kw, keep = _step_kwargs()
        kw["f_hat"] += 2
    else:
        kw, keep = _step_kwargs(**over)
    with pytest.raises(ValueError, match="upsample_accumulate_step: " + match):
        ext.upsample_accumulate_step(**kw)


def test_step_launcher_rejects_too_many_channels(ext):
    f = torch.zeros(1, 65, 4, 4)
    src = torch.zeros(1, 65, 2, 2)
    w = torch.zeros(65, 65, 3, 3)
    with pytest.raises(ValueError, match=r"C <= 64, got C=65"):
        ext.upsample_accumulate_step(
            f_hat=f.data_ptr(), f_shape=list(f.shape), f_strides=list(f.stride()), src=src.data_ptr(),
            src_strides=list(src.stride()), idx=0, idx_strides=[], codebook=0, codebook_shape=[], codebook_strides=[],
            code_hw=[2, 2], weight=w.data_ptr(), weight_strides=list(w.stride()), bias=0, bias_stride=0,
            one_minus_r=0.5, r=0.5, next_out=0, next_hw=[], next_strides=[], aten_cpu=True, stream=0)


# ------------------------------------------------------------------------------------------ the sampler
def _tie_free_cfg_logits(N2, l, V, t, g, scale=3.0):
    x = torch.randn(N2, l, V, generator=g) * scale
    B = N2 // 2
    for _ in range(100):
        srt = sref.cfg_mix(x, t).reshape(-1, V).sort(dim=-1).values
        bad = (srt[:, 1:] == srt[:, :-1]).any(dim=-1).view(B, l)
        if not bad.any():
            return x
        b, i = bad.nonzero(as_tuple=True)
        x[b, i] = torch.randn(len(b), V, generator=g) * scale
    raise AssertionError("could not draw tie-free logits")


def _official(logits_2B, t, top_k, top_p, seed):
    """The official chain: CFG mix, in-place filter, softmax, torch.multinomial with a generator of ``seed``."""
    mixed = sref.cfg_mix(logits_2B.float(), t)
    tokens = sref.sample_top_k_top_p_(mixed, top_k, top_p, torch.Generator().manual_seed(seed))[..., 0]
    return tokens, mixed


def _sample(ext, logits, n_cond, cfg_t, top_k, top_p, noise, filtered=True):
    tokens, err, filt = cuda_ext.sample_exact(logits, n_cond, cfg_t, top_k, top_p, noise, filtered, ext=ext)
    return tokens, err, filt


SETTINGS = [(0, 0.0), (900, 0.96), (7, 0.0), (0, 0.5), (1, 0.9), (5, 1.0), (10 ** 6, 0.3)]   # 10**6: k = V


@pytest.mark.parametrize("B,l,V", [(1, 1, 4096), (2, 5, 333), (3, 2, 1500), (2, 3, 17), (1, 2, 1024), (1, 1, 1025)])
def test_sampler_exact_matches_official(ext, B, l, V):
    """Tokens and filtered logits equal the official chain's for the Exp(1) noise its generator draws; one warp per
    row up to V = 1024, 256 threads above."""
    seed = int.from_bytes(os.urandom(4), "little") % 2 ** 31
    t = 1.5 * 4 / 9
    logits = _tie_free_cfg_logits(2 * B, l, V, t, torch.Generator().manual_seed(seed))
    noise = sref.exponential_noise(B * l, V, torch.Generator().manual_seed(seed))
    for top_k, top_p in SETTINGS:
        top_k = min(top_k, V)
        want, want_filtered = _official(logits, t, top_k, top_p, seed)
        tokens, err, filtered = _sample(ext, logits, B, t, top_k, top_p, noise)
        what = f"B={B} l={l} V={V} k={top_k} p={top_p} seed={seed}"
        assert (err == 0).all(), what
        assert torch.equal(tokens.view(B, l), want), what
        assert torch.equal(filtered.view(B, l, V), want_filtered), what


def test_sampler_strided_half_precision_no_cfg(ext):
    """Logits with no unit stride, float16 and bfloat16 (upcast exactly), no CFG, a strided noise tensor."""
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little") % 2 ** 31)
    B, l, V, t = 2, 5, 257, 0.75
    base = _tie_free_cfg_logits(2 * B, l, V, t, g)
    big = torch.full((2 * B, V, 2 * l), float("nan"))
    big[:, :, ::2] = base.transpose(1, 2)
    strided = big[:, :, ::2].transpose(1, 2)
    wide = torch.full((B * l, 2 * V), float("nan"))
    noise = wide[:, ::2]
    noise.copy_(sref.exponential_noise(B * l, V, torch.Generator().manual_seed(3)))
    want, _ = _official(base, t, 20, 0.8, 3)
    assert torch.equal(_sample(ext, strided, B, t, 20, 0.8, noise)[0].view(B, l), want)
    for dtype in (torch.float16, torch.bfloat16):
        x = base.to(dtype)
        mixed = sref.cfg_mix(x.float(), t)
        if (mixed.sort(-1).values.diff(dim=-1) == 0).any():
            continue                                   # ties: their own tests
        want, want_f = _official(x.float(), t, 20, 0.8, 3)
        tok, err, filt = _sample(ext, x, B, t, 20, 0.8, noise)
        assert torch.equal(tok.view(B, l), want) and torch.equal(filt.view(B, l, V), want_f), dtype
    # no CFG: n_cond rows of the logits themselves
    x = base[:B]
    flat = x.clone()
    want = sref.sample_top_k_top_p_(flat, 30, 0.9, torch.Generator().manual_seed(3))[..., 0]
    tok, err, filt = _sample(ext, x, B, None, 30, 0.9, noise)
    assert torch.equal(tok.view(B, l), want) and torch.equal(filt.view(B, l, V), flat)


def _kept(ext, x, top_k, top_p):
    """The support the sampler keeps for one row ``x`` (as the filtered logits say), and its token."""
    noise = sref.exponential_noise(1, x.numel(), torch.Generator().manual_seed(0))
    tok, err, filt = _sample(ext, x.view(1, 1, -1), 1, None, top_k, top_p, noise)      # no CFG
    assert (err == 0).all()
    return filt[0] > -INF, int(tok[0])


@pytest.mark.parametrize("V", [40, 2000])
def test_sampler_ties_at_the_kth_value_all_kept(ext, V):
    x = torch.linspace(-3, -1, V)
    tied, larger = [3, 11, 25, 30], [5, 7, 9]
    x[tied] = 1.0
    x[larger] = 2.0
    for k in (4, 5, 7):                                      # the k-th largest is the tied 1.0
        kept, tok = _kept(ext, x, k, 0.0)
        assert torch.equal(kept, x >= 1.0), f"k={k}"
        assert x[tok] >= 1.0
    kept, tok = _kept(ext, x, 1, 0.0)                         # k = 1: the largest three tie
    assert torch.equal(kept, x == 2.0)


@pytest.mark.parametrize("V", [16, 3000])
def test_sampler_top_p_tie_rule_stable_order(ext, V):
    """Equal logits at the top-p threshold are ordered by index (a stable ascending sort): lower indices removed
    first; of tied maxima the highest index is kept; a top_p whose 1 - p rounds to 1 keeps that one alone."""
    import math
    p = torch.full((V,), 0.05 / (V - 6))
    G, above = [2, 6, 9, 13], [0, V - 1]
    p[G] = 0.1
    p[above] = 0.275
    x = p.log()
    kept, _ = _kept(ext, x, 0, 0.78)                          # thr 0.22: cumulative 0.15, 0.25, ... -> G[0] removed
    want = torch.zeros(V, dtype=torch.bool)
    want[G[1:]] = True
    want[above] = True
    assert torch.equal(kept, want), kept.nonzero().flatten().tolist()
    assert torch.equal(kept, sref.top_k_top_p_filter_(x.clone()[None], 0, 0.78, stable=True)[0] > -INF)
    x2 = torch.full((V,), math.log(0.2 / (V - 2)))
    x2[[4, 11]] = math.log(0.4)
    assert _kept(ext, x2, 0, 0.3)[0].nonzero().flatten().tolist() == [11]
    kept, tok = _kept(ext, x2, 0, 1e-9)
    assert kept.nonzero().flatten().tolist() == [11] and tok == 11


def test_sampler_top_k_and_top_p_edge_cases(ext):
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little") % 2 ** 31)
    V = 300
    x = torch.randn(V, generator=g) * 6                        # peaked: the largest alone often exceeds p
    kept, tok = _kept(ext, x, 1, 0.0)
    assert kept.nonzero().flatten().tolist() == [int(x.argmax())] and tok == int(x.argmax())
    assert _kept(ext, x, V, 0.0)[0].all() and _kept(ext, x, 0, 0.0)[0].all()      # k = V, k = 0: off
    assert _kept(ext, x, 0, 1.0)[0].all()                      # p = 1: thr 0, nothing has mass <= 0
    tiny = torch.full((64,), -45.0)                             # p = exp(-45) ~ 3e-20 > 0: kept at top_p = 1 too
    tiny[7] = 0.0
    assert _kept(ext, tiny, 0, 1.0)[0].all()
    assert _kept(ext, tiny, 0, 0.5)[0].nonzero().flatten().tolist() == [7]
    for top_p in (1e-9, 0.01, 0.3, 0.999):
        want = sref.top_k_top_p_filter_(x.clone()[None], 3, top_p, stable=True)[0] > -INF
        assert torch.equal(_kept(ext, x, 3, top_p)[0], want), top_p
        assert _kept(ext, x, 0, top_p)[0][x.argmax()]          # never the largest removed
    # -inf entries (a masked vocabulary) are never drawn and count as no mass
    y = x.clone()
    y[::3] = -INF
    kept, tok = _kept(ext, y, 0, 0.5)
    assert y[tok] > -INF and torch.equal(kept, sref.top_k_top_p_filter_(y.clone()[None], 0, 0.5, stable=True)[0] > -INF)


def test_sampler_bad_rows_and_poisoned_outputs(ext):
    """Every token, error code and filtered value written (outputs poisoned first); NaN (also -inf - inf after the
    mix), +inf and all -inf rows get their error bits and token -1, the other rows their tokens."""
    g = torch.Generator().manual_seed(1)
    B, l, V = 3, 4, 1100
    x = torch.randn(2 * B, l, V, generator=g)
    x[0, 1, 7] = float("nan")
    x[1, 2, 9] = INF
    x[2, 0], x[B + 2, 0] = -INF, -INF                         # a row of -inf in both halves: NaN after the mix
    x[1, 3, 5], x[B + 1, 3, 5] = -INF, -INF                   # -inf - inf after the mix: NaN
    rows = B * l
    noise = sref.exponential_noise(rows, V, g)
    tokens = torch.full((rows,), -7, dtype=torch.int64)
    err = torch.full((rows,), -7, dtype=torch.int32)
    filt = torch.full((rows, V), float("nan"))
    ext.sample_top_k_top_p(logits=x.data_ptr(), dtype=0, logits_shape=list(x.shape), logits_strides=list(x.stride()),
                           n_cond=B, has_cfg=True, cfg_a=1.5, cfg_t=0.5, top_k=50, top_p_thr=0.25, has_top_p=True,
                           noise=noise.data_ptr(), noise_shape=[rows, V], noise_stride=V, tokens=tokens.data_ptr(),
                           err=err.data_ptr(), filtered=filt.data_ptr(), stream=0)
    want_err = torch.zeros(rows, dtype=torch.int32)
    want_err[1], want_err[6], want_err[7], want_err[8] = 1, 4, 1, 1 | 2     # row 8: NaN only, so no finite value
    assert err.tolist() == want_err.tolist()
    assert (tokens[err != 0] == -1).all() and (tokens[err == 0] >= 0).all()
    assert not torch.isnan(filt).any()                         # NaN becomes -inf, everything is written
    good = (err == 0).nonzero().flatten()
    mixed = sref.cfg_mix(x, 0.5).reshape(rows, V)[good]
    want_f = sref.top_k_top_p_filter_(mixed.clone(), 50, 0.75, stable=True)
    assert torch.equal(filt[good], want_f)
    assert torch.equal(tokens[good], sref.sample_with_noise(want_f.softmax(-1), noise[good]))
    # a row that is entirely -inf without CFG
    y = torch.randn(1, 2, 50)
    y[0, 1] = -INF
    tok, e, _ = _sample(ext, y, 1, None, 0, 0.0, sref.exponential_noise(2, 50, g))
    assert e.tolist() == [0, 2] and tok[1] == -1


def _sample_kwargs(**over):
    x = torch.randn(4, 3, 20)
    noise = torch.ones(6, 20)
    out = torch.empty(6, dtype=torch.int64), torch.empty(6, dtype=torch.int32)
    kw = dict(logits=x.data_ptr(), dtype=0, logits_shape=[4, 3, 20], logits_strides=list(x.stride()), n_cond=2,
              has_cfg=True, cfg_a=1.5, cfg_t=0.5, top_k=5, top_p_thr=0.1, has_top_p=True, noise=noise.data_ptr(),
              noise_shape=[6, 20], noise_stride=20, tokens=out[0].data_ptr(), err=out[1].data_ptr(), filtered=0,
              stream=0)
    kw.update(over)
    return kw, (x, noise, out)


@pytest.mark.parametrize("over,err,match", [
    (dict(dtype=3), TypeError, r"dtype must be 0 \(float32\), 1 \(float16\) or 2 \(bfloat16\), got 3"),
    (dict(logits_shape=[4, 3]), ValueError, r"logits_shape and logits_strides must have 3 entries"),
    (dict(top_k=21), ValueError, r"top_k must be in \[0, V=20\], got 21"),
    (dict(n_cond=3), ValueError, r"logits must have N = 2 \* n_cond rows of l tokens \(n_cond=3\), got N=4"),
    (dict(noise_shape=[5, 20]), ValueError, r"noise must have shape \(rows=6, V=20\)"),
    (dict(noise_stride=10), ValueError, r"noise rows must not overlap"),
    (dict(logits_shape=[4, 3, 16385]), ValueError, r"V must be <= 16384 \(the row lives in shared memory\), got V=16385"),
    (dict(tokens=0), ValueError, r"tokens must be a non-null pointer"),
    ("misaligned", ValueError, r"tokens must be aligned to 8 bytes"),
    (dict(top_p_thr=1.5), ValueError, r"top_p_thr = fl32\(1 - top_p\) must be in \[0, 1\], got 1.5"),
])
def test_sampler_launcher_rejects_bad_arguments(ext, over, err, match):
    if over == "misaligned":
        kw, keep = _sample_kwargs()
        kw["tokens"] += 4
    else:
        kw, keep = _sample_kwargs(**over)
    with pytest.raises(err, match="sample_top_k_top_p: " + match):
        ext.sample_top_k_top_p(**kw)


def test_host_module_is_the_emulation(ext):
    assert ext.HOST_EMULATION is True and ext.MAX_SAMPLE_V == cuda_ext.MAX_SAMPLE_V and ext.MAX_STEP_C == 64
