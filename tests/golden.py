"""Loading the official golden outputs in ../shared/golden (see its README for the format), and the one
loader behind it and ``golden_infinity``.

CI has ``shared/`` beside the checkout; an environment variable may point elsewhere. When the folder is
missing, tests that need it skip with a message saying where it was looked for.
"""
import functools
import os

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


class GoldenSet:
    """The golden files ``files`` of the folder ``folder`` in ../shared (or ``$env``), and the fastvar models
    ``build(state dict of the file)`` makes of them (cached; shared: do not modify)."""

    def __init__(self, env: str, folder: str, files, what: str, build):
        self.env, self.folder, self.files, self.what, self.build = env, folder, tuple(files), what, build
        self.candidates = [os.environ.get(env, ""), os.path.join(HERE, "..", "..", "shared", folder),
                           os.path.join(HERE, "..", "shared", folder)]

    def golden_dir(self) -> str:
        for c in self.candidates:
            if c and all(os.path.isfile(os.path.join(c, f)) for f in self.files):
                return os.path.abspath(c)
        pytest.skip(f"{self.what} golden outputs not found (looked in ${self.env} and ../shared/{self.folder} beside "
                    f"the checkout: {[os.path.abspath(c) for c in self.candidates if c]}); parity with the official "
                    f"{self.what} code is untested")

    def load(self, name: str):
        """The golden dict of ``name`` (a file of ``files``); skips when the folder is missing."""
        return _load(os.path.join(self.golden_dir(), name))

    @functools.lru_cache(maxsize=None)
    def models(self, name: str):
        """fastvar ``(vae, model)`` from the golden weights of ``name`` (float32, CPU, eval mode,
        ``cond_drop_rate = 0``)."""
        vae, model = self.build(self.load(name))
        model.cond_drop_rate = 0.0
        return vae, model


@functools.lru_cache(maxsize=None)
def _load(path: str):
    return torch.load(path, map_location="cpu", weights_only=True)


def _build_var(g):
    from fastvar.models import vae_var_from_state_dicts
    return vae_var_from_state_dicts(g["var_state_dict"], g["vae_state_dict"])


VAR_GOLDEN = GoldenSet("FASTVAR_GOLDEN", "golden", ("var_d2_256.pt", "var_d2_512_saln.pt"), "VAR", _build_var)
FILES = VAR_GOLDEN.files
golden_dir, load, models = VAR_GOLDEN.golden_dir, VAR_GOLDEN.load, VAR_GOLDEN.models
