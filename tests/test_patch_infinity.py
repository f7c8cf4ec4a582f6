"""fastvar.patch on an official-architecture Infinity (tests/official_infinity_arch.py, itself checked against the
golden files here): the official model's own teacher-forced forward and sampling loop, run on fastvar's modules,
reproduce the official outputs; every official module is swapped keeping its tensors; look-alikes are left alone.

Sampled bits are compared as in test_infinity_golden: robust bits exactly, "fragile" ones (a decision margin within
the logit error) may flip; the free-running comparison stops at the first flip.
"""
import copy
import warnings

import pytest
import torch

import fastvar
import golden_infinity as golden
import official_infinity_arch as official
from fastvar.nn import attention as fnn
from fastvar.nn import infinity as finf
from fastvar.reference import infinity as ref
from test_infinity_golden import fragile_bits, one_thread  # noqa: F401  (one_thread: an autouse fixture)
from tolerances import (INF_FRAGILE_MAX, INF_GOLDEN_LATENT_ABS, INF_GOLDEN_LOGITS_REL, INF_GPU_LOGITS_REL,
                        assert_rel)

SETTINGS = ("cfg3_tau0.5_k900_p0.97", "plain", "hiddencfg_ramp_p0.9")


def _double(name):
    g = golden.load(name)
    vae = copy.deepcopy(golden.models(name)[0])          # its own copy: tests move it to other devices
    return g, vae, official.from_golden(g, vae)


def _patched(name):
    g, vae, model = _double(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # every official module is recognised: no "left as it is"
        fastvar.patch(model)
    return g, vae, model


def _on(device, x):
    if isinstance(x, (tuple, list)):
        return type(x)(_on(device, t) for t in x)
    return x.to(device) if isinstance(x, torch.Tensor) else x


def _sample(model, vae, g, s, gt_leak=0, ret_img=False):
    kw, device = s["kwargs"], model.pos_start.device
    return model.autoregressive_infer_cfg(
        vae=vae, scale_schedule=g["config"]["scale_schedule"], label_B_or_BLT=_on(device, golden.text_tuple(g)),
        B=s["B"], g_seed=s["g_seed"], cfg_list=kw["cfg_list"], tau_list=kw["tau_list"], top_k=kw["top_k"],
        top_p=kw["top_p"], cfg_insertion_layer=kw["cfg_insertion_layer"], vae_type=1, ret_img=ret_img,
        gt_leak=gt_leak, gt_ls_Bl=_on(device, s["bits"]) if gt_leak else None, inference_mode=True)


def _noises(s):
    """The Exp(1) draws the official multinomial makes, one per scale, from the seeded generator (spec section 8)."""
    gen = torch.Generator().manual_seed(s["g_seed"])
    return [ref.bit_noise(lo.shape[0] * lo.shape[1], gen) for lo in s["logits"]]


def _check_replay(model, vae, g, s, what, rel=INF_GOLDEN_LOGITS_REL):
    """Fed the official bits (gt_leak = every scale): per-scale logits within ``rel``, robust bits equal (on CPU:
    a GPU generator draws another stream from the same seed)."""
    _sample(model, vae, g, s, gt_leak=len(s["bits"]))
    rec, n_fragile, n_bits = model.recorded, 0, 0
    for si in range(len(s["logits"])):
        assert_rel(rec["logits"][si].cpu(), s["logits"][si], rel, f"{what}: logits of scale {si}")
    if model.pos_start.device.type != "cpu":
        return
    for si, noise in enumerate(_noises(s)):
        fragile = fragile_bits(rec["logits"][si], s["logits"][si], noise, s["kwargs"]["top_p"])
        diff = (rec["sampled_bits"][si].to(torch.uint8) != s["sampled_bits"][si]).reshape(-1)
        assert not (diff & ~fragile).any(), f"{what}: a robust bit differs at scale {si}"
        n_fragile, n_bits = n_fragile + int(fragile.sum()), n_bits + fragile.numel()
    assert n_fragile <= INF_FRAGILE_MAX * n_bits, f"{what}: {n_fragile} of {n_bits} bits are fragile"


@pytest.fixture(scope="module", params=golden.FILES)
def name(request):
    golden.golden_dir()          # skips with a message when ../shared/golden_infinity is absent
    return request.param


# ------------------------------------------------------------------------------------------ the test double
def test_double_is_the_official_model(name):
    """The stand-in reproduces the official teacher-forced logits and every scale of one sampling setting."""
    g, vae, model = _double(name)
    tf = g["teacher_forcing"]["clean"]
    with torch.no_grad():
        logits = model(golden.text_tuple(g), tf["x_BLC_wo_prefix"], g["config"]["scale_schedule"])
    assert_rel(logits, tf["logits"], INF_GOLDEN_LOGITS_REL, f"{name}: the double's teacher-forced logits")
    _check_replay(model, vae, g, g["samples"][SETTINGS[0]], f"{name}: the double")


# ------------------------------------------------------------------------------------------ patching
def test_patch_swaps_every_official_module_keeping_its_tensors(name):
    g, vae, model = _double(name)
    before = dict(model.named_parameters())
    buffers = {k: v for k, v in model.named_buffers()}
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    fastvar.patch(model)
    assert dict(model.named_parameters()) == before            # the same Parameter objects, by identity
    assert all(model.get_buffer(k) is v for k, v in buffers.items())
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items()) and set(model.state_dict()) == set(sd)
    blocks = [b for chunk in model.block_chunks for b in chunk.module]
    assert all(type(b) is finf.CrossAttnBlock for b in blocks)
    assert all(type(b.sa) is finf.SelfAttention and type(b.ca) is finf.CrossAttention and type(b.ffn) is fnn.FFN
               for b in blocks)
    assert type(model.text_proj_for_sos.ca) is finf.CrossAttention and model.text_proj_for_sos.ca.for_attn_pool
    assert type(model.head_nm) is fnn.AdaLNBeforeHead
    assert all(a is b for a, b in zip(model.unregistered_blocks, blocks))     # the sampler's list follows
    n = len(model.fastvar_patched)
    fastvar.patch(model)                                       # twice is harmless
    assert len(model.fastvar_patched) == 0 and len(blocks) * 4 + 2 == n


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
def test_patched_teacher_forcing(name, device):
    g, _, model = _patched(name)
    model.to(device)
    for case in ("clean", "bsc"):
        tf = g["teacher_forcing"][case]
        with torch.no_grad():
            logits = model(_on(device, golden.text_tuple(g)), tf["x_BLC_wo_prefix"].to(device),
                           g["config"]["scale_schedule"])
        assert_rel(logits.cpu(), tf["logits"], INF_GOLDEN_LOGITS_REL if device == "cpu" else INF_GPU_LOGITS_REL,
                   f"{name} {case} on {device}: patched teacher-forced logits")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("setting", SETTINGS)
