"""NaN or inf never becomes a black picture: weights are checked at load (the tensor named), decoded images at
sampling (an error, nothing written)."""
import copy
import math
import os

import pytest
import torch

import fastvar
from builders import tiny_vae_var
from fastvar.cli import main
from fastvar.models import load_infinity
from fastvar.pretrained import DIGITS_PATH, load_digits
from fastvar.sampler import Sampler
from fastvar.utils.files import check_finite_tensors
from fastvar.utils.images import save_png
from test_infinity_checkpoints import write_sharded
from test_infinity_models import SCHED, _sample, text, tiny_pair


@pytest.fixture(scope="module")
def pair():
    return tiny_vae_var((1, 2, 4))


@pytest.mark.parametrize("which,key,value", [
    ("var", "blocks.1.attn.proj.weight", math.nan),
    ("var", "head.bias", math.inf),
    ("vae", "decoder.conv_out.weight", -math.inf),
    ("vae", "quantize.embedding.weight", math.nan),
])
def test_checkpoint_with_nan_or_inf_is_refused_naming_the_tensor(tmp_path, pair, which, key, value):
    vae, var = pair
    sds = {"var": dict(var.state_dict()), "vae": dict(vae.state_dict())}
    sds[which][key] = sds[which][key].clone()
    sds[which][key].view(-1)[3] = value
    for name, sd in sds.items():
        torch.save(sd, tmp_path / f"{name}.pth")
    what = "VAR" if which == "var" else "VQVAE"
    with pytest.raises(ValueError, match=rf"{what} checkpoint .*{which}\.pth: tensor '{key}' .* holds "
                                         rf"{1 if math.isnan(value) else 0} NaN and {0 if math.isnan(value) else 1} "
                                         rf"infinite values"):
        fastvar.load_vae_var(tmp_path / "var.pth", tmp_path / "vae.pth")


def test_the_official_mask_may_hold_minus_inf(tmp_path, pair):
    vae, var = pair
    torch.save(var.state_dict(), tmp_path / "var.pth")
    torch.save(vae.state_dict(), tmp_path / "vae.pth")
    assert torch.isneginf(var.state_dict()["attn_bias_for_masking"]).any()
    fastvar.load_vae_var(tmp_path / "var.pth", tmp_path / "vae.pth")


@pytest.fixture(scope="module")
def infinity_pair():
    return tiny_pair()


@pytest.mark.parametrize("which,key,value,dtype,sharded", [
    ("infinity", "text_proj_for_ca.2.weight", math.nan, None, False),
    ("infinity", "head.bias", math.inf, torch.bfloat16, False),
    ("infinity", "block_chunks.1.module.0.ffn.fc2.weight", -math.inf, None, True),
    ("vae", "decoder.conv_in.conv.weight", math.inf, None, False),
], ids=["nan", "inf-bf16", "-inf-sharded", "vae-inf"])
def test_infinity_checkpoint_with_nan_or_inf_is_refused_naming_the_tensor(tmp_path, infinity_pair, which, key,
                                                                          value, dtype, sharded):
    vae, model = infinity_pair
    sds = {"infinity": dict(model.state_dict()), "vae": dict(vae.state_dict())}
    sds[which][key] = sds[which][key].clone()
    sds[which][key].view(-1)[3] = value
    inf_path = tmp_path / "infinity.pth"
    if sharded:
        inf_path = tmp_path / "infinity"
        write_sharded(inf_path, sds["infinity"])
    else:
        torch.save(sds["infinity"], inf_path)
    torch.save({"vae": sds["vae"]}, tmp_path / "vae.pth")
    what = "Infinity" if which == "infinity" else "BSQ VAE"
    path = "infinity" if sharded else f"{which}.pth"
    with pytest.raises(ValueError, match=rf"{what} checkpoint .*{path}: tensor '{key}' .* holds "
                                         rf"{1 if math.isnan(value) else 0} NaN and {0 if math.isnan(value) else 1} "
                                         rf"infinite values"):
        load_infinity(inf_path, tmp_path / "vae.pth", dtype=dtype)


