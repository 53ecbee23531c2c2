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


// I(t) on tensor cores, for bf16 activations and a bf16 cache: indexer_scores' contract and grid, block 32 ·
// IDXM_WARPS. The dot products q[h] · k[t] of the block are one small GEMM on `mma.m16n8k16`: A = q [hp][dim]
// (the activations' bf16), B = the block's IDX_KEYS keys [key][dim] as cached, f32 accumulation — every product
// exact as in the f32 kernel, only the order of the sums differs. The key's scale multiplies its dot product (the
// f32 kernel scales the key first: equal up to f32 rounding), then relu, the head weights, and the sum over heads:
// a lane's rows of its fragments, then shuffles across the 8 row groups. Warp w takes keys 16·w.. (two n8 tiles)
// against every head (hp / 16 ≤ IDXM_MT m tiles), dim / 16 k-steps; dim % 16 == 0 (indexer.rs checks).
// Shared: q [hp][dim + 8] and the keys [IDX_KEYS][dim + 8] bf16 (rows an odd number of 16-byte units apart:
// ldmatrix without bank conflicts), the keys' slots and scales [IDX_KEYS].
extern "C" __global__ void __launch_bounds__(32 * IDXM_WARPS) indexer_scores_mma_bf16(
    const __nv_bfloat16* q,  // [rows, heads, dim], roped
    const __nv_bfloat16* w,  // [rows, heads], scaled
    const __nv_bfloat16* k_idx, const float* scales, const int* meta, const int* tables, int row0, int heads,
    int dim, int topk, int stride, float* scores) {
    extern __shared__ __align__(16) unsigned char im_smem[];
    const int lr = blockIdx.y, r = row0 + lr, n = meta[r * 4] + 1;
    if (n <= topk || (int)blockIdx.x * IDX_KEYS >= n) return;
    const int hp = (heads + 15) / 16 * 16, rs = dim + 8, pieces = dim / 8;
    __nv_bfloat16* qs = (__nv_bfloat16*)im_smem;  // [hp][rs]
    __nv_bfloat16* ks = qs + hp * rs;              // [IDX_KEYS][rs]
    int* slot = (int*)(ks + IDX_KEYS * rs);        // [IDX_KEYS]
    float* ksc = (float*)(slot + IDX_KEYS);        // [IDX_KEYS]
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, t0 = blockIdx.x * IDX_KEYS;
    // q's copies go out first (heads past `heads` zero-filled), then each key's slot is looked up: the table's
    // round trip overlaps q's.
    const __nv_bfloat16* qrow = q + (size_t)r * heads * dim;
    for (int i = threadIdx.x; i < hp * pieces; i += blockDim.x) {
        const int h = i / pieces, c = (i % pieces) * 8;
        cp_async16(qs + h * rs + c, qrow + (h < heads ? (size_t)h * dim + c : 0), h < heads ? 16 : 0);
    }
    for (int i = threadIdx.x; i < IDX_KEYS; i += blockDim.x) {
        const int t = t0 + i;
        const int s = t < n ? kv_slot(tables + meta[r * 4 + 1], t) : -1;
        slot[i] = s;
        ksc[i] = s >= 0 ? scales[(size_t)s * 3 + 2] : 0.f;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < IDX_KEYS * pieces; i += blockDim.x) {
        const int key = i / pieces, c = (i % pieces) * 8, s = slot[key];
        cp_async16(ks + key * rs + c, k_idx + (size_t)max(s, 0) * dim + c, s >= 0 ? 16 : 0);
    }
    cp_async_commit();
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
    cp_async_wait<0>();
    __syncthreads();

    // ldmatrix rows: A's matrices are (heads 0..7 | 8..15) × (dims 0..7 | 8..15); B's (keys 0..7, dims 0..7),
    // (keys 0..7, dims 8..15), then keys 8..15: both n8 tiles' two registers.
    const __nv_bfloat16* a_at = qs + (((lane >> 3) & 1) * 8 + (lane & 7)) * rs + (lane >> 4) * 8;
    const __nv_bfloat16* b_at = ks + (warp * 16 + (lane >> 4) * 8 + (lane & 7)) * rs + ((lane >> 3) & 1) * 8;
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
    // Fragment value i of tile (mt, nt): head mt·16 + group (+ 8 for i ≥ 2), key 16·warp + 8·nt + 2·quad + i % 2.
#pragma unroll
    for (int nt = 0; nt < 2; nt++)
#pragma unroll
        for (int j = 0; j < 2; j++) {
            const int key = warp * 16 + nt * 8 + quad * 2 + j;
            const float s = ksc[key];
            float v = 0.f;
#pragma unroll
            for (int mt = 0; mt < IDXM_MT; mt++)
                v += wv[mt][0] * fmaxf(acc[mt][nt][j] * s, 0.f) + wv[mt][1] * fmaxf(acc[mt][nt][2 + j] * s, 0.f);
#pragma unroll
            for (int o = 4; o < 32; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            if (group == 0 && t0 + key < n) scores[(size_t)lr * stride + t0 + key] = v;
        }
}


#define TOPK_THREADS 512  // indexer::TOPK_THREADS
#define TOPK_WARPS (TOPK_THREADS / 32)

// Exclusive prefix sum of v over the block's TOPK_THREADS threads in one barrier: each warp scans its own values
// by shuffles and leaves its total in wsum[warp]; after the barrier every warp adds up the totals of the warps
// before it (and `*total` all of them). The caller puts a barrier between two uses of one `wsum`.
__device__ __forceinline__ int block_scan_once(int v, int* wsum, int* total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
    int x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) wsum[warp] = x;
    __syncthreads();
    const int w = lane < TOPK_WARPS ? wsum[lane] : 0;
    int before = lane < warp ? w : 0, all = w;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        before += __shfl_xor_sync(0xffffffffu, before, o);
        all += __shfl_xor_sync(0xffffffffu, all, o);
    }
    *total = all;
    return before + x - v;
}

