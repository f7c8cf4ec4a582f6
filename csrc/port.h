// Portability layer: the same kernel source compiles with nvcc for the GPU and with a host C++ compiler
// (FASTVAR_HOST_EMULATION) for the CPU tests, where the threads of a block run as loops between barriers.
//
// How a kernel is written so that both builds mean the same thing:
//   - per-thread work sits in `FV_FOR_EACH_THREAD { ... }` blocks, which declare `tid`; `continue` ends the
//     thread's part of the block. Between two such blocks, `FV_SYNC()` is a barrier (__syncthreads on the
//     GPU; on the host the loop itself is the barrier: every thread finished the previous block).
//   - a value a thread keeps across a barrier lives in `FV_PER_THREAD(T, name, THREADS, ITEMS)` and is
//     read as `FV_ITEM(name, ITEMS, i)`: registers on the GPU, one slot per thread on the host.
//   - block-wide collectives (`block_sum`, `block_max`, `block_argmax`, `block_exclusive_sum`, ...) are
//     called outside `FV_FOR_EACH_THREAD`, on FV_PER_THREAD values, and return a block-uniform result.
//     The float sum is a fixed tree (a butterfly over the 32 lanes of each warp, then the warp totals in
//     order) that the host replays operation by operation, so both builds round alike; every other
//     collective is exact (integers, max, argmax under a total order), whatever its order.
//   - shared memory: `__shared__` arrays (static storage on the host) or `FV_DYNAMIC_SMEM(T, name)`.
//   - uniform values (the same in every thread) are ordinary locals outside the thread blocks.
// Floating point: nvcc runs with --fmad=false and the host compiler with -ffp-contract=off, so only the
// explicit fmaf() calls fuse: both builds then round every operation as written.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <limits>

#if defined(__CUDACC__) && !defined(FASTVAR_HOST_EMULATION)
#define FV_GPU 1
#else
#define FV_GPU 0
#endif

#if FV_GPU
#include <cuda_runtime.h>
#include <cub/block/block_scan.cuh>

#define FV_DEVICE __device__ __forceinline__
#define FV_GLOBAL __global__
#define FV_LAUNCH_BOUNDS(n) __launch_bounds__(n)
#define FV_LAUNCH_BOUNDS_MIN(n, m) __launch_bounds__(n, m)
#define FV_FOR_EACH_THREAD for (int tid = (int)threadIdx.x, fv_once_ = 1; fv_once_; fv_once_ = 0)
#define FV_SLOT 0
#define FV_SYNC() __syncthreads()
#define FV_PER_THREAD(T, name, THREADS, ITEMS) T name[(ITEMS)]
#define FV_DYNAMIC_SMEM(T, name) extern __shared__ __align__(16) unsigned char fv_dyn_smem_[]; \
    T* name = reinterpret_cast<T*>(fv_dyn_smem_)
#define FV_ATOMIC_ADD(ptr, v) atomicAdd((ptr), (v))

#else  // host emulation
#include <vector>

#define FV_DEVICE inline
#define FV_GLOBAL
#define FV_LAUNCH_BOUNDS(n)
#define FV_LAUNCH_BOUNDS_MIN(n, m)
#define __shared__ static thread_local
#define FV_FOR_EACH_THREAD for (int tid = 0; tid < (int)blockDim.x; ++tid)
#define FV_SLOT tid
#define FV_SYNC() ((void)0)
#define FV_PER_THREAD(T, name, THREADS, ITEMS) T name[(THREADS) * (ITEMS)]
#define FV_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(fv::host::dynamic_smem.data())
#define FV_ATOMIC_ADD(ptr, v) (*(ptr) += (v))

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline thread_local dim3 blockIdx, blockDim, gridDim;
namespace fv { namespace host { inline thread_local std::vector<unsigned char> dynamic_smem; } }
#endif

// A per-thread item: item i of this thread's ITEMS (the block `FV_FOR_EACH_THREAD` is in defines `tid`).
#define FV_ITEM(name, ITEMS, i) name[FV_SLOT * (ITEMS) + (i)]