def test_patched_sampling_replay(name, setting, device):
    """The official KV-cached loop on fastvar's blocks (caches switched on through ``unregistered_blocks``, RoPE
    rows from the official dict of tables, moved to the device once), each scale fed the official history."""
    g, vae, model = _patched(name)
    model.to(device), vae.to(device)
    _check_replay(model, vae, g, g["samples"][setting], f"{name} {setting} on {device}: patched",
                  INF_GOLDEN_LOGITS_REL if device == "cpu" else INF_GPU_LOGITS_REL)
    assert all(b.sa.kv_cache is None for b in model.unregistered_blocks)       # caches released after the run
    if device != "cpu":          # the official dict's table of this schedule, moved once and kept on the device
        assert model.rope2d_freqs_grid[str(tuple(g["config"]["scale_schedule"]))].device.type == device


def test_patched_sampling_free_running(name):
    """From the seed alone: bits equal up to the first fragile flip; without one, the latent and the uint8 image."""
    g, vae, model = _patched(name)
    s = g["samples"]["plain"]
    _, _, img = _sample(model, vae, g, s, ret_img=True)
    rec = model.recorded
    for si, noise in enumerate(_noises(s)):
        diff = (rec["sampled_bits"][si].to(torch.uint8) != s["sampled_bits"][si]).reshape(-1)
        if diff.any():
            fragile = fragile_bits(rec["logits"][si], s["logits"][si], noise, s["kwargs"]["top_p"])
            assert not (diff & ~fragile).any(), f"{name}: a robust bit differs at scale {si}"
            return
    assert (model.summed_codes.squeeze(2) - s["summed_codes"]).abs().max() <= INF_GOLDEN_LATENT_ABS
    assert (img.int() - s["image_uint8_bgr"].int()).abs().max() <= 1


# ------------------------------------------------------------------------------------------ look-alikes
class NoRopeSelfAttention(official.SelfAttention):
    """Named like the official class, but the rotation is skipped: the probe's output differs."""

    def forward(self, x, attn_bias_or_two_vector, attn_fn=None, scale_schedule=None, rope2d_freqs_grid=None,
                scale_ind=0):
        return super().forward(x, attn_bias_or_two_vector, attn_fn, scale_schedule, None, scale_ind)


