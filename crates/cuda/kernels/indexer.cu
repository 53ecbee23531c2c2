// The V3.2 lightning indexer over the block-paged cache (MODEL_SPEC §2.6; src/indexer.rs): each row's scores
// I(t) = Σ_h w[h] · relu(q[h] · k[t]) over its causal keys, then the top-k of them as positions. Activations are
// T = float or __nv_bfloat16 (symbols `_f32` / `_bf16`); the cache is f32, bf16 or fp8 e4m3 (attention.cu's
// layout: scales [slots, 3], the indexer key's scale third); every sum is f32.

#include "common.cuh"
#include "attention.cuh"
#include "mma.cuh"

#define IDX_KEYS 64    // keys per block of indexer_scores (indexer::KEYS_PER_BLOCK)
#define IDXM_WARPS 4   // indexer_scores_mma: a warp per 16 of the block's keys
#define IDXM_MT 4      // indexer_scores_mma: m16 tiles of heads at most (64 heads; indexer::mma_eligible)
#define IDXM_TILES 16  // indexer_scores_mma: tiles a block takes at most (indexer::MMA_MAX_TILES)
#define IDXM_STAGES 3  // indexer_scores_mma: tiles in shared memory at once (indexer::MMA_STAGES)

__device__ __forceinline__ float idx_value(float v) { return v; }
__device__ __forceinline__ float idx_value(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float idx_value(__nv_fp8_e4m3 v) { return float(v); }

// indexer_scores' keys w, w + 8, ..., w + 56 of its block (warp w), scaled, into kt [dim][ks]: lanes 0..7 hold the
// 8 keys' slots (found before q was staged) and load their scales, then every value a lane loads for them is
// issued before any is stored (one key at a time waited on its table entry, then its values).
template <typename S>
__device__ __forceinline__ void idx_stage_keys(const S* k, const float* scales, int slot, float* kt, int ks, int t0,
                                               int n, int dim, int warp, int lane) {
    const float ksc = lane < 8 && t0 + warp + 8 * lane < n ? scales[(size_t)slot * 3 + 2] : 0.f;
    for (int d0 = 0; d0 < dim; d0 += 128) {
        float v[8][4];
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const int s = __shfl_sync(0xffffffffu, slot, j);
            const bool valid = t0 + warp + 8 * j < n;
#pragma unroll
            for (int c = 0; c < 4; c++) {
                // Every lane loads (past the keys, slot 0 of the pool; past dim, the key's first value): no branch
                // between the loads.
                const int d = d0 + c * 32 + lane;
                const float x = idx_value(k[(size_t)s * dim + (d < dim ? d : 0)]);
                v[j][c] = valid && d < dim ? x : 0.f;
            }
        }
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const float sc = __shfl_sync(0xffffffffu, ksc, j);
#pragma unroll
            for (int c = 0; c < 4; c++) {
                const int d = d0 + c * 32 + lane;
                if (d < dim) kt[d * ks + warp + 8 * j] = v[j][c] * sc;
            }
        }
    }
}

// q of one row [heads][dim] → qt [dim][hp] (zeros past heads); dim a multiple of 8 (indexer.rs checks). A thread
// loads 16-byte pieces (8 bf16 or 4 f32 of one head), four at once, a warp's lanes on consecutive heads so the
// transposed stores do not conflict: 64 heads of 128 bf16 are one round trip a thread (one value at a time: 32).
template <typename T>
__device__ __forceinline__ void idx_stage_q(const T* q, float* qt, int heads, int hp, int dim) {
    constexpr int E = 16 / sizeof(T);  // values per 16-byte piece
    for (int i = threadIdx.x; i < (hp - heads) * dim; i += blockDim.x)
        qt[(i / (hp - heads)) * hp + heads + i % (hp - heads)] = 0.f;
    const int pieces = heads * (dim / E);
    for (int i0 = threadIdx.x; i0 < pieces; i0 += 4 * blockDim.x) {
        uint4 v[4];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            // Piece i is head i % heads, values (i / heads)·E..; past the end a thread reads piece 0 and drops it.
            const int i = i0 + j * blockDim.x;
            v[j] = *(const uint4*)(q + (i < pieces ? (size_t)(i % heads) * dim + (i / heads) * E : 0));
        }
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int i = i0 + j * blockDim.x, h = i % heads, d0 = (i / heads) * E;
            if (i >= pieces) continue;
            const T* e = (const T*)&v[j];
#pragma unroll
            for (int c = 0; c < E; c++) qt[(d0 + c) * hp + h] = act_ld(e, c);
        }
    }
}

