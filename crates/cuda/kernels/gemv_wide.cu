// The one-row tensor-core GEMV as one wide block per 64 output columns (src/wide.rs picks it; docs/PERF.md
// session 37). A trace of a one-row step showed the split-K GEMV's co-resident blocks on an SM ending in the order of
// their index, one to two µs apart (the last alone on its SM with 4 warps, far below the SM's 16-warp rate), and each
// column range's last block adding the splits' partial sums after its arrival (1.3–2.2 µs past the others). Here the
// block's warps (16, or 8 where 16 warps' rings do not fit the shared memory) share the whole of K for their 4
// tiles: each warp's ring takes the next chunk from a counter in shared memory (a warp that runs ahead takes more
// chunks, so the warps end within a chunk of each other), each chunk's scaled sums go to their own place in shared
// memory, and the block adds them in chunk order at the end: the same sums whichever warp ran which chunk, no
// partial sums in global memory, no arrival. One row, a symmetric weight (every zero 2^(BITS−1)), groups of 128 rows
// (a chunk's scales are its row), bf16 out; one block an SM, so the host takes it for launches of about as many
// blocks as SMs. The weight layout and each chunk's arithmetic are mma_gemv_run's (mma_gemv.cuh).
#include "common.cuh"
#include "mma_pack.cuh"
#include "experts.cuh"
#include "mma.cuh"
#include "mma_gemv.cuh"

// grid (⌈N / 64⌉), block 32·WARPS, shared WARPS·stages·slot_bytes(1) + (K / 128)·64 floats.
template <int BITS, int WARPS>
__device__ void gemv_wide(const __nv_bfloat16* __restrict__ x, const uint2* __restrict__ words,
                          const __half* __restrict__ scales, __nv_bfloat16* __restrict__ y, int K, int N,
                          int stages) {
    constexpr int TPW = 4;
    extern __shared__ __align__(16) unsigned char smem[];
    __shared__ int next_chunk;
    __shared__ int slot_chunk[WARPS][MMA_MAX_STAGES];
    __shared__ __align__(16) u32 sums_word[4];
    const int lane = threadIdx.x & 31, warp = threadIdx.x / 32, group = lane >> 2, quad = lane & 3;
    const int n_tiles = N / 16, k_chunks = K / MMA_CHUNK;
    const int tile0 = blockIdx.x * TPW, tiles = min(TPW, n_tiles - tile0);
    const int slot = slot_bytes<BITS, TPW, false>(1);
    constexpr int wbytes = TPW * BITS * 32 * 8;
    unsigned char* ring = smem + (size_t)warp * stages * slot;
    float* parts = (float*)(smem + (size_t)WARPS * stages * slot);  // [k_chunks][64]
    if (threadIdx.x == 0) {
        next_chunk = 0;
        sums_word[0] = sums_word[3] = 0x3F803F80u;
        sums_word[1] = sums_word[2] = 0u;
    }
    __syncthreads();
    const u32 ring_at = smem_addr(ring);
    constexpr int PIECES = BITS * TPW / 2;
    u32 piece_src[PIECES];
#pragma unroll
    for (int i = 0; i < PIECES; i++) {
        const int p = lane + 32 * i, t = p / (BITS * 16);
        piece_src[i] = (u32)((t < tiles ? t : 0) * (size_t)k_chunks * BITS * 256 + (p % (BITS * 16)) * 16);
    }
    const unsigned char* wbase = (const unsigned char*)(words + (size_t)tile0 * k_chunks * BITS * 32);
    const bool scale_lane = lane < 2 * TPW && (lane >> 1) < tiles;
    const int xcol = (lane & 15) * 8;
    const u32 sz_at = ring_at + wbytes + lane * 16;
    const u32 x_at = ring_at + wbytes + sz_bytes<TPW>() + xcol * 2;
    // The slot the next issue fills (its index and byte offset): slots are filled and read in turn, wrapping.
    int next_s = 0, next_off = 0;
    const unsigned long long wpol = weight_policy();
    auto issue = [&]() {
        int c = 0;
        if (lane == 0) c = atomicAdd(&next_chunk, 1);
        c = __shfl_sync(0xffffffffu, c, 0);
        const int off = next_off;
        if (lane == 0) slot_chunk[warp][next_s] = c;
        if (c < k_chunks) {
            const unsigned char* wsrc = wbase + (size_t)c * BITS * 256;
#pragma unroll
            for (int i = 0; i < PIECES; i++)
                cp_async16_w_at(ring_at + off + (lane + 32 * i) * 16, wsrc + piece_src[i], wpol);
            if (lane < 2 * TPW)
                cp_async16_at(sz_at + off, scales + (size_t)c * N + tile0 * 16 + (scale_lane ? lane * 8 : 0),
                              scale_lane ? 16 : 0);
            if (lane < 16) cp_async16_ca_at(x_at + off, x + (size_t)c * MMA_CHUNK + xcol);
        }
        cp_async_commit();
        next_off += slot;
        if (++next_s == stages) next_s = next_off = 0;
    };
    for (int c = 0; c < stages - 1; c++) issue();
    u32 sums_a[4];
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(sums_a[0]), "=r"(sums_a[1]), "=r"(sums_a[2]), "=r"(sums_a[3])
                 : "r"(smem_addr(sums_word)));
    const u32 xrow_at = ((lane >> 3) * 8) * 2;  // row 0 for every lane: one row
    constexpr float BASE_HI = mma_base_hi<BITS>();
    constexpr float Z = sym_zero<BITS>();
    for (int s = 0, off = 0;;) {
        __syncwarp();
        issue();
        cp_async_wait_n(stages - 1);
        __syncwarp();
        const int c = slot_chunk[warp][s];
        if (c >= k_chunks) break;  // the counter only grows: every later slot of this warp is empty too
        const unsigned char* sl = ring + off;
        const u32 xs_at = ring_at + off + wbytes + sz_bytes<TPW>();
        off += slot;
        if (++s == stages) s = off = 0;
        const __half* szs = (const __half*)(sl + wbytes);
        u32 w[TPW][2 * BITS];
        slot_words<BITS, TPW>(sl, lane, w);
        float cacc[TPW][4], xsum[2][4];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            xsum[0][i] = xsum[1][i] = 0.f;
#pragma unroll
            for (int t = 0; t < TPW; t++) cacc[t][i] = 0.f;
        }
