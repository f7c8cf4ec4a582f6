"""Token sampling ops: CFG mix, top-k / top-p filtering and the categorical draw (functional API,
the ``torch.library`` custom op, backend choice).

See :mod:`fastvar.reference.sampling` for the official semantics these ops reproduce and
:mod:`fastvar.triton_kernels.sampling` for the fused kernel (one read of the logits, no sort).

Two modes:

- ``mode="exact"`` (default): the draw consumes the caller's ``torch.Generator`` exactly as the
  official ``torch.multinomial`` does: one ``(rows, V)`` float32 ``exponential_`` draw ``q``, token =
  ``argmax(probs / q)`` (first maximum). The same generator state gives the official tokens. A
  ``noise`` tensor (the Exp(1) draw, e.g. a static buffer refilled before a CUDA-graph replay) may be
  passed instead of the generator.
- ``mode="fast"``: no noise tensor; one counter-based uniform per row inside the kernel,
  ``u = Philox(seed, offset + row)`` (``triton.language.rand``), and an inverse-CDF draw. Same seed and
  offset, same tokens (on every backend: the eager path computes the same Philox numbers); it does not
  reproduce the official tokens.

Semantics shared by every backend (and equal to the official code wherever the official one is
defined; VAR_SPEC.md section 3):

- logits are used in float32 (float16 / bfloat16 inputs are upcast exactly; the official sampler's
  logits are float32). CFG: ``fl32(1 + t) * cond - fl32(t) * uncond``, rounded as torch rounds it.
- top-k (``0 < k < V``): every logit ``>=`` the k-th largest is kept (ties at the k-th value kept).
- top-p (``p > 0``), after top-k: entries whose cumulative probability in the ascending order is
  ``<= fl32(1 - p)`` are removed, never the largest. **Ties** (equal logits straddling the top-p
  threshold) are ordered as a *stable* ascending sort orders them: lower index first, hence removed
  first; of tied maxima the highest index is the one always kept. This is what torch's sort does on
  CUDA for rows of more than 32 values (the official code on a GPU); on CPU torch's unstable sort
  orders ties arbitrarily, so there fastvar may keep a different member of the threshold group than
  the official CPU run. Tie-free rows are unaffected.

Exactness of ``mode="exact"`` on the Triton path (the eager path runs torch's own softmax and is
bit-identical to the official sampler on tie-free rows). The CFG mix and the top-k set are
bit-exact (same float32 roundings, FMA contraction off). The draw compares ``exp(x_j - max) / q_j``,
which is invariant to the normalisation; torch compares ``fl(fl(exp(x_j - max) * s) / q_j)`` with
``s = 1 / sum`` (CPU; ``/ sum`` on CUDA) and its own exp. The two argmaxes can only differ when a
row's two best ratios lie within a few float32 ulps of each other (both computations are within ~3
ulps of the exact ratio, so a relative gap of 2^-20 covers every possible flip), which happens with
probability about that gap per row (~5e-7 at 2^-20, measured 4e-7); the top-p
boundary adds a difference only when the boundary entry's cumulative mass is within float32
rounding of ``1 - p`` *and* that entry wins the draw (~1e-8 per row). On a GPU the kernel uses
libdevice's ``expf``, the exp torch's CUDA softmax uses. Measured (CPU, Triton interpreter,
``bench/results/sampling_study_cpu_*``): 1 token difference in 10.5 M random rows (V = 64,
with and without top-k/top-p), in a row whose two best ratios were within 2^-20; 0 differences over
the golden VAR runs (2 x 680 tokens at V = 4096, top-k 900 / top-p 0.96 and none). GPU rates: owed
(``bench/bench_sampling.py --study``).

Bad input: NaN (after the CFG mix), ``+inf``, or a row that is entirely ``-inf`` raise ``ValueError``
naming the row. The Triton kernel writes a per-row error code; with ``validate=True`` (default) the op
reads it back, one 4-byte-per-row device-to-host check per call (a sync on CUDA), skipped
automatically while a CUDA graph is being captured. ``validate=False`` never syncs: bad rows then get
token ``-1``, which makes the following embedding lookup fail loudly instead of sampling garbage.
A ``noise`` tensor passed in must hold positive, finite values: ``validate=True`` checks it (the same read back),
``validate=False`` does not, and a bad entry gives an undefined token (every backend alike).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
import torch

from fastvar.reference import sampling as ref
from fastvar.ops import cuda_ext
from fastvar.ops._backend import select, warn_once
from fastvar.ops._checks import (FLOAT_DTYPES, capturing as _capturing, check_finite_scalar, check_tensor,
                                 raise_for_sample_errors, sample_error_codes)

MODES = ("exact", "fast")


def check_top_k_top_p(top_k, top_p, V: Optional[int] = None):
    """Validate and normalise ``top_k`` (int in [0, V]) and ``top_p`` (float in [0, 1])."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) and not (
            isinstance(top_k, float) and top_k.is_integer()):
        raise TypeError(f"top_k must be an int >= 0, got {top_k!r}")
    top_k = int(top_k)
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if V is not None and top_k > V:
        raise ValueError(f"top_k must be <= the vocabulary size V={V}, got {top_k}")
    top_p = check_finite_scalar("top_p", top_p, 0.0, 1.0)
    return top_k, top_p


