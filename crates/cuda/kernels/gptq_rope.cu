// A decode step's query projection with its RoPE in the store (src/qrope.rs): the tensor-core GEMV of ≤ 8 rows
// (mma_gemv.cuh) whose warp, holding a block's 64 finished columns, cuts them into two parts — attention's q and
// the indexer's query, both from the fused q_b + wq_b matrix — and ropes the columns each part's heads rotate, as
// `rope_cols2` (ops.cu) does after a plain GEMV: every value rounded to bf16 first (as the GEMV stores it), then the
// pair rotated in f32 by rope_pair's angle (sin and cos in f64, rounded to f32) and rounded again. The same bits as
// the two launches, with one launch, one pass over q and its round trip fewer.
//
// The host (src/qrope.rs) takes it only where a block's 64 columns lie in one head of one part: parts and heads on
// multiples of 64 columns, 8, 16 or 32 pairs a head (DeepSeek's 64 rope dims: 32) rotating from a multiple of
// twice that, one split of K in the split-K layout, and no row order of K (the checkpoint's trivial g_idx). The
// block's threads then take its 64 columns' sums from the warps' partial sums in shared memory (block_sum, as the
// plain GEMV's SumStore adds them), a thread a value and its pair's other value.
//
// Kept small on purpose: a first version ropes in warp 0's registers (16 values a lane, shuffles between lanes,
// every case unrolled, both row-order paths: 12K instructions) and was slower than the two launches — its stalls
// were mostly instruction fetches (ncu, session 26: "no instruction" 60% of the samples outside the loop).
#include "common.cuh"
#include "mma_pack.cuh"
#include "experts.cuh"
#include "mma.cuh"
#include "mma_gemv.cuh"
#include "rows.cuh"

#define ROPE_MAX_HALF 32  // pairs a head rotates, at most (the angles' table: 8 rows of them, 2 KB)

// The rows' angles (cos, sin) of each rotated pair, [row][pair]: worked out by the block while it streams.
__shared__ float2 rope_cs[8 * ROPE_MAX_HALF];

// The two parts' shapes: part p's columns [start, start + heads·dim) of the projection go to y[p] [rows, heads·dim];
// columns [offset, offset + 2·half) of each head rotate, interleaved or half split.
struct RopeStore {
    __nv_bfloat16* y[2];
    int start[2], heads[2], dim[2], offset[2], interleaved[2];
    const int* pos;         // [rows]: each row's position
    const float* inv_freq;  // [half]
    int half;               // pairs a head rotates: 8, 16 or 32
    // The normed kernels' x (fill_x): rows of the fused projection, `stride` values apart, whose first K columns
    // (q_a) are RMS-normed by `norm` here as mla_prep's block norms them; K the GEMV's.
    const __nv_bfloat16* raw;
    int stride, K;
    const float* norm;
    float eps;

    // Every thread, before the ring's first copies: rows [0, nrows) of q_a as they are, by cp.async in a group of
    // their own, into xs [K / 128][nrows][MMA_XS] bf16 (the ring's x layout, chunk after chunk), so that every
    // row's load is in flight at once and beside the first chunks' weights.
    __device__ __forceinline__ void stage_x(unsigned char* xs, int nrows) const {
        const int pieces = K / 8;
        for (int i = threadIdx.x; i < nrows * pieces; i += blockDim.x) {
            const int r = i / pieces, c = i % pieces * 8;
            cp_async16_at(smem_addr(xs + ((size_t)(c / MMA_CHUNK * nrows + r) * MMA_XS + c % MMA_CHUNK) * 2),
                          raw + (size_t)r * stride + c);
        }
        cp_async_commit();
    }

