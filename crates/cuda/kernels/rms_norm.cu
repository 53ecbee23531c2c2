// RMSNorm over rows (MODEL_SPEC §2.2): y = w ⊙ x / sqrt(mean(x²) + eps), statistics in f32. One block per row.
#include "common.cuh"

extern "C" __global__ void rms_norm_bf16(const __nv_bfloat16* __restrict__ x,  // [rows, n]
                                         const __nv_bfloat16* __restrict__ w,  // [n]
                                         __nv_bfloat16* __restrict__ y,        // [rows, n]
                                         int n, float eps) {
    __shared__ float partial[32];
    const __nv_bfloat16* xr = x + (size_t)blockIdx.x * n;
    float ss = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = __bfloat162float(xr[i]);
        ss += v * v;
    }
    ss = warp_sum(ss);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x / 32] = ss;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < (blockDim.x + 31) / 32 ? partial[threadIdx.x] : 0.f;
        v = warp_sum(v);
        if (threadIdx.x == 0) partial[0] = v;
    }
    __syncthreads();
    const float inv = rsqrtf(partial[0] / n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        y[(size_t)blockIdx.x * n + i] = __float2bfloat16(__bfloat162float(w[i]) * (__bfloat162float(xr[i]) * inv));
}
