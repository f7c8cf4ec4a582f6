"""fastvar's VAR / VQVAE: the official construction rules, state-dict names, released sizes."""
import pytest
import torch

import fastvar
from builders import tiny_vae_var
import golden
from fastvar.schedule import PATCH_NUMS_256, PATCH_NUMS_512

# Parameter counts of the released VAR checkpoints (VAR paper / model zoo): d16 310M, d20 600M,
# d24 1.0B, d30 2.0B; d36 (512 px, shared AdaLN) 2.3B. fastvar counts 310.3M, 600.9M, 1033M, 2010M, 2354M.
RELEASED = [(16, False, PATCH_NUMS_256, 310e6), (20, False, PATCH_NUMS_256, 600e6),
            (24, False, PATCH_NUMS_256, 1.0e9), (30, False, PATCH_NUMS_256, 2.0e9),
            (36, True, PATCH_NUMS_512, 2.3e9)]


@pytest.mark.parametrize("depth,shared_aln,patch_nums,params", RELEASED)
def test_released_sizes_follow_the_official_rules(depth, shared_aln, patch_nums, params):
    vae, var = fastvar.build_vae_var("meta", depth=depth, shared_aln=shared_aln, patch_nums=patch_nums)
    assert var.C == 64 * depth and var.num_heads == depth and var.depth == depth
    assert var.blocks[0].attn.head_dim == 64
    assert var.blocks[0].ffn.fc1.out_features == 4 * var.C
    assert var.drop_path_rate == pytest.approx(0.1 * depth / 24)
    assert var.L == sum(p * p for p in patch_nums)
    n = sum(p.numel() for p in var.parameters())
    assert abs(n - params) / params < 0.035, f"d{depth}: {n / 1e6:.1f}M parameters"   # published counts are rounded
    assert sum(p.numel() for p in vae.parameters()) == pytest.approx(108.9e6, rel=0.01)   # vae_ch160v4096z32
    keys = set(var.state_dict())
    assert ("shared_ada_lin.1.weight" in keys) == shared_aln
    assert ("blocks.0.ada_gss" in keys) == shared_aln and ("blocks.0.ada_lin.1.weight" in keys) != shared_aln


def test_released_size_builds_on_cpu_with_finite_random_weights():
    vae, var = fastvar.build_vae_var("cpu", depth=16, fast_init=True)
    assert all(torch.isfinite(p).all() for p in var.parameters())
    assert var.blocks[3].attn.mat_qkv.weight.std().item() == pytest.approx((1 / var.C / 3) ** 0.5, rel=0.05)
    assert torch.equal(var.lvl_1L[0, -256:], torch.full((256,), 9))
    with torch.no_grad():
        logits = var(torch.tensor([1, 999]), torch.randn(2, var.L - 1, 32))
    assert logits.shape == (2, 680, 4096) and torch.isfinite(logits).all()


def test_official_init_scales():
    vae, var = fastvar.build_vae_var("cpu", depth=2, ch=32, init_adaln=0.5, init_adaln_gamma=1e-5)
    C = var.C
    ada = var.blocks[0].ada_lin[1].weight
    assert ada[:2 * C].abs().max() < 1e-3 * ada[2 * C:].abs().max()   # gammas start tiny
    assert torch.equal(var.head.bias, torch.zeros_like(var.head.bias))
    assert torch.allclose(var.blocks[1].attn.scale_mul_1H11, torch.full((1, 2, 1, 1), 4.0).log())


@pytest.mark.parametrize("name", golden.FILES)
def test_fresh_model_key_set_equals_official(name):
    """fastvar -> official: a model built from build_kwargs has exactly the official keys and shapes."""
    g = golden.load(name)
    kw = dict(g["build_kwargs"])
    vae, var = fastvar.build_vae_var("cpu", **kw)
    for model, official in ((var, g["var_state_dict"]), (vae, g["vae_state_dict"])):
        ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert ours == {k: tuple(v.shape) for k, v in official.items()}
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in official.items()})


def test_vae_small_layout_keyword_extras():
    vae = fastvar.VQVAE(vocab_size=64, z_channels=8, ch=16, v_patch_nums=(1, 2, 4), ch_mult=(1, 2, 2),
                        num_res_blocks=1, norm_groups=8)
    assert vae.downsample == 4 and vae.image_hw == (16, 16)
    with torch.no_grad():
        idx = vae.img_to_idxBl(torch.rand(3, 3, 16, 16) * 2 - 1)
        rec = vae.idxBl_to_img(idx, same_shape=True, last_one=True)
    assert [tuple(i.shape) for i in idx] == [(3, 1), (3, 4), (3, 16)]
    assert rec.shape == (3, 3, 16, 16) and rec.abs().max() <= 1