    // Every thread, once stage_x's rows have landed (mma_gemv_run waits, then syncs): each row RMS-normed in place,
    // bit for bit as rms_norm_row's 512 threads norm it (mla_prep's block 0). The block's 128 threads play the 512:
    // thread t is t and t + 128 (the pieces of 8 at t·8 and (t + 128)·8; K ≤ 2048, so threads 256-511 and every
    // second piece hold zeros), its warp w the 512's warps w and w + 4, with the same lanes, so the butterflies and
    // then the 16 warps' sum run in the same order.
    __device__ __forceinline__ void fill_x(unsigned char* xs, int nrows) const {
        static_assert(MMA_WARPS == 4, "128 threads play rms_norm_row's 512");
        __shared__ float scratch[32];
        const int t = threadIdx.x, lane = t & 31, warp = t / 32;
        float g[2][8];
        __nv_bfloat16* at[2];  // this thread's pieces of row 0; a row further is MMA_XS on
#pragma unroll
        for (int k = 0; k < 2; k++) {
            const int c = (t + k * 128) * 8;
#pragma unroll
            for (int i = 0; i < 8; i++) g[k][i] = 0.f;
            if (c < K) load8(norm + c, g[k]);
            at[k] = (__nv_bfloat16*)xs + (size_t)(c / MMA_CHUNK * nrows) * MMA_XS + c % MMA_CHUNK;
        }
        for (int r = 0; r < nrows; r++) {
            float v[2][8];
#pragma unroll
            for (int k = 0; k < 2; k++) {
#pragma unroll
                for (int i = 0; i < 8; i++) v[k][i] = 0.f;
                if ((t + k * 128) * 8 < K) load8(at[k] + r * MMA_XS, v[k]);
            }
            float ss[2] = {0.f, 0.f};
#pragma unroll
            for (int k = 0; k < 2; k++)
#pragma unroll
                for (int i = 0; i < 8; i++) ss[k] += v[k][i] * v[k][i];
#pragma unroll
            for (int k = 0; k < 2; k++) {
                const float w = warp_sum(ss[k]);
                if (lane == 0) scratch[warp + 4 * k] = w;
            }
            if (t < 8) scratch[8 + t] = 0.f;  // the 512's warps 8-15: no pieces
            const float inv = played_inv_rms(scratch, K, eps);
#pragma unroll
            for (int k = 0; k < 2; k++) {
                if ((t + k * 128) * 8 < K) {
                    float o[8];
#pragma unroll
                    for (int i = 0; i < 8; i++) o[i] = g[k][i] * (v[k][i] * inv);
                    save8(at[k] + r * MMA_XS, o);
                }
            }
            __syncthreads();  // scratch again for the next row
        }
    }

    // Every thread, before the ring's first copies: its entries' position and frequency, copied into their own
    // slots of the table by cp.async (they join the first chunk's group, so no load waits here or in the loop).
    __device__ __forceinline__ void prepare(int nrows) const {
        for (int u = threadIdx.x; u < nrows * half; u += blockDim.x) {
            float* slot = (float*)&rope_cs[u / half * ROPE_MAX_HALF + u % half];
            cp_async4(slot, pos + u / half);
            cp_async4(slot + 1, inv_freq + u % half);
        }
    }

    // Every thread, after the loop: its entries' angles as rope_pair takes them (the angle in f32, sin and cos in
    // f64, rounded to f32), in the slots that held their inputs (each thread reads only what it copied).
    __device__ __forceinline__ void after_loop(int nrows) const {
        cp_async_wait<0>();
        for (int u = threadIdx.x; u < nrows * half; u += blockDim.x) {
            float2* slot = &rope_cs[u / half * ROPE_MAX_HALF + u % half];
            const float2 in = *slot;
            double s, c;
            sincos((double)((float)__float_as_int(in.x) * in.y), &s, &c);
            *slot = make_float2((float)c, (float)s);
        }
    }

    // Every thread: the block's 64 columns from the warps' sums red [MMA_WARPS][16][32] (the 8-row kernel's 4
    // tiles), a thread a (row, column), each added in warp order and rounded to bf16 as the plain GEMV stores it;
    // a rotated column's pair partner is added the same way, and the pair rotated as rope_pair rotates it.
    __device__ __forceinline__ void block(const float* red, int tile0, int tiles, int nrows) const {
        const int n0 = tile0 * 16;
        // The block's part, its fields picked by selects (indexed by p, the struct would live in local memory),
        // and its head's rotated columns as the block's columns: [rot, rot + 2·half), d0 the block's first column
        // in its head.
        const bool p = n0 >= start[1];
        const int dim_p = p ? dim[1] : dim[0], c0 = n0 - (p ? start[1] : start[0]), d0 = c0 % dim_p;
        const int rot = (p ? offset[1] : offset[0]) - d0;
        const bool il = (p ? interleaved[1] : interleaved[0]) != 0;
        __nv_bfloat16* out = (p ? y[1] : y[0]) + c0;  // head c0 / dim_p, its column d0
        const size_t row_stride = (size_t)(p ? heads[1] : heads[0]) * dim_p;
        // Row b's column c as the plain GEMV stores it.
        auto sum = [&](int b, int c) { return __bfloat162float(__float2bfloat16(block_sum<8>(red, b, c))); };
#pragma unroll 1
        for (int o = threadIdx.x; o < nrows * 64; o += blockDim.x) {
            const int b = o >> 6, c = o & 63, j = c - rot;  // j: of the rotated columns
            if (c >= tiles * 16) continue;
            float x = sum(b, c);
            if (j >= 0 && j < 2 * half) {
                const float other = sum(b, il ? c ^ 1 : c ^ half);
                const float2 a = rope_cs[b * ROPE_MAX_HALF + (il ? j >> 1 : j & (half - 1))];
                x = rotate_one(x, other, a.x, a.y, il ? (j & 1) == 0 : j < half);
            }
            out[b * row_stride + c] = __float2bfloat16(x);
        }
    }
};

