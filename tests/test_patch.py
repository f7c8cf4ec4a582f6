"""fastvar.patch on an official-architecture model (tests/official_arch.py, checked against the golden
outputs first): swapped modules, same weights, golden logits and tokens afterwards."""
import pytest
import torch

import fastvar
import golden
import official_arch
from fastvar.nn import AdaLNSelfAttn, SelfAttention, VectorQuantizer2
from tolerances import GOLDEN_FHAT_ABS, GOLDEN_LOGITS_REL, assert_rel

NAME = "var_d2_256.pt"
SETTINGS = ("cfg1.5_k900_p0.96", "cfg1.5_k900_p0.96_smooth")


def official_model():
    g = golden.load(NAME)
    conv_vae, _ = golden.models(NAME)
    return g, official_arch.from_golden(g, conv_vae)


def check_golden(g, var, what, settings=SETTINGS):
    tf = g["teacher_forcing"]
    with torch.no_grad():
        logits = var(tf["label_B"], tf["x_BLCv_wo_first_l"])
    assert_rel(logits[:, tf["logit_rows"]], tf["logits_BLV_rows"], GOLDEN_LOGITS_REL, f"{what}: logits")
    for setting in settings:
        s = g["samples"][setting]
        var.autoregressive_infer_cfg(2, s["label_B"], g_seed=s["g_seed"], **s["kwargs"])
        for si, (a, b) in enumerate(zip(var.sampled, s["tokens"])):
            assert torch.equal(a, b), f"{what} {setting}: tokens differ at scale {si}"
        assert (var.f_hat - s["f_hat"]).abs().max() <= GOLDEN_FHAT_ABS, f"{what} {setting}: f_hat"


def test_the_test_double_reproduces_the_official_outputs():
    g, var = official_model()
    check_golden(g, var, "official-architecture double")


def test_patch_swaps_modules_keeps_weights_and_reproduces_golden():
    g, var = official_model()
    params_before = {n: p for n, p in var.named_parameters()}
    quant_before = var.vae_quant_proxy[0]
    emb_before = quant_before.embedding.weight
    out = fastvar.patch(var)
    assert out is var
    assert all(isinstance(b, AdaLNSelfAttn) and isinstance(b.attn, SelfAttention) for b in var.blocks)
    assert isinstance(var.vae_quant_proxy[0], VectorQuantizer2) and var.vae_quant_proxy[0] is var.vae_proxy[0].quantize
    assert var.vae_quant_proxy[0].embedding.weight is emb_before
    after = dict(var.named_parameters())
    assert after.keys() == params_before.keys()
    assert all(after[n] is params_before[n] for n in after), "patch must keep the same Parameter objects"
    assert all(b.attn.cache_capacity == var.L for b in var.blocks)
    check_golden(g, var, "patched")


def test_patching_twice_is_harmless():
    g, var = official_model()
    fastvar.patch(var)
    blocks = list(var.blocks)
    fastvar.patch(var)
    assert all(a is b for a, b in zip(blocks, var.blocks))
    check_golden(g, var, "patched twice")


def test_patch_keeps_training_mode_and_gradients():
    _, var = official_model()
    var.train()
    fastvar.patch(var)
    assert all(m.training for m in var.blocks.modules())
    logits = var(torch.tensor([1, 2]), torch.randn(2, var.L - 1, var.Cvae))
    logits.square().mean().backward()
    assert var.blocks[0].attn.mat_qkv.weight.grad is not None
    assert var.blocks[1].attn.scale_mul_1H11.grad is not None


def test_patch_rejects_what_it_does_not_recognise():
    with pytest.raises(ValueError, match="holds no official VAR/VQVAE or Infinity module that fastvar recognises"):
        fastvar.patch(torch.nn.Sequential(torch.nn.Linear(3, 3)))
    with pytest.raises(TypeError, match="expects a torch.nn.Module"):
        fastvar.patch("var_d16.pth")
    _, var = official_model()
    with pytest.raises(ValueError, match="pass the model that contains the SelfAttention"):
        fastvar.patch(var.blocks[0].attn)


def test_patched_attention_checks_the_official_mask():
    _, var = official_model()
    fastvar.patch(var)
    bad = var.attn_bias_for_masking.clone()
    bad[..., 0, 1] = 0.0      # the first token may now see the second scale: not block-causal
    x = torch.randn(1, var.L, var.C)
    with pytest.raises(ValueError, match="not a block-causal multi-scale mask"):
        var.blocks[0].attn(x, attn_bias=bad)


