"""Scale schedules: the pyramid of token maps VAR predicts, coarse to fine.

A schedule is a sequence of scales. Each scale is an ``int`` ``pn`` (a ``pn x pn`` token map, as
in the official ``patch_nums``) or an ``(h, w)`` pair (a non-square map). The flat token sequence
holds the scales one after the other, row-major inside each scale.

:class:`Schedule` holds everything derived from ``patch_nums`` (sizes, token counts, offsets), built
once per schedule; the models hand it down to their blocks and the sampler instead of re-deriving it.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence, Tuple, Union

from fastvar.labels import int_scalar

ScaleSpec = Union[int, Tuple[int, int]]

# The official schedules of the released checkpoints.
PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)   # L = 680
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)  # L = 2240


def scale_hws(patch_nums: Sequence[ScaleSpec], name: str = "patch_nums") -> Tuple[Tuple[int, int], ...]:
    """``patch_nums`` as a tuple of ``(h, w)`` pairs; raises ``ValueError`` naming ``name`` if malformed."""
    if isinstance(patch_nums, Schedule):
        return patch_nums.hws
    if isinstance(patch_nums, (str, bytes)) or not hasattr(patch_nums, "__len__") or len(patch_nums) == 0:
        raise ValueError(f"{name} must be a non-empty sequence of ints or (h, w) pairs, got {patch_nums!r}")
    hws = []
    for i, pn in enumerate(patch_nums):
        if int_scalar(pn) is not None:
            h = w = int_scalar(pn)
        else:
            try:
                pair = None if isinstance(pn, (str, bytes)) else list(pn)
            except TypeError:          # a float, or a 0-d tensor
                pair = None
            if pair is None or len(pair) != 2 or any(int_scalar(v) is None for v in pair):   # (2.5, 3) is not (2, 3)
                raise ValueError(f"{name}[{i}] must be an int or an (h, w) pair of ints, got {pn!r}")
            h, w = int_scalar(pair[0]), int_scalar(pair[1])
        if h < 1 or w < 1:
            raise ValueError(f"{name}[{i}] must be positive, got {pn!r}")
        hws.append((h, w))
    return tuple(hws)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A scale schedule and what follows from it.

    ``hws``: ``(h, w)`` of every scale; ``lens``: its token count ``h*w``; ``spans``: its ``[begin, end)``
    range in the flat token sequence; ``L``: the sequence length; ``first_l``: tokens of the first scale.
    Build with :meth:`of` (memoised: one object per schedule).
    """

    hws: Tuple[Tuple[int, int], ...]

    @staticmethod
    def of(patch_nums: Union[Sequence[ScaleSpec], "Schedule"], name: str = "patch_nums") -> "Schedule":
        """The schedule of ``patch_nums`` (ints or ``(h, w)`` pairs); ``ValueError`` naming ``name`` if malformed."""
        return patch_nums if isinstance(patch_nums, Schedule) else _schedule(scale_hws(patch_nums, name))

    @functools.cached_property
    def lens(self) -> Tuple[int, ...]:
        return tuple(h * w for h, w in self.hws)

    @functools.cached_property
    def spans(self) -> Tuple[Tuple[int, int], ...]:
        out, cur = [], 0
        for n in self.lens:
            out.append((cur, cur + n))
            cur += n
        return tuple(out)

    @property
    def L(self) -> int:
        return self.spans[-1][1]

    @property
    def first_l(self) -> int:
        return self.lens[0]

    @property
    def num_scales(self) -> int:
        return len(self.hws)

    @property
    def patch_nums(self) -> Tuple[ScaleSpec, ...]:
        """Square scales as ints, others as ``(h, w)``: the form models store and print."""
        return tuple(h if h == w else (h, w) for h, w in self.hws)

    def __len__(self) -> int:
        return len(self.hws)

    def prefix(self, L: int) -> "Schedule":
        """The first scales, which hold exactly ``L`` tokens (a progressive-training forward)."""
        for si, (_, end) in enumerate(self.spans):
            if end == L:
                return Schedule.of(self.hws[: si + 1])
        raise ValueError(f"a sequence of L={L} tokens does not end at a scale boundary of the schedule "
                         f"{list(self.patch_nums)} (scale ends: {[e for _, e in self.spans]})")


@functools.lru_cache(maxsize=64)
def _schedule(hws: Tuple[Tuple[int, int], ...]) -> Schedule:
    return Schedule(hws)


def scale_lens(patch_nums: Sequence[ScaleSpec]) -> Tuple[int, ...]:
    """Token count ``h*w`` of every scale."""
    return Schedule.of(patch_nums).lens


def begin_ends(patch_nums: Sequence[ScaleSpec]) -> Tuple[Tuple[int, int], ...]:
    """``[begin, end)`` token range of every scale in the flat sequence."""
    return Schedule.of(patch_nums).spans


def canonical(patch_nums: Sequence[ScaleSpec]) -> Tuple[ScaleSpec, ...]:
    """Square scales as ints, others as ``(h, w)``: the form models store and print."""
    return Schedule.of(patch_nums).patch_nums
