// MLA attention over the block-paged latent cache with absorbed kv_b_proj (MODEL_SPEC §2.5), and the V3.2
// indexer's scores and top-k (§2.6). Activations are T = float or __nv_bfloat16 (symbols `_f32` / `_bf16`);
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
#define IDX_KEYS 64        // keys per block of indexer_scores

__device__ __forceinline__ float block_max(float v, float* scratch) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x / 32] = v;
    __syncthreads();
    if (threadIdx.x < 32) {
        float t = threadIdx.x < (blockDim.x + 31) / 32 ? scratch[threadIdx.x] : NEG_INF;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) t = fmaxf(t, __shfl_xor_sync(0xffffffffu, t, o));
        if (threadIdx.x == 0) scratch[0] = t;
    }
    __syncthreads();
    float r = scratch[0];
    __syncthreads();
    return r;
}

// Values a thread of cache_store holds (a 512-wide latent at 128 threads is 4).
#define CACHE_HELD 8

// grid (rows, 3): block (r, c) stores component c (0 latent, 1 k_pe, 2 indexer key) of row r at pool slot
// slots[r] in the cache dtype, and its scale (fp8: max|x| / 448, the e4m3 range; else 1). Block 128.
template <typename T>
__device__ void cache_store(const T* latent, const T* k_pe, const T* index_k, const int* slots, int lora, int rope,
                            int idim, void* c_lat, void* c_pe, void* c_idx, float* scales, int dtype) {
    __shared__ float scratch[32];
    const int r = blockIdx.x, c = blockIdx.y;
    const T* src = c == 0 ? latent : c == 1 ? k_pe : index_k;
    void* dst = c == 0 ? c_lat : c == 1 ? c_pe : c_idx;
    const int n = c == 0 ? lora : c == 1 ? rope : idim;
    if (src == nullptr || n == 0) return;
    const size_t slot = slots[r], at = slot * n;
    src += (size_t)r * n;
    const auto put = [&](int i, float v, float sc) {
        if (dtype == 0) ((float*)dst)[at + i] = v;
        else if (dtype == 1) ((__nv_bfloat16*)dst)[at + i] = __float2bfloat16(v);
        else ((__nv_fp8_e4m3*)dst)[at + i] = __nv_fp8_e4m3(v / sc);
    };
    float m = 0.f;
    if (n <= (int)blockDim.x * CACHE_HELD) {
        // Every value of the thread loaded at once and kept for the store (a loop over them issued one load after
        // the other's use: one round trip a value, twice).
        float v[CACHE_HELD];
#pragma unroll
        for (int j = 0; j < CACHE_HELD; j++) {
            const int i = threadIdx.x + j * blockDim.x;
            v[j] = i < n ? act_ld(src, i) : 0.f;
            m = fmaxf(m, fabsf(v[j]));
        }
        m = block_max(m, scratch);
        const float sc = dtype == 2 && m > 0.f ? m / 448.f : 1.f;
        if (threadIdx.x == 0) scales[slot * 3 + c] = sc;
#pragma unroll
        for (int j = 0; j < CACHE_HELD; j++) {
            const int i = threadIdx.x + j * blockDim.x;
            if (i < n) put(i, v[j], sc);
        }
        return;
    }
    for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, fabsf(act_ld(src, i)));
    m = block_max(m, scratch);
    const float sc = dtype == 2 && m > 0.f ? m / 448.f : 1.f;
    if (threadIdx.x == 0) scales[slot * 3 + c] = sc;
    for (int i = threadIdx.x; i < n; i += blockDim.x) put(i, act_ld(src, i), sc);
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
        float m = NEG_INF, l = 0.f;
        if (r0 + k < n_rows && s < splits) {
            const float* ml = ml_part + (((size_t)(r0 + k) * heads + h) * splits + s) * 2;
            m = ml[0];
            l = ml[1];
        }
        float mx = m;
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
        const float e = m == NEG_INF ? 0.f : __expf(m - mx);
        float total = e * l;
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) total += __shfl_xor_sync(0xffffffffu, total, off);
        if (k < R && s < MLA_MAX_SPLITS) wts[k][s] = total > 0.f ? e / total : 0.f;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < R * lora; i += blockDim.x) {
        const int k = i / lora, l = i % lora;
        float v = 0.f;
        if (r0 + k < n_rows) {
            // Every split's value requested before any is added: one round trip, not one per split.
            const float* op = o_part + ((size_t)(r0 + k) * heads + h) * splits * lora + l;
            float part[MLA_MAX_SPLITS];
#pragma unroll
            for (int s = 0; s < MLA_MAX_SPLITS; s++) part[s] = s < splits ? op[(size_t)s * lora] : 0.f;
#pragma unroll
            for (int s = 0; s < MLA_MAX_SPLITS; s++) v += s < splits ? wts[k][s] * part[s] : 0.f;
        }
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
    ABSORB_KERNELS(T, S, 1, 256, _r1)                                                                               \
    extern "C" __global__ void indexer_scores_##S(const T* q, const T* w, const void* k_idx, const float* scales,  \
                                                  int dtype, const int* meta, const int* tables, int row0,          \
                                                  int heads, int dim, int topk, int stride, float* scores) {        \
        indexer_scores<T>(q, w, k_idx, scales, dtype, meta, tables, row0, heads, dim, topk, stride, scores);        \
    }

ATTENTION_KERNELS(float, f32)
ATTENTION_KERNELS(__nv_bfloat16, bf16)

extern "C" __global__ void __launch_bounds__(32 * MLA_HEADS) mla_flash_f32(
    const float* q_lat, const float* q, const void* c_lat, const void* c_pe, const float* scales, int dtype,
    const int* meta, const int* tables, const int* keys, int key_stride, int row0, int heads, int nope, int rope,
    int lora, float scale, float* o_part, float* ml_part) {
    mla_flash<float>(q_lat, q, c_lat, c_pe, scales, dtype, meta, tables, keys, key_stride, row0, heads, nope, rope,
                     lora, scale, o_part, ml_part);
}
