"""load_vae_var: checkpoint files in, models with everything inferred from the tensors out."""
import collections

import pytest
import torch

import fastvar
import golden
from tolerances import GOLDEN_LOGITS_REL, assert_rel


class Opaque:
    """Not loadable with weights_only=True: torch.load must refuse it."""


def _save(tmp_path, name, obj):
    path = tmp_path / name
    torch.save(obj, path)
    return str(path)


@pytest.fixture(scope="module")
def small_pair():
    return fastvar.build_vae_var("cpu", depth=3, ch=32, V=128, Cvae=8, patch_nums=(1, 2, 3, 4), shared_aln=True,
                                 vae_kwargs=dict(ch_mult=(1, 2, 2)))


@pytest.mark.parametrize("name", golden.FILES)
def test_load_golden_checkpoint_files(tmp_path, name):
    g = golden.load(name)
    var_ckpt = _save(tmp_path, "var.pth", g["var_state_dict"])
    vae_ckpt = _save(tmp_path, "vae.pth", g["vae_state_dict"])
    vae, var = fastvar.load_vae_var(var_ckpt, vae_ckpt)
    kw = g["build_kwargs"]
    assert var.depth == kw["depth"] and tuple(var.patch_nums) == tuple(kw["patch_nums"])
    assert (var.blocks[0].shared_aln, var.blocks[0].attn.attn_l2_norm) == (kw["shared_aln"], kw["attn_l2_norm"])
    assert var.V == kw["V"] and var.Cvae == kw["Cvae"] and var.num_classes == kw["num_classes"]
    assert not var.training and not vae.training
    var.cond_drop_rate = 0.0
    tf = g["teacher_forcing"]
    with torch.no_grad():
        logits = var(tf["label_B"], tf["x_BLCv_wo_first_l"])
    assert_rel(logits[:, tf["logit_rows"]], tf["logits_BLV_rows"], GOLDEN_LOGITS_REL, "logits after load_vae_var")


