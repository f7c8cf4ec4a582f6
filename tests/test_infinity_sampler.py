"""fastvar.Sampler on Infinity: the official loop's bits, latent and image (and the golden ones, within the rules of
tests/test_infinity_golden.py), streaming previews, weight sync, runs per (batch size, schedule), per-image seeds,
negative prompts, bad input; CUDA-graph replay on a GPU."""
import pytest
import torch

import golden_infinity as golden
from fastvar import dynamic_resolution as S
from fastvar.sampler import Sampler
from fastvar.settings import InfinitySettings
from test_infinity_golden import SETTINGS, fragile_bits, one_thread  # noqa: F401 (one_thread: autouse, here too)
from test_infinity_models import text, tiny_pair
from tolerances import INF_GOLDEN_LATENT_ABS

SCHED = S.scale_schedule(1.0, "0.06M")                  # 7 scales up to 16 x 16
SCHED_WIDE = S.scale_schedule(0.5, "0.06M")             # 7 scales up to 11 x 22


@pytest.fixture(scope="module")
def pair():
    vae, model = tiny_pair()
    return vae, model


def _golden_kwargs(g, s):
    kw = s["kwargs"]
    return dict(scale_schedule=g["config"]["scale_schedule"], cfg=kw["cfg_list"], tau=kw["tau_list"], top_k=kw["top_k"],
                top_p=kw["top_p"], cfg_insertion_layer=kw["cfg_insertion_layer"])


def _official(model, vae, sched, t, B, seed, settings, negative=None, ret_img=True, record=None):
    """The eager official loop (``Infinity._infer``) with the Sampler's settings."""
    cfg_layers = ([0] if settings.on_logits else []) + [k - model.depth for k in settings.hidden_layers] or [1]
    return model._infer(vae, sched, t, B, negative, seed, list(settings.cfg), list(settings.tau), settings.top_k,
                        settings.top_p, cfg_layers, vae.codebook_dim, ret_img, 1000, 0, None, record)


def _u8(images01):
    """The Sampler's [0, 1] RGB images as the official uint8 BGR ``(B, H, W, 3)``."""
    return (images01.permute(0, 2, 3, 1) * 255).to(torch.uint8).flip(dims=(3,))


# ------------------------------------------------------------------------------------------ golden
@pytest.mark.parametrize("name", golden.FILES)
@pytest.mark.parametrize("setting", SETTINGS)
def test_sampler_gives_the_official_loop_and_the_golden_bits(name, setting):
    """Float32 on CPU: every scale's bits, the latent (with the official channels-last strides) and the uint8 image
    equal those of the official loop (``Infinity.autoregressive_infer_cfg``) bit for bit; against the golden run,
    bits are equal up to the first scale where a fragile bit flips (none on an AVX-512 CPU), and without a flip the
    latent and the image are the golden ones (the rules of tests/test_infinity_golden.py)."""
    g = golden.load(name)
    vae, model = golden.models(name)
    s = g["samples"][setting]
    sampler = Sampler(model, vae, dtype=torch.float32)
    kwargs = _golden_kwargs(g, s)
    steps = list(sampler.stream(golden.text_tuple(g), s["g_seed"], **kwargs))
    rec = {}
    img = _official(model, vae, g["config"]["scale_schedule"], golden.text_tuple(g), s["B"], s["g_seed"],
                    sampler.settings(**kwargs), record=rec)
    sched = g["config"]["scale_schedule"]
    assert [st.index for st in steps] == list(range(len(sched))) and steps[-1].is_last
    assert [st.hw for st in steps] == [tuple(x[1:]) for x in sched]
    for si, st in enumerate(steps):
        assert st.tokens.dtype == torch.uint8 and torch.equal(st.tokens, rec["sampled_bits"][si]), \
            f"{name} {setting}: the Sampler's bits differ from the official loop's at scale {si}"
    latent = steps[-1].f_hat
    official = rec["summed_codes"].squeeze(2)
    assert latent.stride() == official.stride() and torch.equal(latent, official)
    assert torch.equal(_u8(steps[-1].preview()), img)
    # the golden run: the official loop's rule for fragile bits
    for si in range(len(s["sampled_bits"])):
        diff = (steps[si].tokens != s["sampled_bits"][si]).reshape(-1)
        if diff.any():
            fragile = fragile_bits(rec["logits"][si], s["logits"][si], rec["noise"][si], s["kwargs"]["top_p"])
            assert not (diff & ~fragile).any(), f"{name} {setting}: a robust bit differs at scale {si}"
            return
    assert (latent - s["summed_codes"]).abs().max() <= INF_GOLDEN_LATENT_ABS
    assert (_u8(steps[-1].preview()).int() - s["image_uint8_bgr"].int()).abs().max() <= 1


