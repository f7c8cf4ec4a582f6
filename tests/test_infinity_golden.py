"""Parity with the official Infinity code: fastvar loads the golden random-weight models and reproduces the
official outputs on CPU in float32 (../shared/golden_infinity, format in its README).

The golden files are bit-exact only on x86-64 with AVX-512 (their README, "Exactness conditions"); elsewhere
values are compared with the tolerances of tests/tolerances.py, and sampled bits are compared exactly except
where a bit's decision margin lies within the logit difference between fastvar and the golden run ("fragile"
bits, see :func:`fragile_bits`): such a bit may flip on another CPU, and everything sampled after a flip
differs, so the free-running comparison stops at the first scale with a (fragile) flip.
"""
import copy
import math

import numpy as np
import pytest
import torch

import golden_infinity as golden
from fastvar import dynamic_resolution as schedules
from fastvar.reference import infinity as ref
from tolerances import (INF_FRAGILE_MAX, INF_GOLDEN_IMAGE_ABS, INF_GOLDEN_LATENT_ABS, INF_GOLDEN_LOGITS_REL,
                        INF_GOLDEN_RAW_REL, INF_GOLDEN_ROPE_ABS, INF_GPU_LOGITS_REL, assert_rel)

FILES = golden.FILES
SETTINGS = ("cfg3_tau0.5_k900_p0.97", "plain", "hiddencfg_ramp_p0.9")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The golden files were made with one thread (with two, the VAE convolutions round differently)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=FILES)
def gold(request):
    return request.param, golden.load(request.param)


def _abs(a, b):
    return (a.double() - b.double()).abs().max().item()


def _sample_kwargs(s):
    kw = s["kwargs"]
    return dict(cfg_list=kw["cfg_list"], tau_list=kw["tau_list"], top_k=kw["top_k"], top_p=kw["top_p"],
                cfg_insertion_layer=kw["cfg_insertion_layer"])


def _infer(model, vae, g, s, gt_leak=0, record=None):
    kw = _sample_kwargs(s)
    return model._infer(vae, g["config"]["scale_schedule"], golden.text_tuple(g), s["B"], None, s["g_seed"],
                        kw["cfg_list"], kw["tau_list"], kw["top_k"], kw["top_p"], kw["cfg_insertion_layer"],
                        vae.codebook_dim, False, 1000, gt_leak, s["bits"] if gt_leak else None, record)


def fragile_bits(ours: torch.Tensor, gold: torch.Tensor, noise: torch.Tensor, top_p: float) -> torch.Tensor:
    """``(rows,)`` bool: the bits whose draw may go either way given how far fastvar's logits ``ours`` are from
    the golden ``gold`` (both ``(B, n, 2)``, before filtering), for the Exp(1) ``noise`` ``(rows, 2)``.

    A bit is ``argmax_j (l_j - log E_j)`` unless top-p removes the less likely value (when ``|l_1 - l_0| >=
    log((1 - t) / t)``, ``t = fl32(1 - top_p)``). Both decisions depend on ``l_1 - l_0``, which fastvar's error
    moves by at most ``e = |dl_0| + |dl_1|``: a bit is fragile when a decision margin is within ``2e``
    (+1e-6 for the float32 softmax), robust otherwise, and robust bits must be equal."""
    o, gl = ours.reshape(-1, 2).double(), gold.reshape(-1, 2).double()
    slack = 2 * (o - gl).abs().sum(-1) + 1e-6
    d = gl[:, 1] - gl[:, 0]
    race = d - (noise[:, 1].double().log() - noise[:, 0].double().log())
    fragile = race.abs() <= slack
    if top_p > 0:
        t = float(np.float32(1 - top_p))
        cut = math.log((1 - t) / t)
        removed = d.abs() >= cut
        fragile = ((d.abs() - cut).abs() <= slack) | (~removed & fragile)
    return fragile


# ------------------------------------------------------------------------------------------ weights, RoPE
def test_state_dict_keys_both_ways(gold):
    name, g = gold
    vae, model = golden.models(name)
    for m, official in ((model, g["infinity_state_dict"]), (vae, g["vae_state_dict"])):
        ours = m.state_dict()
        assert set(ours) == set(official), set(ours) ^ set(official)
        assert all(tuple(ours[k].shape) == tuple(official[k].shape) for k in ours)
        assert all(torch.equal(ours[k], official[k].to(ours[k].dtype)) for k in ours)
        type(m).load_state_dict(m, ours, strict=True)          # fastvar -> fastvar, strictly


