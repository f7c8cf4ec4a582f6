"""Infinity's bit sampler (temperature, CFG mix, top-k/top-p over the two values of a bit, the draw, the codes)
against the official eager chain.

Exact mode: given the same Exp(1) noise, the eager path is the official chain and the Triton kernel
(interpreter on CPU) must give the same bits on random irregular inputs and on the golden runs. Statistics:
many draws of fixed rows must follow the filtered softmax (chi-square p-value above ``CHI2_P_MIN``) and never
draw a removed value; negative controls (a wrong temperature, no top-p) must fail the same test.
"""
import math

import pytest
import torch

from fastvar import ops
from fastvar.reference import infinity as ref
from tolerances import CHI2_P_MIN

INF = float("inf")




def _rng():
    seed = int(torch.randint(0, 2 ** 31, (1,)))
    return torch.Generator().manual_seed(seed), seed


def _official(logits, B, cfg, tau, top_k, top_p, noise):
    """The official chain: ``.mul(1 / tau)``, guidance, in-place filter, softmax, the multinomial's race."""
    x = logits.float().mul(1 / tau)
    if cfg is not None:
        x = ref.cfg_mix(x, cfg)
    return ref.sample_bits_with_noise(x.contiguous(), top_k, top_p, noise)


SETTINGS = [  # cfg, tau, top_k, top_p
    (None, 1.0, 0, 0.0), (3.0, 0.5, 900, 0.97), (1.5, 1.0 - 0.1 * 6, 0, 0.9), (None, 0.7, 1, 0.0),
    (2.0, 1.0, 2, 0.5), (None, 1.0, 1, 0.9), (-0.5, 2.0, 0, 0.3),
]


@pytest.mark.parametrize("cfg,tau,top_k,top_p", SETTINGS)
def test_exact_mode_equals_official_given_the_noise(cpu_backend, poisoned_empty, cfg, tau, top_k, top_p):
    gen, seed = _rng()
    B, n = 3, 1031                                            # 3093 bits, an irregular count
    N = 2 * B if cfg is not None else B
    wide = torch.randn(N, n, 5, generator=gen) * 3            # logits as a strided view (stride 2 on the pair)
    logits = wide[..., 1:5:2]
    logits[0, :7] = torch.tensor([1.25, 1.25])                # exact ties: the stable order's rule
    noise = torch.empty(B * n, 2).exponential_(generator=gen)
    bits, codes = ops.sample_bits(logits, B, cfg=cfg, tau=tau, top_k=top_k, top_p=top_p, noise=noise)
    want = _official(logits, B, cfg, tau, top_k, top_p, noise)
    assert codes is None and bits.dtype == torch.uint8 and bits.shape == (B, n)
    diff = bits.long() != want
    assert not diff.any(), f"seed {seed}: {int(diff.sum())} bits differ from the official chain"


@pytest.mark.parametrize("patchify", [False, True])
def test_codes_in_the_official_layout(cpu_backend, poisoned_empty, patchify):
    gen, seed = _rng()
    B, h, w, d = 2, 3, 5, 6
    d_t = 4 * d if patchify else d
    logits = torch.randn(2 * B, h * w * d_t, 2, generator=gen)
    gen2 = torch.Generator()
    gen2.set_state(gen.get_state())
    bits, codes = ops.sample_bits(logits, B, cfg=2.5, tau=0.8, top_p=0.9, generator=gen, grid=(h, w),
                                  patchify=patchify)
    vae_bits = ref.tokens_to_vae_bits(bits.reshape(B, h, w, d_t), patchify)
    want = ref.bits_to_codes(vae_bits)
    assert codes.shape == want.shape == (B, d, 1, h * (1 + patchify), w * (1 + patchify))
    assert codes.stride() == want.stride() and torch.equal(codes, want)
    again, _ = ops.sample_bits(logits, B, cfg=2.5, tau=0.8, top_p=0.9, generator=gen2)     # the same draw
    assert torch.equal(again, bits)


