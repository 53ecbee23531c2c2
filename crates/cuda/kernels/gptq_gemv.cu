// Quantized GEMV for decode batches (MODEL_SPEC §4): y[b, n] = Σ_k x[b, k] · W[n, k] with W in GPTQ layout,
// qweight u32 [K·BITS/32, N] (every 32 rows of a column packed little-endian into BITS words), zeros f16 [G, N]
// (already after the checkpoint's v1/v2 convention), scales f16 [G, N], group = row / group_size (rows are
// reordered at load when the checkpoint has a g_idx, and `perm` gathers x to match).
//
// One thread per output column, so a warp reads 32 consecutive columns' words: 128-byte coalesced loads.
// blockIdx.y splits K; each split writes its partial sums to `partial` [splits, B, N] and `gptq_reduce` adds the
// splits in a fixed order, so results do not depend on scheduling (no float atomics).
// Per group the inner loop needs only Σ x·q; the zero enters once per group as z·Σx (Σx computed once per block).
#include "common.cuh"
#include "experts.cuh"

template <int BITS>
__device__ __forceinline__ u32 field(const u32* w, int k) {
    if (BITS == 3) {
        // 96-bit block: value k at bit 3k; k = 10 and 21 straddle words.
        if (k < 21) {
            u64 a = (u64)w[0] | ((u64)w[1] << 32);
            return (u32)(a >> (3 * k)) & 7u;
        } else {
            u64 b = (u64)w[1] | ((u64)w[2] << 32);
            return (u32)(b >> (3 * k - 32)) & 7u;
        }
    } else {
        const int per = 32 / BITS;
        return (w[k / per] >> ((k % per) * BITS)) & ((1u << BITS) - 1u);
    }
}

// grid: (ceil(N / blockDim.x), splits); block: 128 threads; shared: x [MB, k_chunk] and Σx per group [MB, groups].
// MB is the batch rounded up to a power of two (a template parameter, so no work is spent on absent rows).
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(float v) { return v; }

// The work of one block: columns [blockIdx.x·blockDim.x, +blockDim.x) of one matrix over K rows
// [blockIdx.y·k_chunk, +k_chunk), for `nrows` ≤ MB input rows `xrow[b]` of x. Writes its partial sums to
// partial[b·row_stride + n].
template <int BITS, int MB, typename XT>
__device__ void gemv_block(const XT* __restrict__ x,           // [*, K] bf16 or f32
                           const int* xrow,                    // [nrows] rows of x
                           int nrows,
                           const int* __restrict__ perm,       // [K] or null
                           const u32* __restrict__ qweight,    // [K*BITS/32, N]
                           const __half* __restrict__ zeros,   // [G, N], or null: every zero 2^(BITS−1)
                           const __half* __restrict__ scales,  // [G, N]
                           float* __restrict__ partial, size_t row_stride, int n, int K, int N, int group_size,
                           int k_chunk) {
    extern __shared__ float smem[];
    const int k0 = blockIdx.y * k_chunk;
    const int kn = min(k_chunk, K - k0);
    const int ng = (kn + group_size - 1) / group_size;   // groups (or group parts) in this split
    float* xs = smem;                                     // [MB, k_chunk]
    float* gsum = smem + MB * k_chunk;                    // [MB, ng]
    // Stage this split's x (gathered through perm) as f32; rows past nrows are zero.
    for (int i = threadIdx.x; i < MB * kn; i += blockDim.x) {
        int b = i / kn, k = i % kn;
        int src = perm ? perm[k0 + k] : (k0 + k);
        xs[b * k_chunk + k] = b < nrows ? to_f32(x[(size_t)xrow[b] * K + src]) : 0.f;
    }
    __syncthreads();
    // Σx per (row, group): the zero point enters once per group as z·Σx, shared by every column.
    for (int i = threadIdx.x; i < MB * ng; i += blockDim.x) {
        int b = i / ng, g = i % ng;
        float acc = 0.f;
        for (int k = g * group_size; k < min(kn, (g + 1) * group_size); k++) acc += xs[b * k_chunk + k];
        gsum[b * ng + g] = acc;
    }
    __syncthreads();
    if (n >= N) return;
    float acc[MB];
#pragma unroll
    for (int b = 0; b < MB; b++) acc[b] = 0.f;
    for (int gi = 0; gi < ng; gi++) {
        const int g0 = gi * group_size;
        const int gk = min(group_size, kn - g0);
        const int g = (k0 + g0) / group_size;
        const float s = __half2float(scales[(size_t)g * N + n]);
        const float z = gptq_zero<BITS>(zeros, (size_t)g * N + n);
        float dot[MB];
#pragma unroll
        for (int b = 0; b < MB; b++) dot[b] = 0.f;
        for (int r = 0; r < gk; r += 32) {
            const int row = k0 + g0 + r;            // multiple of 32
            u32 w[BITS];
#pragma unroll
            for (int j = 0; j < BITS; j++) w[j] = __ldg(&qweight[(size_t)(row / 32 * BITS + j) * N + n]);
            const float* xr = xs + g0 + r;
#pragma unroll
            for (int k = 0; k < 32; k++) {
                const float q = (float)field<BITS>(w, k);
#pragma unroll
                for (int b = 0; b < MB; b++) dot[b] = fmaf(xr[b * k_chunk + k], q, dot[b]);
            }
        }
#pragma unroll
        for (int b = 0; b < MB; b++) acc[b] += s * (dot[b] - z * gsum[b * ng + gi]);
    }
#pragma unroll
    for (int b = 0; b < MB; b++)
        if (b < nrows) partial[b * row_stride + n] = acc[b];
}

