// MLA attention over the block-paged latent cache with absorbed kv_b_proj (MODEL_SPEC §2.5); the V3.2 indexer's
// scores and top-k over the same cache are in indexer.cu. Activations are T = float or __nv_bfloat16 (symbols `_f32` / `_bf16`);
// the cache is f32, bf16 or fp8 e4m3 (a run-time code, with a scale per slot and component); every sum is f32.
//
// Cache pool layout (src/cache.rs): component arrays `[slots, dim]` and `scales [slots, 3]`; position p of a
// sequence lives at slot table[p / KV_BLOCK] · KV_BLOCK + p % KV_BLOCK. Row descriptors `meta [rows, 4]` hold
// (pos, start of the row's block table in `tables`, key count, 0).
//
// Attention is flash-style (Dao et al., "FlashAttention", online softmax over key tiles) with the MQA shape of
// absorbed MLA: every head scores the same cached latent, so one block holds MLA_HEADS heads of one row and
// loads each key tile once for all of them. Long rows are split over gridDim.z blocks (flash-decoding) whose
// partial results mla_out merges; the two absorption GEMMs are their own kernels (mla_absorb_q, mla_out).
#include "common.cuh"
#include "attention.cuh"

static_assert(MLA_HEADS == 8, "mla_flash reads a key's 8 head queries and probabilities as two float4");
#define MLA_MAX_LORA 512   // each lane accumulates kv_lora / 32 ≤ 16 latent columns
#define MLA_ROWS 8         // rows per block of the absorption kernels
#define ABS_WARPS 8        // warps per block of mla_absorb_q and mla_out
#define OUT_COLS 32        // output columns per block of mla_out (attention::OUT_COLS)
static_assert(OUT_COLS * 8 == 32 * ABS_WARPS, "mla_out gives each output column 8 threads");
static_assert(ABS_WARPS >= MLA_ROWS && MLA_MAX_SPLITS <= 32, "mla_out weighs a row's splits with a warp");

// grid (rows, 3): block (r, c) stores component c (0 latent, 1 k_pe, 2 indexer key) of row r at pool slot
// slots[r] (cache_put_row). Block 128.
template <typename T>
__device__ void cache_store(const T* latent, const T* k_pe, const T* index_k, const int* slots, int lora, int rope,
                            int idim, void* c_lat, void* c_pe, void* c_idx, float* scales, int dtype) {
    const int r = blockIdx.x, c = blockIdx.y;
    const T* src = c == 0 ? latent : c == 1 ? k_pe : index_k;
    const int n = c == 0 ? lora : c == 1 ? rope : idim;
    if (src == nullptr || n == 0) return;
    cache_put_row(src + (size_t)r * n, n, slots[r], c, c == 0 ? c_lat : c == 1 ? c_pe : c_idx, scales, dtype);
}

