// MLA attention over the latent cache with absorbed kv_b_proj (MODEL_SPEC §2.5), and the V3.2 indexer's scores
// (§2.6). First version: one launch per row of the step, one block per head, keys looped in the block;
// the score buffer lives in shared memory, so a row may attend to at most `max_keys` positions.
#include "common.cuh"
#include <cuda_fp8.h>

// A cached value: dtype 0 = f32, 1 = bf16, 2 = fp8 e4m3 (times its row's scale, applied by the caller).
__device__ __forceinline__ float kv_load(const void* base, size_t i, int dtype) {
    if (dtype == 0) return ((const float*)base)[i];
    if (dtype == 1) return __bfloat162float(((const __nv_bfloat16*)base)[i]);
    return float(((const __nv_fp8_e4m3*)base)[i]);
}

__device__ __forceinline__ float block_reduce_max(float v, float* scratch) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x / 32] = v;
    __syncthreads();
    if (threadIdx.x < 32) {
        float t = threadIdx.x < (blockDim.x + 31) / 32 ? scratch[threadIdx.x] : NEG_INF;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) t = fmaxf(t, __shfl_xor_sync(0xffffffffu, t, o));
        if (threadIdx.x == 0) scratch[0] = t;
    }
    __syncthreads();
    float r = scratch[0];
    __syncthreads();
    return r;
}

// grid: heads; block: 128. shared: q_abs[lora], o_lat[lora], scores[n_keys], scratch[32].
extern "C" __global__ void mla_attention_f32(
    const float* q,        // [heads, nope + rope] of this row
    const void* latent,    // [len, lora] of this row's sequence, in the cache's dtype
    const void* k_pe,      // [len, rope]
    const float* scales,   // [len, 3]: latent, k_pe, indexer-key scale of each position (1 unless fp8)
    int dtype,
    const float* kv_b,     // [heads * (nope + v), lora]
    const int* keys,       // [n_keys] positions, or null = 0..n_keys-1
    int n_keys, int nope, int rope, int vdim, int lora, float scale,
    float* out) {          // [heads, v] of this row
    extern __shared__ float sm[];
    float* q_abs = sm;
    float* o_lat = q_abs + lora;
    float* scores = o_lat + lora;
    float* scratch = scores + n_keys;
    const int h = blockIdx.x;
    const float* qh = q + (size_t)h * (nope + rope);
    const float* w = kv_b + (size_t)h * (nope + vdim) * lora;
    for (int l = threadIdx.x; l < lora; l += blockDim.x) {
        float acc = 0.f;
        for (int d = 0; d < nope; d++) acc += qh[d] * w[(size_t)d * lora + l];
        q_abs[l] = acc;
    }
    __syncthreads();
    for (int j = 0; j < n_keys; j++) {
        const int t = keys ? keys[j] : j;
        float pc = 0.f, pr = 0.f;
        for (int l = threadIdx.x; l < lora; l += blockDim.x) pc += q_abs[l] * kv_load(latent, (size_t)t * lora + l, dtype);
        for (int r = threadIdx.x; r < rope; r += blockDim.x) pr += qh[nope + r] * kv_load(k_pe, (size_t)t * rope + r, dtype);
        float s = block_sum(pc * scales[(size_t)t * 3] + pr * scales[(size_t)t * 3 + 1], scratch);
        if (threadIdx.x == 0) scores[j] = s * scale;
    }
    __syncthreads();
    float m = NEG_INF;
    for (int j = threadIdx.x; j < n_keys; j += blockDim.x) m = fmaxf(m, scores[j]);
    m = block_reduce_max(m, scratch);
    float sum = 0.f;
    for (int j = threadIdx.x; j < n_keys; j += blockDim.x) {
        float e = __expf(scores[j] - m);
        scores[j] = e;
        sum += e;
    }
    sum = block_sum(sum, scratch);
    for (int l = threadIdx.x; l < lora; l += blockDim.x) {
        float acc = 0.f;
        for (int j = 0; j < n_keys; j++) {
            const int t = keys ? keys[j] : j;
            acc += scores[j] * scales[(size_t)t * 3] * kv_load(latent, (size_t)t * lora + l, dtype);
        }
        o_lat[l] = acc / sum;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < vdim; i += blockDim.x) {
        const float* wv = w + (size_t)(nope + i) * lora;
        float acc = 0.f;
        for (int l = 0; l < lora; l++) acc += wv[l] * o_lat[l];
        out[(size_t)h * vdim + i] = acc;
    }
}

// I(t) = Σ_h w[h] · relu(q[h]·k[t]) for t < n_keys: one warp per key.
extern "C" __global__ void indexer_scores_f32(const float* q, const float* w, const void* k, const float* scales,
                                              int dtype, int n_keys, int heads, int dim, float* scores) {
    size_t warp = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x & 31;
    if (warp >= (size_t)n_keys) return;
    const float ks = scales[warp * 3 + 2];
    float total = 0.f;
    for (int h = 0; h < heads; h++) {
        float d = 0.f;
        for (int i = lane; i < dim; i += 32) d += q[(size_t)h * dim + i] * kv_load(k, warp * dim + i, dtype);
        d = warp_sum(d);
        total += w[h] * fmaxf(d * ks, 0.f);
    }
    if (lane == 0) scores[warp] = total;
}

// Stores one f32 row into the cache in `dtype`, and its scale (fp8: max|x| / 448, the e4m3 range; else 1).
// One block per call.
extern "C" __global__ void cache_store_f32(const float* src, int n, void* dst, float* scale, int dtype) {
    __shared__ float scratch[32];
    float m = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, fabsf(src[i]));
    // block max via the sum helper's pattern
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x / 32] = m;
    __syncthreads();
    if (threadIdx.x == 0) {
        float t = 0.f;
        for (int w = 0; w < (blockDim.x + 31) / 32; w++) t = fmaxf(t, scratch[w]);
        scratch[0] = dtype == 2 ? (t > 0.f ? t / 448.f : 1.f) : 1.f;
        *scale = scratch[0];
    }
    __syncthreads();
    const float sc = scratch[0];
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        if (dtype == 0) ((float*)dst)[i] = src[i];
        else if (dtype == 1) ((__nv_bfloat16*)dst)[i] = __float2bfloat16(src[i]);
        else ((__nv_fp8_e4m3*)dst)[i] = __nv_fp8_e4m3(src[i] / sc);
    }
}