# ------------------------------------------------------------------------------------------ tiny models
def test_stream_previews_every_scale_and_sample_is_the_last(pair):
    vae, model = pair
    sampler = Sampler(model, vae, dtype=torch.float32)
    t = text([3, 5])
    kw = dict(scale_schedule=SCHED_WIDE, cfg=2.0, tau=0.7, top_p=0.9)
    steps = list(sampler.stream(t, 4, **kw))
    assert [st.hw for st in steps] == [(h, w) for _, h, w in SCHED_WIDE]
    assert [tuple(st.tokens.shape) for st in steps] == [(2, h * w * model.d_vae) for _, h, w in SCHED_WIDE]
    H, W = S.image_size(SCHED_WIDE)
    previews = [st.preview() for st in steps]
    assert all(p.shape == (2, 3, H, W) and p.min() >= 0 and p.max() <= 1 for p in previews)
    assert not torch.equal(steps[0].f_hat, steps[-1].f_hat), "each scale's latent is a snapshot"
    assert torch.equal(sampler.sample(t, 4, **kw), previews[-1])
    bits, latent = sampler.tokens(t, 4, **kw)
    assert all(torch.equal(a, st.tokens) for a, st in zip(bits, steps)) and torch.equal(latent, steps[-1].f_hat)


@pytest.mark.parametrize("kw", [dict(cfg=1.0, tau=1.0, top_p=0.0), dict(cfg=[1.0, 2.0, 1.5, 1.0, 3.0, 2.0, 2.5],
                                tau=0.8, cfg_insertion_layer=[-1]), dict(cfg=3.0, top_k=1, cfg_insertion_layer=[0, -1])])
def test_settings_follow_the_official_loop(pair, kw):
    """No guidance (batch not doubled), hidden-state guidance with cfg 1 at some scales, both insertions at once."""
    vae, model = pair
    sampler = Sampler(model, vae, dtype=torch.float32)
    t = text([4, 2])
    settings = sampler.settings(scale_schedule=SCHED, **kw)
    rec = {}
    _official(model, vae, SCHED, t, 2, 9, settings, ret_img=False, record=rec)
    bits, latent = sampler.tokens(t, 9, scale_schedule=SCHED, **kw)
    assert all(torch.equal(a, b) for a, b in zip(bits, rec["sampled_bits"]))
    assert torch.equal(latent, rec["summed_codes"].squeeze(2))


def test_negative_prompt_and_growing_text(pair):
    """A negative prompt replaces cfg_uncond; a request with longer prompts than the run's text buffers hold grows
    them (and drops the run's graphs) and still gives the official bits."""
    vae, model = pair
    sampler = Sampler(model, vae, dtype=torch.float32)
    kw = dict(scale_schedule=SCHED, cfg=2.5, tau=0.6)
    settings = sampler.settings(**kw)
    for lens, neg_lens in (((2, 3), (4, 1)), ((20, 24), (7, 22)), ((150, 9), (200, 2))):
        t, neg = text(lens, seed=sum(lens)), text(neg_lens, seed=7)
        rec = {}
        _official(model, vae, SCHED, t, 2, 1, settings, negative=neg, ret_img=False, record=rec)
        bits, latent = sampler.tokens(t, 1, negative=neg, **kw)
        assert all(torch.equal(a, b) for a, b in zip(bits, rec["sampled_bits"])), f"prompts {lens}, negative {neg_lens}"
        assert torch.equal(latent, rec["summed_codes"].squeeze(2))
    run = next(iter(sampler._runs.values()))
    assert run.buf.text_rows == 512       # 361 rows: grown from 2 * 2 * 64 to the next power of two