// One matrix, rows 0..B of x: grid (ceil(N / blockDim.x), splits); partial [splits, B, N].
template <int BITS, int MB, typename XT>
__device__ void gemv(const XT* x, const int* perm, const u32* qweight, const __half* zeros, const __half* scales,
                     float* partial, int B, int K, int N, int group_size, int k_chunk) {
    int xrow[MB];
#pragma unroll
    for (int b = 0; b < MB; b++) xrow[b] = b;
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    gemv_block<BITS, MB, XT>(x, xrow, B, perm, qweight, zeros, scales, partial + (size_t)blockIdx.y * B * N, N, n,
                             K, N, group_size, k_chunk);
}

// Grouped experts (every expert selected in a step, one launch): blockIdx.z is a tile of up to MB pairs
// (row of the step, expert) routed to one expert, `tiles[3·t..]` = (expert, first pair, pairs); `pair_x[p]` is the
// row of x of pair p. Pairs are sorted by expert. Each expert's matrix (`mats` matrices per expert, side by
// side in the output: gate then up) comes from the device tables, indexed `m·n_experts + expert`.
// grid (mats·ceil(N / blockDim.x), splits, max tiles); partial [splits, pairs, mats·N].
template <int BITS, int MB, typename XT>
__device__ void gemv_grouped(const XT* x, const int* tiles, const int* n_tiles, const int* pair_x, int pairs,
                             const u64* qw_tab, const u64* zr_tab, const u64* sc_tab, const u64* perm_tab,
                             int n_experts, int mats, float* partial, int K, int N, int group_size, int k_chunk) {
    const int t = blockIdx.z;
    if (t >= *n_tiles) return;
    const int expert = tiles[3 * t], p0 = tiles[3 * t + 1], np = tiles[3 * t + 2];
    const int bx = (N + blockDim.x - 1) / blockDim.x;
    const int m = blockIdx.x / bx;
    const int n = (blockIdx.x % bx) * blockDim.x + threadIdx.x;
    const int e = m * n_experts + expert;
    int xrow[MB];
#pragma unroll
    for (int b = 0; b < MB; b++) xrow[b] = b < np ? pair_x[p0 + b] : 0;
    const size_t width = (size_t)mats * N;
    float* out = partial + ((size_t)blockIdx.y * pairs + p0) * width + (size_t)m * N;
    gemv_block<BITS, MB, XT>(x, xrow, np, (const int*)perm_tab[e], (const u32*)qw_tab[e], (const __half*)zr_tab[e],
                             (const __half*)sc_tab[e], out, width, n, K, N, group_size, k_chunk);
}

#define GEMV_T(BITS, MB, XT, NAME)                                                                         \
    extern "C" __global__ void gptq_gemv_w##BITS##_b##MB##_##NAME(                                        \
        const XT* x, const int* perm, const u32* qweight, const __half* zeros,                             \
        const __half* scales, float* partial, int B, int K, int N, int group_size, int k_chunk) {          \
        gemv<BITS, MB, XT>(x, perm, qweight, zeros, scales, partial, B, K, N, group_size, k_chunk);        \
    }
#define GROUPED_T(BITS, MB, XT, NAME)                                                                      \
    extern "C" __global__ void gptq_gemv_grouped_w##BITS##_b##MB##_##NAME(                                \
        const XT* x, const int* tiles, const int* n_tiles, const int* pair_x, int pairs, const u64* qw,    \
        const u64* zr, const u64* sc, const u64* perm, int n_experts, int mats, float* partial, int K,     \
        int N, int group_size, int k_chunk) {                                                              \
        gemv_grouped<BITS, MB, XT>(x, tiles, n_tiles, pair_x, pairs, qw, zr, sc, perm, n_experts, mats,    \
                                   partial, K, N, group_size, k_chunk);                                    \
    }
