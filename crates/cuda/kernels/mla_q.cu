// MLA's two absorptions (MODEL_SPEC §2.5) straight from the 3-bit (2-, 4-bit) kv_b_proj in the tensor-core layout
// of gptq_mma.cu, for decode rows: the bf16 copy of kv_b the dense kernels read is 5.3× the bytes (33.5 MB a
// layer against 6.3 MB at 3 bits), and on a 3090 those bytes are the time.
//
// kv_b_proj is [heads·(nope + vdim), lora]: a GPTQ matrix whose K is lora. Its repacked words hold, per tile of 16
// output columns n and chunk of 128 rows k, each lane's share of an m16n8k16 A fragment (rows n, columns k) as
// base + q (mma_pack.cuh). Rows a block: MQ_ROWS, each as its bf16 value and its remainder (two B columns of the
// mma, added after it), so the products are as exact as f32 ones: the weights' base + q are exact in bf16.
//
// mla_out_w: o[r, h, i] = Σ_c W_UV[h, i, c] · o_lat[r, h, c] — a GEMV per head over K = lora, A = the weights as
// stored. The block merges its rows' key shares (as mla_out does) into shared memory first.
// mla_absorb_q_w: q_lat[r, h, c] = Σ_d W_UK[h, d, c] · q_nope[r, h, d] — the contraction runs over the stored
// columns n, so each A fragment is transposed in registers (movmatrix) and the scale, a function of (group, n),
// goes into B: B[d][r] = s[d] · q[r, d].
// Per chunk (one group of scales and zeros, group sizes being whole chunks): Σ s·(base + q − base − z)·x with the
// bases and zeros taken out by the sums of x over each half of a k-step. Null zeros: a symmetric weight, every zero
// 2^(BITS−1) (src/gemv.rs uploads none).
#include "common.cuh"
#include "attention.cuh"
#include "mma_pack.cuh"
#include "mma.cuh"

#define MQ_ROWS 4       // rows a block (attention::QUANT_ROWS): 8 B columns, each row's value and remainder
#define MQ_WARPS 4
#define MQ_CHUNK 128
#define MQ_MAX_CHUNKS 4 // lora ≤ MLA_MAX_LORA = 512
#define MQ_OUT_WARPS 8  // mla_out_w: a V tile a warp (vdim 128: all 8 at once)
#define MQ_PRE 2        // mla_out_w: values of o_lat a thread requests before the barrier (one row: all 512)

// The lane's words of (tile, chunk): BITS uint2, as gptq_mma.cu reads them from its ring.
template <int BITS>
__device__ __forceinline__ void mq_load(u32* w, const uint2* words, size_t tile, int k_chunks, int chunk, int lane) {
    const uint2* src = words + ((size_t)tile * k_chunks + chunk) * BITS * 32 + lane;
#pragma unroll
    for (int j = 0; j < BITS; j++) {
        const uint2 v = __ldg(src + j * 32);
        w[2 * j] = v.x;
        w[2 * j + 1] = v.y;
    }
}

// The A fragment of k-step ks (0..7 of a chunk) from a lane's words.
template <int BITS>
__device__ __forceinline__ void mq_frag(u32 a[4], const u32* w, int ks) {
    const u32* blk = w + (ks / 4) * BITS;
#pragma unroll
    for (int r = 0; r < 4; r++) a[r] = mma_pair<BITS>(blk, (ks % 4) * 4 + r);
}

__device__ __forceinline__ u32 mq_trans(u32 a) {
    u32 d;
    asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(d) : "r"(a));
    return d;
}

// v as a bf16 and the bf16 of what is left; returns their sum in f32 (what the tensor cores multiply).
__device__ __forceinline__ float mq_split(float v, __nv_bfloat16* hi, __nv_bfloat16* lo) {
    const __nv_bfloat16 h = __float2bfloat16(v), l = __float2bfloat16(v - __bfloat162float(h));
    *hi = h;
    *lo = l;
    return __bfloat162float(h) + __bfloat162float(l);
}