// q_lat[r, h, l] = Σ_d q_nope[row0 + r, h, d] · W_UK[h, d, l] for r < n_rows. grid (heads, ⌈n_rows / R⌉,
// ⌈lora / C⌉), block 32 · ABS_WARPS. A warp's load is 16 bytes a lane: lane (dl, cg) takes the 8 columns cg·8.. of
// the block's C and row d ≡ warp·DL + dl (mod ABS_WARPS·DL) of W_UK, DL = 32·8 / C rows at once (one row of 256
// columns for a single row of q, four rows of 64 for R rows, whose R · 8 sums a lane then holds); a thread's loads
// go out in batches of U rows (8 for one row of q, 4 for R: all of them at nope 128), each batch together. The lanes of one column group add their sums by shuffles, the warps theirs in
// shared memory. (lora % 8 ≠ 0 reads each value alone, same lanes.) Shared: q [R][nope] and partial sums
// [ABS_WARPS][R][C] (floats). R: rows per block, C: columns per block (ABSORB_KERNELS; attention::absorb_cols).
template <typename T, int R, int C>
__device__ void mla_absorb_q(const T* q,          // [rows, heads, nope + rope]
                             const T* kv_b,       // [heads, nope + vdim, lora]
                             int row0, int n_rows, int heads, int nope, int rope, int vdim, int lora,
                             float* q_lat) {      // [n_rows, heads, lora]
    static_assert(C % 8 == 0 && 32 % (C / 8) == 0, "a warp covers the block's columns in runs of 8");
    constexpr int G = C / 8, DL = 32 / G;
    extern __shared__ float sm[];
    float* qs = sm;
    float* part = sm + R * nope;
    const int h = blockIdx.x, r0 = blockIdx.y * R, c0 = blockIdx.z * C;
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, rows = min(R, n_rows - r0);
    const int cg = lane % G, dl = lane / G, c = c0 + cg * 8;
    for (int i = threadIdx.x; i < R * nope; i += blockDim.x) {
        const int k = i / nope, d = i % nope;
        qs[i] = k < rows ? act_ld(q, ((size_t)(row0 + r0 + k) * heads + h) * (nope + rope) + d) : 0.f;
    }
    __syncthreads();
    const T* w = kv_b + (size_t)h * (nope + vdim) * lora;
    const bool wide = lora % 8 == 0;
    float acc[R][8];
#pragma unroll
    for (int k = 0; k < R; k++)
#pragma unroll
        for (int j = 0; j < 8; j++) acc[k][j] = 0.f;
    const int step = ABS_WARPS * DL;
    int d = warp * DL + dl;
    if (wide) {
        if (c < lora) {
            // U rows of W_UK a batch, their loads issued together before any is used: with the width test inside
            // the loop (as it was) the compiler issued each load after the last one's sums, one in flight a
            // thread, and the kernel took 14 µs for 3.7 µs of bytes (tools/sass.py).
            constexpr int U = R == 1 ? 8 : 4;
            for (; d + (U - 1) * step < nope; d += U * step) {
                float wv[U][8];
#pragma unroll
                for (int u = 0; u < U; u++) load8(w + (size_t)(d + u * step) * lora + c, wv[u]);
#pragma unroll
                for (int u = 0; u < U; u++)
#pragma unroll
                    for (int k = 0; k < R; k++)
#pragma unroll
                        for (int j = 0; j < 8; j++) acc[k][j] += qs[k * nope + d + u * step] * wv[u][j];
            }
            for (; d < nope; d += step) {
                float wv[8];
                load8(w + (size_t)d * lora + c, wv);
#pragma unroll
                for (int k = 0; k < R; k++)
#pragma unroll
                    for (int j = 0; j < 8; j++) acc[k][j] += qs[k * nope + d] * wv[j];
            }
        }
    } else {
        for (; d < nope; d += step) {
            float wv[8];
            const T* wr = w + (size_t)d * lora + c;
#pragma unroll
            for (int j = 0; j < 8; j++) wv[j] = c + j < lora ? act_ld(wr, j) : 0.f;
#pragma unroll
            for (int k = 0; k < R; k++)
#pragma unroll
                for (int j = 0; j < 8; j++) acc[k][j] += qs[k * nope + d] * wv[j];
        }
    }
#pragma unroll
    for (int off = G; off < 32; off <<= 1)
#pragma unroll
        for (int k = 0; k < R; k++)
#pragma unroll
            for (int j = 0; j < 8; j++) acc[k][j] += __shfl_xor_sync(0xffffffffu, acc[k][j], off);
    if (dl == 0)
#pragma unroll
        for (int k = 0; k < R; k++)
#pragma unroll
            for (int j = 0; j < 8; j++) part[(warp * R + k) * C + cg * 8 + j] = acc[k][j];
    __syncthreads();
    for (int i = threadIdx.x; i < R * C; i += blockDim.x) {
        const int k = i / C, cc = i % C;
        if (k >= rows || c0 + cc >= lora) continue;
        float v = 0.f;
        for (int g = 0; g < ABS_WARPS; g++) v += part[(g * R + k) * C + cc];
        q_lat[((size_t)(r0 + k) * heads + h) * lora + c0 + cc] = v;
    }
}