#define TOPK_PER 16       // keys a thread holds of a tile: a tile is TOPK_THREADS · TOPK_PER = 8,192 keys
#define TOPK_BINS 2048    // radix digits of 11, 11 and 10 bits: three passes cover a key

// Thread t's keys of the tile from t0: `per` consecutive ones (so one scan orders the last pass's output), as
// order keys in registers; `valid` bit j says key j exists. Every load is issued before any is used: past the
// row's end a thread reads its last key again and drops it.
__device__ __forceinline__ unsigned topk_load(const float* sc, int n, int t0, u32 key[TOPK_PER], int* per) {
    const int left = min(n - t0, TOPK_THREADS * TOPK_PER);
    *per = (left + TOPK_THREADS - 1) / TOPK_THREADS;
    const int first = t0 + threadIdx.x * *per;
    float v[TOPK_PER];
#pragma unroll
    for (int j = 0; j < TOPK_PER; j++) v[j] = sc[min(first + j, n - 1)];
    unsigned valid = 0;
#pragma unroll
    for (int j = 0; j < TOPK_PER; j++) {
        key[j] = total_order_key(v[j]);
        if (j < *per && first + j < n) valid |= 1u << j;
    }
    return valid;
}

#define TOPK_SLOTS 16  // keys a thread holds of a row of one tile (thread t: keys t, t + TOPK_THREADS, ...)

