"""Parity with the official VAR code: fastvar loads the golden random-weight models and reproduces
the official outputs on CPU in float32 (../shared/golden, format in its README)."""
import pytest
import torch

import golden
from tolerances import (GOLDEN_FHAT_ABS, GOLDEN_IMAGE_FP16_ABS, GOLDEN_LOGITS_REL, assert_rel)

FILES = golden.FILES
SETTINGS = ("cfg1.5_k900_p0.96", "cfg4_k0_p0", "cfg1.5_k900_p0.96_smooth")


@pytest.fixture(params=FILES)
def gold(request):
    return request.param, golden.load(request.param)


def test_state_dict_keys_both_ways(gold):
    name, g = gold
    vae, var = golden.models(name)
    for model, official in ((var, g["var_state_dict"]), (vae, g["vae_state_dict"])):
        ours = model.state_dict()
        assert set(ours) == set(official)
        assert all(tuple(ours[k].shape) == tuple(official[k].shape) for k in ours)
        # fastvar -> official: a fresh model of the same class loads fastvar's own state dict strictly
        model.load_state_dict(ours, strict=True)


def test_teacher_forcing_logits(gold):
    name, g = gold
    vae, var = golden.models(name)
    tf = g["teacher_forcing"]
    with torch.no_grad():
        logits = var(tf["label_B"], tf["x_BLCv_wo_first_l"])
    assert logits.dtype == torch.float32 and logits.shape == (2, var.L, var.V)
    assert_rel(logits[:, tf["logit_rows"]], tf["logits_BLV_rows"], GOLDEN_LOGITS_REL, f"{name} logits")


def test_encode_indices_and_fhat(gold):
    name, g = gold
    vae, _ = golden.models(name)
    with torch.no_grad():
        idx = vae.quantize.f_to_idxBl_or_fhat(g["f"], to_fhat=False)
        fhat = vae.quantize.f_to_idxBl_or_fhat(g["f"], to_fhat=True)
        img_idx = vae.img_to_idxBl(g["image_fp16"].float())
    assert len(idx) == len(g["idx_list"]) == len(img_idx)
    for si, (a, b, c) in enumerate(zip(idx, g["idx_list"], img_idx)):
        assert torch.equal(a, b), f"{name}: idx_list differs at scale {si}"
    for si, (a, b) in enumerate(zip(img_idx, g["img_to_idxBl"])):
        assert torch.equal(a, b), f"{name}: img_to_idxBl differs at scale {si}"
    for si, (a, b) in enumerate(zip(fhat, g["fhat_list"])):
        err = (a - b).abs().max().item()
        assert err <= GOLDEN_FHAT_ABS, f"{name}: f_hat after scale {si} off by {err:.3g}"


def test_teacher_forcing_input(gold):
    name, g = gold
    vae, _ = golden.models(name)
    with torch.no_grad():
        x = vae.quantize.idxBl_to_var_input(g["idx_list"])
    err = (x - g["teacher_forcing"]["x_BLCv_wo_first_l"]).abs().max().item()
    assert err <= GOLDEN_FHAT_ABS, f"{name}: idxBl_to_var_input off by {err:.3g}"


def test_reconstruction(gold):
    name, g = gold
    vae, _ = golden.models(name)
    with torch.no_grad():
        rec = vae.fhat_to_img(g["fhat_list"][-1].clone())
    err = (rec - g["reconstruction_fp16"].float()).abs().max().item()
    assert err <= GOLDEN_IMAGE_FP16_ABS, f"{name}: reconstruction off by {err:.3g}"


@pytest.mark.parametrize("setting", SETTINGS)
def test_sampled_tokens_fhat_and_image(gold, setting):
    name, g = gold
    vae, var = golden.models(name)
    s = g["samples"][setting]
    images, tokens = var._infer(2, s["label_B"], s["g_seed"], **s["kwargs"])
    assert len(tokens) == len(s["tokens"])
    for si, (a, b) in enumerate(zip(tokens, s["tokens"])):
        assert torch.equal(a, b), f"{name} {setting}: sampled tokens differ at scale {si}"
    err = (var.last_f_hat - s["f_hat"]).abs().max().item()
    assert err <= GOLDEN_FHAT_ABS, f"{name} {setting}: final f_hat off by {err:.3g}"
    if setting == g["samples"]["image_fp16_of"]:
        err = (images - g["samples"]["image_fp16"].float()).abs().max().item()
        assert err <= GOLDEN_IMAGE_FP16_ABS, f"{name} {setting}: image off by {err:.3g}"
        # the public API returns the same image
        again = var.autoregressive_infer_cfg(2, s["label_B"], g_seed=s["g_seed"], **s["kwargs"])
        assert torch.equal(again, images)