def test_infinity_official_api_raises_on_non_finite_images(infinity_pair):
    """An inf decoder weight: ``autoregressive_infer_cfg(ret_img=True)`` raises, as the Sampler does, where the
    uint8 cast would give an all-black image."""
    vae, model = infinity_pair
    vae, model = copy.deepcopy(vae), copy.deepcopy(model)
    with torch.no_grad():
        vae.decoder.conv_in.conv.weight.view(-1)[0] = math.inf
    t = text([3])
    _, _, img = _sample(model, vae, t, B=1, ret_img=False)
    assert img == [] and torch.isfinite(model.last_summed_codes).all()      # sampling alone is fine
    with pytest.raises(ValueError, match="the decoded images hold NaN or inf .*from a finite latent"):
        _sample(model, vae, t, B=1, ret_img=True)
    with pytest.raises(ValueError, match="the decoded images hold NaN or inf"):
        Sampler(model, vae, dtype=torch.float32).sample(t, 3, scale_schedule=SCHED)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.complex64])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_check_finite_tensors_finds_one_bad_value_in_any_dtype(dtype, value):
    t = torch.randn(7, 5).to(dtype)
    check_finite_tensors({"w": t, "empty": torch.empty(0, 3, dtype=dtype), "scalar": torch.tensor(2.0).to(dtype),
                          "ids": torch.arange(4)}, "x")
    t.view(-1)[17] = value
    with pytest.raises(ValueError, match=rf"x: tensor 'w' \(7, 5\) holds {int(math.isnan(value))} NaN and "
                                         rf"{int(not math.isnan(value))} infinite values \(of 35\)"):
        check_finite_tensors({"ok": torch.ones(3), "w": t}, "x")
    if value == -math.inf and not dtype.is_complex:     # the official mask's -inf is allowed
        check_finite_tensors({"attn_bias_for_masking": t}, "x")


def test_digits_file_with_nan_is_refused(tmp_path):
    obj = torch.load(DIGITS_PATH, weights_only=True)
    key = next(k for k, v in obj["vae"].items() if v.is_floating_point() and k.startswith("decoder"))
    obj["vae"][key] = obj["vae"][key].clone().fill_(math.nan)
    torch.save(obj, tmp_path / "digits.pt")
    with pytest.raises(ValueError, match=rf"digits weights .*\(vae\): tensor '{key}'"):
        load_digits(path=tmp_path / "digits.pt")


def _overflowing_pair():
    """Finite weights whose decode overflows float32: the images come out NaN."""
    vae, var = tiny_vae_var((1, 2, 4))
    with torch.no_grad():
        vae.post_quant_conv.weight.mul_(1e38)
    return vae, var


def test_sampling_raises_on_non_finite_images():
    vae, var = _overflowing_pair()
    with pytest.raises(ValueError, match="the decoded images hold NaN or inf"):
        Sampler(var, vae, dtype=torch.float32).sample([1, 2], seed=0, top_k=5)
    with pytest.raises(ValueError, match="the decoded images hold NaN or inf"):
        var.autoregressive_infer_cfg(2, 1, g_seed=0, top_k=5)
    steps = list(Sampler(var, vae, dtype=torch.float32).stream([1], seed=0, top_k=5))
    assert torch.isfinite(steps[-1].f_hat).all()
    with pytest.raises(ValueError, match="from a finite latent"):
        steps[-1].preview()


def test_cli_writes_nothing_for_non_finite_images(tmp_path, capsys):
    vae, var = _overflowing_pair()
    torch.save(var.state_dict(), tmp_path / "var.pth")
    torch.save(vae.state_dict(), tmp_path / "vae.pth")
    out = tmp_path / "grid.png"
    assert main(["sample", "--var-ckpt", str(tmp_path / "var.pth"), "--vae-ckpt", str(tmp_path / "vae.pth"),
                 "--labels", "1", "--top-k", "5", "--stream", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "NaN or inf" in err
    assert sorted(os.listdir(tmp_path)) == ["vae.pth", "var.pth"]


def test_png_writer_refuses_nan(tmp_path):
    image = torch.rand(3, 4, 4)
    image[1, 2, 2] = math.nan
    with pytest.raises(ValueError, match="image holds NaN or inf"):
        save_png(image, str(tmp_path / "x.png"))
    assert not list(tmp_path.iterdir())