#pragma unroll
        for (int kp = 0; kp < 4; kp++) {
            u32 xb[4];
            ldmatrix_x4_at(xb, xs_at + xrow_at + kp * 64);
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int ks = kp * 2 + h;
                mma_16816(xsum[h], sums_a, xb[2 * h], xb[2 * h + 1]);
#pragma unroll
                for (int t = 0; t < TPW; t++) {
                    const u32* blk = w[t] + (ks / 4) * BITS;
                    u32 a[4];
#pragma unroll
                    for (int r = 0; r < 4; r++) a[r] = mma_pair<BITS>(blk, (ks % 4) * 4 + r);
                    mma_16816(cacc[t], a, xb[2 * h], xb[2 * h + 1]);
                }
            }
        }
        // Row 0 is the lanes of quad 0, registers 0 (column group) and 2 (group + 8).
        if (quad == 0) {
            const float lo = xsum[0][0] + xsum[1][0], hi = xsum[0][2] + xsum[1][2];
            const float based = 128.f * lo + BASE_HI * hi + Z * (lo + hi);
            float* out = parts + (size_t)c * 64;
#pragma unroll
            for (int t = 0; t < TPW; t++)
#pragma unroll
                for (int j = 0; j < 2; j++)
                    out[t * 16 + group + 8 * j] = __half2float(szs[t * 16 + group + 8 * j]) * (cacc[t][2 * j] - based);
        }
    }
    cp_async_wait<0>();
    __syncthreads();
    if (threadIdx.x < tiles * 16) {
        float v = 0.f;
        for (int c = 0; c < k_chunks; c++) v += parts[(size_t)c * 64 + threadIdx.x];
        y[tile0 * 16 + threadIdx.x] = __float2bfloat16(v);
    }
}

#define WIDE_KERNEL(BITS, WARPS)                                                                                 \
    extern "C" __global__ void __launch_bounds__(32 * WARPS, 1) gptq_mma_gemv_wide##WARPS##_w##BITS##_sym_bf16(  \
        const __nv_bfloat16* x, const uint2* words, const __half* scales, __nv_bfloat16* y, int K, int N,       \
        int stages) {                                                                                           \
        gemv_wide<BITS, WARPS>(x, words, scales, y, K, N, stages);                                              \
    }
WIDE_KERNEL(2, 8)
WIDE_KERNEL(2, 16)
WIDE_KERNEL(3, 8)
WIDE_KERNEL(3, 16)
WIDE_KERNEL(4, 8)
WIDE_KERNEL(4, 16)
