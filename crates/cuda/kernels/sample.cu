// Per-row reduction of logits for sampling; the host finishes from it (pipemoe_model::sampling::Reduced, whose
// `ReducedRow` is this kernel's CPU reference): the argmax, the m largest logits sorted, and in f64
//   sum_t = Σ exp(f64(l − max) · (1/T)),  sum_1 = Σ exp(f64(l − max))   over the non-NaN logits,
// each term computed as the host's `sample` / `logprobs` compute it (f32 difference, f64 product and exp; fast
// math touches neither f64 arithmetic nor f64 exp, and __dmul_rn keeps the product from fusing into exp).
//
// Order of logits: larger first, ties to the lower id, NaN as -inf, -0 as +0 (the host compares numerically).
// The m largest come from a radix select on 32-bit keys (4 passes of 8 bits, histograms by shared atomics, which
// count the same on every run), then one pass in id order that keeps the needed ties at the threshold by lowest
// id, then a bitonic sort of (key, ~id). One block of SAMPLE_THREADS per row.
#include "common.cuh"

#define SAMPLE_THREADS 1024
#define SAMPLE_BATCH 8  // logits a thread loads at once in sample_reduce's passes
#define SAMPLE_MAX_CANDIDATES 1024
// Row flags: the candidates and sum_t (a sampled row); the candidates and sum_1 (logprobs).
#define SAMPLE_WANT_T 1u
#define SAMPLE_WANT_1 2u

__device__ __forceinline__ u32 logit_key(float x) {
    u32 b = __float_as_uint(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) b = 0xff800000u;  // NaN → -inf
    if (b == 0x80000000u) b = 0u;                           // -0 → +0
    return total_order_key(__uint_as_float(b));
}

__device__ __forceinline__ bool is_nan(float x) { return (__float_as_uint(x) & 0x7fffffffu) > 0x7f800000u; }

// Warp-wide: every lane ends with the (key, id) with the larger key, the lower id among equal keys.
__device__ __forceinline__ void warp_argmax(u32& key, u32& id) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const u32 k2 = __shfl_xor_sync(0xffffffffu, key, o), i2 = __shfl_xor_sync(0xffffffffu, id, o);
        if (k2 > key || (k2 == key && i2 < id)) {
            key = k2;
            id = i2;
        }
    }
}

// Block-wide: the (key, id) with the larger key, the lower id among equal keys. `sk`, `si`: 32 u32 each.
__device__ void block_argmax(u32& key, u32& id, u32* sk, u32* si) {
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    warp_argmax(key, id);
    if (lane == 0) {
        sk[warp] = key;
        si[warp] = id;
    }
    __syncthreads();
    if (warp == 0) {
        const bool live = lane < blockDim.x / 32;
        key = live ? sk[lane] : 0u;
        id = live ? si[lane] : 0xffffffffu;
        warp_argmax(key, id);
        if (lane == 0) {
            sk[0] = key;
            si[0] = id;
        }
    }
    __syncthreads();
    key = sk[0];
    id = si[0];
    __syncthreads();
}

// Block-wide f64 sum in a fixed tree (the same result on every run). `scratch`: 32 doubles.
__device__ double block_sum_f64(double v, double* scratch) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x / 32] = v;
    __syncthreads();
    if (threadIdx.x < 32) {
        double t = threadIdx.x < blockDim.x / 32 ? scratch[threadIdx.x] : 0.0;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
        if (threadIdx.x == 0) scratch[0] = t;
    }
    __syncthreads();
    const double r = scratch[0];
    __syncthreads();
    return r;
}

