// The bandwidth ceiling: every byte of a buffer read once with 16-byte loads, summed so nothing is elided.
#include "common.cuh"

extern "C" __global__ void stream_read_u32(const uint4* __restrict__ buf, size_t n16, float* __restrict__ out) {
    u32 acc = 0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n16; i += (size_t)gridDim.x * blockDim.x) {
        uint4 v = buf[i];
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    float s = warp_sum((float)(acc & 1u));
    if ((threadIdx.x & 31) == 0) atomicAdd(out, s);
}