// grid (heads, ⌈n_rows / MQ_ROWS⌉), block 32·MQ_OUT_WARPS: warp w the V tiles w, w + MQ_OUT_WARPS, … over every
// chunk of lora (a decode row's 128 blocks of 8 warps: one wave, a short chain each). Shared: weights of the key
// shares [MQ_ROWS][MLA_MAX_SPLITS], o_lat's parts [2·MQ_ROWS][lora + 8] bf16, their sums per chunk and half of a
// k-step [2·MQ_ROWS][MQ_MAX_CHUNKS][2], the scales and zeros of the head's V columns [chunks][vdim] (half2).
template <int BITS>
__device__ void mla_out_w(const float* o_part,      // [n_rows, heads, splits, lora]
                          const float* ml_part,     // [n_rows, heads, splits, 2]
                          int splits, const uint2* words, const __half* zeros, const __half* scales,
                          const int* perm,          // [lora] or null
                          int n_out, int group_size, int row0, int n_rows, int heads, int nope, int vdim, int lora,
                          __nv_bfloat16* out) {     // [rows, heads, vdim]
    extern __shared__ __align__(16) unsigned char mq_smem[];
    __shared__ float wts[MQ_ROWS][MLA_MAX_SPLITS];
    const int h = blockIdx.x, r0 = blockIdx.y * MQ_ROWS;
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, group = lane >> 2, quad = lane & 3;
    const int k_chunks = lora / MQ_CHUNK, os = lora + 8;
    __nv_bfloat16* ohl = (__nv_bfloat16*)mq_smem;                       // [2·MQ_ROWS][os]
    float* xsum = (float*)(ohl + 2 * MQ_ROWS * os);                       // [2·MQ_ROWS][MQ_MAX_CHUNKS][2]
    __half2* sz = (__half2*)(xsum + 2 * MQ_ROWS * MQ_MAX_CHUNKS * 2);     // [chunks][vdim]
    const size_t tile0 = ((size_t)h * (nope + vdim) + nope) / 16;
    const int vt = vdim / 16;
    constexpr float BASE_HI = mma_base_hi<BITS>();
    // ldmatrix: lane L the part L % 8, columns (L / 8)·8 of a run of 32.
    const __nv_bfloat16* xrow = ohl + (lane & 7) * os + (lane >> 3) * 8;
    for (int t0 = 0; t0 < vt; t0 += MQ_OUT_WARPS) {
        const int tile = t0 + warp;
        // The weights first, into registers: their loads overlap the merge.
        u32 w[MQ_MAX_CHUNKS][2 * BITS];
#pragma unroll
        for (int c = 0; c < MQ_MAX_CHUNKS; c++)
            if (tile < vt && c < k_chunks) mq_load<BITS>(w[c], words, tile0 + tile, k_chunks, c, lane);
        if (t0 == 0) {
            // o_lat of the block's rows, merged over the key shares in the repacked order of lora: the first MQ_PRE
            // values of each thread have their shares requested before the shares' weights are known (one round
            // trip for both at one row, where they are all there is).
            const int vals = max(0, min(MQ_ROWS, n_rows - r0)) * lora;
            auto shares = [&](int i) {
                const int k = i / lora, l = i % lora;
                return o_part + ((size_t)(r0 + k) * heads + h) * splits * lora + (perm ? perm[l] : l);
            };
            // Value i merged from share s0 on.
            auto merge_from = [&](int i, int s0) { return merge_shares(shares(i), lora, splits, wts[i / lora], s0); };
            float pre[MQ_PRE][16];
#pragma unroll
            for (int u = 0; u < MQ_PRE; u++) {
                const int i = threadIdx.x + u * blockDim.x;
                if (i < vals) {
                    const float* op = shares(i);
#pragma unroll
                    for (int s = 0; s < 16; s++) pre[u][s] = s < splits ? op[(size_t)s * lora] : 0.f;
                }
            }
            if (warp < MQ_ROWS) {
                const float wt = split_weight(ml_part, r0 + warp, n_rows, heads, h, splits, lane);
                if (lane < MLA_MAX_SPLITS) wts[warp][lane] = wt;
            }
            // Two entries a thread a pass (a decode row's 4 chunks × 128 V columns over 256 threads: one pass), both
            // loaded before either is stored: a pass an entry waited one round trip for each (tools/sass.py). An
            // entry past the last is the last again, stored with the same value as its own thread's: no branch
            // for the compiler to sink the second pair's loads into, behind the first pair's store.
            const int n_sz = k_chunks * vdim;
            for (int i0 = threadIdx.x; i0 < n_sz; i0 += 2 * blockDim.x) {
                int at[2];
                __half s2[2], z2[2];
#pragma unroll
                for (int u = 0; u < 2; u++) {
                    at[u] = min(i0 + u * (int)blockDim.x, n_sz - 1);
                    const int c = at[u] / vdim, n = h * (nope + vdim) + nope + at[u] % vdim;
                    const size_t g = (size_t)(c * MQ_CHUNK / group_size) * n_out + n;
                    s2[u] = scales[g];
                    z2[u] = zeros ? zeros[g] : __float2half(sym_zero<BITS>());  // kept as half: no conversion
                }
#pragma unroll
                for (int u = 0; u < 2; u++) sz[at[u]] = __halves2half2(s2[u], z2[u]);
            }
            __syncthreads();
            // Stored as value + remainder; rows past n_rows are zeros.
#pragma unroll
            for (int u = 0; u < MQ_PRE; u++) {
                const int i = threadIdx.x + u * blockDim.x;
                if (i < vals) {
                    const int k = i / lora, l = i % lora;
                    float v = 0.f;
#pragma unroll
                    for (int s = 0; s < 16; s++) v += s < splits ? wts[k][s] * pre[u][s] : 0.f;
                    if (splits > 16) v += merge_from(i, 16);
                    mq_split(v, &ohl[2 * k * os + l], &ohl[(2 * k + 1) * os + l]);
                }
            }
            for (int i = threadIdx.x + MQ_PRE * blockDim.x; i < vals; i += blockDim.x) {
                const int k = i / lora, l = i % lora;
                mq_split(merge_from(i, 0), &ohl[2 * k * os + l], &ohl[(2 * k + 1) * os + l]);
            }
            for (int i = vals + threadIdx.x; i < MQ_ROWS * lora; i += blockDim.x) {
                const int k = i / lora, l = i % lora;
                ohl[2 * k * os + l] = ohl[(2 * k + 1) * os + l] = __float2bfloat16(0.f);
            }
            __syncthreads();
            // Sums of each (part, chunk) over the lower and the upper 8 columns of its k-steps: a warp a pair, lane
            // L the columns ≡ L mod 32 (all in one half: L % 16 < 8 or not), then the lanes of each half added.
            for (int pc = warp; pc < 2 * MQ_ROWS * k_chunks; pc += blockDim.x / 32) {
                const int p = pc / k_chunks, c = pc % k_chunks;
                const __nv_bfloat16* src = ohl + p * os + c * MQ_CHUNK + lane;
                float acc = 0.f;
#pragma unroll
                for (int i = 0; i < MQ_CHUNK / 32; i++) acc += __bfloat162float(src[32 * i]);
#pragma unroll
                for (int o = 1; o < 8; o <<= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
                acc += __shfl_xor_sync(0xffffffffu, acc, 16);
                if (lane == 0 || lane == 8) xsum[(p * MQ_MAX_CHUNKS + c) * 2 + lane / 8] = acc;
            }
            __syncthreads();
        }
        if (tile >= vt) continue;
        // A chain of 8 k-steps per chunk, the chunks side by side.
        float d[MQ_MAX_CHUNKS][4];
#pragma unroll
        for (int c = 0; c < MQ_MAX_CHUNKS; c++)
#pragma unroll
            for (int i = 0; i < 4; i++) d[c][i] = 0.f;
#pragma unroll
        for (int kp = 0; kp < 4; kp++) {
#pragma unroll
            for (int c = 0; c < MQ_MAX_CHUNKS; c++) {
                if (c >= k_chunks) break;
                u32 xb[4];
                ldmatrix_x4(xb, xrow + c * MQ_CHUNK + kp * 32);
#pragma unroll
                for (int s = 0; s < 2; s++) {
                    u32 a[4];
                    mq_frag<BITS>(a, w[c], kp * 2 + s);
                    mma_16816(d[c], a, xb[2 * s], xb[2 * s + 1]);
                }
            }
        }
        // d[c]: (column group, part 2·quad), (group, 2·quad + 1), (group + 8, 2·quad), (group + 8, 2·quad + 1).
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int c = 0; c < MQ_MAX_CHUNKS; c++) {
            if (c >= k_chunks) break;
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int p = 2 * quad + (i & 1);
                const float lo = xsum[(p * MQ_MAX_CHUNKS + c) * 2], hi = xsum[(p * MQ_MAX_CHUNKS + c) * 2 + 1];
                const float2 f = __half22float2(sz[c * vdim + tile * 16 + group + 8 * (i >> 1)]);
                acc[i] += f.x * (d[c][i] - 128.f * lo - BASE_HI * hi - f.y * (lo + hi));
            }
        }
        const int row = r0 + quad;
        if (row < n_rows) {
            __nv_bfloat16* o = out + ((size_t)(row0 + row) * heads + h) * vdim + tile * 16 + group;
            o[0] = __float2bfloat16(acc[0] + acc[1]);
            o[8] = __float2bfloat16(acc[2] + acc[3]);
        }
    }
}

