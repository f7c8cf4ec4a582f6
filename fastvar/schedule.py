"""Scale schedules: the pyramid of token maps VAR predicts, coarse to fine.

A schedule is a sequence of scales. Each scale is an ``int`` ``pn`` (a ``pn x pn`` token map, as
in the official ``patch_nums``) or an ``(h, w)`` pair (a non-square map). The flat token sequence
holds the scales one after the other, row-major inside each scale.
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

ScaleSpec = Union[int, Tuple[int, int]]

# The official schedules of the released checkpoints.
PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)   # L = 680
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)  # L = 2240


def scale_hws(patch_nums: Sequence[ScaleSpec], name: str = "patch_nums") -> Tuple[Tuple[int, int], ...]:
    """``patch_nums`` as a tuple of ``(h, w)`` pairs; raises ``ValueError`` naming ``name`` if malformed."""
    if isinstance(patch_nums, (str, bytes)) or not hasattr(patch_nums, "__len__") or len(patch_nums) == 0:
        raise ValueError(f"{name} must be a non-empty sequence of ints or (h, w) pairs, got {patch_nums!r}")
    hws = []
    for i, pn in enumerate(patch_nums):
        if isinstance(pn, bool):
            raise ValueError(f"{name}[{i}] must be an int or an (h, w) pair, got {pn!r}")
        if isinstance(pn, int) or (hasattr(pn, "__index__") and not hasattr(pn, "__len__")):
            h = w = int(pn)
        elif hasattr(pn, "__len__") and len(pn) == 2:
            h, w = int(pn[0]), int(pn[1])
        else:
            raise ValueError(f"{name}[{i}] must be an int or an (h, w) pair, got {pn!r}")
        if h < 1 or w < 1:
            raise ValueError(f"{name}[{i}] must be positive, got {pn!r}")
        hws.append((h, w))
    return tuple(hws)


def scale_lens(patch_nums: Sequence[ScaleSpec]) -> Tuple[int, ...]:
    """Token count ``h*w`` of every scale."""
    return tuple(h * w for h, w in scale_hws(patch_nums))


def begin_ends(patch_nums: Sequence[ScaleSpec]) -> Tuple[Tuple[int, int], ...]:
    """``[begin, end)`` token range of every scale in the flat sequence."""
    out, cur = [], 0
    for n in scale_lens(patch_nums):
        out.append((cur, cur + n))
        cur += n
    return tuple(out)


def canonical(patch_nums: Sequence[ScaleSpec]) -> Tuple[ScaleSpec, ...]:
    """Square scales as ints, others as ``(h, w)``: the form models store and print."""
    return tuple(h if h == w else (h, w) for h, w in scale_hws(patch_nums))