def test_schedule_and_rope_table(gold):
    name, g = gold
    cfg = g["config"]
    sched = schedules.check_schedule(cfg["scale_schedule"])
    assert sched == tuple(tuple(s) for s in cfg["scale_schedule"])
    assert schedules.scale_schedule(cfg["h_div_w"], cfg["pn"]) == sched
    assert schedules.vae_scale_schedule(sched, cfg["apply_spatial_patchify"]) == tuple(
        tuple(s) for s in cfg["vae_scale_schedule"])
    assert schedules.image_size(sched) == tuple(cfg["image_hw"])
    assert torch.equal(schedules.rope_positions(sched).int(), g["rope"]["positions"])
    _, model = golden.models(name)
    table = ref.rope2d_table(sched, model.head_dim)
    assert table.shape == g["rope"]["cos_sin"].shape
    assert _abs(table, g["rope"]["cos_sin"]) <= INF_GOLDEN_ROPE_ABS


# ------------------------------------------------------------------------------------------ VAE
def test_vae_quantizer_from_golden_features(gold):
    """The multi-scale BSQ encode of the official encoder output: bits exact, latents to float32 rounding."""
    name, g = gold
    vae, _ = golden.models(name)
    V = g["vae"]
    z, _, bits, _, _, var_inputs = vae.quantizer(V["raw_features"], scale_schedule=g["config"]["vae_scale_schedule"])
    assert len(bits) == len(V["bit_indices"])
    for si, (a, b) in enumerate(zip(bits, V["bit_indices"])):
        assert a.dtype == torch.int32 and torch.equal(a.to(torch.uint8), b), f"{name}: bits differ at scale {si}"
    assert _abs(z, V["z"]) <= INF_GOLDEN_LATENT_ABS
    assert max(_abs(a, b) for a, b in zip(var_inputs, V["var_inputs"])) <= INF_GOLDEN_LATENT_ABS


def _residuals(raw, vae_schedule):
    """The residual ``r`` (B, 1, h, w, d) of every scale, whose normalised signs are the BSQ bits."""
    x = raw.unsqueeze(2)
    full = tuple(x.shape[2:])
    residual, out = x, []
    for size in (tuple(s) for s in vae_schedule):
        r = ref.interpolate(residual, size, "area") if size != full else residual
        out.append(r.permute(0, 2, 3, 4, 1))
        q, _ = ref.bsq_quantize(r)
        if size != full:
            q = ref.interpolate(q, full, "trilinear").contiguous()
        residual = residual - q
    return out


def test_vae_encode_image(gold):
    """Image -> raw features (convolutions: tolerance) -> bits: equal wherever a residual component is not
    within the features' error of 0 (a flip there changes every later scale, so the check stops at the
    first one). A component of ``r / |r|`` moves by at most ``2 sqrt(d) err / |r|`` when ``r`` moves by ``err``
    per component (area averages do not grow it)."""
    name, g = gold
    vae, _ = golden.models(name)
    V, vs = g["vae"], g["config"]["vae_scale_schedule"]
    h, z, _, bits, _, _ = vae.encode(g["inputs"]["image_fp16"].float(), vs)
    assert_rel(h, V["raw_features"], INF_GOLDEN_RAW_REL, f"{name} raw features")
    err = _abs(h, V["raw_features"])
    rs = _residuals(h, vs)
    for si, (a, b) in enumerate(zip(bits, V["bit_indices"])):
        diff = a.to(torch.uint8) != b
        if diff.any():
            r = rs[si]
            norm = r.norm(dim=-1, keepdim=True).expand_as(r)
            bound = 2 * math.sqrt(r.shape[-1]) * err / norm + 1e-6
            assert ((r / norm).abs()[diff] <= bound[diff]).all(), (
                f"{name}: a bit of scale {si} differs whose residual is far from 0")
            return
    assert _abs(z, V["z"]) <= INF_GOLDEN_LATENT_ABS


