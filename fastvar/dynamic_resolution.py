"""Infinity's dynamic-resolution scale schedules (official ``infinity/utils/dynamic_resolution.py``).

Eight base aspect ratios ``h/w`` each have 13 token grids ``(h, w)``, coarse to fine; the inverse ratios
(keys ``int(1000 / r) / 1000``) use the transposed grids: 15 templates, in the official dict order
(which decides ties of :func:`nearest_template`). Each template has four sizes ``pn``: the first 7, 10, 12
or 13 grids. A schedule is a tuple of ``(1, h, w)`` (the official tuples carry a temporal ``t``; images
always use ``t = 1``). Pixels per token: 16, with or without spatial patchify (the patchify VAE has stride
8 and twice the grid, :func:`vae_scale_schedule`).

Only full template schedules are valid: the official model looks its 2D-RoPE table up by the schedule,
so a truncated schedule that is not itself a template fails there (INFINITY_SPEC.md section 2).
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch

Scale = Tuple[int, int, int]
Schedule = Tuple[Scale, ...]

# h/w -> 13 token grids (h, w), coarse to fine (official ``ratio2hws``)
RATIO2HWS: Dict[float, Tuple[Tuple[int, int], ...]] = {
    1.000: ((1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32), (40, 40),
            (48, 48), (64, 64)),
    1.250: ((1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28), (45, 36),
            (55, 44), (70, 56)),
    1.333: ((1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27), (48, 36),
            (60, 45), (72, 54)),
    1.500: ((1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26), (48, 32),
            (63, 42), (78, 52)),
    1.750: ((1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24), (56, 32),
            (70, 40), (84, 48)),
    2.000: ((1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23), (60, 30),
            (74, 37), (90, 45)),
    2.500: ((1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20), (65, 26),
            (80, 32), (100, 40)),
    3.000: ((1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18), (72, 24),
            (90, 30), (111, 37)),
}
PN_NUM_SCALES: Dict[str, int] = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}
PIXELS_PER_TOKEN = 16
ROPE_GRID = 128        # the official 2D-RoPE table covers 128 x 128 positions (2048 px / 16)


def _templates() -> Dict[float, Tuple[Tuple[int, int], ...]]:
    out = {}
    for ratio, hws in RATIO2HWS.items():
        out[ratio] = hws
        if ratio != 1.0:
            out[int(1 / ratio * 1000) / 1000] = tuple((w, h) for h, w in hws)
    return out


TEMPLATES: Dict[float, Tuple[Tuple[int, int], ...]] = _templates()
H_DIV_W_TEMPLATES: Tuple[float, ...] = tuple(TEMPLATES)     # official order: 1.0, 1.25, 0.8, 1.333, 0.75, ...


def nearest_template(h_div_w: float) -> float:
    """The template ``argmin |h_div_w - t|`` (first in the official order on ties)."""
    try:
        r = float(h_div_w)
    except (TypeError, ValueError):
        raise TypeError(f"h_div_w must be a positive number, got {h_div_w!r}") from None
    if not r > 0 or r == float("inf"):
        raise ValueError(f"h_div_w must be a positive finite number, got {h_div_w!r}")
    return min(H_DIV_W_TEMPLATES, key=lambda t: abs(r - t))


def _check_pn(pn: str) -> str:
    if pn not in PN_NUM_SCALES:
        raise ValueError(f"pn must be one of {list(PN_NUM_SCALES)}, got {pn!r}")
    return pn


def scale_schedule(h_div_w: float, pn: str = "1M") -> Schedule:
    """The transformer schedule for an image of aspect ratio ``h_div_w`` (nearest template) and size
    ``pn``: a tuple of ``(1, h, w)``."""
    grids = TEMPLATES[nearest_template(h_div_w)][:PN_NUM_SCALES[_check_pn(pn)]]
    return tuple((1, h, w) for h, w in grids)


def _as_schedule(schedule, name: str) -> Schedule:
    if isinstance(schedule, (str, bytes)) or not hasattr(schedule, "__len__") or len(schedule) == 0:
        raise ValueError(f"{name} must be a non-empty sequence of (1, h, w) scales, got {schedule!r}")
    out = []
    for i, s in enumerate(schedule):
        try:
            t, h, w = (int(v) for v in s)
        except (TypeError, ValueError):
            raise ValueError(f"{name}[{i}] must be a (t, h, w) triple of ints, got {s!r}") from None
        if t != 1 or h < 1 or w < 1:
            raise ValueError(f"{name}[{i}] must be (1, h, w) with h, w >= 1 (images have t = 1), got {tuple(s)}")
        out.append((1, h, w))
    return tuple(out)


_LOOKUP = {tuple((1, h, w) for h, w in grids[:n]): (ratio, pn)
           for ratio, grids in TEMPLATES.items() for pn, n in PN_NUM_SCALES.items()}


def template_of(schedule: Sequence[Sequence[int]], name: str = "scale_schedule") -> Tuple[float, str]:
    """``(h_div_w template, pn)`` of a full template schedule; ``ValueError`` naming ``name`` for any
    other schedule (a truncated or altered one), as the model cannot take it."""
    sched = _as_schedule(schedule, name)
    hit = _LOOKUP.get(sched)
    if hit is None:
        h, w = sched[-1][1:]
        near = scale_schedule(h / w, min(PN_NUM_SCALES, key=lambda p: abs(PN_NUM_SCALES[p] - len(sched))))
        raise ValueError(f"{name} must be one of the official dynamic-resolution schedules (15 aspect-ratio "
                         f"templates x sizes {list(PN_NUM_SCALES)}); got {len(sched)} scales ending at "
                         f"{h}x{w}, which is none of them (the nearest template schedule is {list(near)})")
    return hit


def check_schedule(schedule, name: str = "scale_schedule") -> Schedule:
    """``schedule`` as a tuple of ``(1, h, w)``, verified to be a full template schedule."""
    template_of(schedule, name)
    return _as_schedule(schedule, name)


def vae_scale_schedule(schedule: Sequence[Sequence[int]], patchify: bool) -> Schedule:
    """The VAE's schedule: equal to the transformer's, or ``(1, 2h, 2w)`` under spatial patchify."""
    sched = _as_schedule(schedule, "scale_schedule")
    return tuple((1, 2 * h, 2 * w) for _, h, w in sched) if patchify else sched


def scale_lens(schedule: Sequence[Sequence[int]]) -> Tuple[int, ...]:
    """Tokens ``h * w`` of every scale."""
    return tuple(h * w for _, h, w in _as_schedule(schedule, "scale_schedule"))


def image_size(schedule: Sequence[Sequence[int]]) -> Tuple[int, int]:
    """Pixels ``(H, W)`` of an image sampled on ``schedule`` (16 per token of the last scale)."""
    _, h, w = _as_schedule(schedule, "scale_schedule")[-1]
    return h * PIXELS_PER_TOKEN, w * PIXELS_PER_TOKEN


def rope_positions(schedule: Sequence[Sequence[int]], length: int = 0) -> torch.Tensor:
    """``(L, 2)`` int64: the 2D-RoPE grid position ``(row, col)`` of every token of ``schedule``
    (``rope2d_normalized_by_hw=2``, INFINITY_SPEC.md section 5).

    ``(H1, W1)`` is the last grid of the template's ``1M`` schedule; a scale ``(h, w)`` puts row ``i`` at
    ``round(i * (H1 / h))`` and column ``j`` at ``round(j * (W1 / w))``: an integer tensor times the Python
    quotient gives float32, rounded half to even. With ``length > L`` the rows continue with the
    positions of the template's ``1M`` schedule (the official table is the 1M one, sliced), up to its end.
    """
    ratio, _ = template_of(schedule)
    full = tuple((1, h, w) for h, w in TEMPLATES[ratio])
    _, H1, W1 = full[-1]
    sched = _as_schedule(schedule, "scale_schedule")
    n = sum(h * w for _, h, w in sched)
    use = full if length > n else sched
    rows = []
    for _, h, w in use:
        r = (torch.arange(h) * (H1 / h)).round().to(torch.int64)
        c = (torch.arange(w) * (W1 / w)).round().to(torch.int64)
        rows.append(torch.stack([r[:, None].expand(h, w), c[None, :].expand(h, w)], dim=-1).reshape(-1, 2))
    pos = torch.cat(rows)
    return pos[:max(n, min(length, pos.shape[0]))]