def test_image_seeds_draw_per_image(pair):
    """One generator per image: an image of a batch of one with ``image_seeds=[s]`` is the official one with
    ``seed=s``; two copies of a prompt with the same image seed give the same bits."""
    vae, model = pair
    sampler = Sampler(model, vae, dtype=torch.float32)
    kw = dict(scale_schedule=SCHED, cfg=2.0, tau=0.7)
    one = text([5])
    a, _ = sampler.tokens(one, image_seeds=[11], **kw)
    b, _ = sampler.tokens(one, 11, **kw)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    kv, lens, cu, mx = one
    two = (torch.cat((kv, kv)), lens * 2, torch.tensor([0, 5, 10], dtype=torch.int32), mx)
    c, _ = sampler.tokens(two, image_seeds=[11, 11], **kw)
    d, _ = sampler.tokens(two, image_seeds=[11, 12], **kw)
    assert all(torch.equal(x[0], x[1]) for x in c)
    assert not all(torch.equal(x[0], x[1]) for x in d)
    with pytest.raises(ValueError, match="image_seeds must hold B=2 seeds"):
        sampler.tokens(two, image_seeds=[1, 2, 3], B=2, **kw)


def test_runs_are_kept_per_batch_size_and_schedule(pair):
    vae, model = pair
    sampler = Sampler(model, vae, dtype=torch.float32, max_batch_sizes=2)
    for lens, sched in (([2], SCHED), ([2, 3], SCHED), ([2, 3], SCHED_WIDE), ([4, 4], SCHED)):
        sampler.tokens(text(lens), 0, scale_schedule=sched, cfg=1.5)
    per = sampler.memory()["per_batch_size"]
    assert sorted(per, key=str) == sorted([(2, SCHED), (2, SCHED_WIDE)], key=str) and all(v > 0 for v in per.values())
    assert sampler.memory()["buffers"] == sum(per.values()) and sampler.memory()["weights"] > 0
    sampler.free()
    assert sampler.memory()["buffers"] == 0