def test_vae_decode(gold):
    name, g = gold
    vae, _ = golden.models(name)
    V, vs = g["vae"], g["config"]["vae_scale_schedule"]
    rec = vae.decode(V["z"])
    assert rec.shape == V["reconstruction"].shape and _abs(rec, V["reconstruction"]) <= INF_GOLDEN_IMAGE_ABS
    summed = ref.sum_codes(V["bit_indices"], vs)
    assert summed.stride() == V["decode_from_bits_summed_codes"].stride()          # channels-last, as officially
    assert _abs(summed, V["decode_from_bits_summed_codes"]) <= INF_GOLDEN_LATENT_ABS
    s = g["samples"][SETTINGS[0]]
    img = vae.decode(s["summed_codes"])        # the sampler's channels-last latent, decoded as the official call
    assert _abs(img, s["image_float"]) <= INF_GOLDEN_IMAGE_ABS
    u8 = ref.image_to_uint8_bgr(img)
    assert (u8.int() - s["image_uint8_bgr"].int()).abs().max() <= 1        # truncation: 1 level at most


# ------------------------------------------------------------------------------------------ teacher forcing
@pytest.mark.parametrize("case", ["clean", "bsc"])
def test_teacher_forcing_input_and_logits(gold, case):
    name, g = gold
    _, model = golden.models(name)
    cfg, tf = g["config"], g["teacher_forcing"][case]
    args = tf["bsc_args"]
    x, targets, _, _ = ref.bitwise_self_correction(
        g["vae"]["raw_features"], cfg["vae_scale_schedule"], bool(cfg["apply_spatial_patchify"]),
        args["noise_apply_layers"], args["noise_apply_strength"], bool(args["noise_apply_requant"]),
        flip_masks=tf.get("bsc_flip_masks"))
    assert _abs(x, tf["x_BLC_wo_prefix"]) <= INF_GOLDEN_LATENT_ABS
    for si, (a, b) in enumerate(zip(targets, tf["gt_bits"])):
        assert torch.equal(a.to(torch.uint8), b), f"{name} {case}: targets differ at scale {si}"
    with torch.no_grad():
        logits = model(golden.text_tuple(g), tf["x_BLC_wo_prefix"], scale_schedule=cfg["scale_schedule"])
    assert logits.dtype == torch.float32 and logits.shape == tf["logits"].shape
    assert_rel(logits, tf["logits"], INF_GOLDEN_LOGITS_REL, f"{name} {case} teacher-forced logits")


@pytest.mark.gpu
def test_teacher_forcing_on_gpu(gold):
    """fastvar's Infinity on CUDA in float32 (the Triton kernels) against the official teacher-forced logits."""
    name, g = gold
    _, model = golden.models(name)
    model = copy.deepcopy(model).cuda()
    tf = g["teacher_forcing"]["clean"]
    text = tuple(t.cuda() if isinstance(t, torch.Tensor) else t for t in golden.text_tuple(g))
    with torch.no_grad():
        logits = model(text, tf["x_BLC_wo_prefix"].cuda(), scale_schedule=g["config"]["scale_schedule"])
    assert_rel(logits.cpu(), tf["logits"], INF_GPU_LOGITS_REL, f"{name}: teacher-forced logits on CUDA")


def test_bitwise_self_correction_random_numbers(gold):
    """The flips drawn from the global NumPy and torch generators, in the official order (spec section 8)."""
    name, g = gold
    cfg, tf = g["config"], g["teacher_forcing"]["bsc"]
    args = tf["bsc_args"]
    np_state, torch_state = np.random.get_state(), torch.get_rng_state()
    try:
        np.random.seed(tf["np_seed"])
        torch.manual_seed(tf["torch_seed"])
        x, _, strengths, masks = ref.bitwise_self_correction(
            g["vae"]["raw_features"], cfg["vae_scale_schedule"], bool(cfg["apply_spatial_patchify"]),
            args["noise_apply_layers"], args["noise_apply_strength"], bool(args["noise_apply_requant"]))
    finally:
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
    assert strengths == tf["bsc_strengths"]
    assert all(torch.equal(a, b) for a, b in zip(masks, tf["bsc_flip_masks"]))
    assert _abs(x, tf["x_BLC_wo_prefix"]) <= INF_GOLDEN_LATENT_ABS


