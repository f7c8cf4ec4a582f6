"""Infinity without the golden files: schedules, bit/code helpers, the loader, sampler options and bad input,
on tiny random models (CPU, seconds)."""
import copy
import random

import pytest
import torch

import fastvar
from fastvar.models import BSQVAE, Infinity, infinity_from_state_dicts, load_infinity
from fastvar import dynamic_resolution as S
from fastvar.reference import attention as ref_attn
from fastvar.reference import infinity as ref
from tolerances import INF_GOLDEN_LOGITS_REL, INF_WEIGHTS_LOGITS_REL, assert_rel

SCHED = S.scale_schedule(1.0, "0.06M")                  # 7 scales up to 16 x 16, L = 521


def tiny_pair(d=4, patchify=False, depth=2, block_chunks=2, C=64, heads=1, Ct5=128, seed=0):
    """A BSQ VAE (base 24 channels: 24 groups of one, stride 16 or 8) and an Infinity of width C with random
    weights (no zeros)."""
    vae = BSQVAE(d, 24, (1, 1, 1, 1) if patchify else (1, 1, 1, 1, 1), num_res_blocks=1)
    model = Infinity(vae, text_channels=Ct5, text_maxlen=24, embed_dim=C, depth=depth, num_heads=heads,
                     block_chunks=block_chunks, pad_to_multiplier=128, apply_spatial_patchify=int(patchify),
                     cond_drop_rate=0.0).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        for p in vae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return vae, model


def text(lens, Ct5=128, seed=1):
    kv = torch.randn(sum(lens), Ct5, generator=torch.Generator().manual_seed(seed))
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32)
    return kv, list(lens), cu, max(lens)


@pytest.fixture(scope="module")
def pair():
    return tiny_pair()


def _sample(model, vae, t, B=2, sched=SCHED, **kw):
    S_ = len(sched)
    args = dict(vae=vae, scale_schedule=sched, label_B_or_BLT=t, B=B, g_seed=3, cfg_list=[2.0] * S_,
                tau_list=[0.7] * S_, top_p=0.9, cfg_insertion_layer=[0], vae_type=vae.codebook_dim)
    args.update(kw)
    return model.autoregressive_infer_cfg(**args)


# ------------------------------------------------------------------------------------------ schedules
def test_all_templates_and_sizes():
    assert len(S.TEMPLATES) == 15 and S.H_DIV_W_TEMPLATES[:3] == (1.0, 1.25, 0.8)
    for ratio, grids in S.TEMPLATES.items():
        assert len(grids) == 13
        for pn, n in S.PN_NUM_SCALES.items():
            sched = S.scale_schedule(ratio, pn)
            assert len(sched) == n and all(t == 1 for t, _, _ in sched)
            _, h, w = sched[-1]
            assert abs(h / w - ratio) < 0.01                    # the official table's own check
            assert S.template_of(sched) == (ratio, pn)
            assert S.image_size(sched) == (16 * h, 16 * w)
        if ratio in S.RATIO2HWS and ratio != 1.0:
            inverse = S.TEMPLATES[int(1 / ratio * 1000) / 1000]
            assert inverse == tuple((w, h) for h, w in grids)
    lens = {(r, pn): sum(S.scale_lens(S.scale_schedule(r, pn))) for r in (1.0, 0.5) for pn in S.PN_NUM_SCALES}
    assert lens[1.0, "0.06M"] == 521 and lens[1.0, "0.25M"] == 2521 and lens[1.0, "0.60M"] == 6425
    assert lens[1.0, "1M"] == 10521 and lens[0.5, "0.06M"] == 451 and lens[0.5, "1M"] == 11269
    assert S.scale_schedule(0.5, "0.06M")[:5] == ((1, 1, 1), (1, 2, 2), (1, 2, 4), (1, 3, 6), (1, 5, 10))


def test_nearest_template():
    assert S.nearest_template(1.0) == 1.0 and S.nearest_template(0.52) == 0.5 and S.nearest_template(5.0) == 3.0
    assert S.nearest_template(1.125) == 1.0            # a tie between 1.0 and 1.25: the first in official order
    assert S.nearest_template(720 / 1280) == 0.571
    with pytest.raises(ValueError, match="h_div_w must be a positive finite number"):
        S.nearest_template(0)
    with pytest.raises(ValueError, match="pn must be one of"):
        S.scale_schedule(1.0, "2M")