// The flash kernel's tile: KT keys and the tile's element type. Only the exact f32 path runs this kernel (16-key
// f32 tiles: more would not fit an RTX 3090's 99 KB); bf16 activations take flash_mma.cu's tensor-core kernel.
template <typename T> struct FlashTile;
template <> struct FlashTile<float> {
    typedef float S;
    static constexpr int KT = 16, PAD = 1;
};
__device__ __forceinline__ float tile_ld(const float* p, int i) { return p[i]; }
__device__ __forceinline__ void tile_st(float* p, int i, float v) { p[i] = v; }

// Block (g, r, s) of grid (⌈heads / MLA_HEADS⌉, n_rows, splits), 32 · MLA_HEADS threads: heads g·MLA_HEADS.. of
// row row0 + r over the s-th share of the row's keys (whole tiles), tile by tile with an online softmax in f32.
// Leaves the share's unnormalised latent mix Σ e^{s_t − m} c_t and (m, Σ e^{s_t − m}) for mla_out to merge.
// Keys are the row's selection `keys[r, :count]` (V3.2 DSA) or every causal position 0..count-1; a key outside
// 0..pos is skipped.
//
// Every key's row [c | k_pe] (D = lora + rope values) is read from shared memory once for all MLA_HEADS heads:
// scoring, warp w takes the dims w·D/8.. of every key (lane = key) and each head's query at that dim (a broadcast
// of 8 floats), so one shared load feeds 8 FMAs; the warps' partial scores are added per head, warp h runs head
// h's online softmax, and for the mix each thread owns latent columns (i, i + 256) of all heads, again one
// shared load of c per 8 FMAs. Shared: q [D][MLA_HEADS] (f32), partial scores [8][MLA_HEADS][KT],
// probabilities [KT][MLA_HEADS], corrections [MLA_HEADS], slots [KT], the tile [KT][D + PAD] (rows padded so
// lane-per-key reads fall in distinct banks).
template <typename T>
__device__ void mla_flash(const float* q_lat,     // [n_rows, heads, lora]
                          const T* q,             // [rows, heads, nope + rope]: q_pe is each head's tail
                          const void* c_lat,      // [slots, lora] in the cache dtype
                          const void* c_pe,       // [slots, rope]
                          const float* scales,    // [slots, 3]
                          int dtype,
                          const int* meta,        // [rows, 4]
                          const int* tables,
                          const int* keys,        // [rows, key_stride], or null
                          int key_stride, int row0, int heads, int nope, int rope, int lora, float scale,
                          float* o_part,          // [n_rows, heads, splits, lora]
                          float* ml_part) {       // [n_rows, heads, splits, 2]
    typedef typename FlashTile<T>::S S;
    constexpr int KT = FlashTile<T>::KT, H = MLA_HEADS, COLS = MLA_MAX_LORA / (32 * MLA_HEADS);
    extern __shared__ float sm[];
    const int D = lora + rope, CS = D + FlashTile<T>::PAD;
    float* qt = sm;                    // [D][H], 16-byte aligned rows
    float* part = qt + D * H;          // [8 warps][H][KT]
    float* pt = part + 8 * H * KT;     // [KT][H]
    float* corr = pt + KT * H;         // [H]
    int* slot = (int*)(corr + H);      // [KT]
    S* ct = (S*)(slot + KT);           // [KT][CS]
    const int lr = blockIdx.y, r = row0 + lr, split = blockIdx.z, splits = gridDim.z;
    const int h0 = blockIdx.x * H, warp = threadIdx.x / 32, lane = threadIdx.x & 31, h = h0 + warp;
    // A selection holds at most key_stride keys a row: a step's tables count every causal key (pos + 1), which
    // serve the dense and the selecting layers alike.
    const int pos = meta[r * 4], n = keys ? min(meta[r * 4 + 2], key_stride) : meta[r * 4 + 2];
    const int* table = tables + meta[r * 4 + 1];
    const int* kr = keys ? keys + (size_t)r * key_stride : nullptr;
    const int per = ((n + KT - 1) / KT + splits - 1) / splits;
    const int begin = min(n, split * per * KT), end = min(n, (split + 1) * per * KT);

    // Warp g stores head h0 + g's query (latent, then rope) down column g.
    for (int d = lane; d < D; d += 32) {
        float v = 0.f;
        if (h < heads)
            v = d < lora ? q_lat[((size_t)lr * heads + h) * lora + d]
                         : act_ld(q, ((size_t)r * heads + h) * (nope + rope) + nope + d - lora);
        qt[d * H + warp] = v;
    }
    // Warp w's share of the dims while scoring.
    const int chunk = (D + 7) / 8, d0 = min(D, warp * chunk), d1 = min(D, d0 + chunk);
    float m = NEG_INF, sum = 0.f, acc[H][COLS];
#pragma unroll
    for (int g = 0; g < H; g++)
#pragma unroll
        for (int j = 0; j < COLS; j++) acc[g][j] = 0.f;

    for (int t0 = begin; t0 < end; t0 += KT) {
        const int cnt = min(KT, end - t0);
        __syncthreads();  // the previous tile is consumed (on the first pass: q is stored)
        if (threadIdx.x < KT) {
            int s = -1;
            if (threadIdx.x < cnt) {
                const int p = kr ? kr[t0 + threadIdx.x] : t0 + threadIdx.x;
                if (p >= 0 && p <= pos) s = kv_slot(table, p);
            }
            slot[threadIdx.x] = s;
        }
        __syncthreads();
        // Warp w loads keys w, w + 8, ...: a warp-wide run of each key's row.
        for (int t = warp; t < KT; t += 8) {
            const int s = slot[t];
            const float sl = s >= 0 ? scales[(size_t)s * 3] : 0.f, sp = s >= 0 ? scales[(size_t)s * 3 + 1] : 0.f;
#pragma unroll 4
            for (int d = lane; d < lora; d += 32)
                tile_st(ct, t * CS + d, s >= 0 ? kv_load(c_lat, (size_t)s * lora + d, dtype) * sl : 0.f);
            for (int d = lane; d < rope; d += 32)
                tile_st(ct, t * CS + lora + d, s >= 0 ? kv_load(c_pe, (size_t)s * rope + d, dtype) * sp : 0.f);
        }
        __syncthreads();

        // Partial scores of key `lane` over this warp's dims, every head at once.
        float a[H];
#pragma unroll
        for (int g = 0; g < H; g++) a[g] = 0.f;
        if (lane < KT) {
            const S* row = ct + lane * CS;
#pragma unroll 4
            for (int d = d0; d < d1; d++) {
                const float c = tile_ld(row, d);
                const float4 qa = *(const float4*)(qt + d * H), qb = *(const float4*)(qt + d * H + 4);
                a[0] += qa.x * c;
                a[1] += qa.y * c;
                a[2] += qa.z * c;
                a[3] += qa.w * c;
                a[4] += qb.x * c;
                a[5] += qb.y * c;
                a[6] += qb.z * c;
                a[7] += qb.w * c;
            }
#pragma unroll
            for (int g = 0; g < H; g++) part[(warp * H + g) * KT + lane] = a[g];
        }
        __syncthreads();

        // Warp g: head h0 + g's scores of the tile and its online softmax.
        {
            float sc = NEG_INF;
            if (lane < cnt && slot[lane] >= 0) {
                float v = 0.f;
#pragma unroll
                for (int w = 0; w < 8; w++) v += part[(w * H + warp) * KT + lane];
                sc = v * scale;
            }
            float p;
            const float c = online_softmax_step(sc, m, sum, p);
            if (lane < KT) pt[lane * H + warp] = p;
            if (lane == 0) corr[warp] = c;
        }
        __syncthreads();

        // The mix: thread i's columns i + 256·j of every head.
        const float4 ca = *(const float4*)corr, cb = *(const float4*)(corr + 4);
        const float cr[H] = {ca.x, ca.y, ca.z, ca.w, cb.x, cb.y, cb.z, cb.w};
#pragma unroll
        for (int g = 0; g < H; g++)
#pragma unroll
            for (int j = 0; j < COLS; j++) acc[g][j] *= cr[g];
        for (int t = 0; t < cnt; t++) {
            const float4 pa = *(const float4*)(pt + t * H), pb = *(const float4*)(pt + t * H + 4);
            const float pr[H] = {pa.x, pa.y, pa.z, pa.w, pb.x, pb.y, pb.z, pb.w};
#pragma unroll
            for (int j = 0; j < COLS; j++) {
                const int l = threadIdx.x + 32 * H * j;
                if (l < lora) {
                    const float c = tile_ld(ct, t * CS + l);
#pragma unroll
                    for (int g = 0; g < H; g++) acc[g][j] += pr[g] * c;
                }
            }
        }
    }
#pragma unroll
    for (int g = 0; g < H; g++) {
        if (h0 + g >= heads) continue;
        const size_t at = ((size_t)lr * heads + h0 + g) * splits + split;
#pragma unroll
        for (int j = 0; j < COLS; j++) {
            const int l = threadIdx.x + 32 * H * j;
            if (l < lora) o_part[at * lora + l] = acc[g][j];
        }
    }
    if (h < heads && lane == 0) {
        const size_t at = ((size_t)lr * heads + h) * splits + split;
        ml_part[at * 2] = m;
        ml_part[at * 2 + 1] = sum;
    }
}