# ------------------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("setting", SETTINGS)
def test_bit_draw_from_golden_logits(gold, setting):
    """The draw alone, from the stored logits: one Exp(1) draw per scale from the seeded generator gives
    every official bit (the official order of random numbers, spec section 8)."""
    _, g = gold
    s = g["samples"][setting]
    gen = torch.Generator().manual_seed(s["g_seed"])
    for si, (logits, want) in enumerate(zip(s["logits"], s["sampled_bits"])):
        noise = ref.bit_noise(logits.shape[0] * logits.shape[1], gen)
        bits = ref.sample_bits_with_noise(logits.clone(), s["kwargs"]["top_k"], s["kwargs"]["top_p"], noise)
        assert torch.equal(bits.to(torch.uint8), want), f"{setting}: bits differ at scale {si}"


@pytest.mark.parametrize("setting", SETTINGS)
def test_sampling_replay_per_scale(gold, setting):
    """The sampler fed the official bits (``gt_leak`` = every scale), so that each scale sees the official
    history: condition, per-scale logits, robust sampled bits, next-scale inputs and the final latent."""
    name, g = gold
    vae, model = golden.models(name)
    s = g["samples"][setting]
    rec = {}
    _infer(model, vae, g, s, gt_leak=len(s["bits"]), record=rec)
    assert_rel(rec["cond_BD"], s["cond_BD"], INF_GOLDEN_LOGITS_REL, f"{name} {setting} cond_BD")
    n_fragile = n_bits = 0
    for si in range(len(s["logits"])):
        assert_rel(rec["logits"][si], s["logits"][si], INF_GOLDEN_LOGITS_REL, f"{name} {setting} logits {si}")
        fragile = fragile_bits(rec["logits"][si], s["logits"][si], rec["noise"][si], s["kwargs"]["top_p"])
        diff = (rec["sampled_bits"][si].to(torch.uint8) != s["sampled_bits"][si]).reshape(-1)
        assert not (diff & ~fragile).any(), f"{name} {setting}: a robust bit differs at scale {si}"
        n_fragile, n_bits = n_fragile + int(fragile.sum()), n_bits + fragile.numel()
    assert n_fragile <= INF_FRAGILE_MAX * n_bits, f"{n_fragile} of {n_bits} bits are fragile"
    for si, (a, b) in enumerate(zip(rec["word_embed_in"], s["word_embed_in"])):
        assert _abs(a, b) <= INF_GOLDEN_LATENT_ABS, f"{name} {setting}: next-scale input {si}"
    assert rec["summed_codes"].squeeze(2).stride() == s["summed_codes"].stride()
    assert _abs(rec["summed_codes"].squeeze(2), s["summed_codes"]) <= INF_GOLDEN_LATENT_ABS


@pytest.mark.parametrize("setting", SETTINGS)
def test_sampling_free_running(gold, setting):
    """The official loop from the seed alone: every sampled bit equal up to the first scale where a fragile
    bit flips (none on an AVX-512 CPU); without a flip, the final latent and the uint8 image of the official
    API (``autoregressive_infer_cfg(..., ret_img=True)``) equal the golden ones."""
    name, g = gold
    vae, model = golden.models(name)
    s = g["samples"][setting]
    rec = {}
    _infer(model, vae, g, s, record=rec)
    for si in range(len(s["sampled_bits"])):
        diff = (rec["sampled_bits"][si].to(torch.uint8) != s["sampled_bits"][si]).reshape(-1)
        if diff.any():
            fragile = fragile_bits(rec["logits"][si], s["logits"][si], rec["noise"][si], s["kwargs"]["top_p"])
            assert not (diff & ~fragile).any(), f"{name} {setting}: a robust bit differs at scale {si}"
            return
        assert torch.equal(rec["bits"][si].to(torch.uint8), s["bits"][si])
    ret, idx, img = model.autoregressive_infer_cfg(
        vae=vae, scale_schedule=g["config"]["scale_schedule"], label_B_or_BLT=golden.text_tuple(g), B=s["B"],
        g_seed=s["g_seed"], vae_type=vae.codebook_dim, ret_img=True, returns_vemb=1, inference_mode=True,
        **_sample_kwargs(s))
    assert ret == [] and idx == []
    assert _abs(model.last_summed_codes.squeeze(2), s["summed_codes"]) <= INF_GOLDEN_LATENT_ABS
    assert img.dtype == torch.uint8 and img.shape == s["image_uint8_bgr"].shape
    assert (img.int() - s["image_uint8_bgr"].int()).abs().max() <= 1
