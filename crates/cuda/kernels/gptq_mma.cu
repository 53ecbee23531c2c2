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
// acc += s · (Σ x·(128 + q) − (128 + z) · Σx). Σx comes from one more mma with an all-ones A, so it lands in the
// very registers (batch row, lane) where the correction needs it, summed from the bf16 x the tensor cores see.
//
// A block is 4 warps on the same 2 tiles (32 columns), each warp over its own run of the block's chunks of K:
// every warp streams its weights, their scales and zeros *and* its x rows through a private ring of cp.async
// slots (no block-wide staging or barrier in the loop, and no load the math waits on that was not requested a
// whole ring ahead), then the warps' sums are added in shared memory in warp order. A grid with
// several splits of K (gridDim.y) writes partial sums [splits, B, N]; for the plain GEMV the last block of a
// column range to finish (a counter per range) adds the splits in split order and stores y — deterministic, one
// launch. The grouped experts keep their partial sums for their own reductions (SiLU·up, the routing weights).
#include "common.cuh"

#define MMA_CHUNK 128
#define MMA_TPW 2       // tiles of 16 columns per warp (and per block)
#define MMA_WARPS 4
#define MMA_XS 136      // bf16 per x row of a ring slot: +8 staggers the rows over the banks
#define MMA_MAX_STAGES 8

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

// cp.async.wait_group takes an immediate: the ring depth is chosen at launch (it depends on the batch).
__device__ __forceinline__ void cp_async_wait_n(int n) {
    switch (n) {
        case 0: cp_async_wait<0>(); break;
        case 1: cp_async_wait<1>(); break;
        case 2: cp_async_wait<2>(); break;
        case 3: cp_async_wait<3>(); break;
        case 4: cp_async_wait<4>(); break;
        case 5: cp_async_wait<5>(); break;
        case 6: cp_async_wait<6>(); break;
        default: cp_async_wait<MMA_MAX_STAGES - 1>(); break;
    }
}

// Bytes of one ring slot: the warp's weight words of one chunk, the scales then the zeros of its 32 columns (f16),
// then `rows` rows of x. (src/mma.rs mirrors this.)
#define MMA_SZ_BYTES 128
template <int BITS>
__device__ __forceinline__ int slot_bytes(int rows) {
    return MMA_TPW * BITS * 32 * 8 + MMA_SZ_BYTES + rows * MMA_XS * 2;
}