// out[row0 + r, h, i] = Σ_l W_UV[h, i, l] · o_lat[r, h, l], where o_lat merges the row's key shares:
// o_lat = Σ_s e^{m_s − M} o_s / Σ_s e^{m_s − M} l_s with M = max_s m_s. grid (heads, ⌈n_rows / R⌉,
// ⌈vdim / OUT_COLS⌉), block 32 · ABS_WARPS (8 threads per output column), shared R · lora floats.
template <typename T, int R>
__device__ void mla_out(const float* o_part,   // [n_rows, heads, splits, lora]
                        const float* ml_part,  // [n_rows, heads, splits, 2]
                        int splits,
                        const T* kv_b,         // [heads, nope + vdim, lora]
                        int row0, int n_rows, int heads, int nope, int vdim, int lora,
                        T* out) {              // [rows, heads, vdim]
    extern __shared__ float sm[];
    __shared__ float wts[R][MLA_MAX_SPLITS];
    const int h = blockIdx.x, r0 = blockIdx.y * R;
    {
        // Warp k weighs row k's splits, lane s split s: the max and the sum by shuffles, all splits' loads at once
        // (one thread per row walked them: two passes of loads one after another).
        const int k = threadIdx.x / 32, s = threadIdx.x & 31;
        const float wt = split_weight(ml_part, r0 + k, n_rows, heads, h, splits, s);
        if (k < R && s < MLA_MAX_SPLITS) wts[k][s] = wt;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < R * lora; i += blockDim.x) {
        const int k = i / lora, l = i % lora;
        float v = 0.f;
        if (r0 + k < n_rows)
            v = merge_shares(o_part + ((size_t)(r0 + k) * heads + h) * splits * lora + l, lora, splits, wts[k], 0);
        sm[i] = v;
    }
    __syncthreads();
    // Thread t: output column z·OUT_COLS + t / 8 and every eighth run of 8 of its W_UV row from run t % 8, so the
    // block's weight loads (16 bytes each, ≤ 8 per thread at lora ≤ 512) are all in flight at once; the column's
    // 8 threads add their sums by shuffles. (lora % 64 ≠ 0 takes a scalar loop over the same runs.)
    const T* w = kv_b + ((size_t)h * (nope + vdim) + nope) * lora;
    const int o = blockIdx.z * OUT_COLS + threadIdx.x / 8, part = threadIdx.x % 8;
    float acc[R];
#pragma unroll
    for (int k = 0; k < R; k++) acc[k] = 0.f;
    if (o < vdim) {
        const T* wr = w + (size_t)o * lora;
        if (lora % 64 == 0) {
#pragma unroll
            for (int v = 0; v < MLA_MAX_LORA / 64; v++) {
                const int c = (v * 8 + part) * 8;
                if (c < lora) {
                    float wv[8];
                    load8(wr + c, wv);
#pragma unroll
                    for (int j = 0; j < 8; j++)
#pragma unroll
                        for (int k = 0; k < R; k++) acc[k] += wv[j] * sm[k * lora + c + j];
                }
            }
        } else {
            for (int c = part * 8; c < lora; c += 64)
                for (int j = c; j < min(lora, c + 8); j++) {
                    const float wv = act_ld(wr, j);
#pragma unroll
                    for (int k = 0; k < R; k++) acc[k] += wv * sm[k * lora + j];
                }
        }
    }
#pragma unroll
    for (int k = 0; k < R; k++) {
        float v = acc[k];
#pragma unroll
        for (int off = 4; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
        if (part == 0 && o < vdim && r0 + k < n_rows) act_st(out, ((size_t)(row0 + r0 + k) * heads + h) * vdim + o, v);
    }
}

// The absorption kernels for R rows per block: MLA_ROWS, and 1 (a single-stream decode step, which would
// otherwise spend 7 of every 8 multiply-adds and shared loads on rows it does not have); mla_absorb_q's block
// covers C latent columns (64 for MLA_ROWS rows, 256 for one: attention::absorb_cols).
#define ABSORB_KERNELS(T, S, R, C, TAG)                                                                             \
    extern "C" __global__ void mla_absorb_q##TAG##_##S(const T* q, const T* kv_b, int row0, int n_rows, int heads,  \
                                                       int nope, int rope, int vdim, int lora, float* q_lat) {      \
        mla_absorb_q<T, R, C>(q, kv_b, row0, n_rows, heads, nope, rope, vdim, lora, q_lat);                         \
    }                                                                                                               \
    extern "C" __global__ void mla_out##TAG##_##S(const float* o_part, const float* ml_part, int splits,            \
                                                  const T* kv_b, int row0, int n_rows, int heads, int nope,         \
                                                  int vdim, int lora, T* out) {                                     \
        mla_out<T, R>(o_part, ml_part, splits, kv_b, row0, n_rows, heads, nope, vdim, lora, out);                   \
    }