// I(t) = Σ_h w[h] · relu(q[h] · k[t]) for keys t ≤ pos of rows row0 + r that have more than topk keys (the others
// take every key and are skipped). grid (⌈stride / IDX_KEYS⌉, n_rows), block 256 = 8 warps: a lane per key, the
// warps split as 2 halves of the block's 64 keys × 4 groups of heads, each lane 16 heads at a time in registers
// (so the sums over dim are 16 independent chains, not one). Shared (f32): q transposed [dim][hp] (hp = heads to
// a multiple of 16, zeros past heads: 16-byte broadcast loads), the keys transposed [dim][IDX_KEYS + 1] (padded:
// stores and loads without bank conflicts), w [hp], and each head group's partial sums [4][IDX_KEYS].
template <typename T>
__device__ void indexer_scores(const T* q,           // [rows, heads, dim], roped
                               const T* w,           // [rows, heads], scaled
                               const void* k_idx,    // [slots, dim] in the cache dtype
                               const float* scales,  // [slots, 3]
                               int dtype, const int* meta, const int* tables, int row0, int heads, int dim,
                               int topk, int stride,
                               float* scores) {      // [n_rows, stride]
    extern __shared__ __align__(16) float sm[];
    const int lr = blockIdx.y, r = row0 + lr, n = meta[r * 4] + 1;
    if (n <= topk || (int)blockIdx.x * IDX_KEYS >= n) return;
    const int hp = (heads + 15) / 16 * 16, ks = IDX_KEYS + 1;
    float* qt = sm;                // [dim][hp]
    float* kt = qt + dim * hp;     // [dim][ks]
    float* ws = kt + dim * ks;     // [hp]
    float* part = ws + hp;         // [4][IDX_KEYS]
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, t0 = blockIdx.x * IDX_KEYS;
    // Warp w's keys are w, w + 8, ..., w + 56: lanes 0..7 ask for their blocks first (kv_slot, its use after q's
    // loads), so the table's round trip overlaps q's.
    const int mine = t0 + warp + 8 * lane;
    const int block = lane < 8 && mine < n ? tables[meta[r * 4 + 1] + mine / KV_BLOCK] : 0;
    idx_stage_q(q + (size_t)r * heads * dim, qt, heads, hp, dim);
    const int slot = block * KV_BLOCK + mine % KV_BLOCK;
    for (int i = threadIdx.x; i < hp; i += blockDim.x) ws[i] = i < heads ? act_ld(w, (size_t)r * heads + i) : 0.f;
    // The keys (idx_stage_keys), in the cache's own element type.
    if (dtype == 0) idx_stage_keys((const float*)k_idx, scales, slot, kt, ks, t0, n, dim, warp, lane);
    else if (dtype == 1) idx_stage_keys((const __nv_bfloat16*)k_idx, scales, slot, kt, ks, t0, n, dim, warp, lane);
    else idx_stage_keys((const __nv_fp8_e4m3*)k_idx, scales, slot, kt, ks, t0, n, dim, warp, lane);
    __syncthreads();
    const int key = (warp & 1) * 32 + lane, group = warp >> 1;
    float total = 0.f;
    for (int h0 = group * 16; h0 < hp; h0 += 64) {
        float acc[16];
#pragma unroll
        for (int j = 0; j < 16; j++) acc[j] = 0.f;
        for (int d = 0; d < dim; d++) {
            const float kv = kt[d * ks + key];
            const float4* qh = (const float4*)(qt + d * hp + h0);
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const float4 v = qh[j];
                acc[4 * j] += v.x * kv;
                acc[4 * j + 1] += v.y * kv;
                acc[4 * j + 2] += v.z * kv;
                acc[4 * j + 3] += v.w * kv;
            }
        }
#pragma unroll
        for (int j = 0; j < 16; j++)
            if (h0 + j < heads) total += ws[h0 + j] * fmaxf(acc[j], 0.f);
    }
    part[group * IDX_KEYS + key] = total;
    __syncthreads();
    if (threadIdx.x < IDX_KEYS && t0 + (int)threadIdx.x < n) {
        const float* p = part + threadIdx.x;
        scores[(size_t)lr * stride + t0 + threadIdx.x] = ((p[0] + p[IDX_KEYS]) + p[2 * IDX_KEYS]) + p[3 * IDX_KEYS];
    }
}


