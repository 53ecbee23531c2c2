// Quantized GEMV for decode batches (MODEL_SPEC §4): y[b, n] = Σ_k x[b, k] · W[n, k] with W in GPTQ layout,
// qweight u32 [K·BITS/32, N] (every 32 rows of a column packed little-endian into BITS words), zeros f16 [G, N]
// (already after the checkpoint's v1/v2 convention), scales f16 [G, N], group = row / group_size (rows are
// reordered at load when the checkpoint has a g_idx, and `perm` gathers x to match).
//
// One thread per output column, so a warp reads 32 consecutive columns' words: 128-byte coalesced loads.
// blockIdx.y splits K; each split writes its partial sums to `partial` [splits, B, N] and `gptq_reduce` adds the
// splits in a fixed order, so results do not depend on scheduling (no float atomics).
// Per group the inner loop needs only Σ x·q; the zero enters once per group as z·Σx (Σx computed once per block).
#include "common.cuh"

template <int BITS>
__device__ __forceinline__ u32 field(const u32* w, int k) {
    if (BITS == 3) {
        // 96-bit block: value k at bit 3k; k = 10 and 21 straddle words.
        if (k < 21) {
            u64 a = (u64)w[0] | ((u64)w[1] << 32);
            return (u32)(a >> (3 * k)) & 7u;
        } else {
            u64 b = (u64)w[1] | ((u64)w[2] << 32);
            return (u32)(b >> (3 * k - 32)) & 7u;
        }
    } else {
        const int per = 32 / BITS;
        return (w[k / per] >> ((k % per) * BITS)) & ((1u << BITS) - 1u);
    }
}

// grid: (ceil(N / blockDim.x), splits); block: 128 threads; shared: x [MB, k_chunk] and Σx per group [MB, groups].
// MB is the batch rounded up to a power of two (a template parameter, so no work is spent on absent rows).
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(float v) { return v; }

template <int BITS, int MB, typename XT>
__device__ void gemv(const XT* __restrict__ x,              // [B, K] bf16 or f32
                     const int* __restrict__ perm,          // [K] or null
                     const u32* __restrict__ qweight,       // [K*BITS/32, N]
                     const __half* __restrict__ zeros,      // [G, N]
                     const __half* __restrict__ scales,     // [G, N]
                     float* __restrict__ partial,           // [splits, B, N]
                     int B, int K, int N, int group_size, int k_chunk) {
    extern __shared__ float smem[];
    const int k0 = blockIdx.y * k_chunk;
    const int kn = min(k_chunk, K - k0);
    const int ng = (kn + group_size - 1) / group_size;   // groups (or group parts) in this split
    float* xs = smem;                                     // [MB, k_chunk]
    float* gsum = smem + MB * k_chunk;                    // [MB, ng]
    // Stage this split's x (gathered through perm) as f32; rows past B are zero.
    for (int i = threadIdx.x; i < MB * kn; i += blockDim.x) {
        int b = i / kn, k = i % kn;
        int src = perm ? perm[k0 + k] : (k0 + k);
        xs[b * k_chunk + k] = b < B ? to_f32(x[(size_t)b * K + src]) : 0.f;
    }
    __syncthreads();
    // Σx per (row, group): the zero point enters once per group as z·Σx, shared by every column.
    for (int i = threadIdx.x; i < MB * ng; i += blockDim.x) {
        int b = i / ng, g = i % ng;
        float acc = 0.f;
        for (int k = g * group_size; k < min(kn, (g + 1) * group_size); k++) acc += xs[b * k_chunk + k];
        gsum[b * ng + g] = acc;
    }
    __syncthreads();
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    float acc[MB];
#pragma unroll
    for (int b = 0; b < MB; b++) acc[b] = 0.f;
    for (int gi = 0; gi < ng; gi++) {
        const int g0 = gi * group_size;
        const int gk = min(group_size, kn - g0);
        const int g = (k0 + g0) / group_size;
        const float s = __half2float(scales[(size_t)g * N + n]);
        const float z = __half2float(zeros[(size_t)g * N + n]);
        float dot[MB];
#pragma unroll
        for (int b = 0; b < MB; b++) dot[b] = 0.f;
        for (int r = 0; r < gk; r += 32) {
            const int row = k0 + g0 + r;            // multiple of 32
            u32 w[BITS];
#pragma unroll
            for (int j = 0; j < BITS; j++) w[j] = __ldg(&qweight[(size_t)(row / 32 * BITS + j) * N + n]);
            const float* xr = xs + g0 + r;
#pragma unroll
            for (int k = 0; k < 32; k++) {
                const float q = (float)field<BITS>(w, k);
#pragma unroll
                for (int b = 0; b < MB; b++) dot[b] = fmaf(xr[b * k_chunk + k], q, dot[b]);
            }
        }
#pragma unroll
        for (int b = 0; b < MB; b++) acc[b] += s * (dot[b] - z * gsum[b * ng + gi]);
    }
#pragma unroll
    for (int b = 0; b < MB; b++)
        if (b < B) partial[((size_t)blockIdx.y * B + b) * N + n] = acc[b];
}

#define GEMV_T(BITS, MB, XT, NAME)                                                                         \
    extern "C" __global__ void gptq_gemv_w##BITS##_b##MB##_##NAME(                                        \
        const XT* x, const int* perm, const u32* qweight, const __half* zeros,                             \
        const __half* scales, float* partial, int B, int K, int N, int group_size, int k_chunk) {          \
        gemv<BITS, MB, XT>(x, perm, qweight, zeros, scales, partial, B, K, N, group_size, k_chunk);        \
    }
#define GEMV(BITS, MB) GEMV_T(BITS, MB, __nv_bfloat16, bf16) GEMV_T(BITS, MB, float, f32)
#define GEMV_ALL(BITS) GEMV(BITS, 1) GEMV(BITS, 2) GEMV(BITS, 4) GEMV(BITS, 8) GEMV(BITS, 16)
GEMV_ALL(2)
GEMV_ALL(3)
GEMV_ALL(4)
GEMV_ALL(8)

// y[b, n] = Σ_s partial[s, b, n], splits added in order.
extern "C" __global__ void gptq_reduce_f32(const float* __restrict__ partial, float* __restrict__ y, int splits,
                                           int B, int N) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= B * N) return;
    float acc = 0.f;
    for (int s = 0; s < splits; s++) acc += partial[(size_t)s * B * N + i];
    y[i] = acc;
}
