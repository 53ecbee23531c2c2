// Quantized GEMV on tensor cores for bf16 decode batches (≤ 16 rows): y[b, n] = Σ_k x[b, k] · W[n, k].
//
// The weights are repacked at load (src/mma.rs) so that each lane's share of an `mma.m16n8k16` A fragment is in
// its own words: for every tile of 16 output columns and every chunk of 128 rows of K, lane L owns 64 values
// (8 k-steps × 4 pairs), stored as two blocks of BITS words. Inside a block, pair i (two neighbouring k of one
// column) sits at bits (s, s + 16) of one word, so `(w >> s) & mask | 0x43004300` is the pair as bf16x2
// (128 + q each, exact). Layout in memory: [tile][chunk][BITS][lane] uint2, so each load instruction of a warp
// reads 256 contiguous bytes.
//
// The multiply runs on tensor cores with fp32 accumulation; per chunk the zero and scale enter once:
// acc += s · (Σ x·(128 + q) − (128 + z) · Σx), with Σx of the same bf16 x the tensor cores see.
// A block is 4 warps × 2 tiles (128 columns) over one split of K; splits write partial sums [splits, B, N]
// that `gptq_reduce_*` adds in a fixed order (deterministic, as the scalar GEMV).
#include "common.cuh"

#define MMA_CHUNK 128
#define MMA_TILES_PER_WARP 2
#define MMA_WARPS 4

// The two fields of pair i (0..15) of a block of BITS words, at bits 0.. and 16.. of the result.
template <int BITS>
__device__ __forceinline__ u32 pair_bits(const u32* w, int i) {
    if (BITS == 2) return (w[i / 8] >> (2 * (i % 8))) & 0x00030003u;
    if (BITS == 4) return (w[i / 4] >> (4 * (i % 4))) & 0x000F000Fu;
    // BITS == 3: five pairs per word at bits 0..14 / 16..30; pair 15 is spread over bits 15 and 31 of the three.
    if (i < 15) return (w[i / 5] >> (3 * (i % 5))) & 0x00070007u;
    return ((w[0] >> 15) & 0x00010001u) | ((w[1] >> 14) & 0x00020002u) | ((w[2] >> 13) & 0x00040004u);
}

__device__ __forceinline__ void mma_bf16(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

#define MMA_STAGES 4

// Asynchronous 8-byte copy global → shared (sm_80+), and its group fences.
__device__ __forceinline__ void cp_async8(void* dst, const void* src) {
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(d), "l"(src) : "memory");
}
// "memory" clobbers: no barrier separates a lane's ring reads from its wait (or its next copy into the slot it
// just read), so these fences must also keep the compiler from moving shared-memory accesses across them.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// Shared memory of one block: the warps' rings of weight words, then Σx per (row, chunk), then x as bf16.
// (src/mma.rs `smem_bytes` mirrors this.)
template <int BITS>
__host__ __device__ constexpr int ring_words() {
    return MMA_WARPS * MMA_STAGES * MMA_TILES_PER_WARP * BITS * 32;  // uint2 each
}

__device__ __forceinline__ __nv_bfloat16 to_bf16(float v) { return __float2bfloat16(v); }
__device__ __forceinline__ __nv_bfloat16 to_bf16(__nv_bfloat16 v) { return v; }