// The copies of a tile of IDX_KEYS keys, positions t0.. of one cache block (t0 a multiple of KV_BLOCK): the keys
// [key][rs] from `block`'s slots, 16 bytes at a time (zeros past the row's n keys), and thread t < IDX_KEYS key
// t's scale (0 past n). Where a key's pieces divide the block (dim 128: 16 of 128 threads) a thread's piece is the
// same in every key it copies: no division a copy.
__device__ __forceinline__ void idxm_tile(const __nv_bfloat16* k_idx, const float* scales, int block, int t0, int n,
                                          __nv_bfloat16* ks, float* ksc, int dim, int rs) {
    const int pieces = dim / 8, valid = min(n - t0, IDX_KEYS);
    const __nv_bfloat16* src = k_idx + (size_t)block * KV_BLOCK * dim;
    if (blockDim.x % pieces == 0) {
        const int c = (threadIdx.x % pieces) * 8;
        for (int key = threadIdx.x / pieces; key < IDX_KEYS; key += blockDim.x / pieces)
            cp_async16(ks + key * rs + c, src + (key < valid ? key * dim + c : 0), key < valid ? 16 : 0);
    } else {
        for (int i = threadIdx.x; i < IDX_KEYS * pieces; i += blockDim.x) {
            const int key = i / pieces, c = (i % pieces) * 8;
            cp_async16(ks + key * rs + c, src + (key < valid ? key * dim + c : 0), key < valid ? 16 : 0);
        }
    }
    if (threadIdx.x < IDX_KEYS) {
        const size_t slot = (size_t)block * KV_BLOCK + threadIdx.x;
        if ((int)threadIdx.x < valid) cp_async4(ksc + threadIdx.x, scales + slot * 3 + 2);
        else ksc[threadIdx.x] = 0.f;
    }
}