def _edit(model, change):
    with torch.no_grad():
        if change == "in place":
            model.head.bias.add_(torch.randn_like(model.head.bias) * 5)
        elif change == "replaced":
            model.head.bias = torch.nn.Parameter(model.head.bias + torch.randn_like(model.head.bias) * 5)
        elif change == "load_state_dict":
            model.load_state_dict({k: v + torch.randn_like(v) * 5 if k == "head.bias" else v
                                   for k, v in model.state_dict().items()})
        elif change == ".data copy_":          # no version counter moves
            model.head.bias.data.copy_(model.head.bias.data + torch.randn_like(model.head.bias) * 5)
        elif change == "qkv bias .data":       # a tensor the sampler concatenates
            for b in model.unregistered_blocks:
                b.sa.v_bias.data.add_(torch.randn_like(b.sa.v_bias) * 5)
        elif change == "text kv bias .data":   # the text keys/values are computed once per sample from it
            for b in model.unregistered_blocks:
                b.ca.v_bias.data.add_(torch.randn_like(b.ca.v_bias) * 5)
        elif change == "ada_gss in place":
            for b in model.unregistered_blocks:
                b.ada_gss.mul_(-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("change", ["in place", "replaced", "load_state_dict", ".data copy_", "qkv bias .data",
                                    "text kv bias .data", "ada_gss in place"])
def test_sampler_follows_weight_changes(dtype, change):
    """Weights cast once, never stale: after any edit the next sample equals a new sampler's."""
    vae, model = tiny_pair(seed=3)
    sampler = Sampler(model, vae, dtype=dtype)
    t = text([3, 4])
    kw = dict(scale_schedule=SCHED, cfg=2.0, tau=0.5, top_p=0.0)
    before, _ = sampler.tokens(t, 5, **kw)
    cast = sampler.model
    again, _ = sampler.tokens(t, 5, **kw)
    assert sampler.model is cast, "unchanged weights must not be cast again"
    _edit(model, change)
    after, _ = sampler.tokens(t, 5, **kw)
    fresh, _ = Sampler(model, vae, dtype=dtype).tokens(t, 5, **kw)
    assert all(torch.equal(a, b) for a, b in zip(before, again))
    assert all(torch.equal(a, b) for a, b in zip(after, fresh)), "the sampler used stale weights"
    assert not all(torch.equal(a, b) for a, b in zip(after, before)), "the change did not change the bits"
    if change == "replaced":
        assert sampler.model is not cast, "a replaced tensor must rebuild the held weights (and drop graphs)"


def test_sync_on_change_skips_the_copy_until_a_version_moves():
    vae, model = tiny_pair(seed=4)
    sampler = Sampler(model, vae, dtype=torch.bfloat16, sync_weights="on_change")
    t = text([3, 2])
    kw = dict(scale_schedule=SCHED, cfg=2.0, top_p=0.0)
    sampler.tokens(t, 3, **kw)
    head_w = sampler.model.head[0]
    head_w.zero_()                   # poison the held cast: without a sync it stays poisoned
    sampler.tokens(t, 3, **kw)
    assert not head_w.any(), "on_change copied the weights although nothing changed"
    with torch.no_grad():
        model.head.weight.mul_(1.0)  # an in-place edit: moves the version counter
    synced, _ = sampler.tokens(t, 3, **kw)
    fresh, _ = Sampler(model, vae, dtype=torch.bfloat16).tokens(t, 3, **kw)
    assert head_w.any() and all(torch.equal(a, b) for a, b in zip(synced, fresh))


def test_bfloat16_sampler(pair):
    """bf16 compute (float32 residual stream, latent and text path): finite images, bf16 caches; most bits agree
    with float32 at the first scales (the same draw, logits within bf16 rounding)."""
    vae, model = pair
    t = text([3, 4])
    kw = dict(scale_schedule=SCHED, cfg=2.0, tau=1.0, top_p=0.0)
    sampler = Sampler(model, vae, dtype=torch.bfloat16)
    bits16, _ = sampler.tokens(t, 2, **kw)
    bits32, _ = Sampler(model, vae, dtype=torch.float32).tokens(t, 2, **kw)
    run = next(iter(sampler._runs.values()))
    assert run.buf.caches[0].k.dtype == torch.bfloat16 and run.buf.x.dtype == torch.float32
    assert run.buf.f_hat.dtype == torch.float32
    agree = (bits16[1] == bits32[1]).float().mean().item()
    assert agree > 0.9, f"only {agree:.3f} of scale 1's bits agree between bf16 and float32"
    assert torch.isfinite(sampler.sample(t, 2, **kw)).all()


def test_interleaved_streams_do_not_share_buffers(pair):
    vae, model = pair
    sampler = Sampler(model, vae, dtype=torch.float32)
    ta, tb = text([2, 3], seed=5), text([4, 1], seed=6)
    kw = dict(scale_schedule=SCHED, cfg=2.0)
    alone_a, alone_b = sampler.tokens(ta, 3, **kw), sampler.tokens(tb, 4, **kw)
    steps_a, steps_b = [], []
    for sa, sb in zip(sampler.stream(ta, 3, **kw), sampler.stream(tb, 4, **kw)):
        steps_a.append(sa)
        steps_b.append(sb)
    for (bits, latent), steps in ((alone_a, steps_a), (alone_b, steps_b)):
        assert all(torch.equal(x, st.tokens) for x, st in zip(bits, steps))
        assert torch.equal(latent, steps[-1].f_hat)


def test_settings_value():
    s = InfinitySettings.checked(SCHED, 3, [0.5] * 9, 0, 0.9, [0, -1, 1], depth=4)
    assert s.cfg == (3.0,) * 7 and s.tau == (0.5,) * 7 and s.on_logits and s.hidden_layers == (3,) and s.guided
    assert hash(s) == hash(InfinitySettings.checked(SCHED, [3] * 7, 0.5, 0, 0.9, (0, -1, 1), depth=4))
    assert not InfinitySettings.checked(SCHED, 1, 1, 0, 0, 0, depth=4).guided


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(scale_schedule=SCHED[:-1]), ValueError, "scale_schedule must be one of the official"),
    (dict(cfg=[2.0] * 3), ValueError, r"cfg must be a number or hold one value per scale \(7\)"),
    (dict(tau=[1, 1, 0, 1, 1, 1, 1]), ValueError, "tau must not hold 0"),
    (dict(cfg=float("nan")), ValueError, r"cfg\[0\] must be finite"),
    (dict(cfg_insertion_layer=[-2]), ValueError, "cfg_insertion_layer items must be 0, 1 or a negative"),
    (dict(cfg_insertion_layer=[0.5]), TypeError, "cfg_insertion_layer items must be ints"),
    (dict(top_p=1.5), ValueError, r"top_p must be in \[0.0, 1.0\]"),
    (dict(B=3), ValueError, "lens must hold B=3 text lengths"),
    (dict(negative=text([2, 2, 2])), ValueError, "negative: lens must hold B=2"),
    (dict(seed=2 ** 64), ValueError, r"seed must be in \[-2\*\*63, 2\*\*64\)"),
])
def test_bad_input(pair, kwargs, error, match):
    vae, model = pair
    sampler = Sampler(model, vae, dtype=torch.float32)
    kw = dict(scale_schedule=SCHED, cfg=2.0)
    kw.update(kwargs)
    seed = kw.pop("seed", 0)
    with pytest.raises(error, match=match):
        sampler.stream(text([2, 3]), seed, **kw)