// One block: tiles [block_x·8, +8) × rows [blockIdx.y·k_chunk, +k_chunk) of K, for `nrows` ≤ MB rows xrow[b]
// of x (MB = 8 or 16: one or two n8 halves). partial[b·row_stride + n].
template <int BITS, int MB, typename XT>
__device__ void mma_gemv_block(const XT* __restrict__ x, const int* xrow, int nrows, const int* __restrict__ perm,
                               const uint2* __restrict__ words, const __half* __restrict__ zeros,
                               const __half* __restrict__ scales, float* __restrict__ partial, size_t row_stride,
                               int K, int N, int group_size, int k_chunk, int block_x) {
    extern __shared__ float smem[];
    const int stride = k_chunk + 8;  // bf16 per staged row: +8 staggers the rows over the banks
    const int k0 = blockIdx.y * k_chunk;
    const int kn = min(k_chunk, K - k0);
    const int chunks = kn / MMA_CHUNK;
    uint2* rings = (uint2*)smem;                                          // [warps][stages][tiles][BITS][32]
    float* gsum = smem + 2 * ring_words<BITS>();                          // [MB, k_chunk / 128]
    __nv_bfloat16* xs = (__nv_bfloat16*)(gsum + MB * (k_chunk / MMA_CHUNK)); // [nrows, stride]
    const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
    const int n_tiles = N / 16, k_chunks = K / MMA_CHUNK;
    const int tile0 = (block_x * MMA_WARPS + warp) * MMA_TILES_PER_WARP;
    const int tiles = max(0, min(MMA_TILES_PER_WARP, n_tiles - tile0));
    uint2* ring = rings + warp * MMA_STAGES * MMA_TILES_PER_WARP * BITS * 32;
    // Each lane copies, and later reads, only its own words: the per-thread cp.async fences order them, no barrier.
    auto issue = [&](int c) {
        if (c < chunks) {
#pragma unroll
            for (int t = 0; t < MMA_TILES_PER_WARP; t++) {
                if (t < tiles) {
                    const uint2* src = words + ((size_t)(tile0 + t) * k_chunks + k0 / MMA_CHUNK + c) * BITS * 32 + lane;
                    uint2* dst = ring + ((c % MMA_STAGES) * MMA_TILES_PER_WARP + t) * BITS * 32 + lane;
#pragma unroll
                    for (int j = 0; j < BITS; j++) cp_async8(dst + j * 32, src + j * 32);
                }
            }
        }
        cp_async_commit();
    };
    // The first stages' weights are requested before x is staged, so the loads overlap the staging.
#pragma unroll
    for (int c = 0; c < MMA_STAGES - 1; c++) issue(c);
    for (int i = threadIdx.x; i < nrows * kn; i += blockDim.x) {
        int b = i / kn, k = i % kn;
        int src = perm ? perm[k0 + k] : (k0 + k);
        xs[b * stride + k] = to_bf16(x[(size_t)xrow[b] * K + src]);
    }
    __syncthreads();
    // Σx per (row, chunk), a warp per pair, of the same bf16 values the tensor cores see.
    for (int i = warp; i < MB * chunks; i += MMA_WARPS) {
        int b = i / chunks, c = i % chunks;
        float v = 0.f;
        if (b < nrows)
            for (int k = lane; k < MMA_CHUNK; k += 32) v += __bfloat162float(xs[b * stride + c * MMA_CHUNK + k]);
        v = warp_sum(v);
        if (lane == 0) gsum[b * (k_chunk / MMA_CHUNK) + c] = v;
    }
    __syncthreads();

    if (tiles == 0) return;
    const int group = lane >> 2, quad = lane & 3;
    constexpr int H = MB / 8;
    float acc[MMA_TILES_PER_WARP][H][4];
#pragma unroll
    for (int t = 0; t < MMA_TILES_PER_WARP; t++)
#pragma unroll
        for (int h = 0; h < H; h++)
#pragma unroll
            for (int i = 0; i < 4; i++) acc[t][h][i] = 0.f;

    const int gstride = k_chunk / MMA_CHUNK;
    // Scale and 128 + zero of the lane's two columns per tile, one chunk ahead of the math (their loads would
    // otherwise stall every chunk).
    auto load_sz = [&](int c, float (&sz)[MMA_TILES_PER_WARP][4]) {
        const int g = (k0 + min(c, chunks - 1) * MMA_CHUNK) / group_size;
#pragma unroll
        for (int t = 0; t < MMA_TILES_PER_WARP; t++) {
            const int na = min(tile0 + t, n_tiles - 1) * 16 + group;
            sz[t][0] = __half2float(__ldg(&scales[(size_t)g * N + na]));
            sz[t][1] = __half2float(__ldg(&scales[(size_t)g * N + na + 8]));
            sz[t][2] = 128.f + __half2float(__ldg(&zeros[(size_t)g * N + na]));
            sz[t][3] = 128.f + __half2float(__ldg(&zeros[(size_t)g * N + na + 8]));
        }
    };
    float sz[MMA_TILES_PER_WARP][4], sz_next[MMA_TILES_PER_WARP][4];
    load_sz(0, sz);
    for (int c = 0; c < chunks; c++) {
        // Keep MMA_STAGES − 1 chunks in flight behind this one's math.
        issue(c + MMA_STAGES - 1);
        load_sz(c + 1, sz_next);
        cp_async_wait<MMA_STAGES - 1>();
        u32 w[MMA_TILES_PER_WARP][2 * BITS];
#pragma unroll
        for (int t = 0; t < MMA_TILES_PER_WARP; t++) {
            const uint2* src = ring + ((c % MMA_STAGES) * MMA_TILES_PER_WARP + t) * BITS * 32 + lane;
#pragma unroll
            for (int j = 0; j < BITS; j++) {
                uint2 v = src[j * 32];
                w[t][2 * j] = v.x;
                w[t][2 * j + 1] = v.y;
            }
        }
        float cacc[MMA_TILES_PER_WARP][H][4];
#pragma unroll
        for (int t = 0; t < MMA_TILES_PER_WARP; t++)
#pragma unroll
            for (int h = 0; h < H; h++)
#pragma unroll
                for (int i = 0; i < 4; i++) cacc[t][h][i] = 0.f;
#pragma unroll
        for (int ks = 0; ks < 8; ks++) {
            const int kk = c * MMA_CHUNK + ks * 16 + quad * 2;
            u32 b0[H], b1[H];
#pragma unroll
            for (int h = 0; h < H; h++) {
                const int b = h * 8 + group;
                const __nv_bfloat16* row = xs + b * stride + kk;
                b0[h] = b < nrows ? *(const u32*)row : 0u;
                b1[h] = b < nrows ? *(const u32*)(row + 8) : 0u;
            }
#pragma unroll
            for (int t = 0; t < MMA_TILES_PER_WARP; t++) {
                if (t < tiles) {
                    const u32* blk = w[t] + (ks / 4) * BITS;
                    u32 a[4];
#pragma unroll
                    for (int r = 0; r < 4; r++) a[r] = pair_bits<BITS>(blk, (ks % 4) * 4 + r) | 0x43004300u;
#pragma unroll
                    for (int h = 0; h < H; h++) mma_bf16(cacc[t][h], a, b0[h], b1[h]);
                }
            }
        }
#pragma unroll
        for (int t = 0; t < MMA_TILES_PER_WARP; t++) {
#pragma unroll
            for (int h = 0; h < H; h++) {
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const int b = h * 8 + quad * 2 + (i & 1);
                    const float sc = sz[t][i >> 1], z = sz[t][2 + (i >> 1)];
                    acc[t][h][i] += sc * (cacc[t][h][i] - z * gsum[b * gstride + c]);
                }
            }
#pragma unroll
            for (int i = 0; i < 4; i++) sz[t][i] = sz_next[t][i];
        }
    }