// The topk largest of a row of n ≤ TOPK_THREADS · TOPK_SLOTS keys (n > topk), as indexer_topk_f32 writes them. The
// keys are held in registers, slot j of thread t being key t + j·TOPK_THREADS, so a slot is one coalesced load and
// every thread holds the same slots of the row. The topk-th largest key is found two bits a step from the highest
// bit where the keys differ (those above it are every key's): the block counts the keys at or above the three
// candidates the next two bits make (one barrier), keeps the largest candidate with at least topk keys at or above
// it, and stops when that count is exactly topk. Then positions in index order, i.e. slot by slot: each (slot,
// warp)'s taken keys by ballots, one warp's scan over them in that order, and the stores — two more barriers.
// (The radix passes over this row: ~1,430 instructions a warp, 21K cycles; a bisection a bit a step with a
// warp's finish: ~2,300, as long: ncu, docs/PERF.md session 25.)
__device__ __forceinline__ void topk_one_tile(const float* sc, int n, int topk, int* out) {
    __shared__ u32 agree[2][TOPK_WARPS];
    __shared__ int counted[2][TOPK_WARPS];
    __shared__ int total;
    __shared__ int before[TOPK_SLOTS * TOPK_WARPS];  // (slot, warp) in index order: taken keys before it
    const int t = threadIdx.x, lane = t & 31, warp = t / 32;
    const int slots = (n + TOPK_THREADS - 1) / TOPK_THREADS;
    u32 key[TOPK_SLOTS];
    {
        // Every load issued before any is used: past the row, a thread reads its last key again and drops it.
        float v[TOPK_SLOTS];
#pragma unroll
        for (int j = 0; j < TOPK_SLOTS; j++) v[j] = sc[min(t + j * TOPK_THREADS, n - 1)];
#pragma unroll
        for (int j = 0; j < TOPK_SLOTS; j++) key[j] = t + j * TOPK_THREADS < n ? total_order_key(v[j]) : 0u;
    }
    // A key not held is 0: below every candidate (each has a bit set), and left out of the bits keys share.
    u32 all = ~0u, any = 0u;
#pragma unroll
    for (int j = 0; j < TOPK_SLOTS; j++) {
        all &= t + j * TOPK_THREADS < n ? key[j] : ~0u;
        any |= key[j];
    }
    all = __reduce_and_sync(0xffffffffu, all);
    any = __reduce_or_sync(0xffffffffu, any);
    if (lane == 0) {
        agree[0][warp] = all;
        agree[1][warp] = any;
    }
    __syncthreads();
    all = __reduce_and_sync(0xffffffffu, lane < TOPK_WARPS ? agree[0][lane] : ~0u);
    any = __reduce_or_sync(0xffffffffu, lane < TOPK_WARPS ? agree[1][lane] : 0u);
    const u32 differ = all ^ any;
    int b = differ ? 31 - __clz(differ) : -1;
    u32 pre = b < 0 ? all : all & ~((2u << b) - 1u);  // b = 31: no bit above it (2u << 31 is 0)
    bool exact = false;
#pragma unroll 1
    for (int parity = 0; b >= 0 && !exact; b -= 2, parity ^= 1) {
        // Candidates pre | 11, | 10, | 01 on bits b, b − 1 (at b = 0 only | 1, three times).
        const u32 hi = 1u << b, lo = b > 0 ? 1u << (b - 1) : hi;
        const u32 c3 = pre | hi | lo, c2 = pre | hi, c1 = pre | lo;
        int n3 = 0, n2 = 0, n1 = 0;
#pragma unroll
        for (int j = 0; j < TOPK_SLOTS; j++) {
            if (j >= slots) break;  // the block's: a uniform branch
            n3 += key[j] >= c3;
            n2 += key[j] >= c2;
            n1 += key[j] >= c1;
        }
        // A warp's counts (≤ 512 each) in one word, 10 bits apart; two slots a warp, a step's in turn (a warp
        // writes one again two steps on, past the barrier every warp passes only once it has read it).
        const int packed = __reduce_add_sync(0xffffffffu, n3 | (n2 << 10) | (n1 << 20));
        if (lane == 0) counted[parity][warp] = packed;
        __syncthreads();
        const int w = lane < TOPK_WARPS ? counted[parity][lane] : 0;
        const int m3 = __reduce_add_sync(0xffffffffu, w & 1023);
        const int m2 = __reduce_add_sync(0xffffffffu, (w >> 10) & 1023);
        const int m1 = __reduce_add_sync(0xffffffffu, (w >> 20) & 1023);
        const int kept = m3 >= topk ? m3 : m2 >= topk ? m2 : m1 >= topk ? m1 : -1;
        pre = m3 >= topk ? c3 : m2 >= topk ? c2 : m1 >= topk ? c1 : pre;
        exact = kept == topk;
    }
    // Keys above `prefix`, then the lowest-index ones equal to it: with an exact count, those at or above pre.
    const u32 prefix = exact ? pre - 1u : pre;
    const unsigned below = (1u << lane) - 1u;
#pragma unroll
    for (int j = 0; j < TOPK_SLOTS; j++) {
        if (j >= slots) break;
        const bool held = t + j * TOPK_THREADS < n;
        const unsigned g = __ballot_sync(0xffffffffu, held && key[j] > prefix);
        const unsigned e = __ballot_sync(0xffffffffu, held && key[j] == prefix);
        if (lane == 0) before[j * TOPK_WARPS + warp] = __popc(g) | (__popc(e) << 16);
    }
    __syncthreads();
    if (warp == 0) {
        // Exclusive scan of the (slot, warp) counts in index order (above in the low half, equal in the high: a
        // row has < 2^16 keys), TOPK_SLOTS · TOPK_WARPS / 32 a lane; the last lane leaves the total.
        constexpr int PER = TOPK_SLOTS * TOPK_WARPS / 32;
        int c[PER], run = 0;
#pragma unroll
        for (int i = 0; i < PER; i++) {
            const int k = lane * PER + i;
            c[i] = k < slots * TOPK_WARPS ? before[k] : 0;
            run += c[i];
        }
        int x = run;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int y = __shfl_up_sync(0xffffffffu, x, o);
            if (lane >= o) x += y;
        }
        if (lane == 31) total = x;
        x -= run;
#pragma unroll
        for (int i = 0; i < PER; i++) {
            const int k = lane * PER + i;
            if (k < slots * TOPK_WARPS) before[k] = x;
            x += c[i];
        }
    }
    __syncthreads();
    const int need = topk - (total & 0xffff);  // the keys equal to the prefix still to take