// grid (heads, ⌈n_rows / MQ_ROWS⌉, lora / MQ_CHUNK), block 32·MQ_WARPS: a block one chunk of lora (one group of
// scales), warp w the pairs of nope tiles w, w + MQ_WARPS, …; the warps' sums added in shared memory in warp order.
// Shared: per warp B = s·q as parts [2·MQ_ROWS][32 + 8] bf16; the warps' partial sums [MQ_WARPS][8][4][32] and
// their Σ s·q, Σ z·s·q [MQ_WARPS][2][MQ_ROWS] (f32).
template <int BITS>
__device__ void mla_absorb_q_w(const __nv_bfloat16* q,   // [rows, heads, nope + rope]
                               const uint2* words, const __half* zeros, const __half* scales,
                               const int* perm,          // [lora] or null
                               int n_out, int group_size, int row0, int n_rows, int heads, int nope, int rope,
                               int vdim, int lora,
                               float* q_lat) {           // [n_rows, heads, lora]
    constexpr int BS = 40;  // bf16 per part of a warp's B: 32 columns and a stagger over the banks
    __shared__ __align__(16) __nv_bfloat16 sx_all[MQ_WARPS][2 * MQ_ROWS][BS];
    __shared__ float red[MQ_WARPS][8][4][32];
    __shared__ float sums[MQ_WARPS][2][MQ_ROWS];
    const int h = blockIdx.x, r0 = blockIdx.y * MQ_ROWS, c = blockIdx.z;
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, group = lane >> 2, quad = lane & 3;
    const int k_chunks = lora / MQ_CHUNK, pairs = nope / 32;
    __nv_bfloat16(*sx)[BS] = sx_all[warp];
    const size_t tile0 = (size_t)h * (nope + vdim) / 16;
    const size_t g = (size_t)(c * MQ_CHUNK / group_size) * n_out + (size_t)h * (nope + vdim);
    const __nv_bfloat16* brow = &sx[lane & 7][(lane >> 3) * 8];
    float d[8][4];
#pragma unroll
    for (int ks = 0; ks < 8; ks++)
#pragma unroll
        for (int i = 0; i < 4; i++) d[ks][i] = 0.f;
    float s1[MQ_ROWS], s2[MQ_ROWS];
#pragma unroll
    for (int k = 0; k < MQ_ROWS; k++) s1[k] = s2[k] = 0.f;
    for (int pr = warp; pr < pairs; pr += MQ_WARPS) {
        u32 w[2][2 * BITS];
#pragma unroll
        for (int u = 0; u < 2; u++) mq_load<BITS>(w[u], words, tile0 + 2 * pr + u, k_chunks, c, lane);
        // B of the pair's 32 columns (a lane one): s·q as value + remainder; the sums the bases and zeros need.
        const int dd = pr * 32 + lane;
        const float sc = __half2float(scales[g + dd]);
        const float z = gptq_zero<BITS>(zeros, g + dd);
        float qv[MQ_ROWS];
#pragma unroll
        for (int k = 0; k < MQ_ROWS; k++)
            qv[k] = r0 + k < n_rows ? __bfloat162float(q[((size_t)(row0 + r0 + k) * heads + h) * (nope + rope) + dd]) : 0.f;
        __syncwarp();  // the last pair's ldmatrix reads are done
#pragma unroll
        for (int k = 0; k < MQ_ROWS; k++) {
            const float v = mq_split(sc * qv[k], &sx[2 * k][lane], &sx[2 * k + 1][lane]);
            s1[k] += v;
            s2[k] += z * v;
        }
        __syncwarp();
        u32 xb[4];  // tiles 2·pr and 2·pr + 1
        ldmatrix_x4(xb, brow);
#pragma unroll
        for (int u = 0; u < 2; u++) {
#pragma unroll
            for (int ks = 0; ks < 8; ks++) {
                u32 a[4];
                mq_frag<BITS>(a, w[u], ks);
                // The fragment is W[n][k]; the product wants W[k][n]: each 8×8 quarter transposed, the
                // off-diagonal two swapped.
                const u32 at[4] = {mq_trans(a[0]), mq_trans(a[2]), mq_trans(a[1]), mq_trans(a[3])};
                mma_16816(d[ks], at, xb[2 * u], xb[2 * u + 1]);
            }
        }
    }
#pragma unroll
    for (int k = 0; k < MQ_ROWS; k++) {
        s1[k] = warp_sum(s1[k]);
        s2[k] = warp_sum(s2[k]);
    }
    if (lane == 0)
#pragma unroll
        for (int k = 0; k < MQ_ROWS; k++) sums[warp][0][k] = s1[k], sums[warp][1][k] = s2[k];
#pragma unroll
    for (int ks = 0; ks < 8; ks++)
#pragma unroll
        for (int i = 0; i < 4; i++) red[warp][ks][i][lane] = d[ks][i];
    __syncthreads();
    // Warp w finishes k-steps 2w and 2w + 1 (8 k-steps over MQ_WARPS = 4 warps). d[ks]: (lora column ks·16 + group,
    // part 2·quad), (…, 2·quad + 1), (column + 8, 2·quad), (…, 2·quad + 1); the lower 8 columns of a k-step read
    // as 128 + q, the upper as BASE_HI + q.
    constexpr float BASE_HI = mma_base_hi<BITS>();
    float a1 = 0.f, a2 = 0.f;
    for (int v = 0; v < MQ_WARPS; v++) a1 += sums[v][0][quad], a2 += sums[v][1][quad];
    const int row = r0 + quad;
    if (row >= n_rows) return;
    float* outp = q_lat + ((size_t)row * heads + h) * lora;
#pragma unroll
    for (int j = 0; j < 8 / MQ_WARPS; j++) {
        const int ks = warp * (8 / MQ_WARPS) + j;
        float e[4] = {0.f, 0.f, 0.f, 0.f};
        for (int v = 0; v < MQ_WARPS; v++)
#pragma unroll
            for (int i = 0; i < 4; i++) e[i] += red[v][ks][i][lane];
        const int k = c * MQ_CHUNK + ks * 16 + group;
        outp[perm ? perm[k] : k] = e[0] + e[1] - 128.f * a1 - a2;
        outp[perm ? perm[k + 8] : k + 8] = e[2] + e[3] - BASE_HI * a1 - a2;
    }
}