#define GEMV(BITS, MB)                                                                                     \
    GEMV_T(BITS, MB, __nv_bfloat16, bf16) GEMV_T(BITS, MB, float, f32)                                     \
    GROUPED_T(BITS, MB, __nv_bfloat16, bf16) GROUPED_T(BITS, MB, float, f32)
#define GEMV_ALL(BITS) GEMV(BITS, 1) GEMV(BITS, 2) GEMV(BITS, 4) GEMV(BITS, 8) GEMV(BITS, 16)
GEMV_ALL(2)
GEMV_ALL(3)
GEMV_ALL(4)
GEMV_ALL(8)

// y[b, n] = Σ_s partial[s, b, n], splits added in order, stored as the activation type.
__device__ __forceinline__ void store(float* y, size_t i, float v) { y[i] = v; }
__device__ __forceinline__ void store(__nv_bfloat16* y, size_t i, float v) { y[i] = __float2bfloat16(v); }

template <typename YT>
__device__ void reduce(const float* __restrict__ partial, YT* __restrict__ y, int splits, int B, int N) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= B * N) return;
    float acc = 0.f;
    for (int s = 0; s < splits; s++) acc += partial[(size_t)s * B * N + i];
    store(y, i, acc);
}
extern "C" __global__ void gptq_reduce_f32(const float* p, float* y, int splits, int B, int N) {
    reduce(p, y, splits, B, N);
}
extern "C" __global__ void gptq_reduce_bf16(const float* p, __nv_bfloat16* y, int splits, int B, int N) {
    reduce(p, y, splits, B, N);
}

__device__ __forceinline__ float as_stored(const float*, float v) { return v; }
__device__ __forceinline__ float as_stored(const __nv_bfloat16*, float v) {
    return __bfloat162float(__float2bfloat16(v));
}

// The gate/up reduction of the grouped experts: h[p, n] = silu(Σ_s gate) · Σ_s up, partial [splits, P, 2N].
// With `sums` (bf16 h, N a multiple of 128, blocks of a multiple of 128 threads) also the sums of h the down
// launch's `_xs` kernels read (mma_gemv.cuh PRESUM): sums[p·N/128 + c] = (Σ h[p, 128c + k] over k % 16 < 8, over
// k % 16 ≥ 8), of the values as stored — a warp's 32 columns summed across its lanes (lane bit 3 tells low from
// high), then a chunk's 4 warps in order.
template <typename YT>
__device__ void reduce_silu(const float* __restrict__ partial, YT* __restrict__ h, float2* __restrict__ sums,
                            int splits, int P, int N) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const bool in = i < P * N;
    float v = 0.f;
    if (in) {
        v = expert_silu_up(partial, splits, P, N, i / N, i % N);
        store(h, i, v);
        v = as_stored(h, v);
    }
    if (sums == nullptr) return;
    __shared__ float2 part[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
    for (int o : {1, 2, 4, 16}) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) part[warp].x = v;
    if (lane == 8) part[warp].y = v;
    __syncthreads();
    if (in && threadIdx.x % 128 == 0) {
        float2 c = part[warp];
        for (int w = 1; w < 4; w++) c.x += part[warp + w].x, c.y += part[warp + w].y;
        sums[i / 128] = c;
    }
}

// The down reduction of the grouped experts, combined per row in slot order (deterministic):
// out[r, n] = Σ_j w[r, j] · Σ_s partial[s, pair_of[r, j], n]; pair_of = −1 for experts this slice lacks. With
// `shared` each row has one more slot, last, weighted 1: the shared expert run as one more expert.
template <typename YT>
__device__ void reduce_combine(const float* __restrict__ partial, int splits, int P, int N, const int* pair_of,
                               const float* w, YT* __restrict__ out, int rows, int top_k, int shared) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * N) return;
    store(out, i, expert_combine(partial, splits, P, N, pair_of, w, i / N, i % N, top_k, shared));
}

