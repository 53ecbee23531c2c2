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

// What a read at a small grid (the tensor-core GEMV's 4 blocks of 128 threads an SM) needs to reach the ceiling:
// U loads of 16 bytes in flight a thread (stream_read_u32 has one), then folded.
template <int U>
__device__ __forceinline__ void read_batched(const uint4* __restrict__ buf, size_t n16, float* __restrict__ out) {
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    u32 acc = 0;
    for (; i + (U - 1) * stride < n16; i += U * stride) {
        uint4 v[U];
#pragma unroll
        for (int u = 0; u < U; u++) v[u] = buf[i + u * stride];
#pragma unroll
        for (int u = 0; u < U; u++) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
    for (; i < n16; i += stride) {
        const uint4 v = buf[i];
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x9e3779b9u) *out = (float)acc;
}

// The same bytes through a ring of S slots of 16 bytes a thread in shared memory (S − 1 copies in flight), copied
// with cp.async as the GEMV streams its weights: whether such copies read as fast as loads into registers. A
// thread reads only its own slots, so its own wait is the only fence. Shared: S · blockDim.x · 16 bytes.
template <int S>
__device__ __forceinline__ void read_ring(const uint4* __restrict__ buf, size_t n16, float* __restrict__ out) {
    extern __shared__ __align__(16) uint4 ring[];
    const size_t stride = (size_t)gridDim.x * blockDim.x, i0 = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    const size_t n = i0 < n16 ? (n16 - i0 + stride - 1) / stride : 0;  // this thread's vectors
    uint4* mine = ring + threadIdx.x;
    u32 acc = 0;
#pragma unroll
    for (int s = 0; s < S - 1; s++) {
        if (s < n) cp_async16(mine + s * blockDim.x, buf + i0 + s * stride);
        cp_async_commit();
    }
    for (size_t c = 0; c < n; c++) {
        const size_t next = c + S - 1;
        if (next < n) cp_async16(mine + (next % S) * blockDim.x, buf + i0 + next * stride);
        cp_async_commit();
        cp_async_wait<S - 1>();
        u32 v[4];  // one 16-byte shared load (a plain uint4 read compiled to four)
        asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(v[0]), "=r"(v[1]), "=r"(v[2]), "=r"(v[3])
                     : "r"(smem_addr(mine + (c % S) * blockDim.x)));
        acc ^= v[0] ^ v[1] ^ v[2] ^ v[3];
    }
    if (acc == 0x9e3779b9u) *out = (float)acc;
}

#define READ_KERNELS(K)                                                                                         \
    extern "C" __global__ void stream_read_x##K(const uint4* __restrict__ buf, size_t n16, float* __restrict__ out) { \
        read_batched<K>(buf, n16, out);                                                                         \
    }                                                                                                           \
    extern "C" __global__ void stream_read_ring##K(const uint4* __restrict__ buf, size_t n16, float* __restrict__ out) { \
        read_ring<K>(buf, n16, out);                                                                            \
    }
READ_KERNELS(2)
READ_KERNELS(4)
READ_KERNELS(8)
READ_KERNELS(16)
