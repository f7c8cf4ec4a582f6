// VAR token sampling after the head, one CTA per row: CFG mix, top-k, top-p and the exact draw
// (the official torch.multinomial tokens for the same Exp(1) noise). Semantics: fastvar/reference/
// sampling.py and fastvar/ops/sampling.py; the same per-row results as triton_kernels/sampling.py:
//
//   x      = a * cond[r] - t * uncond[r]       (HAS_CFG; a = fl32(1 + t): two products, then the difference)
//   keep   = x >= x_(k)                        (0 < k < V; x_(k) the k-th largest, ties all kept)
//   e      = exp(x - max x) on keep;  p = e * (1 / sum e)
//   top-p  : in the ascending order, entries whose cumulative p is <= thr = fl32(1 - top_p) are removed,
//            never the largest; equal values at the threshold are ordered by index (a stable sort): the
//            member of rank m (1-based) is kept iff mass(key < T) + m * p_T > thr, and the last member of the
//            largest value always is
//   token  = argmax_j e_j / q_j over keep (first maximum), q the Exp(1) noise row
//
// Selection is a radix select over order-preserving uint32 keys of x (-0.0 as +0.0): 4 passes of 8-bit
// digits from the most significant, each a block-wide 256-bin histogram in shared memory (atomics) of the
// keys that share the digits chosen so far, then a CUB block scan over the bins to find the bin that holds
// the threshold: 8 block-wide passes over the row in all, against 2 x 32 masked reductions for the Triton
// kernel's bit-serial search.
//   top-k: the bin where the count of larger keys reaches k (the key of the k-th largest).
//   top-p: the bin where the ascending cumulative mass first exceeds thr. The masses are summed in 60-bit
//          fixed point (p * 2^60, rounded up; integer atomics), which makes them exact in any order, hence
//          deterministic, and within V * 2^-60 of the real sums: more accurate than any float32 order, so
//          fastvar's token can differ from torch's only where the boundary entry's cumulative mass lies
//          within torch's own float32 rounding of thr (the Triton kernel's caveat, ops/sampling.py).
//
// Row layout (kMaxSampleV = 16384: 128 KiB, within sm_80's 163 KiB): the mixed logits x and e live in dynamic shared memory (8 bytes per entry); threads stride
// over the row (coalesced). 256 threads per row, or one warp for V <= 1024 ("a warp per row").
// Errors per row (err): 1 NaN after the mix, 2 every logit -inf, 4 a +inf logit; the token is then -1 and
// `filtered` (if given) gets the sanitised mixed row.
#include "fastvar_ext.h"
#include "launch.h"
#include "port.h"

