"""Loading the official golden outputs in ../shared/golden (see its README for the format).

CI has ``shared/`` beside the checkout; ``FASTVAR_GOLDEN`` may point elsewhere. When the folder is
missing, tests that need it skip with a message saying where it was looked for.
"""
import functools
import os

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CANDIDATES = [os.environ.get("FASTVAR_GOLDEN", ""), os.path.join(HERE, "..", "..", "shared", "golden"),
              os.path.join(HERE, "..", "shared", "golden")]
FILES = ("var_d2_256.pt", "var_d2_512_saln.pt")


def golden_dir() -> str:
    for c in CANDIDATES:
        if c and all(os.path.isfile(os.path.join(c, f)) for f in FILES):
            return os.path.abspath(c)
    pytest.skip("golden outputs not found (looked in $FASTVAR_GOLDEN and ../shared/golden beside the "
                f"checkout: {[os.path.abspath(c) for c in CANDIDATES if c]}); parity with the official code is untested")


@functools.lru_cache(maxsize=None)
def _load(path: str):
    return torch.load(path, map_location="cpu", weights_only=True)


def load(name: str):
    """The golden dict of ``name`` (a file of ``FILES``); skips when the folder is missing."""
    return _load(os.path.join(golden_dir(), name))


@functools.lru_cache(maxsize=None)
def _models(name: str):
    from fastvar.models import vae_var_from_state_dicts
    g = load(name)
    vae, var = vae_var_from_state_dicts(g["var_state_dict"], g["vae_state_dict"])
    var.cond_drop_rate = 0.0
    return vae, var


def models(name: str):
    """fastvar ``(vae, var)`` loaded from the golden weights of ``name`` (float32, CPU, eval mode, shared:
    do not modify)."""
    return _models(name)