def test_bad_models_and_text(pair):
    vae, model = pair
    with pytest.raises(TypeError, match="vae must be the Infinity model's BSQ VAE"):
        Sampler(model)
    with pytest.raises(ValueError, match="fused_step_conv applies to VAR"):
        Sampler(model, vae, fused_step_conv=True)
    other_vae, _ = tiny_pair(d=6)
    with pytest.raises(ValueError, match="the BSQ VAE has 6 bits per latent pixel; the Infinity model takes 4"):
        Sampler(model, other_vae)
    sampler = Sampler(model, vae, dtype=torch.float32)
    with pytest.raises(ValueError, match="Infinity has no unconditional sampling"):
        sampler.stream(None, 0, scale_schedule=SCHED)
    kv, lens, cu, mx = text([2, 3])
    with pytest.raises(ValueError, match=r"text: the text lengths \[2, 4\] sum to 6, but kv_compact has 5 rows"):
        sampler.stream((kv, [2, 4], cu, mx), 0, scale_schedule=SCHED)
    with pytest.raises(ValueError, match="longer than cfg_uncond"):
        sampler.stream(text([2, 30]), 0, scale_schedule=SCHED, cfg=2.0)
    sampler.stream(text([2, 30]), 0, scale_schedule=SCHED, cfg=1.0)      # no guidance: no empty prompt needed


def test_nan_logits_raise_a_clear_error(pair):
    vae, model = tiny_pair(seed=5)
    with torch.no_grad():
        model.head.bias[3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        Sampler(model, vae, dtype=torch.float32).sample(text([2, 2]), 0, scale_schedule=SCHED, cfg=1.0)


# ------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_give_the_same_bits(dtype):
    """Each scale step captured once per (run, settings) and replayed: the bits and latent of the same Sampler
    without graphs, for two seeds (the second replays the first's graphs), a long negative prompt (text buffers grow,
    graphs recaptured) and an unguided setting (other graphs on the same buffers)."""
    vae, model = tiny_pair(C=256, heads=2, Ct5=256, seed=1)
    vae, model = vae.cuda(), model.cuda()
    plain = Sampler(model, vae, dtype=dtype, cuda_graphs=False)
    graphed = Sampler(model, vae, dtype=dtype, cuda_graphs=True)

    def cuda(t):
        return None if t is None else tuple(x.cuda() if isinstance(x, torch.Tensor) else x for x in t)

    # a long negative prompt (288 rows > the 2 * 2 * 64 preallocated) makes the text buffers grow
    for lens, seed, cfg, neg in (([3, 5], 0, 3.0, None), ([3, 5], 1, 3.0, None), ([3, 5], 2, 3.0, [150, 130]),
                                 ([3, 5], 3, 1.0, None)):
        t = cuda(text(lens, Ct5=256, seed=seed))
        kw = dict(scale_schedule=SCHED_WIDE, cfg=cfg, tau=0.5, top_p=0.9, cfg_insertion_layer=[0, -1],
                  negative=cuda(neg and text(neg, Ct5=256, seed=9)))
        a, la = plain.tokens(t, seed, **kw)
        b, lb = graphed.tokens(t, seed, **kw)
        assert all(torch.equal(x, y) for x, y in zip(a, b)), f"prompts {lens} seed {seed}: bits differ with graphs"
        assert torch.equal(la, lb)
    assert graphed.memory()["graphs"] > 0
    graphed.free()
    assert graphed.memory()["graphs"] == 0


def test_model_api_under_bf16_autocast(pair):
    """The official demo samples under torch.autocast: the model's own loop keeps a float32 residual stream."""
    vae, model = pair
    with torch.autocast("cpu", torch.bfloat16):
        _, _, img = model.autoregressive_infer_cfg(vae=vae, scale_schedule=SCHED, label_B_or_BLT=text([3, 2]), B=2,
                                                   g_seed=0, cfg_list=[2.0] * 7, tau_list=[0.5] * 7, top_p=0.9,
                                                   cfg_insertion_layer=[0], vae_type=vae.codebook_dim, ret_img=True)
    assert img.dtype == torch.uint8 and img.shape == (2, 256, 256, 3)
