// The V3.2 lightning indexer over the block-paged cache (MODEL_SPEC §2.6; src/indexer.rs): each row's scores
// I(t) = Σ_h w[h] · relu(q[h] · k[t]) over its causal keys, then the top-k of them as positions. Activations are
// T = float or __nv_bfloat16 (symbols `_f32` / `_bf16`); the cache is f32, bf16 or fp8 e4m3 (attention.cu's
// layout: scales [slots, 3], the indexer key's scale third); every sum is f32.

#include "common.cuh"
#include "attention.cuh"

#define IDX_KEYS 64  // keys per block of indexer_scores (indexer::KEYS_PER_BLOCK)

__device__ __forceinline__ float idx_value(float v) { return v; }
__device__ __forceinline__ float idx_value(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float idx_value(__nv_fp8_e4m3 v) { return float(v); }

// indexer_scores' keys w, w + 8, ..., w + 56 of its block (warp w), scaled, into kt [dim][ks]: lanes 0..7 find the
// 8 keys' slots and scales together, then every value a lane loads for them is issued before any is stored (one
// key at a time waited on its table entry, then its values: 16 round trips a warp where this takes 3).
template <typename S>
__device__ __forceinline__ void idx_stage_keys(const S* k, const float* scales, const int* table, float* kt, int ks,
                                               int t0, int n, int dim, int warp, int lane) {
    const int mine = t0 + warp + 8 * lane;
    int slot = 0;
    float ksc = 0.f;
    if (lane < 8 && mine < n) {
        slot = kv_slot(table, mine);
        ksc = scales[(size_t)slot * 3 + 2];
    }
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
    // q [heads][dim] → qt [dim][hp] (qt[i] holds head i % hp, dim i / hp): 8 loads a thread in flight at once (one
    // at a time, each waited for before its store, this was 32 round trips a thread at 64 heads of 128).
    const int qn = hp * dim;
    for (int i0 = threadIdx.x; i0 < qn; i0 += 8 * blockDim.x) {
        float v[8];
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const int i = i0 + j * blockDim.x, h = i % hp, d = i / hp;
            // Every thread loads (a padding entry reads q's first value): no branch between the loads.
            const bool real = i < qn && h < heads;
            const float x = act_ld(q, real ? ((size_t)r * heads + h) * dim + d : 0);
            v[j] = real ? x : 0.f;
        }
#pragma unroll
        for (int j = 0; j < 8; j++)
            if (i0 + j * (int)blockDim.x < qn) qt[i0 + j * blockDim.x] = v[j];
    }
    for (int i = threadIdx.x; i < hp; i += blockDim.x) ws[i] = i < heads ? act_ld(w, (size_t)r * heads + i) : 0.f;
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, t0 = blockIdx.x * IDX_KEYS;
    const int* table = tables + meta[r * 4 + 1];
    // Warp w stages keys w, w + 8, ..., w + 56 (idx_stage_keys), in the cache's own element type.
    if (dtype == 0) idx_stage_keys((const float*)k_idx, scales, table, kt, ks, t0, n, dim, warp, lane);
    else if (dtype == 1) idx_stage_keys((const __nv_bfloat16*)k_idx, scales, table, kt, ks, t0, n, dim, warp, lane);
    else idx_stage_keys((const __nv_fp8_e4m3*)k_idx, scales, table, kt, ks, t0, n, dim, warp, lane);
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

// The total order of Rust's f32::total_cmp as an unsigned order: flip every bit of negatives, the sign of others.
__device__ __forceinline__ u32 order_key(float f) {
    const u32 u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Exclusive prefix sum over the block (blockDim.x a multiple of 32); `*total` gets the block's sum.
__device__ int block_exclusive_scan(int v, int* scratch, int* total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    int x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) scratch[warp] = x;
    __syncthreads();
    if (warp == 0) {
        int s = lane < warps ? scratch[lane] : 0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int y = __shfl_up_sync(0xffffffffu, s, o);
            if (lane >= o) s += y;
        }
        if (lane < warps) scratch[lane] = s;
    }
    __syncthreads();
    const int before = warp > 0 ? scratch[warp - 1] : 0;
    *total = scratch[warps - 1];
    __syncthreads();
    return before + x - v;
}