def test_non_square_schedule_model_samples():
    vae = fastvar.VQVAE(vocab_size=32, z_channels=4, ch=8, v_patch_nums=((1, 1), (2, 3), (3, 5)), ch_mult=(1, 1),
                        num_res_blocks=1, norm_groups=4)
    var = fastvar.VAR(vae, num_classes=5, depth=2, embed_dim=32, num_heads=2, patch_nums=((1, 1), (2, 3), (3, 5)),
                      attn_l2_norm=True)
    var.init_weights(init_std=-1)
    assert var.L == 1 + 6 + 15 and var.patch_nums == (1, (2, 3), (3, 5))
    images = var.autoregressive_infer_cfg(2, 3, g_seed=1, top_k=5)
    assert images.shape == (2, 3, 6, 10) and (0 <= images).all() and (images <= 1).all()
    again = var.autoregressive_infer_cfg(2, 3, g_seed=1, top_k=5)
    assert torch.equal(images, again)


def test_training_step_has_gradients_everywhere():
    vae, var = fastvar.build_vae_var("cpu", depth=2, ch=32, patch_nums=(1, 2, 4), V=64, Cvae=8,
                                     vae_kwargs=dict(ch_mult=(1, 2, 2)))
    var.train()
    logits = var(torch.tensor([1, 2, 3]), torch.randn(3, var.L - 1, 8))
    logits.logsumexp(-1).mean().backward()
    missing = [n for n, p in var.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"


def test_labels_none_int_negative_and_tensor_behave_as_official():
    vae, var = tiny_vae_var()
    B, seed = 3, 11
    # None: B labels drawn first from the seeded generator, uniform over the classes, with replacement
    _, tokens_none = var._infer(B, None, g_seed=seed, top_k=10)
    g = torch.Generator().manual_seed(seed)
    labels = torch.multinomial(torch.full((1, 10), 0.1), num_samples=B, replacement=True, generator=g).reshape(B)
    _, tokens_replayed = var._infer(B, labels, top_k=10, generator=g)
    assert all(torch.equal(a, b) for a, b in zip(tokens_none, tokens_replayed))
    # an int: every image of that class; a negative int: the no-class id 10
    for as_int, as_tensor in ((4, [4, 4, 4]), (-3, [10, 10, 10])):
        _, a = var._infer(B, as_int, g_seed=seed)
        _, b = var._infer(B, torch.tensor(as_tensor), g_seed=seed)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    # different seeds give different samples
    _, same = var._infer(B, 4, g_seed=seed)
    _, other = var._infer(B, 4, g_seed=seed + 1)
    assert any(not torch.equal(x, y) for x, y in zip(same, other))


@pytest.mark.interpreter
def test_training_step_on_triton_kernels_matches_eager(monkeypatch):
    """Teacher forcing through the modules on the Triton attention kernels (interpreter): the eager
    logits and parameter gradients."""
    from tolerances import REL, assert_rel
    vae, var = tiny_vae_var((1, 2, (2, 3), 4), var_kwargs=dict(embed_dim=64, num_heads=2))
    with torch.no_grad():
        for b in var.blocks:
            b.ada_lin[1].weight.normal_(0, 0.05)
    var.cond_drop_rate = 0.0
    labels, x = torch.tensor([1, 2, 3]), torch.randn(3, var.L - 1, 8)
    out = {}
    for backend in ("eager", "triton"):
        monkeypatch.setenv("FASTVAR_BACKEND", backend)
        var.zero_grad()
        torch.manual_seed(0)    # training mode: the same DropPath draws (drop_path_rate > 0) for both backends
        logits = var(labels, x)
        logits.logsumexp(-1).mean().backward()
        out[backend] = logits.detach(), {n: p.grad.clone() for n, p in var.named_parameters()}
    assert_rel(out["triton"][0], out["eager"][0], REL[torch.float32], "logits")
    for n, g in out["eager"][1].items():
        assert_rel(out["triton"][1][n], g, REL[torch.float32], f"grad of {n}")


def test_inference_mode_evaluation_then_training():
    """Validation under torch.inference_mode inside a training loop, and a model loaded under it."""
    with torch.inference_mode():
        vae, var = tiny_vae_var()
        var(torch.tensor([1, 2]), torch.randn(2, var.L - 1, 8))
    vae, var = tiny_vae_var()
    with torch.inference_mode():
        var(torch.tensor([1, 2]), torch.randn(2, var.L - 1, 8))
    var.train()
    var(torch.tensor([1, 2]), torch.randn(2, var.L - 1, 8)).square().mean().backward()
    assert var.blocks[0].attn.mat_qkv.weight.grad is not None