def test_only_full_template_schedules():
    full = S.scale_schedule(1.0, "1M")
    assert S.template_of(full[:7]) == (1.0, "0.06M")           # the first 7 scales of any template are its 0.06M
    with pytest.raises(ValueError, match=r"scale_schedule must be one of the official dynamic-resolution schedules"):
        S.check_schedule(full[:8])
    with pytest.raises(ValueError, match=r"scale_schedule\[0\] must be \(1, h, w\)"):
        S.check_schedule([(2, 1, 1)] + list(full[1:7]))
    with pytest.raises(ValueError, match=r"scale_schedule\[1\] must be a \(t, h, w\) triple"):
        S.check_schedule([(1, 1, 1), (2, 2)])


def test_rope_positions_round_half_to_even():
    pos = S.rope_positions(S.scale_schedule(0.5, "0.06M"))
    assert pos[5:9, 1].tolist() == [0, 22, 45, 68]            # the 2 x 4 scale: 22.5 -> 22, 67.5 -> 68
    assert pos[5:9, 0].tolist() == [0, 0, 0, 0] and pos[9, 0] == 22
    padded = S.rope_positions(SCHED, 640)                      # the teacher-forced table: 1M positions after L
    assert padded.shape == (640, 2) and torch.equal(padded[:521], S.rope_positions(SCHED))
    assert torch.equal(padded[521:640], S.rope_positions(S.scale_schedule(1.0, "0.25M"))[521:640])


def test_rope_rotation_is_pairwise_and_norm_preserving():
    q, k = torch.randn(2, 3, 521, 16, dtype=torch.float64).unbind(0)
    table = ref.rope2d_table(SCHED, 16).double()
    qr, kr = ref_attn.apply_rope2d(q.unsqueeze(0), k.unsqueeze(0), table)
    assert torch.allclose(qr.norm(dim=-1), q.norm(dim=-1)) and torch.allclose(kr.norm(dim=-1), k.norm(dim=-1))
    angle = torch.atan2(table[1], table[0])                    # (L, 8): rows, then cols, 4 frequencies each
    z = torch.view_as_complex(q.reshape(3, 521, 8, 2).contiguous()) * torch.polar(torch.ones_like(angle), angle)
    assert torch.allclose(torch.view_as_real(z).reshape(3, 521, 16), qr[0])


# ------------------------------------------------------------------------------------------ bits and codes
def test_patchify_bit_order_and_inverses():
    bits = torch.randint(0, 2, (2, 1, 4, 6, 3))                # VAE grid 4 x 6, d = 3
    tok = ref.vae_bits_to_tokens(bits, patchify=True)          # (2, 2 * 3, 12): bit 4 ch + 2 i + k
    assert tok.shape == (2, 6, 12)
    assert tok[1, 4, 4 * 2 + 2 * 1 + 0] == bits[1, 0, 2 * 1 + 1, 2 * 1 + 0, 2]
    assert torch.equal(ref.tokens_to_vae_bits(tok.reshape(2, 2, 3, 12), patchify=True), bits)
    assert torch.equal(ref.tokens_to_vae_bits(bits.reshape(2, 4, 6, 3), patchify=False), bits)
    m = torch.randn(2, 3, 1, 4, 6)
    assert torch.equal(ref.tokens_from_map(m, True), torch.nn.functional.pixel_unshuffle(m.squeeze(2), 2)
                       .reshape(2, 12, 6).transpose(1, 2))


def test_codes_are_signed_unit_vectors_with_official_layout():
    bits = torch.randint(0, 2, (2, 1, 3, 5, 8), dtype=torch.uint8)
    codes = ref.bits_to_codes(bits)
    assert codes.shape == (2, 8, 1, 3, 5) and codes.dtype == torch.float32
    assert codes.is_contiguous(memory_format=torch.channels_last_3d)
    expect = (bits.permute(0, 4, 1, 2, 3).double() * 2 - 1) / 8 ** 0.5
    assert (codes.double() - expect).abs().max() < 1e-7
    q, b = ref.bsq_quantize(codes.contiguous() * 3.0)          # re-quantizing codes gives their bits back
    assert torch.equal(b.to(torch.uint8), bits) and (q - codes).abs().max() < 1e-6