namespace fv {

constexpr float kInf = std::numeric_limits<float>::infinity();

// ------------------------------------------------------------------------------------------ scalars
FV_DEVICE uint32_t float_bits(float x) {
#if FV_GPU
    return __float_as_uint(x);
#else
    uint32_t u; std::memcpy(&u, &x, 4); return u;
#endif
}

FV_DEVICE float bits_float(uint32_t u) {
#if FV_GPU
    return __uint_as_float(u);
#else
    float x; std::memcpy(&x, &u, 4); return x;
#endif
}

// IEEE round-to-nearest division (the GPU's `/` is too, with prec-div on; this says so where it matters).
FV_DEVICE float div_rn(float a, float b) {
#if FV_GPU
    return __fdiv_rn(a, b);
#else
    return a / b;
#endif
}

// expf: CUDA's (<= 2 ulp, what torch's CUDA softmax calls) on the GPU, the C library's on the host.
FV_DEVICE float exp_f32(float x) {
#if FV_GPU
    return expf(x);
#else
    return std::exp(x);
#endif
}

// A read-only load through the texture / L1 path (warp-uniform weights).
template <typename T> FV_DEVICE T ldg(const T* p) {
#if FV_GPU
    return __ldg(p);
#else
    return *p;
#endif
}

// double -> uint64, rounded up (non-negative values below 2^63).
FV_DEVICE unsigned long long double_to_u64_ru(double d) {
#if FV_GPU
    return __double2ull_ru(d);
#else
    return (unsigned long long)std::ceil(d);
#endif
}

// float16 / bfloat16 bits -> float32 (exact).
FV_DEVICE float half_bits_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1f) return bits_float(sign | 0x7f800000u | (m << 13));            // inf / NaN
    if (e != 0) return bits_float(sign | ((e + 112u) << 23) | (m << 13));         // normal
    // subnormal: m * 2^-24, exact in float32
    const float mag = (float)m * 5.9604644775390625e-08f;
    return sign ? -mag : mag;
}

FV_DEVICE float bf16_bits_to_float(uint16_t b) { return bits_float((uint32_t)b << 16); }

// ------------------------------------------------------------------------------------- collectives
// THREADS is 32 (one warp) or a multiple of 32 up to 1024. `scratch` is shared memory of >= 32 elements
// of the value type; collectives may reuse it one after another (each starts with a barrier).
struct ArgMax { float v; int i; };
FV_DEVICE bool argmax_better(ArgMax a, ArgMax b) { return a.v > b.v || (a.v == b.v && a.i < b.i); }

#if FV_GPU
template <typename T> FV_DEVICE T shfl_xor(T v, int m) { return __shfl_xor_sync(0xffffffffu, v, m); }

struct OpSum { template <typename T> FV_DEVICE T operator()(T a, T b) const { return a + b; } };
struct OpMax { template <typename T> FV_DEVICE T operator()(T a, T b) const { return a > b ? a : b; } };
struct OpOr { template <typename T> FV_DEVICE T operator()(T a, T b) const { return a | b; } };

// Butterfly: lane i adds lane i^m for m = 16, 8, 4, 2, 1. a + b == b + a in IEEE arithmetic, so every
// lane ends with the same bits.
template <int THREADS, typename T, typename Op>
FV_DEVICE T block_reduce(T v, T* scratch, Op op) {
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) v = op(v, shfl_xor(v, m));
    if (THREADS == 32) return v;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();                          // the previous collective has read scratch
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    T s = scratch[0];
#pragma unroll
    for (int w = 1; w < THREADS / 32; ++w) s = op(s, scratch[w]);
    return s;
}

template <int THREADS>
FV_DEVICE ArgMax block_argmax(ArgMax a, ArgMax* scratch) {
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) {
        ArgMax o{shfl_xor(a.v, m), shfl_xor(a.i, m)};
        if (argmax_better(o, a)) a = o;
    }
    if (THREADS == 32) return a;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();
    if (lane == 0) scratch[warp] = a;
    __syncthreads();
    ArgMax s = scratch[0];
#pragma unroll
    for (int w = 1; w < THREADS / 32; ++w) if (argmax_better(scratch[w], s)) s = scratch[w];
    return s;
}

