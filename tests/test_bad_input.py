"""Bad input gets a clear ValueError/TypeError naming the argument, the expected and the actual value."""
import math

import pytest
import torch

import fastvar
from builders import tiny_vae_var


@pytest.fixture(scope="module")
def pair():
    vae, var = tiny_vae_var()
    return vae, var


def test_no_class_id_and_negative_labels_are_valid(pair):
    _, var = pair
    uncond = var.autoregressive_infer_cfg(2, torch.tensor([10, 10]), g_seed=0)   # 10 = num_classes: no class
    assert torch.equal(var.autoregressive_infer_cfg(2, -1, g_seed=0), uncond)   # negative int -> no class
    assert torch.equal(var.autoregressive_infer_cfg(2, 10, g_seed=0), uncond)


@pytest.mark.parametrize("label,match", [
    (11, r"label_B must be a class id in \[0, 10\] or negative \(no class\), got 11"),
    (torch.tensor([1, 11]), r"label_B must be class ids in \[0, 10\].*got values in \[1, 11\]"),
    (torch.tensor([-1, 3]), r"label_B must be class ids in \[0, 10\].*got values in \[-1, 3\]"),
])
def test_label_out_of_range(pair, label, match):
    _, var = pair
    with pytest.raises(ValueError, match=match):
        var.autoregressive_infer_cfg(2, label, g_seed=0)


def test_label_type_and_batch(pair):
    _, var = pair
    with pytest.raises(ValueError, match=r"label_B must hold B=3 labels, got 2"):
        var.autoregressive_infer_cfg(3, torch.tensor([1, 2]))
    with pytest.raises(TypeError, match=r"label_B must be a 1-D integer tensor"):
        var.autoregressive_infer_cfg(2, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"B must be a positive int"):
        var.autoregressive_infer_cfg(0, 1)
    with pytest.raises(ValueError, match=r"label_B must hold B=2 labels, got 3"):
        var(torch.tensor([1, 2, 3]), torch.randn(2, var.L - 1, 8))
    with pytest.raises(ValueError, match=r"label_B must be class ids in \[0, 10\]"):
        var(torch.tensor([1, 12]), torch.randn(2, var.L - 1, 8))


def test_teacher_forcing_input_shape(pair):
    _, var = pair
    with pytest.raises(ValueError, match=r"x_BLCv_wo_first_l must have shape \(B, L - first_l = 20, Cvae = 8\), got \(2, 19, 8\)"):
        var(torch.tensor([1, 2]), torch.randn(2, 19, 8))


@pytest.mark.parametrize("kw,match", [
    (dict(top_k=-1), r"top_k must be >= 0"),
    (dict(top_k=65), r"top_k must be <= the vocabulary size V=64, got 65"),
    (dict(top_p=1.5), r"top_p must be in \[0.0, 1.0\], got 1.5"),
    (dict(top_p=-0.1), r"top_p must be in \[0.0, 1.0\], got -0.1"),
    (dict(cfg=math.nan), r"cfg must be finite, got nan"),
    (dict(cfg=math.inf), r"cfg must be finite"),
])
def test_sampling_settings(pair, kw, match):
    _, var = pair
    with pytest.raises(ValueError, match=match):
        var.autoregressive_infer_cfg(2, 1, g_seed=0, **kw)


def test_schedule_last_scale_must_match_latent(pair):
    vae, _ = pair
    f = torch.randn(2, 8, 4, 4)
    with pytest.raises(ValueError, match=r"last scale of the schedule \(3, 3\) must equal the latent size \(H, W\) = \(4, 4\)"):
        vae.quantize.f_to_idxBl_or_fhat(f, to_fhat=False, v_patch_nums=(1, 2, 3))
    with pytest.raises(ValueError, match=r"f_BChw must be a \(B, Cvae=8, H, W\) tensor, got \(2, 7, 4, 4\)"):
        vae.quantize.f_to_idxBl_or_fhat(torch.randn(2, 7, 4, 4), to_fhat=False)
    with pytest.raises(ValueError, match=r"v_patch_nums\[1\] must be an int or an \(h, w\) pair"):
        vae.quantize.f_to_idxBl_or_fhat(f, to_fhat=False, v_patch_nums=(1, (2, 3, 4), 4))


def test_schedule_must_match_between_models(pair):
    vae, _ = pair
    with pytest.raises(ValueError, match=r"patch_nums \(1, 2, 3, 4\) must equal the VQVAE's schedule v_patch_nums \(1, 2, 4\)"):
        fastvar.VAR(vae, depth=1, embed_dim=64, num_heads=1, patch_nums=(1, 2, 3, 4))


@pytest.mark.parametrize("shape,match", [
    ((2, 1, 16, 16), r"inp_img_no_grad must have shape \(B, 3, H, W\), got \(2, 1, 16, 16\)"),
    ((2, 3, 32, 32), r"inp_img_no_grad must be 16x16 pixels .* got 32x32"),
    ((3, 16, 16), r"inp_img_no_grad must have shape \(B, 3, H, W\)"),
])
def test_image_size_and_channels(pair, shape, match):
    vae, _ = pair
    with pytest.raises(ValueError, match=match):
        vae.img_to_idxBl(torch.rand(*shape))


def test_index_lists(pair):
    vae, _ = pair
    good = [torch.zeros(2, n, dtype=torch.long) for n in (1, 4, 16)]
    assert vae.quantize.idxBl_to_var_input(good).shape == (2, 20, 8)
    with pytest.raises(ValueError, match=r"a list of 3 index tensors"):
        vae.quantize.idxBl_to_var_input(good[:2])
    with pytest.raises(ValueError, match=r"gt_ms_idx_Bl\[1\] must hold codebook indices in \[0, 64\) \(V=64\), got values in \[64, 64\]"):
        vae.quantize.idxBl_to_var_input([good[0], torch.full((2, 4), 64), good[2]])
    with pytest.raises(ValueError, match=r"gt_ms_idx_Bl\[2\] must have shape \(B=2, 16\), got \(2, 15\)"):
        vae.quantize.idxBl_to_var_input([good[0], good[1], torch.zeros(2, 15, dtype=torch.long)])


def test_sample_op_rejects_nan_and_dead_rows():
    logits = torch.randn(3, 50)
    logits[1, 7] = math.nan
    with pytest.raises(ValueError, match="logits hold NaN"):
        fastvar.ops.sample_top_k_top_p(logits)
    logits = torch.randn(3, 50)
    logits[2] = -math.inf
    with pytest.raises(ValueError, match="entirely -inf"):
        fastvar.ops.sample_top_k_top_p(logits)
