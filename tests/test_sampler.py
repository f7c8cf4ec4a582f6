"""fastvar.Sampler: exact official tokens, streaming, reproducibility, patched official models, bad input."""
import pytest
import torch

import fastvar
from builders import tiny_vae_var
import golden
import official_arch
from fastvar.sampler import Sampler
from tolerances import GOLDEN_FHAT_ABS, GOLDEN_IMAGE_FP16_ABS

SETTINGS = ("cfg1.5_k900_p0.96", "cfg4_k0_p0", "cfg1.5_k900_p0.96_smooth")


@pytest.fixture(scope="module")
def small():
    vae, var = tiny_vae_var((1, 2, (2, 3), 4))
    return vae, var


@pytest.mark.parametrize("name", golden.FILES)
@pytest.mark.parametrize("setting", SETTINGS)
def test_exact_mode_reproduces_golden_tokens(name, setting):
    g = golden.load(name)
    vae, var = golden.models(name)
    s = g["samples"][setting]
    sampler = Sampler(var, dtype=torch.float32)
    tokens, f_hat = sampler.tokens(s["label_B"], seed=s["g_seed"], **s["kwargs"])
    for si, (a, b) in enumerate(zip(tokens, s["tokens"])):
        assert torch.equal(a, b), f"{name} {setting}: tokens differ at scale {si}"
    assert (f_hat - s["f_hat"]).abs().max() <= GOLDEN_FHAT_ABS


def test_stream_yields_every_scale_in_order_and_ends_with_the_sample(small):
    vae, var = small
    sampler = Sampler(var, dtype=torch.float32)
    steps = list(sampler.stream([3, 1, 4], seed=7, top_k=10, top_p=0.9))
    assert [s.index for s in steps] == list(range(4)) and steps[-1].is_last
    assert [s.hw for s in steps] == [(1, 1), (2, 2), (2, 3), (4, 4)]
    assert [tuple(s.tokens.shape) for s in steps] == [(3, 1), (3, 4), (3, 6), (3, 16)]
    assert all(s.f_hat.shape == (3, 8, 4, 4) for s in steps)
    assert not torch.equal(steps[0].f_hat, steps[-1].f_hat), "each scale's f_hat is a snapshot"
    previews = [s.preview() for s in steps]
    assert all(p.shape == (3, 3, 16, 16) and p.min() >= 0 and p.max() <= 1 for p in previews)
    images = sampler.sample([3, 1, 4], seed=7, top_k=10, top_p=0.9)
    assert torch.equal(images, previews[-1])


def test_same_seed_same_images_other_seed_other_images(small):
    vae, var = small
    sampler = Sampler(var, dtype=torch.float32)
    a = sampler.sample(torch.tensor([2, 2]), seed=1, top_k=0, top_p=0.0)
    b = sampler.sample(torch.tensor([2, 2]), seed=1, top_k=0, top_p=0.0)
    c = sampler.sample(torch.tensor([2, 2]), seed=2, top_k=0, top_p=0.0)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the model's own API runs on the sampler: same tokens for the same seed
    tokens, _ = sampler.tokens(torch.tensor([2, 2]), seed=1, top_k=0, top_p=0.0)
    _, model_tokens = var._infer(2, torch.tensor([2, 2]), g_seed=1, top_k=0, top_p=0.0)
    assert all(torch.equal(x, y) for x, y in zip(tokens, model_tokens))