template <int THREADS> FV_DEVICE float block_sum(const float* v, float* scratch) {
    return block_reduce<THREADS>(v[0], scratch, OpSum());
}
template <int THREADS> FV_DEVICE float block_max(const float* v, float* scratch) {
    return block_reduce<THREADS>(v[0], scratch, OpMax());
}
template <int THREADS, typename T> FV_DEVICE T block_sum_int(const T* v, T* scratch) {
    return block_reduce<THREADS>(v[0], scratch, OpSum());
}
template <int THREADS, typename T> FV_DEVICE T block_max_int(const T* v, T* scratch) {
    return block_reduce<THREADS>(v[0], scratch, OpMax());
}
template <int THREADS, typename T> FV_DEVICE T block_or(const T* v, T* scratch) {
    return block_reduce<THREADS>(v[0], scratch, OpOr());
}
template <int THREADS> FV_DEVICE ArgMax block_argmax(const ArgMax* a, ArgMax* scratch) {
    return block_argmax<THREADS>(a[0], scratch);
}

// Exclusive prefix sum over the block's items in blocked order (thread t holds items t*ITEMS ..
// t*ITEMS + ITEMS - 1), in place; returns the total. Integers only (exact in any order): CUB's BlockScan.
template <int THREADS, int ITEMS, typename T>
struct BlockExclusiveSum {
    using Scan = cub::BlockScan<T, THREADS>;
    using TempStorage = typename Scan::TempStorage;
    FV_DEVICE static T run(T* items, TempStorage& tmp) {
        T total;
        Scan(tmp).ExclusiveSum(*reinterpret_cast<T(*)[ITEMS]>(items), *reinterpret_cast<T(*)[ITEMS]>(items), total);
        __syncthreads();                      // tmp may be reused by the next scan
        return total;
    }
};

#else  // host: the same results from the per-thread arrays

template <int THREADS, typename T, typename Op>
inline T block_reduce_host(const T* v, Op op) {
    T warp_total[THREADS / 32 > 0 ? THREADS / 32 : 1];
    for (int w = 0; w < THREADS / 32; ++w) {
        T lanes[32], next[32];
        for (int i = 0; i < 32; ++i) lanes[i] = v[w * 32 + i];
        for (int m = 16; m > 0; m >>= 1) {
            for (int i = 0; i < 32; ++i) next[i] = op(lanes[i], lanes[i ^ m]);
            for (int i = 0; i < 32; ++i) lanes[i] = next[i];
        }
        warp_total[w] = lanes[0];
    }
    T s = warp_total[0];
    for (int w = 1; w < THREADS / 32; ++w) s = op(s, warp_total[w]);
    return s;
}

template <int THREADS> inline float block_sum(const float* v, float*) {
    return block_reduce_host<THREADS>(v, [](float a, float b) { return a + b; });
}
template <int THREADS> inline float block_max(const float* v, float*) {
    return block_reduce_host<THREADS>(v, [](float a, float b) { return a > b ? a : b; });
}
template <int THREADS, typename T> inline T block_sum_int(const T* v, T*) {
    return block_reduce_host<THREADS>(v, [](T a, T b) { return a + b; });
}
template <int THREADS, typename T> inline T block_max_int(const T* v, T*) {
    return block_reduce_host<THREADS>(v, [](T a, T b) { return a > b ? a : b; });
}
template <int THREADS, typename T> inline T block_or(const T* v, T*) {
    return block_reduce_host<THREADS>(v, [](T a, T b) { return a | b; });
}
template <int THREADS> inline ArgMax block_argmax(const ArgMax* a, ArgMax*) {
    return block_reduce_host<THREADS>(a, [](ArgMax x, ArgMax y) { return argmax_better(y, x) ? y : x; });
}

template <int THREADS, int ITEMS, typename T>
struct BlockExclusiveSum {
    struct TempStorage {};
    static T run(T* items, TempStorage&) {
        T run = 0;
        for (int k = 0; k < THREADS * ITEMS; ++k) { T v = items[k]; items[k] = run; run += v; }
        return run;
    }
};
#endif

}  // namespace fv