def test_decode_from_indices_is_sum_of_codes_then_decode(pair):
    vae, _ = pair
    vs = S.scale_schedule(1.0, "0.06M")
    img = torch.rand(1, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        h, z, _, bits, _, var_inputs = vae.encode(img, vs)
        summed, rec = vae.decode_from_indices(bits, vs, "bit_label")
        assert torch.equal(summed, ref.sum_codes(bits, vs)) and torch.equal(rec, vae.decode(summed.squeeze(2)))
    assert h.shape == z.shape == (1, 4, 16, 16) and len(bits) == 7 and len(var_inputs) == 6
    assert (summed.squeeze(2) - z).abs().max() < 1e-5         # sum of codes = the quantized latent
    with pytest.raises(ValueError, match=r"x must be 256x256 pixels for a last VAE scale of 16x16"):
        vae.encode(img[..., :128], vs)
    with pytest.raises(ValueError, match="label_type must be 'bit_label'"):
        vae.decode_from_indices(bits, vs, "int_label")


# ------------------------------------------------------------------------------------------ loading
def test_state_dict_round_trip_and_files(tmp_path, pair):
    vae, model = pair
    v2, m2 = infinity_from_state_dicts(model.state_dict(), vae.state_dict())
    assert m2.num_block_chunks == 2 and m2.depth == 2 and m2.Ct5 == 128 and m2.pad_to_multiplier == 128
    assert all(torch.equal(a, b) for a, b in zip(m2.state_dict().values(), model.state_dict().values()))
    # the official VAE file layout: {"vae": state dict}, names with or without the Conv/Normalize wrappers
    bare = {k.replace(".conv.", ".").replace(".norm.", "."): v for k, v in vae.state_dict().items()
            if not k.endswith("lfq.mask")}
    torch.save({"vae": bare}, tmp_path / "vae.pth")
    torch.save(model.state_dict(), tmp_path / "inf.pth")
    v3, m3 = load_infinity(tmp_path / "inf.pth", tmp_path / "vae.pth")
    assert all(torch.equal(a, b) for a, b in zip(v3.state_dict().values(), vae.state_dict().values()))
    one_chunk = Infinity(vae, text_channels=128, text_maxlen=24, embed_dim=64, depth=2, num_heads=1, block_chunks=1)
    assert any(k.startswith("blocks.1.") for k in one_chunk.state_dict())
    _, m4 = infinity_from_state_dicts(one_chunk.state_dict(), vae.state_dict())
    assert m4.num_block_chunks == 1


def test_other_family_checkpoints_are_named(tmp_path, pair):
    vae, model = pair
    var_vae, var = fastvar.build_vae_var("cpu", depth=1, ch=32, V=64, Cvae=8, patch_nums=(1, 2, 4),
                                         vae_kwargs=dict(ch_mult=(1, 2, 2)))
    files = {n: tmp_path / f"{n}.pth" for n in ("var", "vqvae", "inf", "bsq")}
    for n, sd in (("var", var.state_dict()), ("vqvae", var_vae.state_dict()), ("inf", model.state_dict()),
                  ("bsq", vae.state_dict())):
        torch.save(sd, files[n])
    with pytest.raises(ValueError, match=r"Infinity state dict: this is a VAR checkpoint .*fastvar\.load_vae_var"):
        load_infinity(files["var"], files["bsq"])
    with pytest.raises(ValueError, match=r"BSQ VAE state dict: this is a VQVAE checkpoint"):
        load_infinity(files["inf"], files["vqvae"])
    with pytest.raises(ValueError, match=r"VAR state dict: this is an Infinity checkpoint .*fastvar\.load_infinity"):
        fastvar.load_vae_var(files["inf"], files["vqvae"])
    with pytest.raises(ValueError, match=r"VQVAE state dict: this is a BSQ VAE checkpoint"):
        fastvar.load_vae_var(files["var"], files["bsq"])
    other_vae, _ = tiny_pair(d=6)
    with pytest.raises(ValueError, match=r"word_embed takes 4 bits per token, but the VAE has d=6"):
        infinity_from_state_dicts(model.state_dict(), other_vae.state_dict())
    sd = model.state_dict()
    del sd["block_chunks.1.module.0.ca.proj.bias"]
    with pytest.raises(ValueError, match=r"Infinity state dict does not match .*missing keys: block_chunks\.1\.module"
                                         r"\.0\.ca\.proj\.bias"):
        infinity_from_state_dicts(sd, vae.state_dict())


def test_unsupported_official_switches(pair):
    vae, _ = pair
    with pytest.raises(ValueError, match="rms_norm must be False"):
        Infinity(vae, text_channels=128, embed_dim=64, depth=2, num_heads=1, rms_norm=True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'flux'"):
        Infinity(vae, text_channels=128, embed_dim=64, depth=2, num_heads=1, flux=1)
    with pytest.raises(ValueError, match="block_chunks must divide depth=2"):
        Infinity(vae, text_channels=128, embed_dim=64, depth=2, num_heads=1, block_chunks=3)
    Infinity(vae, text_channels=128, embed_dim=64, depth=2, num_heads=1, use_flex_attn=True, fused_norm=True)


# ------------------------------------------------------------------------------------------ forward, sampling
def test_forward_bad_input(pair):
    vae, model = pair
    t = text([3, 5])
    x = torch.randn(2, 520, 4)
    kv, lens, cu, mx = t
    cases = [
        ((kv[:7], lens, cu, mx), ValueError, r"the text lengths \[3, 5\] sum to 8, but kv_compact has 7 rows"),
        ((kv, [3, 4], cu, mx), ValueError, r"the text lengths \[3, 4\] sum to 7, but kv_compact has 8 rows"),
        ((kv, lens, torch.tensor([0, 4, 8], dtype=torch.int32), mx), ValueError,
         r"cu_seqlens_k must be \[0, cumsum\(lens\)\] = \[0, 3, 8\], got \[0, 4, 8\]"),
        ((kv, lens, cu.long(), mx), TypeError, "cu_seqlens_k must be an int32 tensor"),
        ((kv, lens, cu, 4), ValueError, r"max_seqlen_k must be max\(lens\) = 5, got 4"),
        ((kv[:, :100], lens, cu, mx), ValueError, r"kv_compact must have C_t5=128 features per token"),
        ((kv[:3], [3], cu[:2], 3), ValueError, r"lens must hold B=2 text lengths, got 1"),
        ((kv, lens, cu), TypeError, "must be the text tuple"),
    ]
    for bad, err, match in cases:
        with pytest.raises(err, match=match):
            model(bad, x, scale_schedule=SCHED)
    with pytest.raises(ValueError, match=r"x_BLC_wo_prefix must have shape \(B, L - 1 = 520, d_t = 4\)"):
        model(t, x[:, :519], scale_schedule=SCHED)
    with pytest.raises(ValueError, match="scale_schedule must be one of the official dynamic-resolution schedules"):
        model(t, x[:, :519 - 256 + 400], scale_schedule=list(S.scale_schedule(1.0, "1M"))[:8])


def test_sampling_bad_input(pair):
    vae, model = pair
    t = text([3, 5])
    with pytest.raises(ValueError, match="scale_schedule must be one of the official dynamic-resolution schedules"):
        _sample(model, vae, t, sched=S.scale_schedule(1.0, "1M")[:8])
    with pytest.raises(ValueError, match="vae_type must be non-zero"):
        _sample(model, vae, t, vae_type=0)
    with pytest.raises(ValueError, match=r"cfg_list and tau_list need one value per scale \(7\), got 6 and 7"):
        _sample(model, vae, t, cfg_list=[1.0] * 6)
    with pytest.raises(ValueError, match=r"the text lengths \[3, 5\] sum to 8, but kv_compact has 9 rows"):
        _sample(model, vae, (torch.randn(9, 128), [3, 5], t[2], 5))
    with pytest.raises(ValueError, match=r"a text of 30 tokens is longer than cfg_uncond \(24 rows"):
        _sample(model, vae, text([30, 5]))
    with pytest.raises(ValueError, match="cfg_insertion_layer items must be 0, 1 or a negative block offset"):
        _sample(model, vae, t, cfg_insertion_layer=[-2])
    with pytest.raises(ValueError, match=r"top_p must be in \[0.0, 1.0\]"):
        _sample(model, vae, t, top_p=1.5)


def test_condition_dropout_draws_per_prompt_and_keeps_the_input(pair):
    vae, model = pair
    t = text([3, 5])
    x = torch.randn(2, 520, 4)
    kv_before = t[0].clone()
    state = random.getstate()
    try:
        model.cond_drop_rate = 1.0
        with torch.no_grad():
            dropped = model(t, x, scale_schedule=SCHED)
        assert torch.equal(t[0], kv_before)                    # unlike the official code, no in-place overwrite
        model.cond_drop_rate = 0.0
        random.seed(5)
        with torch.no_grad():
            uncond = model((model._uncond_rows(t[1], t[0]).detach(), *t[1:]), x, scale_schedule=SCHED)
        assert torch.equal(dropped, uncond)
        random.seed(7)
        model(t, x, scale_schedule=SCHED)
        after = random.random()
        random.seed(7)
        random.random(), random.random()                       # one draw per prompt, also at rate 0
        assert after == random.random()
    finally:
        model.cond_drop_rate = 0.0
        random.setstate(state)


def test_sampling_options(pair):
    vae, model = pair
    t = text([3, 5])
    _, _, img = _sample(model, vae, t, ret_img=True)
    assert img.shape == (2, 256, 256, 3) and img.dtype == torch.uint8
    summed = model.last_summed_codes.clone()
    # the same seed, the same image; the negative prompt cfg_uncond is the default unconditional branch
    neg = (model._uncond_rows(t[1], t[0]).detach(), *t[1:])
    _sample(model, vae, t, negative_label_B_or_BLT=neg)
    assert torch.equal(model.last_summed_codes, summed)
    # g_seed=None draws from the global generator exactly as the seeded model generator does
    state = torch.get_rng_state()
    try:
        torch.manual_seed(3)
        _sample(model, vae, t, g_seed=None)
        assert torch.equal(model.last_summed_codes, summed)
    finally:
        torch.set_rng_state(state)
    # trunk_scale stops early; gt_leak forces the given bits
    rec = {}
    model._infer(vae, SCHED, t, 2, None, 3, [1.0] * 7, [1.0] * 7, 0, 0.0, [0], 4, False, 3, 0, None, rec)
    assert len(rec["sampled_bits"]) == 3
    leak = [torch.ones(2, 1, h, w, 4, dtype=torch.int64) for _, h, w in SCHED]
    rec = {}
    model._infer(vae, SCHED, t, 2, None, 3, [1.0] * 7, [1.0] * 7, 0, 0.0, [0], 4, False, 1000, 7, leak, rec)
    assert all(b is l for b, l in zip(rec["bits"], leak))
    assert torch.equal(rec["summed_codes"], ref.sum_codes(leak, SCHED))
    # cfg_insertion_layer=[1] doubles the batch but guides nothing: the logits of the conditional half alone
    # (the same history forced through gt_leak, so that a rounding-level bit flip cannot fork the runs)
    guided, plain = {}, {}
    model._infer(vae, SCHED, t, 2, None, 3, [1.0] + [3.0] * 6, [1.0] * 7, 0, 0.0, [1], 4, False, 1000, 7, leak, guided)
    model._infer(vae, SCHED, t, 2, None, 3, [1.0] * 7, [1.0] * 7, 0, 0.0, [0], 4, False, 1000, 7, leak, plain)
    for si, (a, b) in enumerate(zip(guided["logits"], plain["logits"])):     # batching rounds differently upstream
        assert_rel(a, b, INF_GOLDEN_LOGITS_REL, f"logits of scale {si}")      # of the bf16 cross-attention


def test_patchify_model_samples_and_teacher_forces():
    vae, model = tiny_pair(d=2, patchify=True)
    sched = S.scale_schedule(0.5, "0.06M")
    t = text([4, 2])
    _, _, img = _sample(model, vae, t, sched=sched, ret_img=True)
    assert img.shape == (2, 176, 352, 3)
    raw = torch.randn(2, 2, 22, 44)
    x, targets, _, _ = ref.bitwise_self_correction(raw, S.vae_scale_schedule(sched, True), True)
    assert x.shape == (2, 450, 8) and [tt.shape[1] for tt in targets] == list(S.scale_lens(sched))
    with torch.no_grad():
        logits = model(t, x, scale_schedule=sched)
    assert logits.shape == (2, 451, 16) and torch.isfinite(logits).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_weights(pair, dtype):
    """bf16/fp16 weights (``load_infinity(dtype=)``, ``model.to(dtype)``): the model's own forward and sampling loop
    run under autocast in that dtype, close to the float32 model, without casting the weights back; the Sampler
    takes them as they are; weights of two low-precision dtypes are named."""
    vae, model32 = pair
    model = copy.deepcopy(model32).to(dtype)
    t = text([5, 3])
    L = sum(S.scale_lens(SCHED))
    x = torch.randint(0, 2, (2, L - 1, model.d_vae), generator=torch.Generator().manual_seed(4)).float() - 0.5
    with torch.no_grad():
        want, got = model32(t, x, SCHED), model(t, x, SCHED)
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert_rel(got.float(), want, INF_WEIGHTS_LOGITS_REL[dtype], f"{dtype} weights: teacher-forced logits")
    assert all(p.dtype == dtype for p in model.parameters())
    _, _, img = _sample(model, vae, t, ret_img=True)
    assert img.dtype == torch.uint8 and img.shape == (2, 256, 256, 3)
    compute = dtype if dtype == torch.bfloat16 else torch.float32     # a CPU Sampler computes in these two
    images = fastvar.Sampler(model, vae, dtype=compute).sample(t, seed=0, scale_schedule=SCHED)
    assert images.shape == (2, 3, 256, 256) and torch.isfinite(images).all()
    model.head.to(torch.float16 if dtype == torch.bfloat16 else torch.bfloat16)
    with pytest.raises(ValueError, match=r"the Infinity weights mix the dtypes \['torch.bfloat16', 'torch.float16'\]"):
        model(t, x, SCHED)