def test_image_seeds_give_the_same_tokens_and_latent_in_any_batch_and_thread_count():
    """``image_seeds`` (``fastvar generate``): an image's tokens and latent are bit for bit the same whatever the
    batch it is sampled in (of at least two images) and the number of CPU threads; its decoded pixels may move by
    one uint8 level, because PyTorch's CPU convolutions pick their algorithm by batch size and thread count (a
    64-px VQVAE with ch=64 is large enough for that: 5e-6 on a [0, 1] pixel measured)."""
    from fastvar.utils.images import to_uint8
    torch.manual_seed(0)
    vae, var = fastvar.build_vae_var("cpu", depth=4, ch=64, V=512, Cvae=8, patch_nums=(1, 2, 3, (4, 5), 8),
                                     num_classes=10, vae_kwargs=dict(ch_mult=(1, 1, 2, 2)), fast_init=True)
    sampler = Sampler(var, vae, dtype=torch.float32)
    labels, seeds = [1, 5, 9, 2, 7], [11, 12, 13, 14, 15]
    threads = torch.get_num_threads()
    runs = []
    try:
        for n_threads, (lo, hi) in [(1, (0, 5)), (1, (1, 3)), (3, (0, 5)), (3, (2, 5))]:
            torch.set_num_threads(n_threads)
            steps = list(sampler.stream(labels[lo:hi], image_seeds=seeds[lo:hi], cfg=1.5, top_k=100, top_p=0.9))
            runs.append(((lo, hi), [s.tokens for s in steps], steps[-1].f_hat, to_uint8(steps[-1].preview())))
    finally:
        torch.set_num_threads(threads)
    _, ref_tokens, ref_latent, ref_pixels = runs[0]
    for (lo, hi), tokens, latent, pixels in runs[1:]:
        assert all(torch.equal(a, b[lo:hi]) for a, b in zip(tokens, ref_tokens)), (lo, hi)
        assert torch.equal(latent, ref_latent[lo:hi]), (lo, hi)
        assert (pixels.int() - ref_pixels[lo:hi].int()).abs().max() <= 1, (lo, hi)
    assert len({t.tobytes() for t in ref_pixels.numpy()}) == 5, "every image has its own random numbers"


def test_bfloat16_sampler_logits_stay_close_to_float32(small):
    """bf16 compute (float32 residual stream): the first scale's logits within bf16 error of float32."""
    from tolerances import REL, assert_rel
    vae, var = small
    with torch.no_grad():
        for b in var.blocks:     # gammas away from their tiny init, so every block matters
            b.ada_lin[1].weight.normal_(0, 0.05)
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = Sampler(var, dtype=dtype).model
        buf = model.buffers(3)
        model.condition(buf, torch.tensor([1, 2, 3]))
        logits[dtype] = model.logits(buf, 0)
        assert buf.x_in[0].dtype == torch.float32 and buf.caches[0].k.dtype == dtype
    assert logits[torch.bfloat16].dtype == torch.float32
    assert_rel(logits[torch.bfloat16], logits[torch.float32], REL[torch.bfloat16], "bf16 vs fp32 logits")
    images = Sampler(var, dtype=torch.bfloat16).sample([1, 2, 3], seed=0, top_k=10)
    assert images.shape == (3, 3, 16, 16) and torch.isfinite(images).all()


def test_patched_official_model_samples_golden_tokens():
    name = "var_d2_256.pt"
    g = golden.load(name)
    conv_vae, _ = golden.models(name)
    var = fastvar.patch(official_arch.from_golden(g, conv_vae))
    s = g["samples"]["cfg1.5_k900_p0.96"]
    sampler = Sampler(var, vae=var.vae_proxy[0], dtype=torch.float32)
    tokens, f_hat = sampler.tokens(s["label_B"], seed=s["g_seed"], **s["kwargs"])
    assert all(torch.equal(a, b) for a, b in zip(tokens, s["tokens"]))
    images = sampler.decode(f_hat)
    assert (images - g["samples"]["image_fp16"].float()).abs().max() <= GOLDEN_IMAGE_FP16_ABS


def test_memory_report_and_free(small):
    vae, var = small
    sampler = Sampler(var, dtype=torch.float32)
    assert sampler.memory()["weights"] < 4096 * 4      # float32 model: the sampler holds no weight copies
    sampler.sample([1], seed=0, top_k=5)
    held = sampler.memory()["buffers"]
    L, C = var.L, var.C
    assert held >= 2 * var.depth * (2 * 1 * L * C * 4)  # the K and V caches of every block, CFG-doubled batch
    sampler.free()
    assert sampler.memory()["buffers"] == 0
    bf16 = Sampler(var, dtype=torch.bfloat16)
    assert bf16.memory()["weights"] > 0


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(labels=[11], top_k=5), ValueError, r"labels must be class ids in \[0, 10\]"),
    (dict(labels=None, B=0, top_k=5), ValueError, r"B must be a positive int"),
    (dict(labels=[1], top_k=65), ValueError, r"top_k must be <= the vocabulary size V=64, got 65"),
    (dict(labels=[1], top_k=5, top_p=-1), ValueError, r"top_p must be in \[0.0, 1.0\]"),
    (dict(labels=[1], top_k=5, cfg=float("nan")), ValueError, r"cfg must be finite"),
    (dict(labels=[1, 2], B=3, top_k=5), ValueError, r"labels must hold B=3 labels, got 2"),
])
@pytest.mark.parametrize("method", ["sample", "stream"])
def test_bad_input(small, kwargs, error, match, method):
    """``stream`` checks at the call, not at the first ``next()``."""
    vae, var = small
    sampler = Sampler(var, dtype=torch.float32)
    kwargs = dict(kwargs)
    labels = kwargs.pop("labels")
    with pytest.raises(error, match=match):
        getattr(sampler, method)(labels, **kwargs)