def test_golden_bits(cpu_backend):
    """Every stored official bit from the stored logits and the seeded generator (both backends)."""
    import golden_infinity as golden
    for name in golden.FILES:
        g = golden.load(name)
        sched, patch = g["config"]["scale_schedule"], bool(g["config"]["apply_spatial_patchify"])
        for setting, s in g["samples"].items():
            gen = torch.Generator().manual_seed(s["g_seed"])
            for si, (logits, want) in enumerate(zip(s["logits"], s["sampled_bits"])):
                bits, codes = ops.sample_bits(logits, 2, top_k=s["kwargs"]["top_k"], top_p=s["kwargs"]["top_p"],
                                              generator=gen, grid=sched[si][1:], patchify=patch)
                assert torch.equal(bits, want), f"{name} {setting}: bits differ at scale {si}"
                assert torch.equal(codes, ref.bits_to_codes(s["bits"][si])), f"{name} {setting}: codes, scale {si}"


# ------------------------------------------------------------------------------------------ statistics
def _pvalue(ones: torch.Tensor, draws: int, p1: torch.Tensor) -> float:
    """Chi-square p-value of per-row counts of bit 1 against the probabilities ``p1`` (binomial cells);
    rows with ``p1`` in {0, 1} must be exact, else the p-value is 0."""
    ones, p1 = ones.double(), p1.double()
    det = (p1 == 0) | (p1 == 1)
    if (ones[det] != p1[det] * draws).any():
        return 0.0
    live = ~det
    if not live.any():
        return 1.0
    exp = p1[live] * draws
    stat = ((ones[live] - exp) ** 2 / (exp * (1 - p1[live]))).sum()
    df = int(live.sum())
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def _target_p1(x: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """P(bit = 1) after the official filter, float64, for mixed logits ``x`` ``(R, 2)`` (no ties)."""
    f = ref.bit_top_k_top_p_(x.double().clone(), top_k, top_p)
    return f.softmax(-1)[:, 1]


@pytest.mark.parametrize("cfg,tau,top_k,top_p", [(None, 1.0, 0, 0.0), (3.0, 0.5, 0, 0.9), (None, 0.7, 1, 0.0)])
def test_draws_follow_the_filtered_softmax(cpu_backend, cfg, tau, top_k, top_p):
    gen, seed = _rng()
    B, R, draws = 1, 24, 4000
    # the mixed logits the draw sees: pair differences across (-3, 3), so that top-p removes some and most
    # rows stay random (a test with only near-certain rows could not tell distributions apart)
    m = torch.stack([torch.zeros(R), torch.linspace(-3, 3, R)], dim=-1) + torch.randn(R, 1, generator=gen)
    if cfg is None:
        base = (m * tau)[None]
    else:                                    # cond and uncond rows whose mix is m: cfg * c / tau + (1 - cfg) * u / tau
        u = torch.randn(R, 2, generator=gen, dtype=torch.float64)
        c = (m.double() * tau - (1 - cfg) * u) / cfg
        base = torch.stack([c, u]).float()
    logits = base.repeat(1, draws, 1)                                                  # every row `draws` times
    bits, _ = ops.sample_bits(logits, B, cfg=cfg, tau=tau, top_k=top_k, top_p=top_p, generator=gen)
    ones = bits.view(draws, R).double().sum(0)
    x = base.float().mul(1 / tau)
    x = ref.cfg_mix(x, cfg) if cfg is not None else x
    p1 = _target_p1(x[0], top_k, top_p)
    p = _pvalue(ones, draws, p1)
    assert p > CHI2_P_MIN, f"seed {seed}: p-value {p:.3g} against the filtered softmax"
    # negative controls: a 20% temperature error (top-k 1 leaves no randomness), the filter left out
    if top_k != 1:
        assert _pvalue(ones, draws, _target_p1(x[0] * 1.2, top_k, top_p)) < CHI2_P_MIN, f"seed {seed}"
    if top_k or top_p:
        assert _pvalue(ones, draws, _target_p1(x[0], 0, 0.0)) < CHI2_P_MIN, f"seed {seed}"


def test_tie_rule_under_top_p(cpu_backend):
    """Equal logits with ``p = 0.5 <= 1 - top_p``: value 0 is removed (a stable ascending sort's order)."""
    logits = torch.zeros(1, 64, 2)
    bits, _ = ops.sample_bits(logits, 1, top_p=0.5, generator=torch.Generator().manual_seed(0))
    assert (bits == 1).all()
    bits, _ = ops.sample_bits(logits, 1, top_p=0.6, generator=torch.Generator().manual_seed(0))
    assert (bits == 0).any() and (bits == 1).any()            # 0.5 <= 0.4 is false: nothing removed


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("bad,cfg,match", [       # every backend names the first bad bit, as (b * n + i) of B * n
    ([(0, 3, 1, float("nan"))], None, r"logits hold NaN; cannot sample \(bit 3 of 10; 1 bad bit\(s\)\)"),
    ([(0, 0, 0, INF), (2, 0, 0, INF)], 2.0, r"logits hold NaN after the CFG mix; cannot sample \(bit 0 of 10;"),
    ([(1, 1, 0, INF)], None, r"logits hold \+inf; cannot sample \(bit 6 of 10; 1 bad bit"),
    ([(0, 2, slice(None), -INF)], None, r"both logits of a bit are -inf; cannot sample \(bit 2 of 10;"),
])
def test_bad_values(cpu_backend, bad, cfg, match):
    B = 2
    logits = torch.randn(2 * B if cfg else B, 5, 2)
    for b, i, j, value in bad:
        logits[b, i, j] = value
    with pytest.raises(ValueError, match=match):
        ops.sample_bits(logits, B, cfg=cfg, generator=torch.Generator().manual_seed(0))
    bits, _ = ops.sample_bits(logits, B, cfg=cfg, generator=torch.Generator().manual_seed(0), validate=False)
    assert bits.view(-1)[(b % B) * 5 + i] == 255 and (bits != 255).sum() == B * 5 - 1


def test_bad_arguments():
    logits = torch.randn(4, 30, 2)
    call = ops.sample_bits
    with pytest.raises(ValueError, match=r"logits must have N = 2B = 4 rows \(with cfg\), got 3"):
        call(logits[:3], 2, cfg=2.0)
    with pytest.raises(ValueError, match=r"logits must have N = B = 2 rows \(without cfg\), got 4"):
        call(logits, 2)
    with pytest.raises(ValueError, match=r"logits must be \(N, n, 2\) bit pairs"):
        call(logits.reshape(4, 20, 3), 4)
    with pytest.raises(ValueError, match="tau must be non-zero"):
        call(logits, 4, tau=0.0)
    with pytest.raises(ValueError, match=r"top_p must be in \[0.0, 1.0\]"):
        call(logits, 4, top_p=1.5)
    with pytest.raises(ValueError, match=r"grid \(h, w\) = \(4, 2\) must divide the n = 30 bits"):
        call(logits, 4, grid=(4, 2))
    with pytest.raises(ValueError, match=r"a multiple of 4 with patchify"):
        call(logits, 4, grid=(5, 2), patchify=True)
    with pytest.raises(ValueError, match=r"noise must have shape \(120, 2\)"):
        call(logits, 4, noise=torch.rand(60, 2))
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        call(logits, 4, generator=3)
    with pytest.raises(ValueError, match="B must be a positive int"):
        call(logits, 0)


def test_code_magnitude_is_the_official_normalised_value():
    for d in (8, 14, 16, 32):
        codes = ref.bits_to_codes(torch.randint(0, 2, (1, 1, 3, 3, d)))
        assert set(codes.abs().unique().tolist()) == {ops.code_magnitude(d)}
        assert abs(ops.code_magnitude(d) - 1 / math.sqrt(d)) < 1e-7


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_exact_mode_rate(dtype):
    """Real sizes (2B at 1024 px: 2 x 4096 tokens x 32 bits per scale), a CUDA generator: the kernel's bits
    equal the official chain's except at float32 near-ties (measured rate reported)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    B, n = 2, 4096 * 32
    logits = (torch.randn(2 * B, n, 2, device="cuda", generator=gen) * 4).to(dtype)
    noise = torch.empty(B * n, 2, device="cuda").exponential_(generator=gen)
    for cfg, tau, top_p in ((3.0, 0.5, 0.97), (None, 1.0, 0.0)):
        x = logits if cfg is not None else logits[:B]
        bits, codes = ops.sample_bits(x, B, cfg=cfg, tau=tau, top_p=top_p, noise=noise, grid=(64, 64))
        want = _official(x, B, cfg, tau, 0, top_p, noise)
        rate = (bits.long() != want).double().mean().item()
        assert rate < 1e-5, f"{rate:.2e} of the bits differ"
        assert torch.equal(codes, ref.bits_to_codes(ref.tokens_to_vae_bits(bits.reshape(B, 64, 64, 32), False)))
