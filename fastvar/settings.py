"""Sampling settings: one checked, immutable value instead of positional tuples."""
from __future__ import annotations

import dataclasses
from typing import Optional

from fastvar.labels import int_scalar
from fastvar.ops._checks import check_finite_scalar
from fastvar.ops.sampling import check_top_k_top_p


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """How tokens are drawn at every scale.

    ``cfg``: classifier-free guidance strength (the official ramp ``cfg * si / (S - 1)``); ``top_k`` (0 = off,
    at most the vocabulary) and ``top_p`` (0 = off) filtering; ``more_smooth``: Gumbel-softmax-weighted codes
    instead of sampled ones (the official visualisation option). Build with :meth:`checked`; instances are
    hashable (the Sampler keys its CUDA graphs by them).
    """

    cfg: float
    top_k: int
    top_p: float
    more_smooth: bool = False

    @classmethod
    def checked(cls, cfg, top_k, top_p, more_smooth=False, V: int = None) -> "SamplingSettings":
        """Validated settings; ``ValueError`` / ``TypeError`` naming the argument otherwise."""
        top_k, top_p = check_top_k_top_p(top_k, top_p, V)
        return cls(check_finite_scalar("cfg", cfg), top_k, top_p, bool(more_smooth))


@dataclasses.dataclass(frozen=True)
class InfinitySettings:
    """How Infinity's bits are drawn at every scale (the official ``autoregressive_infer_cfg`` arguments).

    ``scale_schedule``: a full dynamic-resolution template schedule (tuple of ``(1, h, w)``); ``cfg``, ``tau``:
    one guidance strength and one temperature per scale (the official ``cfg_list`` / ``tau_list``);
    ``top_k`` / ``top_p`` over the two values of each bit; ``on_logits``: guidance on the logits (official
    ``cfg_insertion_layer`` item 0); ``hidden_layers``: the blocks after which the hidden state is guided (items
    ``k < 0`` -> block ``depth + k``). Build with :meth:`checked`; instances are hashable (the Sampler keys its
    CUDA graphs by them).
    """

    scale_schedule: tuple
    cfg: tuple
    tau: tuple
    top_k: int
    top_p: float
    on_logits: bool
    hidden_layers: tuple

    @property
    def guided(self) -> bool:
        """Guidance at some scale: the batch is doubled (conditional rows first), as officially."""
        return any(c != 1 for c in self.cfg)

    @classmethod
    def checked(cls, scale_schedule, cfg, tau, top_k, top_p, cfg_insertion_layer, depth: int) -> "InfinitySettings":
        """Validated settings for a model of ``depth`` blocks; ``ValueError`` / ``TypeError`` naming the argument.
        ``cfg`` / ``tau``: a number (every scale) or a sequence with at least one value per scale (the official
        lists; extra values are ignored, as officially)."""
        from fastvar import dynamic_resolution

        sched = dynamic_resolution.check_schedule(scale_schedule, "scale_schedule")
        S = len(sched)
        per_scale = {}
        for name, value in (("cfg", cfg), ("tau", tau)):
            values = [value] * S if not isinstance(value, (list, tuple)) else list(value)
            if len(values) < S:
                raise ValueError(f"{name} must be a number or hold one value per scale ({S}), got {len(values)}: "
                                 f"{values}")
            per_scale[name] = tuple(check_finite_scalar(f"{name}[{i}]", v) for i, v in enumerate(values[:S]))
        if any(t == 0 for t in per_scale["tau"]):
            raise ValueError(f"tau must not hold 0 (the logits are multiplied by 1 / tau), got {per_scale['tau']}")
        top_k, top_p = check_top_k_top_p(top_k, top_p)
        if isinstance(cfg_insertion_layer, (int, float)) and not isinstance(cfg_insertion_layer, bool):
            cfg_insertion_layer = [cfg_insertion_layer]
        on_logits, hidden = False, []
        for item in cfg_insertion_layer:
            if isinstance(item, bool) or not isinstance(item, int):
                raise TypeError(f"cfg_insertion_layer items must be ints, got {item!r}")
            if item == 0:
                on_logits = True
            elif item < 0 and depth + item > 0:
                hidden.append(depth + item)
            elif item != 1:          # 1: the official "guidance on probabilities" flag, which nothing reads
                raise ValueError(f"cfg_insertion_layer items must be 0, 1 or a negative block offset > -depth "
                                 f"({-depth}), got {item}")
        return cls(sched, per_scale["cfg"], per_scale["tau"], top_k, top_p, on_logits, tuple(sorted(set(hidden))))


# The sampling settings of the released ImageNet checkpoints (the official demo's): cfg 1.5, top-k 900, top-p 0.96.
RELEASED_SETTINGS = dict(cfg=1.5, top_k=900, top_p=0.96)


def default_settings(var) -> SamplingSettings:
    """A model's sampling settings when the caller gives none: the ones it carries
    (``var.recommended_settings``, e.g. the bundled digits model's cfg 2, top-k 0, top-p 0), else the released
    checkpoints' :data:`RELEASED_SETTINGS` with ``top_k`` capped at the model's vocabulary ``V``. The one place
    the defaults of :class:`fastvar.Sampler` and ``fastvar sample`` come from."""
    own = getattr(var, "recommended_settings", None)
    if own is not None:
        if not isinstance(own, SamplingSettings):
            raise TypeError(f"{type(var).__name__}.recommended_settings must be a SamplingSettings or None, "
                            f"got {type(own).__name__}")
        return own
    V = int(var.V)
    return SamplingSettings.checked(RELEASED_SETTINGS["cfg"], min(RELEASED_SETTINGS["top_k"], V),
                                    RELEASED_SETTINGS["top_p"], V=V)


def resolve_settings(var, cfg=None, top_k=None, top_p=None, more_smooth: bool = False) -> SamplingSettings:
    """Checked settings for ``var``: each of ``cfg``, ``top_k``, ``top_p`` given, or None for the model's default
    (:func:`default_settings`)."""
    d = default_settings(var)
    return SamplingSettings.checked(d.cfg if cfg is None else cfg, d.top_k if top_k is None else top_k,
                                    d.top_p if top_p is None else top_p, more_smooth, V=int(var.V))


# torch.Generator.manual_seed takes any 64-bit pattern: [-2**63, 0) wraps to 2**64 + seed
SEED_RANGE = (-2 ** 63, 2 ** 64)


def check_seed(seed, name: str = "seed") -> Optional[int]:
    """``seed`` as an int for ``torch.Generator.manual_seed`` (None stays None): integers only (a float seed is
    not truncated, a bool is not 0 or 1), in ``[-2**63, 2**64)`` as torch takes them."""
    if seed is None:
        return None
    value = int_scalar(seed)
    if value is None:
        raise TypeError(f"{name} must be an int (or None), got {seed!r} ({type(seed).__name__})")
    if not SEED_RANGE[0] <= value < SEED_RANGE[1]:
        raise ValueError(f"{name} must be in [-2**63, 2**64) (torch.Generator.manual_seed), got {value}")
    return value