def check_logits(logits: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the first bad row if ``logits`` ``(..., V)`` has NaN, ``+inf``, or a row that is
    entirely ``-inf``."""
    raise_for_sample_errors(sample_error_codes(logits), after_cfg=False)


def _fp32(x: float) -> float:
    """The float32 rounding of a Python float, as torch rounds a scalar it combines with a float32 tensor."""
    return float(np.float32(x))


# ------------------------------------------------------------------------------ implementations
# Every implementation takes the normalised request:
#   logits  (N, l, V) float, any strides;  n_cond: rows are n_cond * l (N = 2 * n_cond with CFG)
#   cfg_t   None (no CFG) or the guidance t;  top_k int in [0, V];  top_p float in [0, 1]
#   noise   (rows, V) float32 Exp(1) draw (exact mode) or None (fast mode)
#   seed_offset  fast mode: (seed, offset) ints or an int64 tensor [seed, offset]
# and returns (tokens (rows,) int64, filtered (rows, V) float32 or None).

def _eager_impl(logits, n_cond, cfg_t, top_k, top_p, noise, seed_offset, return_filtered, validate):
    V = logits.shape[-1]
    x = logits.float()
    if cfg_t is not None:
        x = ref.cfg_mix(x, cfg_t)
    elif x.data_ptr() == logits.data_ptr():
        x = x.clone()                                  # the filter works in place
    x = x.reshape(-1, V)
    if not x.is_contiguous():
        x = x.contiguous()
    err, bad = sample_error_codes(x), None
    if validate and not _capturing(x):
        raise_for_sample_errors(err, cfg_t is not None)
    else:   # no host sync (CUDA graphs): bad rows draw -1, as the Triton kernel marks them
        bad = err != 0
    ref.top_k_top_p_filter_(x, top_k, top_p, stable=True)
    probs = x.softmax(dim=-1)
    if noise is not None:
        tokens = ref.sample_with_noise(probs, noise)
    else:
        if isinstance(seed_offset, torch.Tensor):
            seed, offset = (int(v) for v in seed_offset.tolist())
        else:
            seed, offset = seed_offset
        rows = torch.arange(x.shape[0], device=x.device, dtype=torch.int64)
        tokens = ref.sample_with_uniform(probs, ref.philox_uniform(seed, rows + offset))
    if bad is not None:
        tokens = torch.where(bad, -1, tokens)
    return tokens, (x if return_filtered else None)


@torch.library.custom_op("fastvar::sample_top_k_top_p", mutates_args=())
def _fused_sample_op(logits: torch.Tensor, noise: Optional[torch.Tensor], seed_offset: Optional[torch.Tensor],
                     n_cond: int, seed: int, offset: int, has_cfg: bool, cfg_t: float, top_k: int, top_p: float,
                     return_filtered: bool, validate: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The fused Triton sampler as one graph node: ``(tokens (rows,) int64, filtered)``, ``filtered``
    ``(rows, V)`` float32 if ``return_filtered`` else ``(0, V)``. Raises ``ValueError`` on bad rows when
    ``validate`` (not while a CUDA graph is being captured)."""
    from fastvar.triton_kernels import sampling as kernels

    N, l, V = logits.shape
    rows = n_cond * l
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    err = torch.empty(rows, dtype=torch.int32, device=logits.device)
    filtered = torch.empty((rows if return_filtered else 0), V, dtype=torch.float32, device=logits.device)
    kernels.sample_fwd(
        logits, tokens, err, n_cond, _fp32(1.0 + cfg_t), _fp32(cfg_t), top_k, _fp32(1.0 - top_p),
        noise=noise, seed=seed, offset=offset, seed_offset=seed_offset,
        filtered=filtered if return_filtered else None, has_cfg=has_cfg, has_top_k=0 < top_k < V,
        has_top_p=top_p > 0, interpret=logits.device.type != "cuda")
    if validate and not _capturing(logits):
        raise_for_sample_errors(err, has_cfg)
    return tokens, filtered


@_fused_sample_op.register_fake
def _(logits, noise, seed_offset, n_cond, seed, offset, has_cfg, cfg_t, top_k, top_p, return_filtered, validate):
    rows, V = n_cond * logits.shape[1], logits.shape[2]
    return (logits.new_empty(rows, dtype=torch.int64),
            logits.new_empty((rows if return_filtered else 0), V, dtype=torch.float32))


def _triton_impl(logits, n_cond, cfg_t, top_k, top_p, noise, seed_offset, return_filtered, validate):
    from fastvar.triton_kernels.sampling import MAX_V

    if logits.shape[-1] > MAX_V or logits.dtype == torch.float64:
        why = (f"V={logits.shape[-1]} > {MAX_V} (the row must fit in registers)" if logits.shape[-1] > MAX_V
               else "float64 logits (the kernel computes in float32)")
        warn_once(("sample_top_k_top_p", "triton", why), f"fastvar: the fused sampler falls back to eager: {why}")
        return _eager_impl(logits, n_cond, cfg_t, top_k, top_p, noise, seed_offset, return_filtered, validate)
    seed, offset, so_tensor = 0, 0, None
    if noise is None:
        if isinstance(seed_offset, torch.Tensor):
            so_tensor = seed_offset
        else:
            seed, offset = seed_offset
    tokens, filtered = _fused_sample_op(
        logits, noise, so_tensor, n_cond, seed, offset, cfg_t is not None,
        0.0 if cfg_t is None else float(cfg_t), top_k, top_p, return_filtered, validate)
    return tokens, (filtered if return_filtered else None)


SAMPLE_IMPLS = {"eager": _eager_impl, "triton": _triton_impl, "cuda": cuda_ext.sample}


# ------------------------------------------------------------------------------ public API

def _check_generator(generator, device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(f"generator must be on the device of logits ({device}), got one on {generator.device}")


def _exact_noise(noise, rows: int, V: int, generator, device, validate: bool) -> torch.Tensor:
    if noise is None:
        return ref.exponential_noise(rows, V, generator, device=device)
    check_tensor("noise", noise, ndim=2, dtypes=(torch.float32,), shape=(rows, V))
    if noise.device != device:
        raise ValueError(f"noise must be on the device of logits ({device}), got {noise.device}")
    # the draw is argmax(p / noise): a zero, negative, NaN or inf entry picks or hides tokens at will. Checked with
    # the logits (validate: one more read back, a sync on CUDA), never while capturing
    if validate and not _capturing(noise) and not bool(((noise > 0) & (noise < float("inf"))).all()):
        raise ValueError("noise must hold positive, finite Exp(1) draws (the exact mode's exponential race); it "
                         "holds a value <= 0, NaN or inf")
    return noise if noise.stride(-1) == 1 else noise.contiguous()


def _fast_seed(seed, offset, generator, device):
    """``(seed, offset)`` ints, or an int64 ``[seed, offset]`` tensor on ``device``."""
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be an int >= 0, got {offset!r}")
    if seed is None:                                   # a fresh seed from the caller's generator
        gen_device = generator.device if generator is not None else device
        s = torch.randint(0, 2 ** 62, (2,), generator=generator, device=gen_device)
        if s.device.type == "cpu":
            return int(s[0]), offset
        s[1] = offset                                  # stays on the device: no sync
        return s.to(device)
    if isinstance(seed, torch.Tensor):
        check_tensor("seed", seed, dtypes=(torch.int64,))
        if seed.numel() not in (1, 2) or seed.device != device:
            raise ValueError(f"seed as a tensor must be an int64 [seed] or [seed, offset] on {device}, got "
                             f"shape {tuple(seed.shape)} on {seed.device}")
        if seed.numel() == 1:
            return torch.cat([seed.reshape(1), seed.new_full((1,), offset)])
        return seed.reshape(2)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed must be an int in [0, 2**63) (or an int64 tensor), got {seed!r}")
    return seed, offset


def _run(op, impls, logits3, n_cond, cfg_t, top_k, top_p, generator, mode, seed, offset, noise,
         return_filtered, validate):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    device = logits3.device
    _check_generator(generator, device)
    rows, V = n_cond * logits3.shape[1], logits3.shape[2]
    if mode == "exact":
        noise, seed_offset = _exact_noise(noise, rows, V, generator, device, bool(validate)), None
    else:
        if noise is not None:
            raise ValueError("noise is for mode='exact'; mode='fast' draws its own random numbers from seed")
        seed_offset = _fast_seed(seed, offset, generator, device)
    impl = select(op, impls, device, {"cuda": cuda_ext.sample_unsupported(logits3, noise)})
    return impl(logits3, n_cond, cfg_t, top_k, top_p, noise, seed_offset, return_filtered, bool(validate))


def _check_float_logits(name: str, logits) -> None:
    check_tensor(name, logits, dtypes=FLOAT_DTYPES)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"{name} must have shape (..., V) with V >= 1, got {tuple(logits.shape)}")


def _as_3d(logits: torch.Tensor) -> torch.Tensor:
    """``(..., V)`` -> ``(N, l, V)``, a view whenever torch can make one (any strides are fine)."""
    if logits.dim() == 3:
        return logits
    if logits.dim() == 1:
        return logits.view(1, 1, -1)
    if logits.dim() == 2:
        return logits.unsqueeze(1)
    return logits.reshape(-1, logits.shape[-2], logits.shape[-1])


def sample_top_k_top_p(
    logits: torch.Tensor,
    top_k: int = 0,
    top_p: float = 0.0,
    generator: Optional[torch.Generator] = None,
    *,
    mode: str = "exact",
    seed: Optional[Union[int, torch.Tensor]] = None,
    offset: int = 0,
    noise: Optional[torch.Tensor] = None,
    validate: bool = True,
) -> torch.Tensor:
    """Draw one token per row from ``softmax(logits)`` restricted to the top-k / top-p support.

    Official semantics (``sample_with_top_k_top_p_`` then ``torch.multinomial``): in ``mode="exact"``
    the same ``generator`` state gives the same tokens as the official sampler (see the module
    docstring for ties and the Triton path's float32 caveat). ``logits`` is not modified.

    Args:
        logits: ``(..., V)`` float (computed in float32), any strides.
        top_k: keep the logits >= the k-th largest per row (ties at the k-th value kept); 0 disables.
        top_p: then drop the entries of cumulative ascending probability <= 1 - p (never the
            largest); 0 disables.
        generator: the ``torch.Generator`` the draw consumes (None: the device's default one). In exact
            mode it draws the ``(rows, V)`` Exp(1) noise; in fast mode without ``seed``, the seed.
        mode: ``"exact"`` (official tokens) or ``"fast"`` (in-kernel Philox, no noise tensor).
        seed, offset: fast mode: row ``r`` uses the uniform ``Philox(seed, offset + r)``. ``seed`` an int
            in [0, 2**63), or an int64 device tensor ``[seed]`` / ``[seed, offset]`` (CUDA graphs);
            None draws one from ``generator``.
        noise: exact mode: the ``(rows, V)`` float32 Exp(1) draw to use instead of drawing from
            ``generator`` (``rows = logits.numel() // V``), e.g. a static buffer for CUDA graphs. Every entry
            must be positive and finite (checked when ``validate``).
        validate: raise ``ValueError`` on NaN / +inf / all -inf rows of logits and on noise that is not positive
            and finite (a device sync on CUDA; skipped while a CUDA graph is captured); False: no sync, bad
            logit rows get token -1 on every backend, and noise is not checked: a zero, negative, NaN or inf
            entry gives an undefined token on every backend.
    Returns:
        int64 tensor of shape ``logits.shape[:-1]``.
    """
    _check_float_logits("logits", logits)
    top_k, top_p = check_top_k_top_p(top_k, top_p, logits.shape[-1])
    x = _as_3d(logits)
    tokens, _ = _run("sample_top_k_top_p", SAMPLE_IMPLS, x, x.shape[0], None, top_k, top_p, generator, mode, seed,
                     offset, noise, False, validate)
    return tokens.view(logits.shape[:-1])


def sample_cfg_top_k_top_p(
    logits: torch.Tensor,
    cfg_t: float,
    top_k: int = 0,
    top_p: float = 0.0,
    generator: Optional[torch.Generator] = None,
    *,
    mode: str = "exact",
    seed: Optional[Union[int, torch.Tensor]] = None,
    offset: int = 0,
    noise: Optional[torch.Tensor] = None,
    return_filtered: bool = False,
    validate: bool = True,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """One VAR sampling step after the head, fused: CFG mix, top-k, top-p and the draw.

    ``x = (1 + t) * logits[:B] - t * logits[B:]`` (conditional rows first), then exactly
    :func:`sample_top_k_top_p` on ``x``. The official loop calls it per scale with
    ``t = cfg * si / (S - 1)`` and the model's generator; ``mode="exact"`` reproduces its tokens.

    Args:
        logits: ``(2B, l, V)`` or ``(2B, V)`` float head output (computed in float32), any strides.
        cfg_t: the guidance ``t`` (finite; 0 keeps the conditional logits).
        top_k, top_p, generator, mode, seed, offset, noise, validate: as in :func:`sample_top_k_top_p`
            (``rows = B * l``).
        return_filtered: also return the CFG-mixed logits with ``-inf`` outside the kept support, as
            the official in-place filter leaves them (``more_smooth`` needs them; a ``-0.0`` logit may
            come back as ``+0.0`` from the Triton path).
    Returns:
        tokens ``(B, l)`` (or ``(B,)``) int64; with ``return_filtered``, ``(tokens, filtered)`` with
        ``filtered`` ``(B, l, V)`` (or ``(B, V)``) float32, a new tensor.
    """
    _check_float_logits("logits", logits)
    if logits.dim() not in (2, 3) or logits.shape[0] % 2 or logits.shape[0] == 0:
        raise ValueError(f"logits must have shape (2B, l, V) or (2B, V) with the B conditional rows first, "
                         f"got {tuple(logits.shape)}")
    cfg_t = check_finite_scalar("cfg_t", cfg_t)
    top_k, top_p = check_top_k_top_p(top_k, top_p, logits.shape[-1])
    x = logits if logits.dim() == 3 else logits.unsqueeze(1)
    B = x.shape[0] // 2
    tokens, filtered = _run("sample_cfg_top_k_top_p", SAMPLE_IMPLS, x, B, cfg_t, top_k, top_p, generator, mode,
                            seed, offset, noise, return_filtered, validate)
    out_shape = (B,) + tuple(logits.shape[1:-1])
    tokens = tokens.view(out_shape)
    if return_filtered:
        return tokens, filtered.view(out_shape + (logits.shape[-1],))
    return tokens


# Implementations by backend, per op: `fastvar info` reports them and the tests sweep them.
OPS = {"sample_top_k_top_p": SAMPLE_IMPLS, "sample_cfg_top_k_top_p": SAMPLE_IMPLS}
__all__ = ["sample_top_k_top_p", "sample_cfg_top_k_top_p", "check_top_k_top_p", "check_logits"]