#pragma unroll
    for (int t = 0; t < MMA_TILES_PER_WARP; t++) {
        if (t < tiles) {
#pragma unroll
            for (int h = 0; h < H; h++) {
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const int b = h * 8 + quad * 2 + (i & 1);
                    const int n = (tile0 + t) * 16 + group + 8 * (i >> 1);
                    if (b < nrows) partial[b * row_stride + n] = acc[t][h][i];
                }
            }
        }
    }
}

// One matrix, rows 0..B of x: grid (ceil(N / 128), splits); partial [splits, B, N].
template <int BITS, int MB, typename XT>
__device__ void mma_gemv(const XT* x, const int* perm, const uint2* words, const __half* zeros,
                         const __half* scales, float* partial, int B, int K, int N, int group_size, int k_chunk) {
    int xrow[MB];
#pragma unroll
    for (int b = 0; b < MB; b++) xrow[b] = b;
    mma_gemv_block<BITS, MB, XT>(x, xrow, B, perm, words, zeros, scales, partial + (size_t)blockIdx.y * B * N, N, K,
                                 N, group_size, k_chunk, blockIdx.x);
}

// Grouped experts, as gemv_grouped in gptq_gemv.cu: blockIdx.z is a tile of up to MB pairs routed to one expert;
// the matrix m of expert e comes from the tables at m·n_experts + e (words, zeros, scales, row order).
template <int BITS, int MB, typename XT>
__device__ void mma_gemv_grouped(const XT* x, const int* tiles, const int* n_tiles, const int* pair_x, int pairs,
                                 const u64* w_tab, const u64* zr_tab, const u64* sc_tab, const u64* perm_tab,
                                 int n_experts, int mats, float* partial, int K, int N, int group_size,
                                 int k_chunk) {
    const int t = blockIdx.z;
    if (t >= *n_tiles) return;
    const int expert = tiles[3 * t], p0 = tiles[3 * t + 1], np = tiles[3 * t + 2];
    const int bx = (N / 16 + MMA_WARPS * MMA_TILES_PER_WARP - 1) / (MMA_WARPS * MMA_TILES_PER_WARP);
    const int m = blockIdx.x / bx;
    const int e = m * n_experts + expert;
    int xrow[MB];
#pragma unroll
    for (int b = 0; b < MB; b++) xrow[b] = b < np ? pair_x[p0 + b] : 0;
    const size_t width = (size_t)mats * N;
    float* out = partial + ((size_t)blockIdx.y * pairs + p0) * width + (size_t)m * N;
    mma_gemv_block<BITS, MB, XT>(x, xrow, np, (const int*)perm_tab[e], (const uint2*)w_tab[e],
                                    (const __half*)zr_tab[e], (const __half*)sc_tab[e], out, width, K, N, group_size,
                                    k_chunk, blockIdx.x % bx);
}

