"""Bad arguments to the ops: rejected before any backend runs, so eager, Triton and the CUDA extension's glue
answer alike (the checks sit in the op layer; a forced backend that cannot run here would raise a RuntimeError
instead of the ValueError/TypeError if a check came after the dispatch)."""
import math

import pytest
import torch

from fastvar import ops

BACKENDS = ["eager", "triton", "cuda"]


@pytest.fixture(params=BACKENDS)
def any_backend(request, monkeypatch):
    monkeypatch.setenv("FASTVAR_BACKEND", request.param)
    return request.param


def _kv(B=2, l=3, H=2, D=64, L=9):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, l, H, D, generator=g) for _ in range(3))
    return q, k, v, torch.zeros(B, L, H, D), torch.zeros(B, L, H, D)


def test_one_tensor_as_both_kv_caches(any_backend):
    q, k, v, kc, _ = _kv()
    with pytest.raises(ValueError, match="k_cache and v_cache must not share memory"):
        ops.kv_cached_attention(q, k, v, kc, kc, 0)
    both = torch.zeros(2, 9, 2, 128)              # overlapping views of one buffer
    with pytest.raises(ValueError, match="k_cache and v_cache must not share memory"):
        ops.kv_cached_attention(q, k, v, both[..., :64], both[..., 32:96], 0)


def test_disjoint_views_of_one_buffer_are_fine_as_caches():
    q, k, v, _, _ = _kv()
    buf = torch.zeros(2, 2, 9, 2, 64)            # k and v caches as two halves of one allocation
    ref_k, ref_v = torch.zeros(2, 9, 2, 64), torch.zeros(2, 9, 2, 64)
    out = ops.kv_cached_attention(q, k, v, buf[0], buf[1], 2)
    expect = ops.kv_cached_attention(q, k, v, ref_k, ref_v, 2)
    assert torch.equal(out, expect) and torch.equal(buf[0], ref_k) and torch.equal(buf[1], ref_v)


@pytest.mark.parametrize("cache_len,error", [(2.5, TypeError), (2.0, TypeError), (True, TypeError),
                                             (torch.tensor(2), TypeError), (-1, ValueError), (7, ValueError)])
def test_cache_len_must_be_a_whole_in_range_int(any_backend, cache_len, error):
    q, k, v, kc, vc = _kv()
    with pytest.raises(error, match="cache_len must be"):
        ops.kv_cached_attention(q, k, v, kc, vc, cache_len)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("cfg", [False, True])
def test_sampling_noise_must_be_positive_and_finite(any_backend, bad, cfg):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 3, 16, generator=g)
    noise = torch.empty(6 if cfg else 12, 16).exponential_(generator=g)
    noise[1, 5] = bad
    with pytest.raises(ValueError, match="noise must hold positive, finite Exp"):
        if cfg:
            ops.sample_cfg_top_k_top_p(logits, 1.5, top_k=4, noise=noise)
        else:
            ops.sample_top_k_top_p(logits, noise=noise)


def test_noise_check_is_skipped_while_capturing(monkeypatch):
    """A check that reads values back to the host must not run inside a CUDA-graph capture."""
    import fastvar.ops.sampling as sampling
    noise = torch.full((4, 16), -1.0)
    with pytest.raises(ValueError, match="noise"):
        ops.sample_top_k_top_p(torch.randn(4, 16), noise=noise)
    monkeypatch.setattr(sampling, "_capturing", lambda t: True)
    ops.sample_top_k_top_p(torch.randn(4, 16), noise=noise)      # no check, no error


@pytest.mark.parametrize("eps,error", [(0.0, ValueError), (-1e-6, ValueError), (math.nan, ValueError),
                                       (math.inf, ValueError), ("1e-6", TypeError), (None, TypeError)])
def test_layernorm_eps_must_be_positive_and_finite(any_backend, eps, error):
    x, y = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    m = torch.randn(2, 1, 8)
    with pytest.raises(error, match="eps must be"):
        ops.adaln_modulate(x, m, m, eps)
    with pytest.raises(error, match="eps must be"):
        ops.gated_residual_adaln(x, y, m, m, m, eps)


@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("code", [64, -1, 1 << 40])
def test_out_of_range_codes_raise_on_the_host_whatever_validate(any_backend, validate, code):
    """On host tensors the range check costs no synchronisation, so it runs with ``validate=False`` too:
    eager (whose gather would raise) and Triton (whose masked load added a 0 code) answer alike."""
    f_hat = torch.zeros(1, 8, 4, 4)
    codes = torch.zeros(1, 2, 2, dtype=torch.int64)
    codes[0, 1, 0] = code
    with pytest.raises(ValueError, match=r"codes must hold codebook indices in \[0, 64\)"):
        ops.upsample_accumulate_(f_hat, codes, codebook=torch.randn(64, 8), next_hw=(2, 2), validate=validate)
    assert not f_hat.any(), "f_hat must be left untouched"


@pytest.mark.parametrize("hw", [(2.5, 3), (2, 3.0), (True, 2), "ab", 4])
def test_sizes_are_whole_numbers(any_backend, hw):
    x = torch.randn(1, 2, 8, 8)
    with pytest.raises(TypeError, match="size must be a pair of positive ints"):
        ops.area_downsample(x, hw)
    with pytest.raises(TypeError, match="next_hw must be a pair of positive ints"):
        ops.upsample_accumulate_(torch.zeros(1, 2, 8, 8), torch.randn(1, 2, 4, 4), next_hw=hw)


@pytest.mark.parametrize("pn", [(1, (2.5, 3), 4), (1, 2.5, 4), (1, torch.tensor(2.0), 4)])
def test_fractional_scales_in_a_schedule(pn):
    from fastvar.schedule import Schedule
    with pytest.raises(ValueError, match=r"patch_nums\[1\] must be an int or an \(h, w\) pair of ints"):
        Schedule.of(pn)


def test_unchecked_paths_read_nothing_back(monkeypatch):
    """``validate=False`` (the Sampler's setting on CUDA) and the scalar checks add no host read of a tensor's
    values: no ``bool()``, ``int()``, ``float()``, ``.item()`` or ``.tolist()`` of a tensor."""
    g = torch.Generator().manual_seed(2)
    logits, noise = torch.randn(4, 3, 16, generator=g), torch.empty(6, 16).exponential_(generator=g)
    q, k, v, kc, vc = _kv()
    x, y, m = torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(2, 1, 8)

    def no_read(*args, **kwargs):
        raise AssertionError("a tensor's value was read back to the host")
    for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, no_read)
    ops.sample_cfg_top_k_top_p(logits, 1.5, top_k=4, top_p=0.9, noise=noise, validate=False)
    ops.kv_cached_attention(q, k, v, kc, vc, 3)
    ops.adaln_modulate(x, m, m, 1e-6)
    ops.gated_residual_adaln(x, y, m, m, m, 1e-6)
