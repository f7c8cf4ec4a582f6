"""fastvar's functional ops. Each picks its backend (CUDA extension -> Triton -> eager) by the
tensors' device and what is installed; ``FASTVAR_BACKEND=eager|triton|cuda`` forces one."""
from . import attention as _attention, quantize as _quantize, sampling as _sampling
from .attention import block_causal_attention, kv_cached_attention, scale_lens_from_bias
from .quantize import rq_lookup
from .sampling import sample_top_k_top_p

# Every op's implementations by backend: what `fastvar info` reports and the tests sweep.
OPS = {
    "block_causal_attention": _attention.BLOCK_CAUSAL_IMPLS,
    "kv_cached_attention": _attention.KV_CACHED_IMPLS,
    "rq_lookup": _quantize.RQ_LOOKUP_IMPLS,
    "sample_top_k_top_p": _sampling.SAMPLE_IMPLS,
}
