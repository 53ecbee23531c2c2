// What the attention kernels share (attention.cu, flash_mma.cu; ops.cu's mla_prep stores rows too): the paged
// cache's addressing, element types and row stores.
#pragma once
#include <cuda_fp8.h>

#define KV_BLOCK 64        // positions per cache block (cache::BLOCK)
#define MLA_HEADS 8        // heads per flash block
#define MLA_MAX_SPLITS 32  // key shares per row the kernels hold (attention::MAX_SPLITS)

__device__ __forceinline__ float act_ld(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float act_ld(const __nv_bfloat16* p, size_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void act_st(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void act_st(__nv_bfloat16* p, size_t i, float v) { p[i] = __float2bfloat16(v); }

// A cached value: dtype 0 = f32, 1 = bf16, 2 = fp8 e4m3 (times its slot's scale, applied by the caller).
__device__ __forceinline__ float kv_load(const void* base, size_t i, int dtype) {
    if (dtype == 0) return ((const float*)base)[i];
    if (dtype == 1) return __bfloat162float(((const __nv_bfloat16*)base)[i]);
    return float(((const __nv_fp8_e4m3*)base)[i]);
}

// Values a thread of cache_put_row holds (a 512-wide latent at 128 threads is 4).
#define CACHE_HELD 8

// One row `src` [n] of component c (0 latent, 1 k_pe, 2 indexer key) into the pool at `slot` of `dst` in the cache
// dtype, and its scale (fp8: max|x| / 448, the e4m3 range; else 1). Every thread of the block calls it (a block
// max). (Needs common.cuh's block_max.)
template <typename T>
__device__ void cache_put_row(const T* src, int n, size_t slot, int c, void* dst, float* scales, int dtype) {
    __shared__ float scratch[32];
    const size_t at = slot * n;
    const auto put = [&](int i, float v, float sc) {
        if (dtype == 0) ((float*)dst)[at + i] = v;
        else if (dtype == 1) ((__nv_bfloat16*)dst)[at + i] = __float2bfloat16(v);
        else ((__nv_fp8_e4m3*)dst)[at + i] = __nv_fp8_e4m3(v / sc);
    };
    float m = 0.f;
    if (n <= (int)blockDim.x * CACHE_HELD) {
        // Every value of the thread loaded at once and kept for the store (a loop over them issued one load after
        // the other's use: one round trip a value, twice).
        float v[CACHE_HELD];
#pragma unroll
        for (int j = 0; j < CACHE_HELD; j++) {
            const int i = threadIdx.x + j * blockDim.x;
            v[j] = i < n ? act_ld(src, i) : 0.f;
            m = fmaxf(m, fabsf(v[j]));
        }
        m = block_max(m, scratch);
        const float sc = dtype == 2 && m > 0.f ? m / 448.f : 1.f;
        if (threadIdx.x == 0) scales[slot * 3 + c] = sc;
#pragma unroll
        for (int j = 0; j < CACHE_HELD; j++) {
            const int i = threadIdx.x + j * blockDim.x;
            if (i < n) put(i, v[j], sc);
        }
        return;
    }
    for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, fabsf(act_ld(src, i)));
    m = block_max(m, scratch);
    const float sc = dtype == 2 && m > 0.f ? m / 448.f : 1.f;
    if (threadIdx.x == 0) scales[slot * 3 + c] = sc;
    for (int i = threadIdx.x; i < n; i += blockDim.x) put(i, act_ld(src, i), sc);
}

// Pool slot of position p of a sequence whose block table is `table`.
__device__ __forceinline__ int kv_slot(const int* table, int p) {
    return table[p / KV_BLOCK] * KV_BLOCK + p % KV_BLOCK;
}

// One online-softmax step of a warp over a tile of keys (lane = key; s its scaled score, NEG_INF when masked):
// the tile's max joins the running max m, the running sum is rescaled and grown, p = e^{s − m}. Returns the
// correction e^{m_old − m} the running mix must be scaled by. With nothing unmasked yet m stays −inf, every p is 0
// and the sums stay 0.
__device__ __forceinline__ float online_softmax_step(float s, float& m, float& sum, float& p) {
    float mt = s;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, o));
    const float mn = fmaxf(m, mt);
    const float c = m == mn ? 1.f : __expf(m - mn);
    p = s == NEG_INF ? 0.f : __expf(s - mn);
    sum = sum * c + warp_sum(p);
    m = mn;
    return c;
}

// Σ_s w[s]·op[s·stride] over key shares s0.. of one merged value: each run of 16 shares' values requested before
// any is added (one round trip per 16 shares, not one per share; runs of 16 keep the registers of the usual ≤ 16).
// mla_out and mla_out_w merge o_lat with it.
__device__ __forceinline__ float merge_shares(const float* op, size_t stride, int splits, const float* w, int s0) {
    float v = 0.f;
    for (; s0 < splits; s0 += 16) {
        float part[16];
#pragma unroll
        for (int s = 0; s < 16; s++) part[s] = s0 + s < splits ? op[(size_t)(s0 + s) * stride] : 0.f;
#pragma unroll
        for (int s = 0; s < 16; s++) v += s0 + s < splits ? w[s0 + s] * part[s] : 0.f;
    }
    return v;
}

// The weight of row r's key share s (lane s of a warp; the warp holds the row) in its merged latent mix:
// e^{m_s − M} / Σ_t e^{m_t − M} l_t with M the row's largest share max, 0 for an empty share, a row past n_rows or
// a lane past the shares. (Needs common.cuh's warp_sum.)
__device__ __forceinline__ float split_weight(const float* ml_part, int r, int n_rows, int heads, int h, int splits,
                                             int s) {
    float m = NEG_INF, l = 0.f;
    if (r < n_rows && s < splits) {
        const float* ml = ml_part + (((size_t)r * heads + h) * splits + s) * 2;
        m = ml[0];
        l = ml[1];
    }
    const float mx = warp_max(m);
    const float e = m == NEG_INF ? 0.f : __expf(m - mx);
    const float total = warp_sum(e * l);
    return total > 0.f ? e / total : 0.f;
}
