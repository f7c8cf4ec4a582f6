"""Sampling settings: one checked, immutable value instead of positional tuples."""
from __future__ import annotations

import dataclasses

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
