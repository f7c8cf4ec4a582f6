"""fastvar: fast, lossless kernels and a streaming sampler for VAR (Visual AutoRegressive modeling)."""
from ._version import __version__
from .models import BSQVAE, VAR, VQVAE, Infinity, build_vae_var, load_infinity, load_vae_var
from .patch import patch
from .sampler import Sampler

__all__ = ["__version__", "VAR", "VQVAE", "build_vae_var", "load_vae_var", "patch", "Sampler", "BSQVAE", "Infinity",
           "load_infinity"]
