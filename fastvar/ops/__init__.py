"""fastvar's functional ops. Each picks its backend (CUDA extension -> Triton -> eager) by the
tensors' device and what is installed; ``FASTVAR_BACKEND=eager|triton|cuda`` forces one.

Each op module exports its functions in ``__all__`` and its implementations by backend in ``OPS``.
"""
from . import adaln as _adaln, attention as _attention, rq_lookup as _rq_lookup, sampling as _sampling
from . import bit_sampling as _bit_sampling, cross_attention as _cross_attention, upsample as _upsample
from .adaln import *  # noqa: F401,F403
from .attention import *  # noqa: F401,F403
from .bit_sampling import *  # noqa: F401,F403
from .cross_attention import *  # noqa: F401,F403
from .rq_lookup import *  # noqa: F401,F403
from .sampling import *  # noqa: F401,F403
from .upsample import *  # noqa: F401,F403

OPS = {**_adaln.OPS, **_attention.OPS, **_rq_lookup.OPS, **_upsample.OPS, **_sampling.OPS, **_cross_attention.OPS,
       **_bit_sampling.OPS}
