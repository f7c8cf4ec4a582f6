// The launchers of fastvar's CUDA extension: raw pointers (as integers), shapes, strides (in elements) and a
// CUDA stream (a cudaStream_t as an integer). No torch types: one build works with any torch. Each launcher
// checks every argument (fv::ArgError / fv::DtypeError) and turns a CUDA error into fv::CudaError.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <vector>

namespace fv {

constexpr int kMaxSampleV = 16384;   // sample_top_k_top_p: the row lives in shared memory (8 bytes per entry)
constexpr int kMaxStepC = 64;       // upsample_accumulate_step with Phi's conv: <= 16 output channels per thread

// Bad argument value or shape (Python ValueError) / wrong dtype (Python TypeError).
struct ArgError : std::invalid_argument { using std::invalid_argument::invalid_argument; };
struct DtypeError : std::invalid_argument { using std::invalid_argument::invalid_argument; };
// A CUDA call failed (Python RuntimeError): the message names the kernel and the CUDA error.
struct CudaError : std::runtime_error { using std::runtime_error::runtime_error; };

// True for the host build (FASTVAR_HOST_EMULATION: csrc/port.h), false for the CUDA one.
bool host_emulation();

// The sampling step between scales (csrc/upsample_step.cu): f_hat += Phi(bicubic(codes)) in place, then the
// next scale's area-downsampled map into next_out (next_out = 0: none). Exactly one of src (a float32 code map
// (B, C, h, w)) and idx (int64 token indices (B, h, w) into codebook (V, C)) is non-zero; weight = 0: Phi is the
// identity; bias = 0: no bias. aten_cpu: the bicubic weights in ATen's CPU rounding (host tests) instead of its
// CUDA build's.
void upsample_accumulate_step(
    uintptr_t f_hat, const std::vector<int64_t>& f_shape, const std::vector<int64_t>& f_strides,
    uintptr_t src, const std::vector<int64_t>& src_strides,
    uintptr_t idx, const std::vector<int64_t>& idx_strides,
    uintptr_t codebook, const std::vector<int64_t>& codebook_shape, const std::vector<int64_t>& codebook_strides,
    const std::vector<int64_t>& code_hw,
    uintptr_t weight, const std::vector<int64_t>& weight_strides, uintptr_t bias, int64_t bias_stride,
    float one_minus_r, float r,
    uintptr_t next_out, const std::vector<int64_t>& next_hw, const std::vector<int64_t>& next_strides,
    bool aten_cpu, uintptr_t stream);

// CFG + top-k + top-p + the exact draw (csrc/sampling.cu). logits (N, l, V) of dtype 0 float32, 1 float16,
// 2 bfloat16, any strides; rows = n_cond * l (N = 2 n_cond with CFG: conditional rows first); noise (rows, V)
// float32 Exp(1), unit column stride; writes tokens (rows,) int64, err (rows,) int32 and, if non-zero,
// filtered (rows, V) float32 contiguous. top_k in [0, V] (0 or V: off); top_p_thr = fl32(1 - top_p).
void sample_top_k_top_p(
    uintptr_t logits, int dtype, const std::vector<int64_t>& logits_shape, const std::vector<int64_t>& logits_strides,
    int64_t n_cond, bool has_cfg, float cfg_a, float cfg_t, int64_t top_k, float top_p_thr, bool has_top_p,
    uintptr_t noise, const std::vector<int64_t>& noise_shape, int64_t noise_stride,
    uintptr_t tokens, uintptr_t err, uintptr_t filtered, uintptr_t stream);

}  // namespace fv