// The topk largest of each row's n = pos + 1 scores, as positions in ascending order: exactly the set of
// pipemoe_model::cpu::kernels::top_k (total_cmp order, ties to the lower index). Radix select finds the k-th
// largest key 8 bits at a time (a histogram of the keys that share the prefix found so far), then one ordered
// pass writes every key above it and the lowest-index keys equal to it. Rows with n ≤ topk take 0..n-1.
// grid (n_rows), block 512.
extern "C" __global__ void indexer_topk_f32(const float* scores,  // [n_rows, stride]
                                            int stride, const int* meta, int row0, int topk,
                                            int* sel) {           // [rows, topk]
    __shared__ int hist[256];
    __shared__ int scratch[32];
    __shared__ int pick[2];
    const int lr = blockIdx.x, r = row0 + lr, n = meta[r * 4] + 1;
    int* out = sel + (size_t)r * topk;
    if (n <= topk) {
        for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = i;
        return;
    }
    const float* sc = scores + (size_t)lr * stride;
    u32 prefix = 0, mask = 0;
    int need = topk;  // how many keys matching the prefix are still to take
    const int lane = threadIdx.x & 31;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        // Scores cluster in a few bins (the first pass sees one or two exponents): the lanes of a warp that share a
        // bin add to it once, through their leader.
        for (int c0 = 0; c0 < n; c0 += blockDim.x) {
            const int i = c0 + threadIdx.x;
            const u32 k = i < n ? order_key(sc[i]) : 0u;
            const bool counted = i < n && (k & mask) == prefix;
            const u32 bin = counted ? (k >> shift) & 255u : 256u + lane;
            const u32 peers = __match_any_sync(0xffffffffu, bin);
            if (counted && lane == __ffs(peers) - 1) atomicAdd(&hist[bin], __popc(peers));
        }
        __syncthreads();
        // The highest bin d ≥ 1 whose keys and those above reach `need` (else bin 0): warp 0, eight bins a lane,
        // a suffix sum over the lanes, and the highest lane that found one.
        if (threadIdx.x < 32) {
            int h[8], t = 0;
#pragma unroll
            for (int j = 0; j < 8; j++) t += h[j] = hist[lane * 8 + j];
            int s = t;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const int y = __shfl_down_sync(0xffffffffu, s, o);
                if (lane + o < 32) s += y;
            }
            int run = s - t, found = -1, above = 0;
#pragma unroll
            for (int j = 7; j >= 0; j--) {
                if (found < 0 && lane * 8 + j > 0 && run + h[j] >= need) {
                    found = lane * 8 + j;
                    above = run;
                }
                run += h[j];
            }
            const u32 any = __ballot_sync(0xffffffffu, found >= 0);
            if (any != 0 && lane == 31 - __clz(any)) {
                pick[0] = found;
                pick[1] = need - above;
            } else if (any == 0 && lane == 0) {
                pick[0] = 0;
                pick[1] = need - (run - h[0]);
            }
        }
        __syncthreads();
        prefix |= (u32)pick[0] << shift;
        mask |= 255u << shift;
        need = pick[1];
        __syncthreads();  // pick and hist are rewritten by the next pass
    }
    int written = 0, equal_seen = 0;
    for (int c0 = 0; c0 < n; c0 += blockDim.x) {
        const int i = c0 + threadIdx.x;
        const u32 k = i < n ? order_key(sc[i]) : 0u;
        const int eq = i < n && k == prefix;
        int eq_total, take_total;
        const int rank = equal_seen + block_exclusive_scan(eq, scratch, &eq_total);
        const int take = i < n && (k > prefix || (eq && rank < need));
        const int at = written + block_exclusive_scan(take, scratch, &take_total);
        if (take) out[at] = i;
        written += take_total;
        equal_seen += eq_total;
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
