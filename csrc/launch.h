// Host side of every launcher: argument checks that name the argument, the expected and the actual value;
// kernel launches on a caller's stream; CUDA errors turned into exceptions that name the kernel.
// Built twice, like the kernels: with nvcc for fastvar._C, and for the host (FASTVAR_HOST_EMULATION), where
// a launch runs the grid's blocks one after another on the calling thread.
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

#include "fastvar_ext.h"
#include "port.h"

namespace fv {

template <typename... Parts> std::string cat(const Parts&... parts) {
    std::ostringstream s;
    (s << ... << parts);
    return s.str();
}

inline void require(bool ok, const std::string& what) { if (!ok) throw ArgError(what); }

// `name` must be a non-null device pointer aligned to `align` bytes (the element size).
inline void check_ptr(const char* fn, const char* name, uintptr_t p, size_t align) {
    require(p != 0, cat(fn, ": ", name, " must be a non-null pointer, got 0"));
    require(p % align == 0, cat(fn, ": ", name, " must be aligned to ", align, " bytes (its element size), got ",
                                "address 0x", std::hex, p, std::dec, " (", p % align, " bytes off)"));
}

inline void check_positive(const char* fn, const char* name, int64_t v) {
    require(v >= 1, cat(fn, ": ", name, " must be >= 1, got ", v));
}

#if FV_GPU
inline void check_cuda(cudaError_t e, const char* fn, const char* kernel) {
    if (e != cudaSuccess)
        throw CudaError(cat(fn, ": CUDA error in ", kernel, ": ", cudaGetErrorName(e), ": ", cudaGetErrorString(e)));
}

inline int max_dynamic_smem(const char* fn, const char* kernel) {
    int dev = 0, bytes = 0;
    check_cuda(cudaGetDevice(&dev), fn, kernel);
    check_cuda(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), fn, kernel);
    return bytes;
}

// Launch `kernel` on `stream` (a cudaStream_t as an integer; 0 is the legacy default stream).
template <typename... KArgs, typename... Args>
void launch(const char* fn, const char* name, void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
            uintptr_t stream, Args&&... args) {
    if (smem > 48 * 1024) {
        const int limit = max_dynamic_smem(fn, name);
        require(smem <= (size_t)limit, cat(fn, ": ", name, " needs ", smem, " bytes of shared memory per block; this "
                                           "GPU allows ", limit));
        check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem), fn, name);
    }
    kernel<<<grid, block, smem, reinterpret_cast<cudaStream_t>(stream)>>>(std::forward<Args>(args)...);
    check_cuda(cudaGetLastError(), fn, name);
}
#else
template <typename... KArgs, typename... Args>
void launch(const char*, const char*, void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, uintptr_t,
            Args&&... args) {
    gridDim = grid;
    blockDim = block;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                blockIdx = dim3(x, y, z);
                // poisoned (all bits set: NaN as float) so that a read before a write shows
                host::dynamic_smem.assign(smem, 0xff);
                kernel(args...);
            }
}
#endif

}  // namespace fv