#pragma unroll
    for (int j = 0; j < TOPK_SLOTS; j++) {
        if (j >= slots) break;
        const bool held = t + j * TOPK_THREADS < n;
        const bool above = held && key[j] > prefix, equal = held && key[j] == prefix;
        const unsigned g = __ballot_sync(0xffffffffu, above), e = __ballot_sync(0xffffffffu, equal);
        const int at = before[j * TOPK_WARPS + warp];
        const int gs = (at & 0xffff) + __popc(g & below), es = (at >> 16) + __popc(e & below);
        if (above) out[gs + min(es, need)] = t + j * TOPK_THREADS;
        else if (equal && es < need) out[gs + es] = t + j * TOPK_THREADS;
    }
}

// The topk largest of each row's n = pos + 1 scores, as positions in ascending order: exactly the set of
// pipemoe_model::cpu::kernels::top_k (total_cmp order, ties to the lower index). Radix select finds the k-th
// largest key 11 bits at a time (a histogram of the keys that share the prefix found so far; it stops early when
// the chosen bin holds exactly the keys still needed), then one ordered pass writes every key above the prefix
// and the lowest-index keys equal to it; the row is read a tile at a time each pass. A row of up to 8,192 keys
// takes topk_one_tile instead. Rows with n ≤ topk take 0..n-1. grid (n_rows), block TOPK_THREADS.
extern "C" __global__ void __launch_bounds__(TOPK_THREADS) indexer_topk_f32(const float* scores,  // [n_rows, stride]
                                                                           int stride, const int* meta, int row0,
                                                                           int topk,
                                                                           int* sel) {  // [rows, topk]
    // Two histograms: a pass counts into one while its threads clear the other for the next pass, so no barrier
    // stands between one pass's choice and the next pass's counting.
    __shared__ int hist[2][TOPK_BINS];
    __shared__ int wsum[TOPK_WARPS];
    // Its own 16 bytes: the three reads after the barrier are one 16-byte load, which would otherwise take in a
    // neighbour's word — wsum's last, which the ordered pass's first scan writes with no barrier between
    // (compute-sanitizer's racecheck: a hazard on that word, the value unused).
    __shared__ __align__(16) int pick[4];
    const int lr = blockIdx.x, r = row0 + lr, n = meta[r * 4] + 1;
    int* out = sel + (size_t)r * topk;
    if (n <= topk) {
        for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = i;
        return;
    }
    const float* sc = scores + (size_t)lr * stride;
    if (n <= TOPK_THREADS * TOPK_SLOTS) {
        topk_one_tile(sc, n, topk, out);
        return;
    }
    const int tile = TOPK_THREADS * TOPK_PER, tiles = (n + tile - 1) / tile, lane = threadIdx.x & 31;
    u32 key[TOPK_PER];
    int per = 0;
    unsigned valid = 0;
    u32 prefix = 0, mask = 0;
    int need = topk;  // how many keys matching the prefix are still to take
    for (int i = threadIdx.x; i < 2 * TOPK_BINS; i += TOPK_THREADS) (&hist[0][0])[i] = 0;
    __syncthreads();
    for (int pass = 0; pass < 3; pass++) {
        const int shift = pass == 0 ? 21 : pass == 1 ? 10 : 0;
        const u32 digit = pass == 2 ? 1023u : 2047u;
        int* hs = hist[pass & 1];
        // Pass 2 counts into pass 0's histogram, last read before pass 0's final barrier: pass 1 clears it (pass
        // 1's own was cleared at the start).
        if (pass == 1)
            for (int i = threadIdx.x; i < TOPK_BINS; i += TOPK_THREADS) hist[0][i] = 0;
        for (int t = 0; t < tiles; t++) {
            valid = topk_load(sc, n, t * tile, key, &per);
#pragma unroll
            for (int j = 0; j < TOPK_PER; j++) {
                const bool counted = ((valid >> j) & 1u) && (key[j] & mask) == prefix;
                if (pass == 0) {
                    // Lanes of a warp that share a bin add to it once, through their leader (the first pass's bins
                    // are the sign, exponent and top mantissa bits: a row's scores share a few); warps with nothing
                    // to count skip the match.
                    if (__any_sync(0xffffffffu, counted)) {
                        const u32 bin = counted ? (key[j] >> shift) & digit : TOPK_BINS + lane;
                        const u32 peers = __match_any_sync(0xffffffffu, bin);
                        if (counted && lane == __ffs(peers) - 1) atomicAdd(&hs[bin], __popc(peers));
                    }
                } else if (counted) {
                    // Later passes count only keys within the chosen bin, on the next 11 bits: spread over the
                    // bins, so plain atomics (the match's cost grows with the distinct bins of a warp).
                    atomicAdd(&hs[(key[j] >> shift) & digit], 1);
                }
            }
        }
        __syncthreads();
        // The highest bin whose keys and those above reach `need`: thread t holds bins 2047 − 4t down to 2044 − 4t,
        // a scan over the threads gives the count above them, and the one thread where `need` is crossed says so.
        int h[TOPK_BINS / TOPK_THREADS], mine = 0, total;
#pragma unroll
        for (int j = 0; j < TOPK_BINS / TOPK_THREADS; j++)
            mine += h[j] = hs[TOPK_BINS - 1 - (TOPK_BINS / TOPK_THREADS) * threadIdx.x - j];
        int above = block_scan_once(mine, wsum, &total);
#pragma unroll
        for (int j = 0; j < TOPK_BINS / TOPK_THREADS; j++) {
            if (above < need && above + h[j] >= need) {
                pick[0] = TOPK_BINS - 1 - (TOPK_BINS / TOPK_THREADS) * threadIdx.x - j;
                pick[1] = need - above;
                pick[2] = h[j];
            }
            above += h[j];
        }
        __syncthreads();
        prefix |= (u32)pick[0] << shift;
        mask |= digit << shift;
        need = pick[1];
        // Every key of the chosen bin is taken: the prefix so far is the threshold. (pick is rewritten only after
        // the next pass's barriers.)
        if (pick[2] == need) break;
    }
    // A taken key's place: the keys above the prefix before it, plus those equal to it before it (at most need).
    int gt_seen = 0, eq_seen = 0;
    for (int t = 0; t < tiles; t++) {
        valid = topk_load(sc, n, t * tile, key, &per);
        int gt = 0, eq = 0;
#pragma unroll
        for (int j = 0; j < TOPK_PER; j++) {
            const u32 m = key[j] & mask;
            gt += ((valid >> j) & 1u) && m > prefix;
            eq += ((valid >> j) & 1u) && m == prefix;
        }
        // One scan of both counts (a tile has < 2^16 keys): above in the low half, equal in the high.
        int both;
        if (t > 0) __syncthreads();  // every warp has read the previous tile's wsum
        const int before = block_scan_once(gt | (eq << 16), wsum, &both);
        int g = gt_seen + (before & 0xffff), e = eq_seen + (before >> 16);
        const int first = t * tile + threadIdx.x * per;
#pragma unroll
        for (int j = 0; j < TOPK_PER; j++) {
            if (!((valid >> j) & 1u)) continue;
            const u32 m = key[j] & mask;
            if (m > prefix) {
                out[g + min(e, need)] = first + j;
                g++;
            } else if (m == prefix) {
                if (e < need) out[g + e] = first + j;
                e++;
            }
        }
        gt_seen += both & 0xffff;
        eq_seen += both >> 16;
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
