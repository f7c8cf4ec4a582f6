"""fastvar: fast, lossless kernels and a streaming sampler for VAR (Visual AutoRegressive modeling)."""
from ._version import __version__
from .models import VAR, VQVAE, build_vae_var, load_vae_var

__all__ = ["__version__", "VAR", "VQVAE", "build_vae_var", "load_vae_var"]
from .patch import patch

__all__.append("patch")
from .sampler import Sampler

__all__.append("Sampler")
from .models import BSQVAE, Infinity, load_infinity

__all__ += ["BSQVAE", "Infinity", "load_infinity"]
