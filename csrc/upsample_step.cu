// The sampling step between two VAR scales (official get_next_autoregressive_input), on raw pointers:
//
//   u       = bicubic(codes -> (H, W))      codes: codebook[idx] gathered on the fly, or a float code map;
//                                           no upsample when (h, w) == (H, W)
//   f_hat  += (1 - r) u + r (conv3x3(u) + bias)      Phi (f_hat += u without a weight), in place
//   next    = area(f_hat -> (nh, nw))                 the next scale's input (none at the last scale)
//
// Shapes: f_hat (B, C, H, W) float32 with (H, W) contiguous; idx (B, h, w) int64 into codebook (V, C), or a
// code map (B, C, h, w) float32, any strides; weight (C, C, 3, 3), bias (C,); next (B, C, nh, nw), any strides.
//
// Two kernels, one launcher call:
// - upsample_phi_accumulate_kernel: a CTA owns an 8x8 tile of one image and all C channels. It computes u on
//   the tile and its one-pixel halo (10x10) into shared memory once, then Phi's 9 taps read u from there,
//   instead of recomputing the 16-tap bicubic gather for every tap (the Triton fused kernel recomputes the
//   halo per tap: 9 x 16 codebook reads per value, against 16 x 100/64 = 25 here). Zero padding at the
//   image border, as F.conv2d(padding=1).
// - area_downsample_kernel: the next scale's map from the finished f_hat (a cell's window spans tiles, so it
//   waits for the first kernel: stream order, no grid-wide barrier).
//
// Rounding (see triton_kernels/upsample.py, whose sequences these are): bicubic source index
// fma(o + 0.5, in/out, -0.5), weights cc1/cc2 with explicit fmaf, 4-tap sums fma(v3,w3,fma(v2,w2,fma(v0,w0,v1*w1)))
// along x then y; aten_cpu=true leaves the polynomials' last step unfused (ATen's x86-64 CPU build, the host
// tests' bit-exact reference), false fuses it (the CUDA build's contraction, as the Triton kernel assumes).
// Phi: (u * (1-r)) + (cv * r), three roundings; the convolution sums over (in channel, ky, kx) in that order
// with fmaf from 0, then adds the bias: not cuDNN's order, so held to float64 with eager's error as the bound.
// Area: window summed row-major from 0, then / kh, then / kw (IEEE), as ATen; next (1, 1) is ATen's mean()
// (a reduction tree): rejected here, the caller uses torch for it.
#include "fastvar_ext.h"
#include "launch.h"
#include "port.h"