// rows ≤ 8 of x [rows, K] through the repacked weight (N columns: both parts), one split of K, no row order:
// grid blocks of 64 columns from block0 (⌈N / 64⌉ in all: one launch, or one a part), 128 threads. `_sym`: a
// symmetric weight's kernel (null zeros; mma_gemv.cuh SYM), which the host picks for one.
#define ROPE_K(BITS, SYMNAME, SYM)                                                                               \
    extern "C" __global__ void MMA_BOUNDS(8) gptq_mma_gemv_rope_w##BITS##_b8##SYMNAME##_bf16(                   \
        const __nv_bfloat16* x, const uint2* words, const __half* zeros, const __half* scales, int B, int K,     \
        int N, int group_size, int stages, const int* pos, const float* inv_freq, int half, __nv_bfloat16* y1,   \
        int s1, int h1, int d1, int o1, int il1, __nv_bfloat16* y2, int s2, int h2, int d2, int o2, int il2,     \
        int block0) {                                                                                           \
        const RopeStore st{{y1, y2}, {s1, s2}, {h1, h2}, {d1, d2}, {o1, o2}, {il1, il2}, pos, inv_freq, half};   \
        const int row = threadIdx.x < B ? threadIdx.x : 0;                                                      \
        mma_gemv_run<BITS, 8, false, MMA_WARPS, SYM>(x, row, B, nullptr, words, zeros, scales, K, N, group_size, \
                                                     K, stages, block0 + blockIdx.x, blockIdx.y, st);        \
    }
// The same with q_a's RMSNorm in the block (RopeStore::fill_x): x the fused projection's rows (`stride` apart),
// its first K columns the GEMV's input, normed by `norm` and `eps` as mla_prep would norm them (K ≤ 2048, a
// multiple of 128, 16-byte aligned rows); dynamic shared memory the rings' and K / 128 · B · MMA_XS bf16 more.
#define ROPE_NORM_K(BITS, SYMNAME, SYM)                                                                          \
    extern "C" __global__ void MMA_BOUNDS(8) gptq_mma_gemv_rope_norm_w##BITS##_b8##SYMNAME##_bf16(              \
        const __nv_bfloat16* x, const uint2* words, const __half* zeros, const __half* scales, int B, int K,     \
        int N, int group_size, int stages, const int* pos, const float* inv_freq, int half, __nv_bfloat16* y1,   \
        int s1, int h1, int d1, int o1, int il1, __nv_bfloat16* y2, int s2, int h2, int d2, int o2, int il2,     \
        int block0, int stride, const float* norm, float eps) {                                                 \
        const RopeStore st{{y1, y2}, {s1, s2}, {h1, h2}, {d1, d2}, {o1, o2}, {il1, il2}, pos, inv_freq, half,    \
                           x,        stride,   K,        norm,     eps};                                       \
        const int row = threadIdx.x < B ? threadIdx.x : 0;                                                      \
        mma_gemv_run<BITS, 8, false, MMA_WARPS, SYM, false, true>(x, row, B, nullptr, words, zeros, scales, K, N, \
                                                                  group_size, K, stages, block0 + blockIdx.x,   \
                                                                  blockIdx.y, st);                              \
    }
#define ROPE_T(BITS) \
    ROPE_K(BITS, , false) ROPE_K(BITS, _sym, true) ROPE_NORM_K(BITS, , false) ROPE_NORM_K(BITS, _sym, true)
ROPE_T(2)
ROPE_T(3)
ROPE_T(4)
