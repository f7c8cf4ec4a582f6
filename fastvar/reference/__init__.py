"""Plain-PyTorch definitions of every op fastvar's kernels replace: the ground truth for tests and
benchmarks, and the CPU path. See each module for shapes and semantics."""
from .attention import (
    MAX_SCALE_MUL,
    block_causal_attention,
    block_causal_bias,
    kv_cached_attention,
    qk_l2_norm,
    scale_index,
    scale_mul_factor,
)
from .quantize import (
    area_downsample,
    bicubic_upsample,
    encode_multiscale,
    idx_to_var_input,
    phi,
    phi_index,
    phi_index_at,
    phi_ticks,
    residual_quantize,
    rq_lookup,
    rq_step,
    scale_ratio,
)
from .sampling import (
    cfg_mix,
    exponential_noise,
    gumbel_softmax,
    sample_top_k_top_p_,
    sample_with_noise,
    smooth_tau,
    top_k_top_p_filter_,
)
from .adaln import adaln_modulate, gated_residual_adaln
from .sampling import philox_uniform, sample_with_uniform
