"""Loading the official Infinity golden outputs in ../shared/golden_infinity (format in its README).

``FASTVAR_GOLDEN_INFINITY`` may point elsewhere. When the folder is missing, tests that need it skip with a
message saying where it was looked for.
"""
import functools
import os

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CANDIDATES = [os.environ.get("FASTVAR_GOLDEN_INFINITY", ""), os.path.join(HERE, "..", "..", "shared", "golden_infinity"),
              os.path.join(HERE, "..", "shared", "golden_infinity")]
FILES = ("infinity_d2_sq16.pt", "infinity_d4_r0.5_patchify.pt")


def golden_dir() -> str:
    for c in CANDIDATES:
        if c and all(os.path.isfile(os.path.join(c, f)) for f in FILES):
            return os.path.abspath(c)
    pytest.skip("Infinity golden outputs not found (looked in $FASTVAR_GOLDEN_INFINITY and ../shared/golden_infinity "
                f"beside the checkout: {[os.path.abspath(c) for c in CANDIDATES if c]}); parity with the official "
                "Infinity code is untested")


@functools.lru_cache(maxsize=None)
def _load(path: str):
    return torch.load(path, map_location="cpu", weights_only=True)


def load(name: str):
    """The golden dict of ``name`` (a file of ``FILES``); skips when the folder is missing."""
    return _load(os.path.join(golden_dir(), name))


@functools.lru_cache(maxsize=None)
def _models(name: str):
    from fastvar.models import infinity_from_state_dicts
    g = load(name)
    vae, model = infinity_from_state_dicts(g["infinity_state_dict"], g["vae_state_dict"])
    model.cond_drop_rate = 0.0
    return vae, model


def models(name: str):
    """fastvar ``(vae, infinity)`` loaded from the golden weights of ``name`` (float32, CPU, eval mode,
    ``cond_drop_rate = 0``; shared: do not modify)."""
    return _models(name)


def text_tuple(g):
    t = g["inputs"]["text"]
    return t["kv_compact"], t["lens"], t["cu_seqlens_k"], t["max_seqlen_k"]