// One block: tiles [block_x·2, +2) over chunks [blockIdx.y·k_chunk, +k_chunk) of K, for `nrows` ≤ MB rows of x
// (row b is x row `xrow[b]`, or b when xrow is null). Sums of the block go to store(b, n, v) — every (b < nrows,
// n of the block's tiles) exactly once. MB = 8 or 16: one or two n8 halves of the mma.
// Shared: [MMA_WARPS][stages] slots (≥ the warps' sums at the end, MMA_WARPS · 16 · 32 floats).
template <int BITS, int MB, typename Store>
__device__ void mma_gemv_block(const __nv_bfloat16* __restrict__ x, const int* __restrict__ xrow, int nrows,
                               const int* __restrict__ perm, const uint2* __restrict__ words,
                               const __half* __restrict__ zeros, const __half* __restrict__ scales, int K, int N,
                               int group_size, int k_chunk, int stages, int block_x, Store store) {
    extern __shared__ __align__(16) unsigned char smem[];
    __shared__ int rows_of[MB];
    constexpr int H = MB / 8;
    const int lane = threadIdx.x & 31, warp = threadIdx.x / 32, group = lane >> 2, quad = lane & 3;
    const int n_tiles = N / 16, k_chunks = K / MMA_CHUNK;
    const int tile0 = block_x * MMA_TPW, tiles = max(0, min(MMA_TPW, n_tiles - tile0));
    // This warp's run of the split's chunks.
    const int split0 = blockIdx.y * (k_chunk / MMA_CHUNK);
    const int in_split = max(0, min(k_chunk / MMA_CHUNK, k_chunks - split0));
    const int per = (in_split + MMA_WARPS - 1) / MMA_WARPS;
    const int c0 = split0 + min(in_split, warp * per);
    const int chunks = min(in_split, (warp + 1) * per) - min(in_split, warp * per);
    const int wbytes = MMA_TPW * BITS * 32 * 8, slot = slot_bytes<BITS>(nrows);
    unsigned char* ring = smem + (size_t)warp * stages * slot;
    if (threadIdx.x < MB) rows_of[threadIdx.x] = threadIdx.x < nrows ? (xrow ? xrow[threadIdx.x] : threadIdx.x) : 0;
    __syncthreads();

    // Chunk c of this warp's run into slot c % stages: the weight words each lane later reads itself, and the x
    // rows (16-byte copies; gathered through perm with plain stores when the checkpoint reorders K).
    auto issue = [&](int c) {
        if (c < chunks) {
            unsigned char* sl = ring + (c % stages) * slot;
            const int kc = c0 + c;
#pragma unroll
            for (int t = 0; t < MMA_TPW; t++) {
                if (t < tiles) {
                    const uint2* src = words + ((size_t)(tile0 + t) * k_chunks + kc) * BITS * 32 + lane;
                    uint2* dst = (uint2*)sl + t * BITS * 32 + lane;
#pragma unroll
                    for (int j = 0; j < BITS; j++) cp_async8(dst + j * 32, src + j * 32);
                }
            }
            if (lane < 8) {  // 16 bytes each: scales (lanes 0..3) then zeros of the two tiles' 32 columns
                const int part = lane & 3, tile_ok = (part >> 1) < tiles;
                const __half* base = lane < 4 ? scales : zeros;
                const size_t g = (size_t)kc * MMA_CHUNK / group_size;
                cp_async16(sl + wbytes + lane * 16, base + g * N + tile0 * 16 + (tile_ok ? part * 8 : 0),
                           tile_ok ? 16 : 0);
            }
            __nv_bfloat16* xd = (__nv_bfloat16*)(sl + wbytes + MMA_SZ_BYTES);
            const size_t k = (size_t)kc * MMA_CHUNK;
            if (perm == nullptr) {
                for (int i = lane; i < nrows * 16; i += 32)
                    cp_async16(xd + (i >> 4) * MMA_XS + (i & 15) * 8, x + (size_t)rows_of[i >> 4] * K + k + (i & 15) * 8);
            } else {
                for (int i = lane; i < nrows * MMA_CHUNK; i += 32)
                    xd[(i >> 7) * MMA_XS + (i & 127)] = x[(size_t)rows_of[i >> 7] * K + perm[k + (i & 127)]];
            }
        }
        cp_async_commit();
    };
    for (int c = 0; c < stages - 1; c++) issue(c);

    float acc[MMA_TPW][H][4];
#pragma unroll
    for (int t = 0; t < MMA_TPW; t++)
#pragma unroll
        for (int h = 0; h < H; h++)
#pragma unroll
            for (int i = 0; i < 4; i++) acc[t][h][i] = 0.f;
    const u32 ones[4] = {0x3F803F80u, 0x3F803F80u, 0x3F803F80u, 0x3F803F80u};
    for (int c = 0; c < chunks; c++) {
        __syncwarp();  // every lane has read the slot the next issue refills
        issue(c + stages - 1);
        cp_async_wait_n(stages - 1);
        __syncwarp();  // and every lane's copies of this chunk (x rows are read across lanes) have landed
        const unsigned char* sl = ring + (c % stages) * slot;
        const __half* szs = (const __half*)(sl + wbytes);  // scales [32], zeros [32]
        const __nv_bfloat16* xs = (const __nv_bfloat16*)(sl + wbytes + MMA_SZ_BYTES);
        u32 w[MMA_TPW][2 * BITS];
#pragma unroll
        for (int t = 0; t < MMA_TPW; t++) {
            const uint2* src = (const uint2*)sl + t * BITS * 32 + lane;
#pragma unroll
            for (int j = 0; j < BITS; j++) {
                uint2 v = src[j * 32];
                w[t][2 * j] = v.x;
                w[t][2 * j + 1] = v.y;
            }
        }
        float cacc[MMA_TPW][H][4], xsum[H][4];
#pragma unroll
        for (int h = 0; h < H; h++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                xsum[h][i] = 0.f;
#pragma unroll
                for (int t = 0; t < MMA_TPW; t++) cacc[t][h][i] = 0.f;
            }
#pragma unroll
        for (int ks = 0; ks < 8; ks++) {
            const int kk = ks * 16 + quad * 2;
            u32 b0[H], b1[H];
#pragma unroll
            for (int h = 0; h < H; h++) {
                const int b = h * 8 + group;
                const __nv_bfloat16* row = xs + b * MMA_XS + kk;
                b0[h] = b < nrows ? *(const u32*)row : 0u;
                b1[h] = b < nrows ? *(const u32*)(row + 8) : 0u;
                mma_bf16(xsum[h], ones, b0[h], b1[h]);
            }
#pragma unroll
            for (int t = 0; t < MMA_TPW; t++) {
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
        // Scale and 128 + zero of the lane's two columns per tile (group and group + 8).
#pragma unroll
        for (int t = 0; t < MMA_TPW; t++) {
            float sc[2], z[2];
#pragma unroll
            for (int j = 0; j < 2; j++) {
                sc[j] = __half2float(szs[t * 16 + group + 8 * j]);
                z[j] = 128.f + __half2float(szs[32 + t * 16 + group + 8 * j]);
            }
#pragma unroll
            for (int h = 0; h < H; h++)
#pragma unroll
                for (int i = 0; i < 4; i++)
                    acc[t][h][i] += sc[i >> 1] * (cacc[t][h][i] - z[i >> 1] * xsum[h][i]);
        }
    }

    // The warps' sums, added in warp order by warp 0.
    constexpr int V = MMA_TPW * H * 4;
    __syncthreads();  // every warp is done with its ring
    float* red = (float*)smem;  // [MMA_WARPS][V][32]
#pragma unroll
    for (int t = 0; t < MMA_TPW; t++)
#pragma unroll
        for (int h = 0; h < H; h++)
#pragma unroll
            for (int i = 0; i < 4; i++) red[(warp * V + (t * H + h) * 4 + i) * 32 + lane] = acc[t][h][i];
    __syncthreads();
    if (warp != 0) return;
#pragma unroll
    for (int t = 0; t < MMA_TPW; t++) {
#pragma unroll
        for (int h = 0; h < H; h++) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                float v = 0.f;
                for (int g = 0; g < MMA_WARPS; g++) v += red[(g * V + (t * H + h) * 4 + i) * 32 + lane];
                const int b = h * 8 + quad * 2 + (i & 1);
                const int n = (tile0 + t) * 16 + group + 8 * (i >> 1);
                if (t < tiles && b < nrows) store(b, n, v);
            }
        }
    }
}