#define MMA_T(BITS, MB)                                                                                       \
    extern "C" __global__ void gptq_mma_gemv_w##BITS##_b##MB##_bf16(                                         \
        const __nv_bfloat16* x, const int* perm, const uint2* words, const __half* zeros, const __half* scales, \
        float* partial, int B, int K, int N, int group_size, int k_chunk) {                                   \
        mma_gemv<BITS, MB, __nv_bfloat16>(x, perm, words, zeros, scales, partial, B, K, N, group_size, k_chunk); \
    }                                                                                                         \
    extern "C" __global__ void gptq_mma_gemv_grouped_w##BITS##_b##MB##_bf16(                                 \
        const __nv_bfloat16* x, const int* tiles, const int* n_tiles, const int* pair_x, int pairs,           \
        const u64* w, const u64* zr, const u64* sc, const u64* perm, int n_experts, int mats, float* partial,  \
        int K, int N, int group_size, int k_chunk) {                                                          \
        mma_gemv_grouped<BITS, MB, __nv_bfloat16>(x, tiles, n_tiles, pair_x, pairs, w, zr, sc, perm, n_experts, \
                                                  mats, partial, K, N, group_size, k_chunk);                  \
    }
MMA_T(2, 8)
MMA_T(2, 16)
MMA_T(3, 8)
MMA_T(3, 16)
MMA_T(4, 8)
MMA_T(4, 16)

// The repacked weight back to f32 [N, K] in the checkpoint's row order (attention's absorbed kv_b_proj, tests).
template <int BITS>
__device__ void mma_dequant(const uint2* words, const __half* zeros, const __half* scales, const int* perm, float* w,
                            int K, int N, int group_size) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= (size_t)K * N) return;
    const int n = i / K, k = i % K;  // k: reordered row
    const int tile = n / 16, r16 = n % 16, chunk = k / MMA_CHUNK, kk = k % MMA_CHUNK;
    const int ks = kk / 16, k16 = kk % 16;
    const int lane = (r16 % 8) * 4 + (k16 % 8) / 2;
    const int reg = (r16 / 8) + 2 * (k16 / 8);
    const int p = ks * 4 + reg;  // pair 0..31 of the lane in this chunk
    const uint2* src = words + ((size_t)tile * (K / MMA_CHUNK) + chunk) * BITS * 32 + lane;
    u32 wv[2 * BITS];
    for (int j = 0; j < BITS; j++) {
        uint2 v = src[j * 32];
        wv[2 * j] = v.x;
        wv[2 * j + 1] = v.y;
    }
    const u32 bits = pair_bits<BITS>(wv + (p / 16) * BITS, p % 16);
    const float q = (float)((k16 % 2) ? (bits >> 16) : (bits & 0xFFFFu));
    const int g = k / group_size;
    const int src_k = perm ? perm[k] : k;
    w[(size_t)n * K + src_k] = __half2float(scales[(size_t)g * N + n]) * (q - __half2float(zeros[(size_t)g * N + n]));
}
#define MMA_DEQUANT(BITS)                                                                                    \
    extern "C" __global__ void gptq_mma_dequant_w##BITS##_f32(const uint2* q, const __half* z, const __half* s, \
                                                              const int* perm, float* w, int K, int N, int gs) { \
        mma_dequant<BITS>(q, z, s, perm, w, K, N, gs);                                                       \
    }
MMA_DEQUANT(2)
MMA_DEQUANT(3)
MMA_DEQUANT(4)