#define EXPERT_REDUCE(YT, NAME)                                                                            \
    extern "C" __global__ void gptq_reduce_silu_##NAME(const float* p, YT* h, float2* sums, int splits, int P, \
                                                       int N) {                                            \
        reduce_silu(p, h, sums, splits, P, N);                                                             \
    }                                                                                                      \
    extern "C" __global__ void gptq_reduce_combine_##NAME(const float* p, int splits, int P, int N,         \
                                                          const int* pair_of, const float* w, YT* out,      \
                                                          int rows, int top_k, int shared) {                \
        reduce_combine(p, splits, P, N, pair_of, w, out, rows, top_k, shared);                             \
    }
EXPERT_REDUCE(float, f32)
EXPERT_REDUCE(__nv_bfloat16, bf16)

// The grouped launch's layout of a decode step, from the router's choice on the device (one block, a thread per
// expert; n_experts ≤ 1024, entries = rows · top_k ≤ 1024): pairs (row, slot) sorted by expert and in row order
// within one, tiles of up to `tile_rows` pairs of one expert, `pair_x[p]` = the row of pair p, `pair_of[i]` =
// the pair of entry i (−1 when this slice does not hold the expert: its address in `held` is 0). With `shared`
// every row has one more entry, last, for expert n_experts − 1 (the shared expert, appended to the tables):
// entries = rows · (top_k + 1) and entry i is slot i % (top_k + 1) of row i / (top_k + 1).
// tiles [entries, 3] (expert, first pair, pairs); n_tiles [1]. Deterministic: the atomics below only set bits.
//
// A row names an expert at most once (the router's top-k are distinct), so for ≤ 64 rows each expert's rows are
// one 64-bit mask, and an entry's place among its expert's pairs is the count of the mask's rows before its own:
// every entry is placed in O(1), a thread an entry. (A thread per expert scanning all entries, twice, took ~20 µs
// at 32 rows: 288 entries.) A routing that names an expert twice in a row, or more rows, takes that scan.
//
// Blocks past the first (a launch with `xsums`) write the sums of x [rows, K] the gate/up launch's `_xs` kernels
// read (mma_gemv.cuh PRESUM): xsums[r·K/128 + c] = (Σ x[r, 128c + k] over k % 16 < 8, over k % 16 ≥ 8), a warp a
// chunk of a row — lane l's 4 columns 4l.. are all low (l % 4 < 2) or all high — in the plan's launch rather than
// one of their own (K a multiple of 128).
__device__ void x_chunk_sums(const __nv_bfloat16* __restrict__ x, int rows, int K, float2* __restrict__ xsums) {
    const int warps = blockDim.x / 32, lane = threadIdx.x & 31, n = rows * (K / 128);
    for (int w = (blockIdx.x - 1) * warps + threadIdx.x / 32; w < n; w += (gridDim.x - 1) * warps) {
        const uint2 v = *(const uint2*)(x + (size_t)w * 128 + lane * 4);  // row r, chunk c: w = r·K/128 + c
        const float2 a = __bfloat1622float2(*(const __nv_bfloat162*)&v.x);
        const float2 b = __bfloat1622float2(*(const __nv_bfloat162*)&v.y);
        float s = (a.x + a.y) + (b.x + b.y);
        for (int o : {1, 4, 8, 16}) s += __shfl_xor_sync(0xffffffffu, s, o);
        const float hi = __shfl_sync(0xffffffffu, s, 2);
        if (lane == 0) xsums[w] = make_float2(s, hi);
    }
}