def test_no_class_id_is_a_valid_label(small):
    vae, var = small
    assert Sampler(var, dtype=torch.float32).sample([1, 10], seed=0, top_k=5).shape[0] == 2


def test_unsupported_dtype_on_device(small):
    vae, var = small
    with pytest.raises(ValueError, match=r"dtype must be one of \['torch.float32', 'torch.bfloat16'\] on cpu, got torch.float16"):
        Sampler(var, dtype=torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_give_the_same_tokens(dtype):
    vae, var = fastvar.build_vae_var("cuda", depth=4, V=4096, ch=32, fast_init=True)
    plain = Sampler(var, dtype=dtype, cuda_graphs=False)
    graphed = Sampler(var, dtype=dtype, cuda_graphs=True)
    for seed in (0, 1):     # the second call replays the captured graphs
        a, fa = plain.tokens(torch.tensor([1, 2, 3]), seed=seed)
        b, fb = graphed.tokens(torch.tensor([1, 2, 3]), seed=seed)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert torch.equal(fa, fb)
    assert graphed.memory()["graphs"] > 0          # bytes the captured graphs reserved
    graphed.free()
    assert graphed.memory()["graphs"] == 0


@pytest.mark.gpu
@pytest.mark.parametrize("change", ["EMA .data lerp_", "codebook replaced", "codebook in place"])
def test_cuda_graphs_follow_weight_changes(change):
    """The captured graphs read the held casts and the VQVAE's codebook and Phi: after an edit (a replaced VQVAE
    tensor included, which the graphs would otherwise read from freed memory) the replays equal a new sampler's."""
    vae, var = tiny_vae_var((1, 2, (2, 3), 4))
    with torch.no_grad():
        for b in var.blocks:
            b.ada_lin[1].weight.normal_(0, 0.05)
        var.head.weight.mul_(100)
    vae, var = vae.cuda(), var.cuda()
    graphed = Sampler(var, vae, dtype=torch.bfloat16, cuda_graphs=True)
    kw = dict(seed=5, top_k=0, top_p=0.0)
    before, _ = graphed.tokens([1, 2], **kw)
    graphed.tokens([1, 2], **kw)                    # replays
    _edit(var, vae, change)
    after, _ = graphed.tokens([1, 2], **kw)
    fresh, _ = Sampler(var, vae, dtype=torch.bfloat16, cuda_graphs=False).tokens([1, 2], **kw)
    assert all(torch.equal(a, b) for a, b in zip(after, fresh)), "the graphs replayed stale weights"
    assert not all(torch.equal(a, b) for a, b in zip(after, before)), "the change did not change the tokens"


@pytest.mark.parametrize("name", golden.FILES)
def test_official_loop_reference_reproduces_golden(name):
    """The benchmarks' eager baseline (the official loop, torch.cat KV cache) is the official algorithm."""
    from fastvar.reference.var_sampling import official_autoregressive_infer_cfg
    g = golden.load(name)
    _, var = golden.models(name)
    for setting in ("cfg1.5_k900_p0.96", "cfg1.5_k900_p0.96_smooth"):
        s = g["samples"][setting]
        images, tokens, f_hat = official_autoregressive_infer_cfg(var, 2, s["label_B"], s["g_seed"], **s["kwargs"],
                                                                  decode=False)
        assert all(torch.equal(a, b) for a, b in zip(tokens, s["tokens"])), setting
        assert (f_hat - s["f_hat"]).abs().max() <= GOLDEN_FHAT_ABS


def test_nan_logits_raise_a_clear_error():
    vae, var = tiny_vae_var(depth=1, V=32, num_classes=4)
    with torch.no_grad():
        var.head.bias[3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        Sampler(var, dtype=torch.float32).sample([1, 2], seed=0, top_k=5)


@pytest.mark.interpreter
def test_triton_kernels_in_the_sampler_give_the_eager_tokens(monkeypatch):
    """Every kernel of the sampling path (AdaLN, KV-cached attention, fused sampling, upsample-accumulate)
    composed by the Sampler, through the Triton interpreter: the eager tokens and f_hat."""
    vae, var = tiny_vae_var((1, 2, (2, 3), 4), var_kwargs=dict(embed_dim=64, num_heads=2))
    with torch.no_grad():   # gammas away from their tiny init, so every block matters
        for b in var.blocks:
            b.ada_lin[1].weight.normal_(0, 0.05)
    results = {}
    for backend, fused in (("eager", False), ("triton", False), ("triton", True)):
        monkeypatch.setenv("FASTVAR_BACKEND", backend)
        for smooth in (False, True):
            results[backend, fused, smooth] = Sampler(var, dtype=torch.float32, fused_step_conv=fused).tokens(
                [3, 1, 4], seed=5, top_k=20, top_p=0.9, more_smooth=smooth)
    from tolerances import REL, assert_rel
    with pytest.raises(AttributeError):     # fixed per Sampler: its CUDA graphs are captured with it
        Sampler(var, dtype=torch.float32).fused_step_conv = True
    for fused in (False, True):
        for smooth in (False, True):
            (te, fe), (tt, ft) = results["eager", False, smooth], results["triton", fused, smooth]
            what = f"more_smooth={smooth} fused_step_conv={fused}"
            assert all(torch.equal(a, b) for a, b in zip(te, tt)), f"{what}: tokens differ"
            if smooth or fused:   # a softmax and a matmul, or Phi's convolution, summed in another order
                assert_rel(ft, fe, REL[torch.float32], f"{what}: f_hat")
            else:        # the same codes through bit-compatible interpolation: the same f_hat
                assert torch.equal(ft, fe), f"{what}: f_hat differs"


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graphs", [False, True])
@pytest.mark.parametrize("fused_step_conv", [False, True])
def test_triton_sampler_gives_the_eager_tokens_on_cuda(monkeypatch, cuda_graphs, fused_step_conv):
    """The compiled kernels composed by the Sampler on a GPU (float32, TF32 off), with and without CUDA graphs:
    the eager path's tokens, and f_hat within float32 tolerance (cuDNN picks the conv algorithm per call)."""
    from tolerances import REL, assert_rel
    vae, var = tiny_vae_var((1, 2, (2, 3), 4), var_kwargs=dict(embed_dim=64, num_heads=2))
    with torch.no_grad():   # gammas away from their tiny init, so every block matters
        for b in var.blocks:
            b.ada_lin[1].weight.normal_(0, 0.05)
    vae, var = vae.cuda(), var.cuda()        # var.cuda() leaves the VQVAE (var.vae_proxy, not a submodule) on the CPU
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        results = {}
        for backend in ("eager", "triton"):
            monkeypatch.setenv("FASTVAR_BACKEND", backend)
            sampler = Sampler(var, dtype=torch.float32, cuda_graphs=cuda_graphs and backend == "triton",
                              fused_step_conv=fused_step_conv)
            for seed in (5, 6):     # with graphs, the second seed replays what the first captured
                results[backend, seed] = sampler.tokens([3, 1, 4], seed=seed, top_k=20, top_p=0.9)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev
    for seed in (5, 6):
        (te, fe), (tt, ft) = results["eager", seed], results["triton", seed]
        assert all(torch.equal(a, b) for a, b in zip(te, tt)), f"seed {seed}: tokens differ from the eager path"
        assert_rel(ft, fe, REL[torch.float32], f"seed {seed}: f_hat")


def test_interleaved_streams_do_not_share_buffers(small):
    vae, var = small
    sampler = Sampler(var, dtype=torch.float32)
    alone_a = sampler.tokens([1, 2], seed=3, top_k=10)
    alone_b = sampler.tokens([4, 5], seed=4, top_k=10)
    a, b = sampler.stream([1, 2], seed=3, top_k=10), sampler.stream([4, 5], seed=4, top_k=10)
    steps_a, steps_b = [], []
    for sa, sb in zip(a, b):         # both suspended mid-sample, scale after scale
        steps_a.append(sa)
        steps_b.append(sb)
    for (tokens, f_hat), steps in ((alone_a, steps_a), (alone_b, steps_b)):
        assert all(torch.equal(x, s.tokens) for x, s in zip(tokens, steps))
        assert torch.equal(f_hat, steps[-1].f_hat)


def test_sampler_inside_and_outside_inference_mode(small):
    vae, var = small
    sampler = Sampler(var, dtype=torch.float32)
    with torch.inference_mode():
        a = sampler.sample([1, 2], seed=0, top_k=10)
    b = sampler.sample([1, 2], seed=0, top_k=10)
    assert torch.equal(a, b)


def test_autoregressive_infer_cfg_under_autocast(small):
    """The official demo samples under torch.autocast: the model API computes in the autocast dtype."""
    vae, var = small
    with torch.autocast("cpu", dtype=torch.bfloat16):
        images = var.autoregressive_infer_cfg(2, 3, g_seed=0, top_k=10, more_smooth=True)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def test_label_forms(small):
    import numpy as np
    vae, var = small
    sampler = Sampler(var, dtype=torch.float32)
    one = sampler.tokens([7], seed=2, top_k=10)[0]
    for form in (7, torch.tensor(7), np.int64(7), torch.tensor([7])):
        assert all(torch.equal(a, b) for a, b in zip(sampler.tokens(form, seed=2, top_k=10)[0], one)), repr(form)
    with pytest.raises(TypeError, match="labels must be None, an int or a sequence of class ids .*got .seven. \\(str\\)"):
        sampler.sample("seven", top_k=10)
    with pytest.raises(TypeError, match="labels must be a 1-D integer tensor of class ids"):
        sampler.sample(torch.tensor([1.0]), top_k=10)


def _edit(var, vae, change):
    """Change the model the ways PyTorch users do; every one must change the tokens."""
    with torch.no_grad():
        if change == "in place":
            var.head.bias.add_(torch.randn_like(var.head.bias) * 5)
        elif change == "replaced":
            var.head.bias = torch.nn.Parameter(var.head.bias + torch.randn_like(var.head.bias) * 5)
        elif change == "load_state_dict":
            state = {k: v + torch.randn_like(v) * 5 if k == "head.bias" else v for k, v in var.state_dict().items()}
            var.load_state_dict(state)
        elif change == ".data copy_":          # no version counter moves
            var.head.bias.data.copy_(var.head.bias.data + torch.randn_like(var.head.bias) * 5)
        elif change == "EMA .data lerp_":      # every weight, a little (but enough to change the draw)
            for p in var.parameters():
                p.data.lerp_(torch.randn_like(p) * p.data.abs().mean() * 8, 0.5)
        elif change == "qkv bias .data":       # a tensor the sampler concatenates
            for b in var.blocks:
                b.attn.v_bias.data.add_(torch.randn_like(b.attn.v_bias) * 5)
        elif change == "codebook in place":    # the VQVAE: the step reads its codebook
            vae.quantize.embedding.weight.mul_(-1)
        elif change == "codebook replaced":
            vae.quantize.embedding.weight = torch.nn.Parameter(-vae.quantize.embedding.weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("change", ["in place", "replaced", "load_state_dict", ".data copy_", "EMA .data lerp_",
                                    "qkv bias .data", "codebook in place", "codebook replaced"])
def test_sampler_follows_weight_changes(dtype, change):
    """Weights cast once, but never stale: after the model changes, however it was changed, the next sample
    equals a new sampler's."""
    vae, var = tiny_vae_var((1, 2, (2, 3), 4))
    with torch.no_grad():
        for b in var.blocks:     # gammas and the head away from their tiny init, so that every weight matters
            b.ada_lin[1].weight.normal_(0, 0.05)
        var.head.weight.mul_(100)
    sampler = Sampler(var, dtype=dtype)
    kw = dict(seed=5, top_k=0, top_p=0.0)
    before, _ = sampler.tokens([1, 2], **kw)
    cast = sampler.model
    again, _ = sampler.tokens([1, 2], **kw)
    assert sampler.model is cast, "unchanged weights must not be cast again"
    _edit(var, vae, change)
    after, _ = sampler.tokens([1, 2], **kw)
    fresh, _ = Sampler(var, dtype=dtype).tokens([1, 2], **kw)
    assert all(torch.equal(a, b) for a, b in zip(before, again))
    assert all(torch.equal(a, b) for a, b in zip(after, fresh)), "the sampler used stale weights"
    assert not all(torch.equal(a, b) for a, b in zip(after, before)), "the change did not change the tokens"
    if change.endswith("replaced"):
        assert sampler.model is not cast, "a replaced tensor must rebuild the held weights (and drop graphs)"


def test_sampler_follows_edits_of_inference_tensors():
    """Weights made and edited in inference mode have no version counter: the default sync still sees them."""
    with torch.inference_mode():
        vae, var = tiny_vae_var((1, 2, 4))
    sampler = Sampler(var, dtype=torch.bfloat16)
    kw = dict(seed=3, top_k=0, top_p=0.0)
    before, _ = sampler.tokens([1, 2], **kw)
    with torch.inference_mode():
        var.head.bias.add_(torch.randn_like(var.head.bias) * 5)
    after, _ = sampler.tokens([1, 2], **kw)
    fresh, _ = Sampler(var, dtype=torch.bfloat16).tokens([1, 2], **kw)
    assert all(torch.equal(a, b) for a, b in zip(after, fresh)), "the sampler used stale weights"
    assert not all(torch.equal(a, b) for a, b in zip(after, before)), "the change did not change the tokens"


def test_sync_on_change_skips_the_copy_until_a_version_moves():
    """``sync_weights="on_change"``: no per-sample copy of the casts; an edit through torch is still seen."""
    vae, var = tiny_vae_var((1, 2, 4))
    sampler = Sampler(var, dtype=torch.bfloat16, sync_weights="on_change")
    kw = dict(seed=3, top_k=0, top_p=0.0)
    sampler.tokens([1, 2], **kw)
    head_w = sampler.model.head[0]
    head_w.zero_()                   # poison the held cast: without a sync it stays poisoned
    poisoned, _ = sampler.tokens([1, 2], **kw)
    assert not head_w.any(), "on_change copied the weights although nothing changed"
    with torch.no_grad():
        var.head.weight.mul_(1.0)    # an in-place edit: moves the version counter
    synced, _ = sampler.tokens([1, 2], **kw)
    fresh, _ = Sampler(var, dtype=torch.bfloat16).tokens([1, 2], **kw)
    assert head_w.any() and all(torch.equal(a, b) for a, b in zip(synced, fresh))
    with pytest.raises(ValueError, match="sync_weights must be 'every_sample' or 'on_change'"):
        Sampler(var, sync_weights="always")


def test_buffers_are_kept_for_the_most_recent_batch_sizes_only(small):
    vae, var = small
    sampler = Sampler(var, dtype=torch.float32, max_batch_sizes=2)
    for B in (1, 2, 3, 2):
        sampler.tokens([1] * B, seed=0, top_k=5)
    per = sampler.memory()["per_batch_size"]
    assert sorted(per) == [2, 3] and all(v > 0 for v in per.values())
    assert sampler.memory()["buffers"] == sum(per.values())
    with pytest.raises(ValueError, match="max_batch_sizes must be a positive int"):
        Sampler(var, max_batch_sizes=0)


def test_model_api_keeps_its_sampler_and_frees_the_caches(small):
    """``autoregressive_infer_cfg`` casts the weights once per compute dtype, not on every call, and frees its
    KV caches on return as the official method does."""
    vae, var = small
    a = var.autoregressive_infer_cfg(2, 3, g_seed=4, top_k=5)
    sampler = var._sampler
    b = var.autoregressive_infer_cfg(2, 3, g_seed=4, top_k=5)
    assert var._sampler is sampler and torch.equal(a, b)
    assert sampler.memory()["buffers"] == 0


def test_adaln_modulation_is_computed_once_per_sample(small, monkeypatch):
    """The condition never changes across scales: every block's AdaLN linear runs once per sample, not per scale."""
    vae, var = small
    sampler = Sampler(var, dtype=torch.float32)
    ada = {w.ada[0].data_ptr() for w in sampler.model.block_weights} | {sampler.model.head_ada[0].data_ptr()}
    calls = []
    real_linear = torch.nn.functional.linear

    def linear(x, weight, bias=None):
        calls.append(weight.data_ptr() in ada)
        return real_linear(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", linear)
    sampler.tokens([1, 2], seed=0, top_k=0, top_p=0.0)
    assert sum(calls) == len(var.blocks) + 1, f"{sum(calls)} AdaLN linears for {len(var.blocks)} blocks + head"
    assert len(calls) > 5 * len(var.schedule), "the transformer's linears were not seen (wrong hook?)"