#define ATTENTION_KERNELS(T, S)                                                                                     \
    extern "C" __global__ void cache_store_##S(const T* latent, const T* k_pe, const T* index_k, const int* slots, \
                                               int lora, int rope, int idim, void* c_lat, void* c_pe, void* c_idx, \
                                               float* scales, int dtype) {                                          \
        cache_store<T>(latent, k_pe, index_k, slots, lora, rope, idim, c_lat, c_pe, c_idx, scales, dtype);          \
    }                                                                                                               \
    ABSORB_KERNELS(T, S, MLA_ROWS, 64, )                                                                            \
    ABSORB_KERNELS(T, S, 1, 256, _r1)

ATTENTION_KERNELS(float, f32)
ATTENTION_KERNELS(__nv_bfloat16, bf16)

extern "C" __global__ void __launch_bounds__(32 * MLA_HEADS) mla_flash_f32(
    const float* q_lat, const float* q, const void* c_lat, const void* c_pe, const float* scales, int dtype,
    const int* meta, const int* tables, const int* keys, int key_stride, int row0, int heads, int nope, int rope,
    int lora, float scale, float* o_part, float* ml_part) {
    mla_flash<float>(q_lat, q, c_lat, c_pe, scales, dtype, meta, tables, keys, key_stride, row0, heads, nope, rope,
                     lora, scale, o_part, ml_part);
}