__device__ __forceinline__ void store_y(float* y, size_t i, float v) { y[i] = v; }
__device__ __forceinline__ void store_y(__nv_bfloat16* y, size_t i, float v) { y[i] = __float2bfloat16(v); }

// One matrix, rows 0..B of x: grid (⌈N / 32⌉, splits). One split stores y; several store partial sums
// [splits, B, N] and the last block of each column range (counters[blockIdx.x], left at 0 again) adds them.
template <int BITS, int MB, typename YT>
__device__ void mma_gemv(const __nv_bfloat16* x, const int* perm, const uint2* words, const __half* zeros,
                         const __half* scales, float* partial, YT* y, int* counters, int B, int K, int N,
                         int group_size, int k_chunk, int stages) {
    const int splits = gridDim.y;
    if (splits == 1) {
        mma_gemv_block<BITS, MB>(x, nullptr, B, perm, words, zeros, scales, K, N, group_size, k_chunk, stages,
                                 blockIdx.x, [&](int b, int n, float v) { store_y(y, (size_t)b * N + n, v); });
        return;
    }
    float* part = partial + (size_t)blockIdx.y * B * N;
    mma_gemv_block<BITS, MB>(x, nullptr, B, perm, words, zeros, scales, K, N, group_size, k_chunk, stages,
                             blockIdx.x, [&](int b, int n, float v) { part[(size_t)b * N + n] = v; });
    __shared__ int last;
    __threadfence();  // this block's partial sums are visible device-wide before it is counted
    __syncthreads();
    if (threadIdx.x == 0) {
        last = atomicAdd(&counters[blockIdx.x], 1) == splits - 1;
        if (last) counters[blockIdx.x] = 0;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    const int cols = MMA_TPW * 16, n0 = blockIdx.x * cols;
    for (int i = threadIdx.x; i < B * cols; i += blockDim.x) {
        const int b = i / cols, n = n0 + i % cols;
        if (n >= N) continue;
        float v = 0.f;
        for (int s = 0; s < splits; s++) v += __ldcg(&partial[((size_t)s * B + b) * N + n]);
        store_y(y, (size_t)b * N + n, v);
    }
}

// Grouped experts, as gemv_grouped in gptq_gemv.cu: blockIdx.z is a tile of up to MB pairs routed to one expert;
// the matrix m of expert e comes from the tables at m·n_experts + e (words, zeros, scales, row order).
// grid (mats·⌈N / 32⌉, splits, max tiles); partial [splits, pairs, mats·N].
template <int BITS, int MB>
__device__ void mma_gemv_grouped(const __nv_bfloat16* x, const int* tiles, const int* n_tiles, const int* pair_x,
                                 int pairs, const u64* w_tab, const u64* zr_tab, const u64* sc_tab,
                                 const u64* perm_tab, int n_experts, int mats, float* partial, int K, int N,
                                 int group_size, int k_chunk, int stages) {
    const int t = blockIdx.z;
    if (t >= *n_tiles) return;
    const int expert = tiles[3 * t], p0 = tiles[3 * t + 1], np = tiles[3 * t + 2];
    const int bx = (N / 16 + MMA_TPW - 1) / MMA_TPW;
    const int m = blockIdx.x / bx;
    const int e = m * n_experts + expert;
    const size_t width = (size_t)mats * N;
    float* out = partial + ((size_t)blockIdx.y * pairs + p0) * width + (size_t)m * N;
    mma_gemv_block<BITS, MB>(x, pair_x + p0, np, (const int*)perm_tab[e], (const uint2*)w_tab[e],
                             (const __half*)zr_tab[e], (const __half*)sc_tab[e], K, N, group_size, k_chunk, stages,
                             blockIdx.x % bx, [&](int b, int n, float v) { out[b * width + n] = v; });
}

#define MMA_T(BITS, MB)                                                                                         \
    extern "C" __global__ void gptq_mma_gemv_w##BITS##_b##MB##_to_bf16(                                         \
        const __nv_bfloat16* x, const int* perm, const uint2* words, const __half* zeros, const __half* scales,   \
        float* partial, __nv_bfloat16* y, int* counters, int B, int K, int N, int group_size, int k_chunk,      \
        int stages) {                                                                                           \
        mma_gemv<BITS, MB>(x, perm, words, zeros, scales, partial, y, counters, B, K, N, group_size, k_chunk,   \
                           stages);                                                                             \
    }                                                                                                           \
    extern "C" __global__ void gptq_mma_gemv_w##BITS##_b##MB##_to_f32(                                          \
        const __nv_bfloat16* x, const int* perm, const uint2* words, const __half* zeros, const __half* scales,   \
        float* partial, float* y, int* counters, int B, int K, int N, int group_size, int k_chunk, int stages) { \
        mma_gemv<BITS, MB>(x, perm, words, zeros, scales, partial, y, counters, B, K, N, group_size, k_chunk,   \
                           stages);                                                                             \
    }                                                                                                           \
    extern "C" __global__ void gptq_mma_gemv_grouped_w##BITS##_b##MB##_bf16(                                   \
        const __nv_bfloat16* x, const int* tiles, const int* n_tiles, const int* pair_x, int pairs,             \
        const u64* w, const u64* zr, const u64* sc, const u64* perm, int n_experts, int mats, float* partial,    \
        int K, int N, int group_size, int k_chunk, int stages) {                                                \
        mma_gemv_grouped<BITS, MB>(x, tiles, n_tiles, pair_x, pairs, w, zr, sc, perm, n_experts, mats, partial, \
                                   K, N, group_size, k_chunk, stages);                                          \
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