extern "C" __global__ void experts_plan(const unsigned* experts, int entries, int top_k, int shared,
                                        const u64* held, int n_experts, int tile_rows, int* tiles, int* n_tiles,
                                        int* pair_x, int* pair_of, const __nv_bfloat16* x, int K, float2* xsums) {
    if (blockIdx.x > 0) {
        x_chunk_sums(x, entries / (top_k + shared), K, xsums);
        return;
    }
    __shared__ unsigned ids[1024];
    __shared__ unsigned long long rows_of[1024];  // bit r: row r chose the expert (≤ 64 rows)
    __shared__ int pair_scan[1024], tile_scan[1024], counts[1024];
    __shared__ int scan_all;  // 1: place entries by the scan (more than 64 rows, or a row naming an expert twice)
    const int e = threadIdx.x, slots = top_k + shared, rows = entries / slots;
    // Whether this slice holds expert e, asked first: its load overlaps the routing's (they were one after other).
    const bool mine = e < n_experts && held[e] != 0;
    rows_of[e] = 0ull;
    if (e == 0) scan_all = rows > 64;
    for (int i = e; i < entries; i += blockDim.x) {
        const int row = i / slots, slot = i % slots;
        ids[i] = slot < top_k ? experts[row * top_k + slot] : (unsigned)(n_experts - 1);
        pair_of[i] = -1;
    }
    __syncthreads();
    if (rows <= 64) {
        for (int i = e; i < entries; i += blockDim.x) {
            const unsigned x = ids[i];
            const unsigned long long bit = 1ull << (i / slots);
            if (x < (unsigned)n_experts && (atomicOr(&rows_of[x], bit) & bit)) scan_all = 1;
        }
    }
    __syncthreads();
    const bool by_scan = scan_all;
    int count = 0;
    if (mine) {
        if (by_scan)
            for (int i = 0; i < entries; i++) count += ids[i] == (unsigned)e;
        else
            count = __popcll(rows_of[e]);
    }
    const int n_t = (count + tile_rows - 1) / tile_rows;
    pair_scan[e] = count;
    tile_scan[e] = n_t;
    counts[e] = count;
    __syncthreads();
    // Inclusive scans (Hillis–Steele) over the block.
    for (int off = 1; off < blockDim.x; off <<= 1) {
        int a = e >= off ? pair_scan[e - off] : 0, b = e >= off ? tile_scan[e - off] : 0;
        __syncthreads();
        pair_scan[e] += a;
        tile_scan[e] += b;
        __syncthreads();
    }
    if (e == blockDim.x - 1) *n_tiles = tile_scan[e];
    if (!by_scan) {
        for (int i = e; i < entries; i += blockDim.x) {
            const unsigned x = ids[i];
            const int c = x < (unsigned)n_experts ? counts[x] : 0;  // 0: not held here (pair_of stays −1)
            if (c == 0) continue;
            const int row = i / slots;
            const int j = __popcll(rows_of[x] & ((1ull << row) - 1));  // this pair's place among the expert's
            const int p = pair_scan[x] - c + j;
            if (j % tile_rows == 0) {
                const int t = tile_scan[x] - (c + tile_rows - 1) / tile_rows + j / tile_rows;
                tiles[3 * t] = (int)x;
                tiles[3 * t + 1] = p;
                tiles[3 * t + 2] = min(tile_rows, c - j);
            }
            pair_x[p] = row;
            pair_of[i] = p;
        }
        return;
    }
    int p = pair_scan[e] - count, t = tile_scan[e] - n_t;
    if (count == 0) return;
    int j = 0;
    for (int i = 0; i < entries; i++) {
        if (ids[i] != (unsigned)e) continue;
        if (j % tile_rows == 0) {
            tiles[3 * t] = e;
            tiles[3 * t + 1] = p;
            tiles[3 * t + 2] = min(tile_rows, count - j);
            t++;
        }
        pair_x[p] = i / slots;
        pair_of[i] = p;
        p++;
        j++;
    }
}

// W[n, k] = s[g(k), n] · (q[k, n] − z[g(k), n]) for any-bit GPTQ weight, rows already in group order (the
// inverse permutation maps them back): used once per weight where attention needs kv_b_proj dense. Null zeros: a
// symmetric weight, every zero 2^(BITS−1).
template <int BITS>
__device__ void dequant(const u32* qweight, const __half* zeros, const __half* scales, const int* perm, float* w,
                        int K, int N, int group_size) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= (size_t)K * N) return;
    int k = i / N, n = i % N;   // k: reordered row
    const u32* col = qweight + (size_t)(k / 32 * BITS) * N + n;
    u32 words[BITS];
    for (int j = 0; j < BITS; j++) words[j] = col[(size_t)j * N];
    int idx = k % 32, bit = idx * BITS;
    u64 block = 0;
    // Gather the (up to) 64 bits around the field: fine for BITS ≤ 8 since a field never crosses two words.
    int wi = bit / 32, sh = bit % 32;
    block = (u64)words[wi] | (wi + 1 < BITS ? ((u64)words[wi + 1] << 32) : 0ull);
    float q = (float)((u32)(block >> sh) & ((1u << BITS) - 1u));
    int g = k / group_size;
    const float z = gptq_zero<BITS>(zeros, (size_t)g * N + n);
    float v = __half2float(scales[(size_t)g * N + n]) * (q - z);
    int src = perm ? perm[k] : k;
    w[(size_t)n * K + src] = v;
}

#define DEQUANT(BITS)                                                                                       \
    extern "C" __global__ void gptq_dequant_w##BITS##_f32(const u32* q, const __half* z, const __half* s,    \
                                                          const int* perm, float* w, int K, int N, int gs) { \
        dequant<BITS>(q, z, s, perm, w, K, N, gs);                                                           \
    }
DEQUANT(2)
DEQUANT(3)
DEQUANT(4)
DEQUANT(8)
