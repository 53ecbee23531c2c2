// The bandwidth ceiling: every byte of a buffer read once with 16-byte loads. Each thread folds its words into one
// and stores it only on a value it practically never has, so no load can be elided and the launch ends with no
// reduction: the sum and same-address atomicAdd this kernel had cost ~30 us at 8 blocks of 512 an SM on the H200
// (16,896 warps' atomics on one word, serialized in L2), a fixed tail that hid how fast a short read really is.
#include "common.cuh"

extern "C" __global__ void stream_read_u32(const uint4* __restrict__ buf, size_t n16, float* __restrict__ out) {
    u32 acc = 0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n16; i += (size_t)gridDim.x * blockDim.x) {
        uint4 v = buf[i];
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x9e3779b9u) *out = (float)acc;
}