namespace fv {

bool host_emulation() { return !FV_GPU; }

constexpr int kStepThreads = 256;
constexpr int kTileH = 8, kTileW = 8, kTilePix = kTileH * kTileW;
constexpr int kHaloH = kTileH + 2, kHaloW = kTileW + 2, kHaloPix = kHaloH * kHaloW;
constexpr int kOutGroups = kStepThreads / kTilePix;      // threads per pixel, each owning C / 4 channels
static_assert(kMaxStepC == 16 * kOutGroups, "<= 16 output channels per thread (registers)");

struct StepArgs {
    const float* src; const int64_t* idx; const float* cb; const float* wt; const float* bias; float* f;
    int C, h, w, H, W;
    int64_t s_b, s_c, s_y, s_x;          // code map strides (elements)
    int64_t i_b, i_y, i_x;               // index strides
    int64_t cb_v, cb_c;                  // codebook strides
    int64_t bias_s;                      // bias stride
    int64_t f_b, f_c;                    // f_hat strides; (H, W) contiguous
    float scale_y, scale_x, one_minus_r, r;
    bool upsample, has_bias, aten_cpu;
};

struct AreaArgs {
    const float* x; float* out;
    int B, C, H, W, nh, nw;
    int64_t x_b, x_c, x_y, x_x, o_b, o_c, o_y, o_x;
};

// ------------------------------------------------------------------------------------------- bicubic
FV_DEVICE float cc1(float x, bool cpu) {          // ((A + 2) x - (A + 3)) x x + 1, A = -0.75
    const float p = fmaf(x, 1.25f, -2.25f);
    return cpu ? (p * x) * x + 1.0f : fmaf(p * x, x, 1.0f);
}

FV_DEVICE float cc2(float x, bool cpu) {          // ((A x - 5A) x + 8A) x - 4A
    const float q = fmaf(fmaf(x, -0.75f, 3.75f), x, -6.0f);
    return cpu ? q * x + 3.0f : fmaf(q, x, 3.0f);
}

struct Taps { int i; float w0, w1, w2, w3; };

FV_DEVICE Taps cubic_taps(int o, float scale, bool cpu) {
    const float real = fmaf((float)o + 0.5f, scale, -0.5f);
    const float fl = floorf(real);
    const float t = real - fl, x2 = 1.0f - t;
    return Taps{(int)fl, cc2(t + 1.0f, cpu), cc1(t, cpu), cc1(x2, cpu), cc2(x2 + 1.0f, cpu)};
}

FV_DEVICE float sum4(float v0, float v1, float v2, float v3, const Taps& t) {
    float s = v1 * t.w1;
    s = fmaf(v0, t.w0, s);
    s = fmaf(v2, t.w2, s);
    return fmaf(v3, t.w3, s);
}

FV_DEVICE int clampi(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

template <bool FROM_IDX>
FV_DEVICE float load_code(const StepArgs& a, int64_t b, int c, int y, int x) {
    if (FROM_IDX) {
        const int64_t code = a.idx[b * a.i_b + y * a.i_y + x * a.i_x];
        return a.cb[code * a.cb_v + c * a.cb_c];
    }
    return a.src[b * a.s_b + c * a.s_c + y * a.s_y + x * a.s_x];
}

// u[b, c, oy, ox]: the code map upsampled to (H, W) (a plain read when no upsample).
template <bool FROM_IDX>
FV_DEVICE float up_value(const StepArgs& a, int64_t b, int c, int oy, int ox) {
    if (!a.upsample) return load_code<FROM_IDX>(a, b, c, oy, ox);
    const Taps ty = cubic_taps(oy, a.scale_y, a.aten_cpu), tx = cubic_taps(ox, a.scale_x, a.aten_cpu);
    const int x0 = clampi(tx.i - 1, 0, a.w - 1), x1 = clampi(tx.i, 0, a.w - 1);
    const int x2 = clampi(tx.i + 1, 0, a.w - 1), x3 = clampi(tx.i + 2, 0, a.w - 1);
    float r[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int yy = clampi(ty.i - 1 + j, 0, a.h - 1);
        r[j] = sum4(load_code<FROM_IDX>(a, b, c, yy, x0), load_code<FROM_IDX>(a, b, c, yy, x1),
                    load_code<FROM_IDX>(a, b, c, yy, x2), load_code<FROM_IDX>(a, b, c, yy, x3), tx);
    }
    return sum4(r[0], r[1], r[2], r[3], ty);
}

// ------------------------------------------------------------------------------------------- kernels
// Grid (tiles_y * tiles_x, B), 256 threads. CPT: output channels per thread (C <= 4 * CPT).
template <bool FROM_IDX, bool HAS_CONV, int CPT>
FV_GLOBAL void FV_LAUNCH_BOUNDS_MIN(kStepThreads, 2) upsample_phi_accumulate_kernel(StepArgs a) {
    const int tiles_x = (a.W + kTileW - 1) / kTileW;
    const int ty0 = (int)(blockIdx.x / tiles_x) * kTileH, tx0 = (int)(blockIdx.x % tiles_x) * kTileW;
    const int64_t b = blockIdx.y;
    float* fb = a.f + b * a.f_b;
    if (!HAS_CONV) {                                     // Phi = identity: f_hat += u, no halo
        FV_FOR_EACH_THREAD {
            for (int item = tid; item < a.C * kTilePix; item += kStepThreads) {
                const int c = item / kTilePix, p = item % kTilePix;
                const int y = ty0 + p / kTileW, x = tx0 + p % kTileW;
                if (y >= a.H || x >= a.W) continue;
                float* fp = fb + c * a.f_c + (int64_t)y * a.W + x;
                *fp = *fp + up_value<FROM_IDX>(a, b, c, y, x);
            }
        }
        return;
    }
    FV_DYNAMIC_SMEM(float, us);                          // u on the halo: [C][kHaloH][kHaloW]
    FV_FOR_EACH_THREAD {
        for (int item = tid; item < a.C * kHaloPix; item += kStepThreads) {
            const int c = item / kHaloPix, q = item % kHaloPix;
            const int y = ty0 - 1 + q / kHaloW, x = tx0 - 1 + q % kHaloW;
            const bool inside = y >= 0 && y < a.H && x >= 0 && x < a.W;
            us[item] = inside ? up_value<FROM_IDX>(a, b, c, y, x) : 0.0f;     // the conv's zero padding
        }
    }
    FV_SYNC();
    FV_FOR_EACH_THREAD {
        // a warp's 32 threads share g, hence the weight addresses: one broadcast load per tap
        const int p = tid % kTilePix, g = tid / kTilePix;
        const int py = p / kTileW, px = p % kTileW;
        const int y = ty0 + py, x = tx0 + px;
        if (y >= a.H || x >= a.W) continue;
        float acc[CPT];
#pragma unroll
        for (int k = 0; k < CPT; ++k) acc[k] = 0.0f;
        // per output channel the sum runs over (in channel i, ky, kx) in that order; one u value live at a time
        for (int i = 0; i < a.C; ++i) {
            const float* ui = us + i * kHaloPix + py * kHaloW + px;
            const float* wi = a.wt + i * 9;
#pragma unroll 3
            for (int t = 0; t < 9; ++t) {
                const float v = ui[(t / 3) * kHaloW + t % 3];
#pragma unroll
                for (int k = 0; k < CPT; ++k) {
                    const int o = g + k * kOutGroups;
                    if (o < a.C) acc[k] = fmaf(ldg(wi + (int64_t)o * a.C * 9 + t), v, acc[k]);
                }
            }
        }
#pragma unroll
        for (int k = 0; k < CPT; ++k) {
            const int o = g + k * kOutGroups;
            if (o < a.C) {
                const float cv = a.has_bias ? acc[k] + ldg(a.bias + o * a.bias_s) : acc[k];
                const float u = us[o * kHaloPix + (py + 1) * kHaloW + px + 1];
                const float hval = u * a.one_minus_r + cv * a.r;
                float* fp = fb + o * a.f_c + (int64_t)y * a.W + x;
                *fp = *fp + hval;
            }
        }
    }
}

// Grid cdiv(B * C * nh * nw, 256), 256 threads, one output cell per thread.
FV_GLOBAL void FV_LAUNCH_BOUNDS(256) area_downsample_kernel(AreaArgs a) {
    FV_FOR_EACH_THREAD {
        const int64_t item = (int64_t)blockIdx.x * 256 + tid;
        const int64_t total = (int64_t)a.B * a.C * a.nh * a.nw;
        if (item >= total) continue;
        const int ox = (int)(item % a.nw), oy = (int)((item / a.nw) % a.nh);
        const int64_t c = (item / ((int64_t)a.nw * a.nh)) % a.C, b = item / ((int64_t)a.nw * a.nh * a.C);
        const int y0 = (oy * a.H) / a.nh, y1 = ((oy + 1) * a.H + a.nh - 1) / a.nh;
        const int x0 = (ox * a.W) / a.nw, x1 = ((ox + 1) * a.W + a.nw - 1) / a.nw;
        const float* xp = a.x + b * a.x_b + c * a.x_c;
        float s = 0.0f;
        for (int y = y0; y < y1; ++y)
            for (int x = x0; x < x1; ++x) s += xp[y * a.x_y + x * a.x_x];
        s = div_rn(s, (float)(y1 - y0));
        s = div_rn(s, (float)(x1 - x0));
        a.out[b * a.o_b + c * a.o_c + oy * a.o_y + ox * a.o_x] = s;
    }
}

// ------------------------------------------------------------------------------------------ launcher
static void check_len(const char* fn, const char* name, const std::vector<int64_t>& v, size_t n) {
    require(v.size() == n, cat(fn, ": ", name, " must have ", n, " entries, got ", v.size()));
}

template <bool FROM_IDX, bool HAS_CONV>
static void launch_step(const char* fn, const StepArgs& a, int B, uintptr_t stream) {
    const dim3 grid((unsigned)(((a.H + kTileH - 1) / kTileH) * ((a.W + kTileW - 1) / kTileW)), (unsigned)B);
    const size_t smem = HAS_CONV ? sizeof(float) * a.C * kHaloPix : 0;
    const char* name = "upsample_phi_accumulate_kernel";
    if (!HAS_CONV)
        launch(fn, name, upsample_phi_accumulate_kernel<FROM_IDX, false, 1>, grid, dim3(kStepThreads), smem, stream, a);
    else if (a.C <= 4 * kOutGroups)
        launch(fn, name, upsample_phi_accumulate_kernel<FROM_IDX, true, 4>, grid, dim3(kStepThreads), smem, stream, a);
    else if (a.C <= 8 * kOutGroups)   // VAR's C = 32
        launch(fn, name, upsample_phi_accumulate_kernel<FROM_IDX, true, 8>, grid, dim3(kStepThreads), smem, stream, a);
    else
        launch(fn, name, upsample_phi_accumulate_kernel<FROM_IDX, true, 16>, grid, dim3(kStepThreads), smem, stream, a);
}

void upsample_accumulate_step(
    uintptr_t f_hat, const std::vector<int64_t>& f_shape, const std::vector<int64_t>& f_strides,
    uintptr_t src, const std::vector<int64_t>& src_strides,
    uintptr_t idx, const std::vector<int64_t>& idx_strides,
    uintptr_t codebook, const std::vector<int64_t>& codebook_shape, const std::vector<int64_t>& codebook_strides,
    const std::vector<int64_t>& code_hw,
    uintptr_t weight, const std::vector<int64_t>& weight_strides, uintptr_t bias, int64_t bias_stride,
    float one_minus_r, float r,
    uintptr_t next_out, const std::vector<int64_t>& next_hw, const std::vector<int64_t>& next_strides,
    bool aten_cpu, uintptr_t stream) {
    const char* fn = "upsample_accumulate_step";
    check_len(fn, "f_shape", f_shape, 4);
    check_len(fn, "f_strides", f_strides, 4);
    check_len(fn, "code_hw", code_hw, 2);
    check_ptr(fn, "f_hat", f_hat, sizeof(float));
    const int64_t B = f_shape[0], C = f_shape[1], H = f_shape[2], W = f_shape[3];
    for (int k = 0; k < 4; ++k) check_positive(fn, "f_shape entries (B, C, H, W)", f_shape[k]);
    check_positive(fn, "code_hw h", code_hw[0]);
    check_positive(fn, "code_hw w", code_hw[1]);
    require(f_strides[3] == 1 && f_strides[2] == W,
            cat(fn, ": f_hat must be contiguous over (H, W) (strides (*, *, ", W, ", 1)), got strides (", f_strides[0],
                ", ", f_strides[1], ", ", f_strides[2], ", ", f_strides[3], ")"));
    require(B <= 65535, cat(fn, ": the batch B must be <= 65535 (grid y), got ", B));
    require(H * W < (int64_t(1) << 31), cat(fn, ": H * W must be < 2^31, got ", H * W));

    StepArgs a{};
    a.f = reinterpret_cast<float*>(f_hat);
    a.C = (int)C; a.H = (int)H; a.W = (int)W; a.h = (int)code_hw[0]; a.w = (int)code_hw[1];
    a.f_b = f_strides[0]; a.f_c = f_strides[1];
    const bool from_idx = idx != 0;
    require(from_idx != (src != 0), cat(fn, ": pass exactly one of src (a float32 code map) and idx (int64 token "
                                        "indices), got ", src ? "both" : "neither"));
    if (from_idx) {
        check_ptr(fn, "idx", idx, sizeof(int64_t));
        check_ptr(fn, "codebook", codebook, sizeof(float));
        check_len(fn, "idx_strides", idx_strides, 3);
        check_len(fn, "codebook_shape", codebook_shape, 2);
        check_len(fn, "codebook_strides", codebook_strides, 2);
        check_positive(fn, "codebook rows V", codebook_shape[0]);
        require(codebook_shape[1] == C, cat(fn, ": codebook must have C=", C, " columns (shape (V, ", C, ")), got (",
                                            codebook_shape[0], ", ", codebook_shape[1], ")"));
        a.idx = reinterpret_cast<const int64_t*>(idx);
        a.cb = reinterpret_cast<const float*>(codebook);
        a.i_b = idx_strides[0]; a.i_y = idx_strides[1]; a.i_x = idx_strides[2];
        a.cb_v = codebook_strides[0]; a.cb_c = codebook_strides[1];
    } else {
        check_ptr(fn, "src", src, sizeof(float));
        check_len(fn, "src_strides", src_strides, 4);
        a.src = reinterpret_cast<const float*>(src);
        a.s_b = src_strides[0]; a.s_c = src_strides[1]; a.s_y = src_strides[2]; a.s_x = src_strides[3];
    }
    const bool has_conv = weight != 0;
    if (has_conv) {
        check_ptr(fn, "weight", weight, sizeof(float));
        check_len(fn, "weight_strides", weight_strides, 4);
        require(C <= kMaxStepC, cat(fn, ": Phi's convolution keeps a thread's output channels in registers: C <= ",
                                    kMaxStepC, ", got C=", C));
        a.wt = reinterpret_cast<const float*>(weight);
        require(weight_strides[0] == 9 * C && weight_strides[1] == 9 && weight_strides[2] == 3 && weight_strides[3] == 1,
                cat(fn, ": weight must be contiguous (strides (", 9 * C, ", 9, 3, 1)), got strides (", weight_strides[0],
                    ", ", weight_strides[1], ", ", weight_strides[2], ", ", weight_strides[3], ")"));
        if (bias != 0) {
            check_ptr(fn, "bias", bias, sizeof(float));
            a.bias = reinterpret_cast<const float*>(bias);
            a.bias_s = bias_stride;
            a.has_bias = true;
        }
    } else {
        require(bias == 0, cat(fn, ": a bias needs a weight (Phi is the identity without one)"));
    }
    require(std::isfinite(one_minus_r) && std::isfinite(r),
            cat(fn, ": one_minus_r and r must be finite, got ", one_minus_r, " and ", r));
    a.one_minus_r = one_minus_r; a.r = r;
    a.upsample = a.h != H || a.w != W;
    // float32 h / H as the host rounds it (IEEE division of two floats)
    a.scale_y = (float)a.h / (float)a.H;
    a.scale_x = (float)a.w / (float)a.W;
    a.aten_cpu = aten_cpu;

    AreaArgs n{};
    if (next_out != 0) {
        check_ptr(fn, "next_out", next_out, sizeof(float));
        check_len(fn, "next_hw", next_hw, 2);
        check_len(fn, "next_strides", next_strides, 4);
        check_positive(fn, "next_hw h'", next_hw[0]);
        check_positive(fn, "next_hw w'", next_hw[1]);
        require(!(next_hw[0] == 1 && next_hw[1] == 1),
                cat(fn, ": next_hw (1, 1) is ATen's mean() (a reduction tree, not the window sum): compute it "
                        "with torch after this call"));
        n.x = a.f; n.out = reinterpret_cast<float*>(next_out);
        n.B = (int)B; n.C = (int)C; n.H = (int)H; n.W = (int)W; n.nh = (int)next_hw[0]; n.nw = (int)next_hw[1];
        n.x_b = f_strides[0]; n.x_c = f_strides[1]; n.x_y = f_strides[2]; n.x_x = f_strides[3];
        n.o_b = next_strides[0]; n.o_c = next_strides[1]; n.o_y = next_strides[2]; n.o_x = next_strides[3];
    }

    if (from_idx) {
        if (has_conv) launch_step<true, true>(fn, a, (int)B, stream); else launch_step<true, false>(fn, a, (int)B, stream);
    } else {
        if (has_conv) launch_step<false, true>(fn, a, (int)B, stream); else launch_step<false, false>(fn, a, (int)B, stream);
    }
    if (next_out != 0) {
        const int64_t total = B * C * n.nh * n.nw;
        launch(fn, "area_downsample_kernel", area_downsample_kernel, dim3((unsigned)((total + 255) / 256)), dim3(256),
               0, stream, n);
    }
}

}  // namespace fv