def test_patch_keeps_frozen_parameters_frozen():
    _, var = official_model()
    var.requires_grad_(False)
    var.vae_proxy[0].requires_grad_(False)                    # the official VQVAE is frozen (test_mode)
    var.blocks[1].ffn.fc1.weight.requires_grad_(True)          # one trainable tensor among frozen ones
    fastvar.patch(var)
    trainable = [n for n, p in var.named_parameters() if p.requires_grad]
    assert trainable == ["blocks.1.ffn.fc1.weight"]
    assert not any(p.requires_grad for p in var.vae_quant_proxy[0].parameters())


@pytest.mark.slow
def test_patched_model_under_autocast():
    """The official demo runs both APIs under torch.autocast (here CPU bf16). The images decode through a small
    VQVAE decoder: the golden one's bf16 CPU convolutions (ATen's, not fastvar's) took 60 s of this test's 72."""
    g, var = official_model()
    kw = g["build_kwargs"]
    var.vae_proxy[0].conv_vae = fastvar.models.VQVAE(vocab_size=kw["V"], z_channels=kw["Cvae"], ch=32, test_mode=True,
                                                     v_patch_nums=tuple(kw["patch_nums"]), ch_mult=(1, 2))
    fastvar.patch(var)
    tf = g["teacher_forcing"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = var(tf["label_B"], tf["x_BLCv_wo_first_l"])
        images = var.autoregressive_infer_cfg(2, tf["label_B"], g_seed=0, top_k=50, more_smooth=True)
    assert torch.isfinite(logits).all() and torch.isfinite(images).all()


def test_the_mask_is_verified_once_per_buffer_not_per_forward(monkeypatch):
    """The official forward hands a fresh slice of the same mask buffer to every call."""
    from fastvar import ops
    from fastvar.nn import attention as fnn
    _, var = official_model()
    fastvar.patch(var)
    calls = []
    real = ops.scale_lens_from_bias
    monkeypatch.setattr(fnn.ops, "scale_lens_from_bias", lambda bias: calls.append(1) or real(bias))
    fnn._verified_masks.clear()
    with torch.no_grad():
        for _ in range(3):
            var(torch.tensor([1, 2]), torch.randn(2, var.L - 1, var.Cvae))
    assert len(calls) == 1


def test_a_mask_in_the_memory_of_a_checked_one_is_checked_again():
    """Same address, shape, strides and version as a mask checked before, different values: the
    cache must not answer for it (a freed mask's memory is reused by the next tensor of its size)."""
    import numpy as np
    from fastvar.nn.attention import schedule_of_mask
    from fastvar.reference import block_causal_bias
    memory = block_causal_bias([1, 4, 9], "cpu").numpy().copy()
    good = torch.from_numpy(memory)
    assert schedule_of_mask(good) == (1, 4, 9)
    del good                                     # the checked tensor is gone; its memory is not
    memory[0, 1] = 0.0                           # written behind torch's back: no version bump
    bad = torch.from_numpy(memory)               # same address, shape, strides, dtype and version 0
    with pytest.raises(ValueError, match="not a block-causal multi-scale mask"):
        schedule_of_mask(bad)
    assert np.shares_memory(bad.numpy(), memory)


@pytest.mark.interpreter
def test_patched_model_on_the_triton_kernels_reproduces_golden(backend):
    """The patched official model's forward and autoregressive_infer_cfg on the Triton kernels (interpreter;
    one sampling setting, ~70 s on 2 CPU cores: the smooth one's soft codes are covered in test_upsample)."""
    backend("triton")
    g, var = official_model()
    fastvar.patch(var)
    check_golden(g, var, "patched, Triton", SETTINGS[:1])


def test_patch_with_shared_adaln_reproduces_golden_logits():
    """The shared-AdaLN branch of patch (``shared_ada_lin`` + ``ada_gss``), on the 512-px golden file."""
    name = "var_d2_512_saln.pt"
    g = golden.load(name)
    conv_vae, _ = golden.models(name)
    var = official_arch.from_golden(g, conv_vae)
    fastvar.patch(var)
    assert all(isinstance(b, AdaLNSelfAttn) and b.shared_aln for b in var.blocks)
    tf = g["teacher_forcing"]
    with torch.no_grad():
        logits = var(tf["label_B"], tf["x_BLCv_wo_first_l"])
    assert_rel(logits[:, tf["logit_rows"]], tf["logits_BLV_rows"], GOLDEN_LOGITS_REL, "patched saln: logits")


def test_patch_warns_about_attention_dropout():
    """Dropout inside attention is not in the kernels: said at patch time, and a training forward raises."""
    _, var = official_model()
    for b in var.blocks:
        b.attn.attn_drop = 0.1
    with pytest.warns(UserWarning, match=r"attention dropout \(attn_drop=0.1\) is not supported"):
        fastvar.patch(var)
    var.train()
    with pytest.raises(NotImplementedError, match="attn_drop > 0"):
        var.blocks[0].attn(torch.randn(1, var.L, var.C), attn_bias=var.attn_bias_for_masking)