def test_roundtrip_of_a_saved_random_model(tmp_path, small_pair):
    vae, var = small_pair
    vae2, var2 = fastvar.load_vae_var(_save(tmp_path, "var.pth", var.state_dict()),
                                      _save(tmp_path, "vae.pth", vae.state_dict()))
    assert var2.patch_nums == (1, 2, 3, 4) and var2.depth == 3 and var2.blocks[0].shared_aln
    for a, b in ((var, var2), (vae, vae2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_load_casts_var_to_dtype_and_samples(tmp_path, small_pair):
    vae, var = small_pair
    vae2, var2 = fastvar.load_vae_var(_save(tmp_path, "var.pth", var.state_dict()),
                                      _save(tmp_path, "vae.pth", vae.state_dict()), dtype=torch.bfloat16)
    assert {p.dtype for p in var2.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in vae2.parameters()} == {torch.float32}
    images = var2.autoregressive_infer_cfg(2, 1, g_seed=0, top_k=20, top_p=0.9)
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32 and torch.isfinite(images).all()


def _corrupt(sd, kind):
    sd = collections.OrderedDict(sd)
    if kind == "missing":
        del sd["blocks.1.attn.proj.weight"]
    elif kind == "unexpected":
        sd["blocks.1.attn.extra"] = torch.zeros(3)
    elif kind == "shape":
        sd["blocks.1.ffn.fc1.weight"] = torch.zeros(7, sd["blocks.1.ffn.fc1.weight"].shape[1])
    return sd


@pytest.mark.parametrize("kind,needle", [("missing", "missing keys: blocks.1.attn.proj.weight"),
                                         ("unexpected", "unexpected keys: blocks.1.attn.extra"),
                                         ("shape", "wrong shapes: blocks.1.ffn.fc1.weight")])
def test_mismatched_var_checkpoint_says_which_keys(tmp_path, small_pair, kind, needle):
    vae, var = small_pair
    var_ckpt = _save(tmp_path, "var.pth", _corrupt(var.state_dict(), kind))
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        fastvar.load_vae_var(var_ckpt, _save(tmp_path, "vae.pth", vae.state_dict()))


def test_mismatched_vae_checkpoint_says_which_keys(tmp_path, small_pair):
    vae, var = small_pair
    sd = vae.state_dict()
    del sd["decoder.conv_out.bias"]
    with pytest.raises(ValueError, match=r"VQVAE state dict .*missing keys: decoder\.conv_out\.bias"):
        fastvar.load_vae_var(_save(tmp_path, "var.pth", var.state_dict()), _save(tmp_path, "vae.pth", sd))


def test_schedule_mismatch_between_var_and_vae(tmp_path, small_pair):
    vae, var = small_pair
    other_vae, _ = fastvar.build_vae_var("cpu", depth=1, ch=32, V=128, Cvae=8, patch_nums=(1, 2, 4),
                                         vae_kwargs=dict(ch_mult=(1, 2, 2)))
    with pytest.raises(ValueError, match="patch_nums"):
        fastvar.VAR(other_vae, depth=1, embed_dim=64, num_heads=1, patch_nums=(1, 2, 3, 4))


def test_bad_checkpoint_files(tmp_path, small_pair):
    vae, var = small_pair
    vae_ckpt = _save(tmp_path, "vae.pth", vae.state_dict())
    with pytest.raises(FileNotFoundError, match="VAR checkpoint not found"):
        fastvar.load_vae_var(str(tmp_path / "nope.pth"), vae_ckpt)
    with pytest.raises(ValueError, match="must hold a state dict"):
        fastvar.load_vae_var(_save(tmp_path, "list.pth", [1, 2, 3]), vae_ckpt)
    with pytest.raises(ValueError, match="weights_only=True"):
        fastvar.load_vae_var(_save(tmp_path, "obj.pth", {"w": Opaque()}), vae_ckpt)
    bad = var.state_dict()
    bad["lvl_1L"] = torch.zeros_like(bad["lvl_1L"])
    bad["lvl_1L"][0, -1] = 3     # a schedule whose scales are not squares
    with pytest.raises(ValueError, match="lvl_1L"):
        fastvar.load_vae_var(_save(tmp_path, "var.pth", bad), vae_ckpt)


def test_checkpoint_mask_is_verified(tmp_path, small_pair):
    vae, var = small_pair
    sd = var.state_dict()
    sd["attn_bias_for_masking"] = torch.zeros_like(sd["attn_bias_for_masking"])   # no mask at all
    with pytest.raises(ValueError, match="attn_bias_for_masking"):
        fastvar.load_vae_var(_save(tmp_path, "var.pth", sd), _save(tmp_path, "vae.pth", vae.state_dict()))


def test_non_square_schedule_needs_patch_nums(tmp_path):
    schedule = (1, (2, 3), (4, 6))
    vae, var = fastvar.build_vae_var("cpu", depth=1, ch=32, V=64, Cvae=8, patch_nums=schedule,
                                     vae_kwargs=dict(ch_mult=(1, 2, 2)))
    var_ckpt = _save(tmp_path, "var.pth", var.state_dict())
    vae_ckpt = _save(tmp_path, "vae.pth", vae.state_dict())
    with pytest.raises(ValueError, match=r"not all squares; pass the schedule as load_vae_var\(\.\.\., patch_nums="):
        fastvar.load_vae_var(var_ckpt, vae_ckpt)
    _, var2 = fastvar.load_vae_var(var_ckpt, vae_ckpt, patch_nums=schedule)
    assert var2.patch_nums == schedule
    with pytest.raises(ValueError, match=r"wrong shapes: .*pos_1LC"):     # 1 + 4 + 24 tokens, not 1 + 6 + 24
        fastvar.load_vae_var(var_ckpt, vae_ckpt, patch_nums=(1, 2, (4, 6)))


def test_training_checkpoint_with_a_state_dict_inside(tmp_path, small_pair):
    vae, var = small_pair
    ckpt = _save(tmp_path, "train.pth", {"state_dict": var.state_dict(), "epoch": 3})
    _, var2 = fastvar.load_vae_var(ckpt, _save(tmp_path, "vae.pth", vae.state_dict()))
    assert var2.depth == var.depth