// logits [rows, vocab]; spec [rows, 2] = (temperature as f32 bits, flags); m = min(candidates, vocab) ≤ 1024.
// argmax [rows]; sums [rows, 2] = (sum_t, sum_1), 0 where not asked; ids, cand [rows, m], where asked.
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_reduce_f32(const float* logits, const u32* spec, int vocab, int m, u32* argmax, double* sums, u32* ids,
                      float* cand) {
    __shared__ u64 best[SAMPLE_MAX_CANDIDATES];
    __shared__ u32 hist[256];
    __shared__ u32 sk[32], si[32];
    __shared__ double sd[32];
    __shared__ u32 s_prefix, s_want, s_gt;
    const size_t row = blockIdx.x;
    const float* x = logits + row * (size_t)vocab;
    const u32 tid = threadIdx.x, n = (u32)vocab;
    const float temperature = __uint_as_float(spec[2 * row]);
    const u32 flags = spec[2 * row + 1];

    // Argmax: strictly greater wins, so each thread keeps its first; NaN and -inf never win (key of -inf).
    // SAMPLE_BATCH values a thread loaded before any is compared (a compare and branch between one load and the
    // next kept them one at a time: ~126 round trips a thread at a 129K vocabulary); past the row reads as -inf.
    u32 key = logit_key(NEG_INF), id = 0xffffffffu;
    for (u32 i0 = tid; i0 < n; i0 += SAMPLE_BATCH * blockDim.x) {
        float v[SAMPLE_BATCH];
#pragma unroll
        for (int u = 0; u < SAMPLE_BATCH; u++) {
            const u32 i = i0 + u * blockDim.x;
            v[u] = i < n ? x[i] : NEG_INF;
        }
#pragma unroll
        for (int u = 0; u < SAMPLE_BATCH; u++) {
            const u32 k = logit_key(v[u]);
            if (k > key) {
                key = k;
                id = i0 + u * blockDim.x;
            }
        }
    }
    block_argmax(key, id, sk, si);
    const bool found = id != 0xffffffffu;
    if (tid == 0) argmax[row] = found ? id : 0u;
    if (!(flags & (SAMPLE_WANT_T | SAMPLE_WANT_1))) return;

    // The sums, relative to the largest logit.
    const bool want_t = (flags & SAMPLE_WANT_T) && temperature > 0.f, want_1 = flags & SAMPLE_WANT_1;
    const float mx = found ? x[id] : NEG_INF;
    const double inv_t = want_t ? 1.0 / (double)temperature : 1.0;
    double st = 0.0, s1 = 0.0;
    if (found) {
        // Batched loads as above; past the row reads as NaN, which is skipped like a NaN logit.
        for (u32 i0 = tid; i0 < n; i0 += SAMPLE_BATCH * blockDim.x) {
            float v[SAMPLE_BATCH];
#pragma unroll
            for (int u = 0; u < SAMPLE_BATCH; u++) {
                const u32 i = i0 + u * blockDim.x;
                v[u] = i < n ? x[i] : __int_as_float(0x7fffffff);
            }
#pragma unroll
            for (int u = 0; u < SAMPLE_BATCH; u++) {
                const float d = v[u] - mx;  // NaN for a NaN logit, and for +inf − +inf
                if (is_nan(d)) continue;
                const double e1 = want_1 || inv_t == 1.0 ? exp((double)d) : 0.0;
                s1 += e1;
                if (want_t) st += inv_t == 1.0 ? e1 : exp(__dmul_rn((double)d, inv_t));
            }
        }
    }
    st = block_sum_f64(st, sd);
    s1 = block_sum_f64(s1, sd);
    if (tid == 0) {
        sums[2 * row] = want_t ? st : 0.0;
        sums[2 * row + 1] = want_1 ? s1 : 0.0;
    }

    // Radix select: the m-th largest key `prefix`, and how many entries equal to it to keep (`want`).
    if (tid == 0) {
        s_prefix = 0u;
        s_want = (u32)m;
    }
    __syncthreads();
    if ((u32)m < n) {
        for (int shift = 24; shift >= 0; shift -= 8) {
            const u32 mask = shift == 24 ? 0u : 0xffffffffu << (shift + 8), prefix = s_prefix;
            for (u32 b = tid; b < 256; b += blockDim.x) hist[b] = 0u;
            __syncthreads();
            for (u32 i = tid; i < n; i += blockDim.x) {
                const u32 k = logit_key(x[i]);
                if ((k & mask) == prefix) atomicAdd(&hist[(k >> shift) & 255u], 1u);
            }
            __syncthreads();
            if (tid == 0) {
                // From the top bin down, the first whose cumulative count reaches `want`.
                u32 acc = 0, b = 255;
                for (; b > 0; --b) {
                    if (acc + hist[b] >= s_want) break;
                    acc += hist[b];
                }
                s_prefix = prefix | (b << shift);
                s_want -= acc;
            }
            __syncthreads();
        }
    } else if (tid == 0) {
        s_want = 0u;  // every entry has a key above 0: all are kept as "greater"
    }
    __syncthreads();
    const u32 threshold = s_prefix, want = s_want, n_gt = (u32)m - want;

    // Keep every key above the threshold (their order is fixed by the sort below) and the first `want` equal to
    // it in id order.
    if (tid == 0) s_gt = 0u;
    __syncthreads();
    u32 eq_done = 0;
    for (u32 start = 0; start < n; start += blockDim.x) {
        const u32 i = start + tid;
        const u32 k = i < n ? logit_key(x[i]) : 0u;
        const bool gt = i < n && k > threshold, eq = i < n && k == threshold && want > 0;
        if (gt) best[atomicAdd(&s_gt, 1u)] = ((u64)k << 32) | (u64)(0xffffffffu - i);
        u32 total;
        const u32 before = block_count_before(eq, &total, sk);
        if (eq && eq_done + before < want) best[n_gt + eq_done + before] = ((u64)k << 32) | (u64)(0xffffffffu - i);
        eq_done += total;
    }
    // Bitonic sort, descending, over a power of two padded with 0 (below every real entry).
    u32 p = 1;
    while (p < (u32)m) p <<= 1;
    for (u32 i = (u32)m + tid; i < p; i += blockDim.x) best[i] = 0ull;
    __syncthreads();
    for (u32 k = 2; k <= p; k <<= 1) {
        for (u32 j = k >> 1; j > 0; j >>= 1) {
            for (u32 i = tid; i < p; i += blockDim.x) {
                const u32 partner = i ^ j;
                if (partner > i) {
                    const u64 a = best[i], b = best[partner];
                    if ((i & k) == 0 ? a < b : a > b) {
                        best[i] = b;
                        best[partner] = a;
                    }
                }
            }
            __syncthreads();
        }
    }
    for (u32 j = tid; j < (u32)m; j += blockDim.x) {
        const u32 c = 0xffffffffu - (u32)best[j];
        ids[row * m + j] = c;
        cand[row * m + j] = x[c];
    }
}
