// What the attention kernels share (attention.cu, flash_mma.cu): the paged cache's addressing and element types.
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
