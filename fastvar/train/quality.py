"""Does a digits VAR draw the digits it is asked for? A classifier trained on the real 8x8 digits judges.

- :func:`fit_classifier`: an RBF SVC on the 1,797 real 8x8 images (0..16 scale), ~99% on held-out real digits.
- :func:`sample_per_class`: ``n`` samples of every class from a VAR, with a fixed seed.
- :func:`evaluate`: per-class accuracy of the classifier on generated samples (as the class asked for)
  and the within-class spread (mean pairwise L2 distance on the 8x8 / 0..16 scale) next to the real data's.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from fastvar.train.data import NUM_CLASSES, load_raw_digits, to_digits_8x8


def fit_classifier(gamma: float = 0.001, C: float = 1.0):
    """An ``sklearn.svm.SVC`` fitted on all real digits (features ``(N, 64)`` on the 0..16 scale)."""
    from sklearn.svm import SVC
    raw, labels = load_raw_digits()
    return SVC(gamma=gamma, C=C).fit(raw.reshape(len(raw), -1), labels)


def mean_pairwise_distance(x: np.ndarray) -> float:
    """Mean L2 distance over all pairs of rows of ``x`` ``(n, d)`` (0 for fewer than 2 rows)."""
    n = len(x)
    if n < 2:
        return 0.0
    x = np.asarray(x, dtype=np.float64)
    sq = (x * x).sum(1)
    d2 = np.clip(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0, None)
    iu = np.triu_indices(n, 1)
    return float(np.sqrt(d2[iu]).mean())


def real_spread() -> List[float]:
    """Within-class mean pairwise distance of the real digits, per class."""
    raw, labels = load_raw_digits()
    X = raw.reshape(len(raw), -1)
    return [mean_pairwise_distance(X[labels == c]) for c in range(NUM_CLASSES)]


@torch.no_grad()
def sample_per_class(var, n: int, seed: int = 0, cfg: float = 3.0, top_k: int = 0, top_p: float = 0.0,
                     classes: Optional[Sequence[int]] = None, batch: int = 500) -> Dict[str, torch.Tensor]:
    """``n`` samples of every class in ``classes`` (default all), class-major.

    Returns ``{"images": (len(classes) * n, 3, S, S) in [0, 1], "labels": (len(classes) * n,)}``. Batch
    ``i`` is drawn with ``g_seed = seed + i``, so the result depends only on the arguments.
    """
    classes = list(range(var.num_classes)) if classes is None else list(classes)
    labels = torch.tensor([c for c in classes for _ in range(n)], dtype=torch.long)
    dev = var.lvl_1L.device
    out = []
    for i, start in enumerate(range(0, len(labels), batch)):
        lab = labels[start:start + batch].to(dev)
        imgs = var.autoregressive_infer_cfg(len(lab), lab, g_seed=int(seed) + i, cfg=cfg, top_k=top_k, top_p=top_p)
        out.append(imgs.float().cpu())
    return {"images": torch.cat(out), "labels": labels}


def evaluate(images: torch.Tensor, labels: torch.Tensor, clf=None) -> Dict[str, object]:
    """Judge generated ``images`` ``(B, 3, S, S)`` in [0, 1] asked to be ``labels`` ``(B,)``.

    Returns ``accuracy`` (all samples), ``per_class`` accuracy, ``spread`` (within-class mean pairwise
    distance of the samples), ``real_spread`` (the same for the real digits) and ``spread_ratio``
    (the smallest per-class ratio of the two).
    """
    clf = fit_classifier() if clf is None else clf
    X = to_digits_8x8(images).numpy()
    y = labels.cpu().numpy()
    pred = clf.predict(X)
    classes = sorted(set(y.tolist()))
    per_class = {c: float((pred[y == c] == c).mean()) for c in classes}
    spread = {c: mean_pairwise_distance(X[y == c]) for c in classes}
    real = real_spread()
    return dict(accuracy=float((pred == y).mean()), per_class=per_class, spread=spread,
                real_spread={c: real[c] for c in classes},
                spread_ratio=min(spread[c] / real[c] for c in classes), predictions=pred)