NoRopeSelfAttention.__name__ = NoRopeSelfAttention.__qualname__ = "SelfAttention"


def test_look_alikes_are_left_alone():
    g, vae, model = _double(golden.FILES[0])
    blk = model.block_chunks[0].module[0]
    old = blk.sa
    mine = NoRopeSelfAttention(old.mat_qkv.in_features, old.num_heads)
    mine.load_state_dict(old.state_dict())
    blk.sa = mine
    blk2 = model.block_chunks[1].module[0]
    blk2.fused_norm_func = None                      # the official non-fused block (no scale index for RoPE)
    blk2.ln_wo_grad.eps = blk2.norm_eps
    with pytest.warns(UserWarning) as record:
        fastvar.patch(model)
    messages = [str(w.message) for w in record]
    assert any("block_chunks.0.module.0.sa" in m and "computes something else than the official SelfAttention" in m
               for m in messages), messages
    assert any("block_chunks.1.module.0 " in m and "non-fused block" in m for m in messages), messages
    assert type(blk.sa) is NoRopeSelfAttention                       # left alone: its block cannot be swapped
    assert type(model.block_chunks[0].module[0]) is official.CrossAttnBlock
    assert type(model.block_chunks[1].module[0]) is official.CrossAttnBlock
    assert type(model.block_chunks[1].module[0].sa) is finf.SelfAttention     # its children still are
    assert not hasattr(model, "fastvar_proxy")           # not fully patched: the Sampler cannot take it
    flash = official.SelfAttention(256, 2, customized_flash_attn=True)
    holder = torch.nn.Sequential(flash)
    with pytest.warns(UserWarning, match="customized flash-attention kernel"):
        with pytest.raises(ValueError, match="nothing was patched"):
            fastvar.patch(holder)


def test_rope_rows_and_attention_call_errors():
    table = torch.zeros(2, 5, 4)
    with pytest.raises(ValueError, match=r"rope2d_freqs_grid has no table for scale_schedule \(\(1, 1, 1\),\)"):
        finf.rope_rows({"((1, 2, 2),)": table[:, None, None, None]}, [(1, 1, 1)], 0, 1, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"rows \[1, 6\) of a \(2, L, c/2\) table are needed, got \(2, 5, 4\)"):
        finf.rope_rows(table, [(1, 1, 1), (1, 2, 2), (1, 3, 3)], 1, 5, torch.device("cpu"))
    with pytest.raises(ValueError, match="scale_schedule is required"):
        finf.rope_rows(table, None, 1, 4, torch.device("cpu"))
    sa = finf.SelfAttention(embed_dim=256, num_heads=2)
    with pytest.raises(NotImplementedError, match="build the official model with use_flex_attn=False"):
        sa(torch.zeros(1, 5, 256), None, attn_fn=lambda *a, **k: None)       # the official flex teacher forcing
    sa.kv_caching(True)
    with pytest.raises(ValueError, match="with kv_caching\\(True\\), pass scale_schedule"):
        sa(torch.zeros(1, 1, 256), None)


def test_sampler_on_a_patched_official_model(name):
    """``fastvar.Sampler`` takes the patched official model (through its ``fastvar_proxy``, made of the model's own
    modules): the same bits and latent as on fastvar's Infinity with the same weights; a later ``.to()`` of the
    official model (new buffer objects) is seen by the proxy."""
    g, vae, model = _patched(name)
    _, ours = golden.models(name)
    view = model.fastvar_proxy[0]
    assert "fastvar_proxy" not in "".join(model.state_dict()) and view.pos_start is model.pos_start
    assert view.block_chunks is model.block_chunks and view.unregistered_blocks is model.unregistered_blocks
    s = g["samples"]["cfg3_tau0.5_k900_p0.97"]
    kw = dict(scale_schedule=g["config"]["scale_schedule"], cfg=s["kwargs"]["cfg_list"][0],
              tau=s["kwargs"]["tau_list"][0], top_k=s["kwargs"]["top_k"], top_p=s["kwargs"]["top_p"])
    want_bits, want_latent = fastvar.Sampler(ours, vae, dtype=torch.float32).tokens(golden.text_tuple(g), 5, **kw)
    model.to(torch.float64).to(torch.float32)                # every parameter's data and every buffer replaced
    bits, latent = fastvar.Sampler(model, vae, dtype=torch.float32).tokens(golden.text_tuple(g), 5, **kw)
    assert all(torch.equal(a, b) for a, b in zip(bits, want_bits)) and torch.equal(latent, want_latent)