namespace fv {

constexpr int kWarpRowMaxV = 1024;        // one warp per row up to here (<= 32 entries per thread)
constexpr double kMassScale = 1152921504606846976.0;     // 2^60: masses <= 1 + V 2^-24 < 2^63 / 2^60

enum LogitsDtype { kF32 = 0, kF16 = 1, kBF16 = 2 };

struct SampleArgs {
    const void* logits; int dtype;
    int64_t stride_b, stride_l, stride_v, uncond_offset;   // elements
    const float* noise; int64_t stride_noise;
    int64_t* tokens; int32_t* err; float* filtered;        // filtered: (rows, V) contiguous, or null
    int64_t n_rows, l; int V;
    float cfg_a, cfg_t; bool has_cfg;
    int top_k; bool has_top_k;
    unsigned long long thr_fixed; bool has_top_p;           // floor(fl32(1 - top_p) * 2^60)
};

FV_DEVICE float load_logit(const SampleArgs& a, int64_t off) {
    if (a.dtype == kF32) return static_cast<const float*>(a.logits)[off];
    const uint16_t bits = static_cast<const uint16_t*>(a.logits)[off];
    return a.dtype == kF16 ? half_bits_to_float(bits) : bf16_bits_to_float(bits);
}

// order-preserving: negative floats -> ~bits, non-negative -> bits | sign bit
FV_DEVICE uint32_t key_of(float x) {
    const uint32_t b = float_bits(x);
    return (b >> 31) ? ~b : (b | 0x80000000u);
}

// rounded up: a positive p never becomes mass 0 (top_p = 1, thr = 0, keeps every entry of positive p, as torch's
// float32 cumsum does)
FV_DEVICE unsigned long long mass_fixed(float p) { return double_to_u64_ru((double)p * kMassScale); }

template <int THREADS>
FV_GLOBAL void FV_LAUNCH_BOUNDS(THREADS) sample_kernel(SampleArgs a) {
    constexpr int BPT = 256 / THREADS;                    // histogram bins per thread
    using ScanU32 = BlockExclusiveSum<THREADS, BPT, uint32_t>;
    using ScanU64 = BlockExclusiveSum<THREADS, BPT, unsigned long long>;
    using ScanRank = BlockExclusiveSum<THREADS, 1, uint32_t>;
    __shared__ uint32_t hist[256];
    __shared__ unsigned long long mhist[256];
    __shared__ float red_f[32];
    __shared__ uint32_t red_u[32];
    __shared__ unsigned long long red_m[32];
    __shared__ ArgMax red_a[32];
    __shared__ uint32_t sel_digit;
    __shared__ unsigned long long sel_below;
    __shared__ int sel_found;
    __shared__ typename ScanU32::TempStorage scan32;
    __shared__ typename ScanU64::TempStorage scan64;
    __shared__ typename ScanRank::TempStorage scan_rank;
    FV_DYNAMIC_SMEM(float, xs);                           // [V] mixed logits, then [V] e (or -1: removed)
    float* es = xs + a.V;

    const int64_t row = blockIdx.x;
    const int V = a.V;
    const int64_t base = (row / a.l) * a.stride_b + (row % a.l) * a.stride_l;

    // ---- load, CFG mix, bad-input flags; NaN -> -inf, -0.0 -> +0.0
    FV_PER_THREAD(uint32_t, t_flags, THREADS, 1);
    FV_PER_THREAD(uint32_t, t_count, THREADS, 1);
    FV_FOR_EACH_THREAD {
        uint32_t flags = 0, finite = 0;
        for (int j = tid; j < V; j += THREADS) {
            const int64_t off = base + j * a.stride_v;
            float x = load_logit(a, off);
            if (a.has_cfg) x = a.cfg_a * x - a.cfg_t * load_logit(a, off + a.uncond_offset);
            if (x != x) { flags |= 1u; x = -kInf; }
            if (x == kInf) flags |= 4u;
            if (x > -kInf) ++finite;
            if (x == 0.0f) x = 0.0f;
            xs[j] = x;
        }
        FV_ITEM(t_flags, 1, 0) = flags;
        FV_ITEM(t_count, 1, 0) = finite;
    }
    const uint32_t flags = block_or<THREADS>(t_flags, red_u);
    const uint32_t n_finite = block_sum_int<THREADS>(t_count, red_u);
    const int err = (int)(flags | (n_finite == 0 ? 2u : 0u));
    if (err != 0) {
        FV_FOR_EACH_THREAD {
            if (tid == 0) { a.tokens[row] = -1; a.err[row] = err; }
            if (a.filtered)
                for (int j = tid; j < V; j += THREADS) a.filtered[row * V + j] = xs[j];
        }
        return;
    }

    // ---- top-k: the key of the k-th largest, 8 bits per pass
    uint32_t thr_k = 0;
    if (a.has_top_k) {
        uint32_t prefix = 0, hi_mask = 0, k_rem = (uint32_t)a.top_k;
        for (int shift = 24; shift >= 0; shift -= 8) {
            FV_FOR_EACH_THREAD { for (int d = tid; d < 256; d += THREADS) hist[d] = 0; }
            FV_SYNC();
            FV_FOR_EACH_THREAD {
                for (int j = tid; j < V; j += THREADS) {
                    const uint32_t key = key_of(xs[j]);
                    if ((key & hi_mask) == prefix) FV_ATOMIC_ADD(&hist[(key >> shift) & 255u], 1u);
                }
            }
            FV_SYNC();
            // bins in descending digit order: the exclusive sum of bin 255 - d counts the keys above d
            FV_PER_THREAD(uint32_t, cnt, THREADS, BPT);
            FV_FOR_EACH_THREAD { for (int i = 0; i < BPT; ++i) FV_ITEM(cnt, BPT, i) = hist[255 - (tid * BPT + i)]; }
            ScanU32::run(cnt, scan32);
            FV_FOR_EACH_THREAD {
                for (int i = 0; i < BPT; ++i) {
                    const uint32_t d = 255u - (uint32_t)(tid * BPT + i), above = FV_ITEM(cnt, BPT, i);
                    if (above < k_rem && k_rem <= above + hist[d]) { sel_digit = d; sel_below = above; }
                }
            }
            FV_SYNC();
            prefix |= sel_digit << shift;
            hi_mask |= 255u << shift;
            k_rem -= (uint32_t)sel_below;
            FV_SYNC();                                    // sel_* and hist are rewritten by the next pass
        }
        thr_k = prefix;
    }

    // ---- e = exp(x - max) on the kept entries; -1 marks a removed one
    FV_PER_THREAD(float, t_max, THREADS, 1);
    FV_FOR_EACH_THREAD {
        float m = -kInf;
        for (int j = tid; j < V; j += THREADS)
            if (key_of(xs[j]) >= thr_k && xs[j] > m) m = xs[j];
        FV_ITEM(t_max, 1, 0) = m;
    }
    const float x_max = block_max<THREADS>(t_max, red_f);         // finite: err == 0
    const uint32_t key_max = key_of(x_max);
    FV_PER_THREAD(float, t_sum, THREADS, 1);
    FV_FOR_EACH_THREAD {
        float s = 0.0f;
        for (int j = tid; j < V; j += THREADS) {
            const bool keep = key_of(xs[j]) >= thr_k;
            const float e = keep ? exp_f32(xs[j] - x_max) : 0.0f;
            es[j] = keep ? e : -1.0f;
            s += e;
        }
        FV_ITEM(t_sum, 1, 0) = s;
    }

    // ---- top-p
    if (a.has_top_p) {
        const float z = block_sum<THREADS>(t_sum, red_f);              // >= 1: the largest has e = 1
        const float inv_z = div_rn(1.0f, z);
        const unsigned long long thr = a.thr_fixed;
        // T = the smallest key whose inclusive ascending mass exceeds thr; none: T = key_max
        uint32_t prefix = 0, hi_mask = 0;
        unsigned long long below = 0;
        bool found = true;
        for (int shift = 24; shift >= 0 && found; shift -= 8) {
            FV_FOR_EACH_THREAD { for (int d = tid; d < 256; d += THREADS) mhist[d] = 0; }
            FV_SYNC();
            FV_FOR_EACH_THREAD {
                for (int j = tid; j < V; j += THREADS) {
                    const uint32_t key = key_of(xs[j]);
                    if (es[j] > 0.0f && (key & hi_mask) == prefix)
                        FV_ATOMIC_ADD(&mhist[(key >> shift) & 255u], mass_fixed(es[j] * inv_z));
                }
            }
            FV_SYNC();
            FV_PER_THREAD(unsigned long long, mass, THREADS, BPT);
            FV_FOR_EACH_THREAD {
                for (int i = 0; i < BPT; ++i) FV_ITEM(mass, BPT, i) = mhist[tid * BPT + i];
                if (tid == 0) sel_found = 0;
            }
            ScanU64::run(mass, scan64);
            FV_FOR_EACH_THREAD {
                for (int i = 0; i < BPT; ++i) {
                    const int d = tid * BPT + i;
                    const unsigned long long lo = below + FV_ITEM(mass, BPT, i);
                    if (lo <= thr && lo + mhist[d] > thr) { sel_digit = (uint32_t)d; sel_below = lo; sel_found = 1; }
                }
            }
            FV_SYNC();
            found = sel_found != 0;
            if (found) {
                prefix |= sel_digit << shift;
                hi_mask |= 255u << shift;
                below = sel_below;
            }
            FV_SYNC();
        }
        const uint32_t T = found && prefix < key_max ? prefix : key_max;
        // the group of entries with key T: its size, its (common) mass, and the mass below it
        FV_PER_THREAD(uint32_t, t_n, THREADS, 1);
        FV_PER_THREAD(unsigned long long, t_below, THREADS, 1);
        FV_PER_THREAD(unsigned long long, t_pg, THREADS, 1);
        FV_FOR_EACH_THREAD {
            uint32_t n = 0;
            unsigned long long mb = 0, pg = 0;
            for (int j = tid; j < V; j += THREADS) {
                if (es[j] < 0.0f) continue;
                const uint32_t key = key_of(xs[j]);
                const unsigned long long m = mass_fixed(es[j] * inv_z);
                if (key < T) mb += m;
                if (key == T) { ++n; pg = m; }
            }
            FV_ITEM(t_n, 1, 0) = n;
            FV_ITEM(t_below, 1, 0) = mb;
            FV_ITEM(t_pg, 1, 0) = pg;
        }
        const uint32_t n_group = block_sum_int<THREADS>(t_n, red_u);
        const unsigned long long mass_below = block_sum_int<THREADS>(t_below, red_m);
        const unsigned long long p_group = block_max_int<THREADS>(t_pg, red_m);
        // remove every kept key below T; members of T's group by their rank in index order
        uint32_t rank_base = 0;
        for (int j0 = 0; j0 < V; j0 += THREADS) {
            FV_PER_THREAD(uint32_t, member, THREADS, 1);
            FV_FOR_EACH_THREAD {
                const int j = j0 + tid;
                FV_ITEM(member, 1, 0) = (j < V && es[j] >= 0.0f && key_of(xs[j]) == T) ? 1u : 0u;
            }
            const uint32_t in_chunk = n_group > 1 ? ScanRank::run(member, scan_rank) : 0u;
            FV_FOR_EACH_THREAD {
                const int j = j0 + tid;
                if (j >= V || es[j] < 0.0f) continue;
                const uint32_t key = key_of(xs[j]);
                if (key < T) { es[j] = -1.0f; continue; }
                if (key > T) continue;
                const uint32_t m = n_group > 1 ? rank_base + FV_ITEM(member, 1, 0) + 1u : 1u;
                const bool keep = mass_below + (unsigned long long)m * p_group > thr || (T == key_max && m == n_group);
                if (!keep) es[j] = -1.0f;
            }
            rank_base += in_chunk;
            FV_SYNC();
        }
    }
    FV_SYNC();

    // ---- the draw: argmax e / q over the kept entries, first maximum
    FV_PER_THREAD(ArgMax, t_best, THREADS, 1);
    FV_FOR_EACH_THREAD {
        ArgMax best{-1.0f, V};
        const float* q = a.noise + row * a.stride_noise;
        for (int j = tid; j < V; j += THREADS) {
            const float e = es[j];
            const float race = e > 0.0f ? div_rn(e, q[j]) : -1.0f;
            if (race > best.v) best = ArgMax{race, j};
        }
        FV_ITEM(t_best, 1, 0) = best;
    }
    const ArgMax win = block_argmax<THREADS>(t_best, red_a);
    FV_FOR_EACH_THREAD {
        if (tid == 0) { a.tokens[row] = win.i; a.err[row] = 0; }
        if (a.filtered)
            for (int j = tid; j < V; j += THREADS) a.filtered[row * V + j] = es[j] >= 0.0f ? xs[j] : -kInf;
    }
}

// ------------------------------------------------------------------------------------------ launcher
void sample_top_k_top_p(
    uintptr_t logits, int dtype, const std::vector<int64_t>& logits_shape, const std::vector<int64_t>& logits_strides,
    int64_t n_cond, bool has_cfg, float cfg_a, float cfg_t, int64_t top_k, float top_p_thr, bool has_top_p,
    uintptr_t noise, const std::vector<int64_t>& noise_shape, int64_t noise_stride,
    uintptr_t tokens, uintptr_t err, uintptr_t filtered, uintptr_t stream) {
    const char* fn = "sample_top_k_top_p";
    if (logits_shape.size() != 3 || logits_strides.size() != 3)
        throw ArgError(cat(fn, ": logits_shape and logits_strides must have 3 entries (N, l, V), got ",
                           logits_shape.size(), " and ", logits_strides.size()));
    if (dtype != kF32 && dtype != kF16 && dtype != kBF16)
        throw DtypeError(cat(fn, ": dtype must be 0 (float32), 1 (float16) or 2 (bfloat16), got ", dtype));
    const int64_t N = logits_shape[0], l = logits_shape[1], V = logits_shape[2];
    check_positive(fn, "N", N);
    check_positive(fn, "l", l);
    check_positive(fn, "V", V);
    require(V <= kMaxSampleV, cat(fn, ": V must be <= ", kMaxSampleV, " (the row lives in shared memory), got V=", V));
    check_positive(fn, "n_cond", n_cond);
    require(has_cfg ? N == 2 * n_cond : N == n_cond,
            cat(fn, ": logits must have N = ", has_cfg ? "2 * n_cond" : "n_cond", " rows of l tokens (n_cond=", n_cond,
                "), got N=", N));
    const int64_t rows = n_cond * l;
    require(rows <= 2147483647, cat(fn, ": n_cond * l must be < 2^31 (one CTA per row), got ", rows));
    require(top_k >= 0 && top_k <= V, cat(fn, ": top_k must be in [0, V=", V, "], got ", top_k));
    require(std::isfinite(cfg_a) && std::isfinite(cfg_t), cat(fn, ": cfg_a and cfg_t must be finite, got ", cfg_a,
                                                               " and ", cfg_t));
    require(!has_top_p || (top_p_thr >= 0.0f && top_p_thr <= 1.0f),
            cat(fn, ": top_p_thr = fl32(1 - top_p) must be in [0, 1], got ", top_p_thr));
    check_ptr(fn, "logits", logits, dtype == kF32 ? 4 : 2);
    check_ptr(fn, "noise", noise, sizeof(float));
    require(noise_shape.size() == 2 && noise_shape[0] == rows && noise_shape[1] == V,
            cat(fn, ": noise must have shape (rows=", rows, ", V=", V, ")"));
    require(noise_stride >= V, cat(fn, ": noise rows must not overlap (row stride >= V=", V, ", unit column stride), "
                                   "got row stride ", noise_stride));
    check_ptr(fn, "tokens", tokens, sizeof(int64_t));
    check_ptr(fn, "err", err, sizeof(int32_t));
    if (filtered != 0) check_ptr(fn, "filtered", filtered, sizeof(float));

    SampleArgs a{};
    a.logits = reinterpret_cast<const void*>(logits);
    a.dtype = dtype;
    a.stride_b = logits_strides[0]; a.stride_l = logits_strides[1]; a.stride_v = logits_strides[2];
    a.uncond_offset = n_cond * logits_strides[0];
    a.noise = reinterpret_cast<const float*>(noise);
    a.stride_noise = noise_stride;
    a.tokens = reinterpret_cast<int64_t*>(tokens);
    a.err = reinterpret_cast<int32_t*>(err);
    a.filtered = reinterpret_cast<float*>(filtered);
    a.n_rows = rows; a.l = l; a.V = (int)V;
    a.cfg_a = cfg_a; a.cfg_t = cfg_t; a.has_cfg = has_cfg;
    a.top_k = (int)top_k; a.has_top_k = top_k > 0 && top_k < V;
    a.has_top_p = has_top_p;
    a.thr_fixed = has_top_p ? (unsigned long long)std::floor((double)top_p_thr * kMassScale) : 0ull;
    const size_t smem = 2 * sizeof(float) * (size_t)V;
    if (V <= kWarpRowMaxV)
        launch(fn, "sample_kernel<32>", sample_kernel<32>, dim3((unsigned)rows), dim3(32), smem, stream, a);
    else
        launch(fn, "sample_kernel<256>", sample_kernel<256>, dim3((unsigned)rows), dim3(256), smem, stream, a);
}

}  // namespace fv
