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