// I(t) on tensor cores, for bf16 activations and a bf16 cache: indexer_scores' contract, block 32 · IDXM_WARPS,
// grid (tiles, n_rows) with any number of tiles: block x takes the row's tiles of IDX_KEYS keys x, x + tiles, ...,
// so a long row's query is staged once a block rather than once every 64 keys (src/indexer.rs chooses the tiles:
// at most IDXM_TILES a block). A tile is one cache block's positions (IDX_KEYS = KV_BLOCK), so its keys and scales
// are two runs of memory at the block's table entry: the block reads its tiles' entries once, at the start, and
// no load waits on another after that. The dot products q[h] · k[t] of a tile are one small GEMM on
// `mma.m16n8k16`: A = q [hp][dim] (the activations' bf16), B = the tile's keys [key][dim] as cached, f32
// accumulation — every product exact as in the f32 kernel, only the order of the sums differs. The key's scale
// multiplies its dot product (the f32 kernel scales the key first: equal up to f32 rounding), then relu, the head
// weights, and the sum over heads: a lane's rows of its fragments, then shuffles across the 8 row groups. Warp w
// takes keys 16·w.. of the tile (two n8 tiles) against every head (hp / 16 ≤ IDXM_MT m tiles), dim / 16 k-steps;
// dim % 16 == 0 (indexer.rs checks). IDXM_STAGES stages: the next two tiles' keys are copied while this one's are
// multiplied (a block's copies are what it has in flight: one tile a block left the H200 at ~1.7 TB/s at 128K).
// Shared: q [hp][dim + 8] and the stages' keys [IDXM_STAGES][IDX_KEYS][dim + 8] bf16 (rows an odd number of
// 16-byte units apart: ldmatrix without bank conflicts), their scales [IDXM_STAGES][IDX_KEYS], the tiles' cache
// blocks [IDXM_TILES].
extern "C" __global__ void __launch_bounds__(32 * IDXM_WARPS) indexer_scores_mma_bf16(
    const __nv_bfloat16* q,  // [rows, heads, dim], roped
    const __nv_bfloat16* w,  // [rows, heads], scaled
    const __nv_bfloat16* k_idx, const float* scales, const int* meta, const int* tables, int row0, int heads,
    int dim, int topk, int stride, float* scores) {
    static_assert(IDX_KEYS == KV_BLOCK, "a tile is one cache block");
    extern __shared__ __align__(16) unsigned char im_smem[];
    __shared__ int blocks[IDXM_TILES];
    const int lr = blockIdx.y, r = row0 + lr, n = meta[r * 4] + 1;
    if (n <= topk || (int)blockIdx.x * IDX_KEYS >= n) return;
    const int hp = (heads + 15) / 16 * 16, rs = dim + 8, pieces = dim / 8;
    __nv_bfloat16* qs = (__nv_bfloat16*)im_smem;  // [hp][rs]
    __nv_bfloat16* ks = qs + hp * rs;                        // [IDXM_STAGES][IDX_KEYS][rs]
    float* ksc = (float*)(ks + IDXM_STAGES * IDX_KEYS * rs);  // [IDXM_STAGES][IDX_KEYS]
    const int* table = tables + meta[r * 4 + 1];
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, step = gridDim.x * IDX_KEYS;
    // q's copies go out first (heads past `heads` zero-filled), then the tiles' table entries are read: their
    // round trip overlaps q's.
    const __nv_bfloat16* qrow = q + (size_t)r * heads * dim;
    for (int i = threadIdx.x; i < hp * pieces; i += blockDim.x) {
        const int h = i / pieces, c = (i % pieces) * 8;
        cp_async16(qs + h * rs + c, qrow + (h < heads ? (size_t)h * dim + c : 0), h < heads ? 16 : 0);
    }
    if (threadIdx.x < IDXM_TILES) {
        const int t = blockIdx.x + threadIdx.x * gridDim.x;
        blocks[threadIdx.x] = t * IDX_KEYS < n ? table[t] : 0;
    }
    __syncthreads();
    // Tile i of the block (positions t0 + i·step) goes to stage i % IDXM_STAGES; its table entry past IDXM_TILES
    // (not in the grids indexer.rs makes) is read when its copies are issued. A commit group a tile, empty past
    // the row's end, so that the wait below counts tiles.
    const int t_first = blockIdx.x * IDX_KEYS;
    auto issue = [&](int i) {
        const int t = t_first + i * step;
        if (t < n) {
            const int block = i < IDXM_TILES ? blocks[i] : table[t / IDX_KEYS];
            const int st = i % IDXM_STAGES;
            idxm_tile(k_idx, scales, block, t, n, ks + st * IDX_KEYS * rs, ksc + st * IDX_KEYS, dim, rs);
        }
        cp_async_commit();
    };
#pragma unroll
    for (int i = 0; i < IDXM_STAGES - 1; i++) issue(i);
    // The head weights of the lane's fragment rows (heads mt·16 + group and + 8), 0 past `heads`.
    const int group = lane >> 2, quad = lane & 3, mts = hp / 16;
    float wv[IDXM_MT][2];
#pragma unroll
    for (int mt = 0; mt < IDXM_MT; mt++)
#pragma unroll
        for (int hh = 0; hh < 2; hh++) {
            const int h = mt * 16 + group + 8 * hh;
            wv[mt][hh] = h < heads ? __bfloat162float(w[(size_t)r * heads + h]) : 0.f;
        }
    // ldmatrix rows: A's matrices are (heads 0..7 | 8..15) × (dims 0..7 | 8..15); B's (keys 0..7, dims 0..7),
    // (keys 0..7, dims 8..15), then keys 8..15: both n8 tiles' two registers.
    const __nv_bfloat16* a_at = qs + (((lane >> 3) & 1) * 8 + (lane & 7)) * rs + (lane >> 4) * 8;
    const int b_off = (warp * 16 + (lane >> 4) * 8 + (lane & 7)) * rs + ((lane >> 3) & 1) * 8;
    for (int t0 = t_first, j = 0; t0 < n; t0 += step, j++) {
        const int st = j % IDXM_STAGES;
        // Tile j's group done (the IDXM_STAGES − 2 after it may be in flight), and every warp past tile j − 1's
        // reads: its stage takes tile j + IDXM_STAGES − 1, which arrives while this one and the next are multiplied.
        cp_async_wait<IDXM_STAGES - 2>();
        __syncthreads();
        issue(j + IDXM_STAGES - 1);
        const __nv_bfloat16* b_at = ks + st * IDX_KEYS * rs + b_off;
        float acc[IDXM_MT][2][4] = {};
        for (int k = 0; k < dim; k += 16) {
            u32 b[4];
            ldmatrix_x4(b, b_at + k);
#pragma unroll
            for (int mt = 0; mt < IDXM_MT; mt++) {
                if (mt < mts) {
                    u32 a[4];
                    ldmatrix_x4(a, a_at + mt * 16 * rs + k);
                    mma_16816(acc[mt][0], a, b[0], b[1]);
                    mma_16816(acc[mt][1], a, b[2], b[3]);
                }
            }
        }
        // Fragment value i of tile (mt, nt): head mt·16 + group (+ 8 for i ≥ 2), key 16·warp + 8·nt + 2·quad +
        // i % 2.
#pragma unroll
        for (int nt = 0; nt < 2; nt++)
#pragma unroll
            for (int jj = 0; jj < 2; jj++) {
                const int key = warp * 16 + nt * 8 + quad * 2 + jj;
                const float s = ksc[st * IDX_KEYS + key];
                float v = 0.f;
#pragma unroll
                for (int mt = 0; mt < IDXM_MT; mt++)
                    v += wv[mt][0] * fmaxf(acc[mt][nt][jj] * s, 0.f) + wv[mt][1] * fmaxf(acc[mt][nt][2 + jj] * s, 0.f);
#pragma unroll
                for (int o = 4; o < 32; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
                if (group == 0 && t0 + key < n) scores[(size_t)lr * stride + t0 + key] = v;
            }
        // This stage's keys and scales are refilled only after the next iteration's barrier.
    }
}


#define INDEXER_KERNELS(T, S)                                                                                      \
    extern "C" __global__ void indexer_scores_##S(const T* q, const T* w, const void* k_idx, const float* scales,  \
                                                  int dtype, const int* meta, const int* tables, int row0,          \
                                                  int heads, int dim, int topk, int stride, float* scores) {        \
        indexer_scores<T>(q, w, k_idx, scales, dtype, meta, tables, row0, heads, dim, topk, stride, scores);        \
    }

INDEXER_KERNELS(float, f32)
INDEXER_KERNELS(__nv_bfloat16, bf16)