#define MLA_Q(BITS)                                                                                               \
    extern "C" __global__ void __launch_bounds__(32 * MQ_OUT_WARPS) mla_out_w##BITS(                                  \
        const float* o_part, const float* ml_part, int splits, const uint2* words, const __half* zeros,           \
        const __half* scales, const int* perm, int n_out, int group_size, int row0, int n_rows, int heads,        \
        int nope, int vdim, int lora, __nv_bfloat16* out) {                                                       \
        mla_out_w<BITS>(o_part, ml_part, splits, words, zeros, scales, perm, n_out, group_size, row0, n_rows,     \
                        heads, nope, vdim, lora, out);                                                            \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(32 * MQ_WARPS) mla_absorb_q_w##BITS(                             \
        const __nv_bfloat16* q, const uint2* words, const __half* zeros, const __half* scales, const int* perm,  \
        int n_out, int group_size, int row0, int n_rows, int heads, int nope, int rope, int vdim, int lora,       \
        float* q_lat) {                                                                                           \
        mla_absorb_q_w<BITS>(q, words, zeros, scales, perm, n_out, group_size, row0, n_rows, heads, nope, rope,   \
                             vdim, lora, q_lat);                                                                  \
    }
MLA_Q(2)
MLA_Q(3)
MLA_Q(4)
