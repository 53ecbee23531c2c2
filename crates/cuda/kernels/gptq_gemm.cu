// Tensor-core GEMM over GPTQ weights for prefill (MODEL_SPEC §4): y[M, N] = x[M, K] · Wᵀ with
// W[n, k] = s[g, n] · (q[k, n] − z[g, n]), g = k / group_size. qweight u32 [K·BITS/32, N] (32 rows of a column packed
// little-endian into BITS words), zeros and scales f16 [G, N] (zeros already after the v1/v2 convention). x is bf16
// with rows 16-byte aligned and already gathered through the act-order permutation (gptq_gemm_gather_bf16).
//
// Block: 256 threads (8 warps, 2 along M × 4 along N) own a BM × 128 tile of y (BM = 64 or 128) and walk K in steps
// of 32 rows, one GPTQ pack block. Per step a 4-stage cp.async pipeline brings x [BM, 32], the packed words
// [BITS, 128] and the group's scales and zeros into shared memory; the block dequantizes the step one ahead into
// a bf16 tile Bs [128 n][32 k] (double-buffered, so one barrier per step) while the warps multiply the current one
// with mma.sync m16n8k16 (bf16 in, f32 accumulate), fragments loaded with ldmatrix. Rows of 40 bf16 (80 bytes) make
// every 8-row ldmatrix phase hit distinct banks. Each weight is rounded to bf16 once: (q − z)·s is exact in f32
// (a 9-bit integer times an f16), then rounded to nearest even, so the test can rebuild the same bf16 weights.
// The second kernel below (gptq_mma_gemm_*) is the same GEMM over weights repacked for tensor cores (src/mma.rs).
#include "common.cuh"
#include "mma_pack.cuh"

#define GEMM_BN 128
#define GEMM_BK 32
#define GEMM_STAGES 4
#define GEMM_LD (GEMM_BK + 8)  // bf16 per shared row of x and of the dequantized tile
#define GEMM_THREADS 256

// Shared-memory plan (bytes); gemm.rs computes the same total.
template <int BITS, int BM>
struct GemmSmem {
    static constexpr int A = BM * GEMM_LD * 2;        // x tile [BM][GEMM_LD] bf16
    static constexpr int W = BITS * GEMM_BN * 4;      // packed words [BITS][BN] u32
    static constexpr int SZ = 2 * GEMM_BN * 2;        // scales [BN], zeros [BN] f16
    static constexpr int STAGE = A + W + SZ;
    static constexpr int B = GEMM_BN * GEMM_LD * 2;   // dequantized tile [BN][GEMM_LD] bf16
    static constexpr int TOTAL = GEMM_STAGES * STAGE + 2 * B;
};


// Four 8×8 b16 matrices; lanes 8j..8j+7 give the row addresses of matrix j, register j receives it.
__device__ __forceinline__ void ldmatrix_x4(u32 r[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

// c += a · b for one 16×8×16 step (PTX ISA "mma.m16n8k16": a rows g, g+8 × k 2t.., 2t+8..; b k 2t.., 2t+8.. × n g;
// c rows g, g+8 × n 2t, 2t+1, with g = lane / 4, t = lane % 4).
__device__ __forceinline__ void mma_bf16(float c[4], const u32 a[4], const u32 b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void store2(float* p, float a, float b) { *reinterpret_cast<float2*>(p) = make_float2(a, b); }
__device__ __forceinline__ void store2(__nv_bfloat16* p, float a, float b) {
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
}

// A warp's accumulators (RB m16 tiles × NB n8 tiles of mma.m16n8k16, from row m0 + r0 and column n0 + c0) into
// y [M, N], rows and columns past the matrix skipped (columns come in pairs: N is even).
template <int RB, int NB, typename OUT>
__device__ __forceinline__ void store_tile(OUT* y, const float (&acc)[RB][NB][4], int m0, int n0, int M, int N,
                                           int r0, int c0, int lane) {
#pragma unroll
    for (int i = 0; i < RB; i++) {
        const int row = m0 + r0 + i * 16 + (lane >> 2);
#pragma unroll
        for (int j = 0; j < NB; j++) {
            const int col = n0 + c0 + j * 8 + (lane & 3) * 2;
            if (col >= N) continue;
            if (row < M) store2(y + (size_t)row * N + col, acc[i][j][0], acc[i][j][1]);
            if (row + 8 < M) store2(y + (size_t)(row + 8) * N + col, acc[i][j][2], acc[i][j][3]);
        }
    }
}

struct GemmArgs {
    const __nv_bfloat16* x;  // [M, K]
    const u32* qweight;      // [K*BITS/32, N]
    const __half* zeros;     // [G, N], or null: a symmetric weight, every zero 2^(BITS−1) (gptq_mma.cu)
    const __half* scales;    // [G, N]
    int M, N, K, group_size, m0, n0;
};

// Issues the cp.async copies of K step `kt` into stage buffer `st`. Rows past M and columns past N read nothing
// and land as zeros (N is a multiple of 8, so a 16-byte chunk is wholly inside or outside).
template <int BITS, int BM>
__device__ __forceinline__ void load_stage(unsigned char* st, const GemmArgs& a, int kt) {
    typedef GemmSmem<BITS, BM> S;
    __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(st);
    u32* ws = reinterpret_cast<u32*>(st + S::A);
    __half* ss = reinterpret_cast<__half*>(st + S::A + S::W);
    const int k0 = kt * GEMM_BK;
    for (int c = threadIdx.x; c < BM * 4; c += GEMM_THREADS) {  // 4 chunks of 8 bf16 per row
        const int r = c >> 2, ch = c & 3, m = a.m0 + r;
        const __nv_bfloat16* src = a.x + (size_t)min(m, a.M - 1) * a.K + k0 + ch * 8;
        cp_async16(xs + r * GEMM_LD + ch * 8, src, m < a.M ? 16 : 0);
    }
    for (int c = threadIdx.x; c < BITS * (GEMM_BN / 4); c += GEMM_THREADS) {  // 4 words per chunk
        const int r = c / (GEMM_BN / 4), ch = c % (GEMM_BN / 4), n = a.n0 + ch * 4;
        const u32* src = a.qweight + (size_t)(kt * BITS + r) * a.N + min(n, a.N - 4);
        cp_async16(ws + r * GEMM_BN + ch * 4, src, n < a.N ? 16 : 0);
    }
    if (threadIdx.x < 2 * (GEMM_BN / 8)) {  // 8 halves per chunk: scales, then zeros
        const int which = threadIdx.x / (GEMM_BN / 8), ch = threadIdx.x % (GEMM_BN / 8), n = a.n0 + ch * 8;
        // A symmetric weight has no zeros: they land as 0 and dequant_stage adds the constant.
        const bool read = n < a.N && (!which || a.zeros != nullptr);
        const __half* src = (which && a.zeros ? a.zeros : a.scales) + (size_t)(k0 / a.group_size) * a.N + min(n, a.N - 8);
        cp_async16(ss + which * GEMM_BN + ch * 8, src, read ? 16 : 0);
    }
}

// Packed words of stage `st` → bf16 Bs[n][k]. A task is 8 consecutive k of one column: 8·BITS bits of the column's
// 32·BITS-bit block starting at bit 8·c·BITS (3 bits: the 96-bit little-endian block of MODEL_SPEC §4.1), written as
// one 16-byte store. c is uniform across a warp and n follows the lane, so the word reads are conflict-free.
// z_all: a symmetric weight's zero 2^(BITS−1) (its zeros in shared memory are 0), else 0.
template <int BITS, int BM>
__device__ __forceinline__ void dequant_stage(const unsigned char* st, __nv_bfloat16* bs, float z_all) {
    typedef GemmSmem<BITS, BM> S;
    const u32* ws = reinterpret_cast<const u32*>(st + S::A);
    const __half* ss = reinterpret_cast<const __half*>(st + S::A + S::W);
    const __half* zs = ss + GEMM_BN;
    constexpr u32 MASK = (1u << BITS) - 1u;
#pragma unroll
    for (int i = 0; i < GEMM_BN * 4 / GEMM_THREADS; i++) {
        const int t = threadIdx.x + i * GEMM_THREADS;
        const int n = t % GEMM_BN, c = t / GEMM_BN;
        const int bit = 8 * c * BITS, lo = bit >> 5;
        u64 v = ws[lo * GEMM_BN + n];
        if (lo + 1 < BITS) v |= (u64)ws[(lo + 1) * GEMM_BN + n] << 32;
        v >>= (bit & 31);
        const float s = __half2float(ss[n]);
        // 2^23 + q as a float's bits is exact, so (that − (2^23 + z)) = q − z exactly, then one exact multiply.
        const float zf = 8388608.f + (__half2float(zs[n]) + z_all);
        u32 out[4];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const u32 q0 = (u32)(v >> (2 * j * BITS)) & MASK, q1 = (u32)(v >> ((2 * j + 1) * BITS)) & MASK;
            const float w0 = (__uint_as_float(0x4B000000u | q0) - zf) * s;
            const float w1 = (__uint_as_float(0x4B000000u | q1) - zf) * s;
            __nv_bfloat162 h = __floats2bfloat162_rn(w0, w1);
            out[j] = *reinterpret_cast<u32*>(&h);
        }
        *reinterpret_cast<uint4*>(bs + n * GEMM_LD + c * 8) = make_uint4(out[0], out[1], out[2], out[3]);
    }
}

// One 32-deep step of the warp's (16·WM) × 32 tile: WM m16 tiles × 4 n8 tiles × 2 k16 steps.
template <int WM>
__device__ __forceinline__ void mma_stage(const __nv_bfloat16* xs, const __nv_bfloat16* bs, float acc[WM][4][4],
                                          int wm, int wn, int lane) {
#pragma unroll
    for (int kk = 0; kk < GEMM_BK; kk += 16) {
        u32 a[WM][4], b[4][2];
#pragma unroll
        for (int i = 0; i < WM; i++) {
            // Matrices: rows 0-7 / 8-15 × k 0-7, then × k 8-15: a's four registers in order.
            const int row = wm * 16 * WM + i * 16 + (lane & 15);
            ldmatrix_x4(a[i], xs + row * GEMM_LD + kk + (lane >> 4) * 8);
        }
#pragma unroll
        for (int j = 0; j < 2; j++) {
            // Matrices: n 0-7 × k 0-7, n 0-7 × k 8-15, n 8-15 × k 0-7, n 8-15 × k 8-15: two n8 tiles' b registers.
            u32 r[4];
            const int nrow = wn * 32 + j * 16 + ((lane >> 4) << 3) + (lane & 7);
            ldmatrix_x4(r, bs + nrow * GEMM_LD + kk + ((lane >> 3) & 1) * 8);
            b[2 * j][0] = r[0];
            b[2 * j][1] = r[1];
            b[2 * j + 1][0] = r[2];
            b[2 * j + 1][1] = r[3];
        }
#pragma unroll
        for (int i = 0; i < WM; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) mma_bf16(acc[i][j], a[i], b[j]);
    }
}

// grid: (ceil(N / 128), ceil(M / BM)); block: 256 threads; dynamic shared memory GemmSmem<BITS, BM>::TOTAL.
template <int BITS, int WM, typename OUT>
__device__ void gptq_gemm(GemmArgs a, OUT* __restrict__ y) {
    constexpr int BM = 32 * WM;
    typedef GemmSmem<BITS, BM> S;
    extern __shared__ __align__(16) unsigned char smem[];
    u32 have;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(have));
    if (have < (u32)S::TOTAL) __trap();  // the launch asked for too little: fail loudly, never overrun
    // The two dequantized tiles, S::B / 2 bf16 each (indexed arithmetically: an array of pointers would live
    // in local memory).
    __nv_bfloat16* const bs = reinterpret_cast<__nv_bfloat16*>(smem + GEMM_STAGES * S::STAGE);
    constexpr int B_ELEMS = S::B / 2;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int wm = warp >> 2, wn = warp & 3;
    a.m0 = blockIdx.y * BM;
    a.n0 = blockIdx.x * GEMM_BN;
    const int steps = a.K / GEMM_BK;

    // Prologue: stages 0..STAGES-2 in flight (empty groups past the end keep the group count uniform), step 0
    // dequantized.
#pragma unroll
    for (int s = 0; s < GEMM_STAGES - 1; s++) {
        if (s < steps) load_stage<BITS, BM>(smem + s * S::STAGE, a, s);
        cp_async_commit();
    }
    cp_async_wait<GEMM_STAGES - 2>();
    __syncthreads();
    const float z_all = shared_zero<BITS>(a.zeros);
    dequant_stage<BITS, BM>(smem, bs, z_all);

    float acc[WM][4][4];
#pragma unroll
    for (int i = 0; i < WM; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] = 0.f;

    for (int kt = 0; kt < steps; kt++) {
        // Step kt+1 has landed (own copies: wait; everyone's: the barrier). The barrier also means every warp is
        // done with step kt-1: its x stage and Bs[(kt+1)&1] may be overwritten now.
        cp_async_wait<GEMM_STAGES - 3>();
        __syncthreads();
        const int next = kt + GEMM_STAGES - 1;
        if (next < steps) load_stage<BITS, BM>(smem + (next % GEMM_STAGES) * S::STAGE, a, next);
        cp_async_commit();
        if (kt + 1 < steps)
            dequant_stage<BITS, BM>(smem + ((kt + 1) % GEMM_STAGES) * S::STAGE, bs + ((kt + 1) & 1) * B_ELEMS, z_all);
        mma_stage<WM>(reinterpret_cast<const __nv_bfloat16*>(smem + (kt % GEMM_STAGES) * S::STAGE),
                      bs + (kt & 1) * B_ELEMS, acc, wm, wn, lane);
    }
    cp_async_wait<0>();

    store_tile<WM, 4>(y, acc, a.m0, a.n0, a.M, a.N, wm * 16 * WM, wn * 32, lane);
}

#define GEMM_T(BITS, BM, OUT, NAME)                                                                              \
    extern "C" __global__ void __launch_bounds__(GEMM_THREADS) gptq_gemm_w##BITS##_m##BM##_##NAME(              \
        const __nv_bfloat16* x, const u32* qweight, const __half* zeros, const __half* scales, OUT* y, int M,     \
        int N, int K, int group_size) {                                                                          \
        gptq_gemm<BITS, BM / 32, OUT>(GemmArgs{x, qweight, zeros, scales, M, N, K, group_size, 0, 0}, y);        \
    }
#define GEMM(BITS)                                                                                               \
    GEMM_T(BITS, 64, __nv_bfloat16, bf16)                                                                        \
    GEMM_T(BITS, 64, float, f32) GEMM_T(BITS, 128, __nv_bfloat16, bf16) GEMM_T(BITS, 128, float, f32)
GEMM(2)
GEMM(3)
GEMM(4)
GEMM(8)

// out[m, k] = x[m, perm[k]] (or x[m, k] without perm): act-order gather, or a copy to aligned scratch.
extern "C" __global__ void gptq_gemm_gather_bf16(const __nv_bfloat16* __restrict__ x,  // [M, K]
                                                 const int* __restrict__ perm,          // [K] or null
                                                 __nv_bfloat16* __restrict__ out,       // [M, K]
                                                 int M, int K) {
    const size_t total = (size_t)M * K;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t m = i / K;
        const int k = (int)(i % K);
        out[i] = x[m * K + (perm ? perm[k] : k)];
    }
}

// ---- The same GEMM over the tensor-core (Mma) layout of src/mma.rs -------------------------------------------
//
// Weights uploaded for tensor cores are stored as mma fragments: per 16-column tile t and 128-row chunk c of K, lane
// L owns 2·BITS words ([tile][chunk][BITS][lane] uint2) holding 32 pairs; pair p (k-step p / 4, reg p % 4) is
// W[n][k], W[n][k + 1] with n = 16t + L/4 + 8·(reg & 1), k = 128c + 16·(p / 4) + 2·(L % 4) + 8·(reg >> 1). For
// y = x · Wᵀ with W as mma's B operand ("col": k × n), B of m16n8k16 is b0 = (k 2·(L%4).., n L/4), b1 = (k + 8, n):
// regs 0 and 2 of a k-step are the B fragment of the tile's columns 0..7, regs 1 and 3 that of columns 8..15. So a
// warp dequantizes its B fragments in registers from its own words (no shared bf16 weight tile) and reuses each for
// all its m16 tiles of x.
//
// Exactness: a field as bf16 is 128 + q (exact up to 7 bits), and one bf16x2 fma subtracts 128 + z exactly (both are
// integers below 256), leaving q − z exact; x · (q − z) is exact in f32, summed over one chunk on the tensor cores,
// then scaled once per chunk in f32 (the group's scale, f16, is exact in f32): acc += s · Σ x · (q − z). The only
// errors are the accumulation order and, for bf16 y, the final rounding.
//
// Block: 256 threads (8 warps, 2 along M × 4 along N) own a BM × 128 tile of y and walk K in half chunks of 64 rows
// (one block of BITS words per lane); a 4-stage cp.async pipeline brings x [BM, 64], the tiles' words of the half
// and the chunk's scales and zeros into shared memory. A warp covers 16·WM rows × 2 tiles: it reads its lanes' words
// with 8-byte loads (256 contiguous bytes per warp), x with ldmatrix.
#define MG_BN 128
#define MG_BK 64
#define MG_STAGES 4
#define MG_LD (MG_BK + 8)  // bf16 per shared row of x: 144 bytes, so 8-row ldmatrix phases hit distinct banks
#define MG_THREADS 256

// Shared-memory plan (bytes); gemm.rs computes the same total. A half chunk's BITS words per lane lie in
// ROWS uint2 rows of the [BITS][lane] uint2 layout (2 bits: one row; 3 and 4 bits: two, 3 bits overlapping).
template <int BITS, int BM>
struct MgSmem {
    static constexpr int ROWS = BITS == 2 ? 1 : 2;
    static constexpr int A = BM * MG_LD * 2;            // x tile [BM][MG_LD] bf16
    static constexpr int W = (MG_BN / 16) * ROWS * 256;  // words [tile][ROWS][lane] uint2
    static constexpr int SZ = 2 * MG_BN * 2;            // scales [BN], zeros [BN] f16
    static constexpr int STAGE = A + W + SZ;
    static constexpr int TOTAL = MG_STAGES * STAGE;
};

struct MgArgs {
    const __nv_bfloat16* x;  // [M, K]
    const uint2* words;      // [N/16][K/128][BITS][32]
    const __half* zeros;     // [G, N], or null: a symmetric weight, every zero 2^(BITS−1) (gptq_mma.cu)
    const __half* scales;    // [G, N]
    int M, N, K, group_size, m0, n0;
    const int* rows;  // x's row of each of the M rows (the grouped experts' pairs), or null: rows m0.. of x
};

// The cp.async copies of a half chunk into a stage buffer. Each thread's share is the same every step: x rows
// tid / 8 + 32·i at 16-byte column tid % 8, one 16-byte run of the tiles' words, for 32 threads one run of 8
// scales or zeros. Their sources and destinations are worked out once (a step adds its K offset): the division and
// 64-bit index arithmetic per copy and step was most of the loop's instructions (tools/sass.py). Rows past M and
// tiles past N read nothing and land as zeros (N is a multiple of 16: a tile, and a 16-byte run of 8 scales, is
// wholly inside or outside).
template <int BITS, int BM, bool GATHER>
struct MgLoader {
    typedef MgSmem<BITS, BM> S;
    static constexpr int XI = BM * (MG_BK / 8) / MG_THREADS;  // x copies per thread: BM / 32
    static constexpr int PER_TILE = S::ROWS * 16;             // 16-byte copies of a tile's half chunk
    const __nv_bfloat16* x;                                   // row tid / 8 (clamped), column (tid % 8) · 8
    const __nv_bfloat16* xg[GATHER ? XI : 1];                 // GATHER: rows tid / 8 + 32·i, through a.rows
    u32 x_rows;                                               // bit i: row tid / 8 + 32·i is inside M
    size_t x_step;                                            // 32 rows of x, in elements
    const uint2* w;                                           // this thread's run at chunk 0, lo 0
    bool w_ok;
    const __half* sz;                                         // scales or zeros at group 0, this thread's run
    bool sz_ok;
    unsigned long long group_magic;                           // ⌈2^32 / chunks per group⌉: group = chunk · it >> 32
    int n;
    float z_all;  // a symmetric weight's zero (its zeros land as 0), else 0

    __device__ __forceinline__ MgLoader(const MgArgs& a) {
        const int tid = threadIdx.x, r0 = tid / (MG_BK / 8), ch = tid % (MG_BK / 8);
        x = a.x + (size_t)min(a.m0 + r0, a.M - 1) * a.K + ch * 8;
        x_step = (size_t)32 * a.K;
        if constexpr (GATHER) {
#pragma unroll
            for (int i = 0; i < XI; i++) xg[i] = a.x + (size_t)a.rows[min(a.m0 + r0 + 32 * i, a.M - 1)] * a.K + ch * 8;
        }
        x_rows = 0;
#pragma unroll
        for (int i = 0; i < XI; i++) x_rows |= (u32)(a.m0 + r0 + 32 * i < a.M) << i;
        const int chunks = a.K / 128, tiles = a.N / 16, t0 = a.n0 / 16;
        const int ti = tid / PER_TILE, r = (tid / 16) % S::ROWS, q = tid % 16;
        const int t = min(t0 + ti, tiles - 1);
        w = a.words + ((size_t)t * chunks * BITS + r) * 32 + 2 * q;
        w_ok = tid < (MG_BN / 16) * PER_TILE && t0 + ti < tiles;
        const int which = tid / (MG_BN / 8), c = tid % (MG_BN / 8), col = a.n0 + c * 8;
        // A symmetric weight's zeros are not read: they land as 0 and z_all is added.
        const bool sym = a.zeros == nullptr;
        sz = (which && !sym ? a.zeros : a.scales) + min(col, a.N - 8);
        sz_ok = tid < 2 * (MG_BN / 8) && col < a.N && !(which && sym);
        z_all = shared_zero<BITS>(a.zeros);
        // Mma layouts have groups of whole 128-row chunks (mma::eligible). Exact for chunk · chunks per group < 2^32.
        const unsigned long long per = a.group_size / 128;
        group_magic = ((1ull << 32) + per - 1) / per;
        n = a.N;
    }

    // Half chunk kt into stage buffer st.
    __device__ __forceinline__ void load(unsigned char* st, int kt) const {
        const int tid = threadIdx.x, k0 = kt * MG_BK, chunk = kt >> 1, lo = ((kt & 1) * BITS) >> 1;
        static_assert(MG_BK * 2 == 128, "two steps make a 128-row chunk");
        __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(st) + (tid / (MG_BK / 8)) * MG_LD + (tid % (MG_BK / 8)) * 8;
        // A row past M reads row M − 1 with size 0 (zeros); the clamped source stays inside x.
        const __nv_bfloat16* src = x + k0;
#pragma unroll
        for (int i = 0; i < XI; i++) {
            const bool in = (x_rows >> i) & 1;
            const __nv_bfloat16* from = GATHER ? xg[GATHER ? i : 0] + k0 : src + i * x_step;
            cp_async16(xs + i * 32 * MG_LD, in ? from : src, in ? 16 : 0);
        }
        if (tid < (MG_BN / 16) * PER_TILE) {
            uint2* ws = reinterpret_cast<uint2*>(st + S::A);
            const int ti = tid / PER_TILE, r = (tid / 16) % S::ROWS, q = tid % 16;
            cp_async16(ws + (ti * S::ROWS + r) * 32 + 2 * q, w + ((size_t)chunk * BITS + lo) * 32, w_ok ? 16 : 0);
        }
        if (tid < 2 * (MG_BN / 8)) {
            __half* ss = reinterpret_cast<__half*>(st + S::A + S::W);
            // The group by a multiply: a division here was ~20 of the loop's instructions every step (tools/sass.py).
            const int group = (int)(((unsigned long long)chunk * group_magic) >> 32);
            cp_async16(ss + tid * 8, sz + (size_t)group * n, sz_ok ? 16 : 0);
        }
    }
};

// The warp's products over one half chunk (H: which half) into the chunk sums `cacc`; after the second half the
// chunk is scaled into `acc` and `cacc` cleared. The warp holds RB m16 row blocks from row r0 and TW 16-column
// tiles from tile t0 (2·TW n8 blocks); BM is the block's rows (the shared x tile's height).
template <int BITS, int BM, int RB, int TW, int H>
__device__ __forceinline__ void mg_mma_stage(const unsigned char* st, float acc[RB][2 * TW][4],
                                             float cacc[RB][2 * TW][4], int r0, int t0, int lane, float z_all) {
    typedef MgSmem<BITS, BM> S;
    const __nv_bfloat16* xs = reinterpret_cast<const __nv_bfloat16*>(st);
    const uint2* ws = reinterpret_cast<const uint2*>(st + S::A);
    const __half* ss = reinterpret_cast<const __half*>(st + S::A + S::W);
    const __half* zs = ss + MG_BN;
    const int g = lane >> 2, t = lane & 3;
    // The lane's words of its tiles, and −(base + z) as bf16x2 for its B columns (g and g + 8 of each tile)
    // and the lower and upper 8 rows of K of a step (mma_pack.cuh).
    u32 w[TW][2 * S::ROWS], nz[TW][2][2];
#pragma unroll
    for (int ti = 0; ti < TW; ti++) {
        const int tile = t0 + ti;
#pragma unroll
        for (int r = 0; r < S::ROWS; r++) {
            const uint2 v = ws[(tile * S::ROWS + r) * 32 + lane];
            w[ti][2 * r] = v.x;
            w[ti][2 * r + 1] = v.y;
        }
#pragma unroll
        for (int hh = 0; hh < 2; hh++) {
            const float z = __half2float(zs[tile * 16 + g + 8 * hh]) + z_all;
            const __nv_bfloat162 lo = __float2bfloat162_rn(-(128.f + z));
            const __nv_bfloat162 hi = __float2bfloat162_rn(-(mma_base_hi<BITS>() + z));
            nz[ti][hh][0] = *reinterpret_cast<const u32*>(&lo);
            nz[ti][hh][1] = *reinterpret_cast<const u32*>(&hi);
        }
    }
    // Words 3..5 of a 3-bit lane start at the high half of its second uint2.
    constexpr int OFF = (H * BITS) & 1;
#pragma unroll
    for (int ks = 0; ks < MG_BK / 16; ks++) {
        u32 a[RB][4], b[2 * TW][2];
#pragma unroll
        for (int i = 0; i < RB; i++) {
            const int row = r0 + i * 16 + (lane & 15);
            ldmatrix_x4(a[i], xs + row * MG_LD + ks * 16 + (lane >> 4) * 8);
        }
#pragma unroll
        for (int ti = 0; ti < TW; ti++) {
            u32 p[4];
#pragma unroll
            for (int r = 0; r < 4; r++)
                p[r] = bf16x2_add(mma_pair<BITS>(w[ti] + OFF, ks * 4 + r), nz[ti][r & 1][r >> 1]);
            b[2 * ti][0] = p[0];
            b[2 * ti][1] = p[2];
            b[2 * ti + 1][0] = p[1];
            b[2 * ti + 1][1] = p[3];
        }
#pragma unroll
        for (int i = 0; i < RB; i++)
#pragma unroll
            for (int j = 0; j < 2 * TW; j++) mma_bf16(cacc[i][j], a[i], b[j]);
    }
    if (H == 1) {
#pragma unroll
        for (int j = 0; j < 2 * TW; j++) {
            const int col = t0 * 16 + j * 8 + 2 * t;
            const float s0 = __half2float(ss[col]), s1 = __half2float(ss[col + 1]);
#pragma unroll
            for (int i = 0; i < RB; i++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    acc[i][j][e] += (e & 1 ? s1 : s0) * cacc[i][j][e];
                    cacc[i][j][e] = 0.f;
                }
            }
        }
    }
}

// One pipeline step: half chunk kt has landed (own copies: wait; everyone's: the barrier, which also means every
// warp is done with step kt − 1, whose stage the copies for step kt + STAGES − 1 now overwrite).
template <int BITS, int BM, int RB, int TW, int H, bool GATHER>
__device__ __forceinline__ void mg_step(unsigned char* smem, const MgLoader<BITS, BM, GATHER>& ld, int kt, int steps,
                                        float acc[RB][2 * TW][4], float cacc[RB][2 * TW][4], int r0, int t0,
                                        int lane) {
    typedef MgSmem<BITS, BM> S;
    cp_async_wait<MG_STAGES - 2>();
    __syncthreads();
    const int next = kt + MG_STAGES - 1;
    static_assert((MG_STAGES & (MG_STAGES - 1)) == 0, "stage indices by a mask");
    if (next < steps) ld.load(smem + (next & (MG_STAGES - 1)) * S::STAGE, next);
    cp_async_commit();
    mg_mma_stage<BITS, BM, RB, TW, H>(smem + (kt & (MG_STAGES - 1)) * S::STAGE, acc, cacc, r0, t0, lane, ld.z_all);
}

// One block: columns a.n0.. and rows a.m0.. of y, over K rows [split·k_split, (split + 1)·k_split) (k_split a
// multiple of 128); block: 256 threads; dynamic shared memory MgSmem<BITS, BM>::TOTAL.
// TW: 16-column tiles per warp. With 2 the 8 warps are 2 along M × 4 along N; with 1, 8 along N, each warp all
// BM rows: every tile's words are unpacked by one warp instead of two (the unpacking was ~40% of the m64 loop,
// done twice), for twice the x fragment loads.
template <int BITS, int BM, int TW, typename OUT, bool GATHER>
__device__ void gptq_mma_gemm(const MgArgs& a, int split, int k_split, OUT* __restrict__ y) {
    constexpr int WN = (MG_BN / 16) / TW, WM = (MG_THREADS / 32) / WN, RB = BM / (16 * WM);
    static_assert(WN * WM == MG_THREADS / 32 && RB * 16 * WM == BM, "the warps tile the block");
    typedef MgSmem<BITS, BM> S;
    extern __shared__ __align__(16) unsigned char smem[];
    u32 have;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(have));
    if (have < (u32)S::TOTAL) __trap();  // the launch asked for too little: fail loudly, never overrun
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int r0 = (warp / WN) * 16 * RB, t0 = (warp % WN) * TW;
    // Steps (half chunks) of this split: both ends even, K being whole chunks.
    const int first = split * (k_split / MG_BK), stop = min(a.K, (split + 1) * k_split) / MG_BK;
    const MgLoader<BITS, BM, GATHER> ld(a);

#pragma unroll
    for (int s = 0; s < MG_STAGES - 1; s++) {
        if (first + s < stop) ld.load(smem + ((first + s) & (MG_STAGES - 1)) * S::STAGE, first + s);
        cp_async_commit();
    }

    float acc[RB][2 * TW][4], cacc[RB][2 * TW][4];
#pragma unroll
    for (int i = 0; i < RB; i++)
#pragma unroll
        for (int j = 0; j < 2 * TW; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] = cacc[i][j][e] = 0.f;

    for (int kt = first; kt < stop; kt += 2) {
        mg_step<BITS, BM, RB, TW, 0, GATHER>(smem, ld, kt, stop, acc, cacc, r0, t0, lane);
        mg_step<BITS, BM, RB, TW, 1, GATHER>(smem, ld, kt + 1, stop, acc, cacc, r0, t0, lane);
    }
    cp_async_wait<0>();

    store_tile<RB, 2 * TW>(y, acc, a.m0, a.n0, a.M, a.N, r0, t0 * 16, lane);
}

// Tiles per warp: 1 for 32- and 64-row blocks (2 or 4 m16 blocks a warp), 2 for 128 (1 would hold 8 m16 blocks'
// sums a warp). 32 rows: decode batches of 17..32 rows, whose m64 tile spent half its mma and ldmatrix on padding.
#define MG_TW(BM) ((BM) == 128 ? 2 : 1)
// grid (ceil(N / 128), ceil(M / BM), splits): split z writes y + z·M·N — with one split the output, with more
// f32 partial sums that gptq_reduce adds in split order.
#define MMA_GEMM_T(BITS, BM, OUT, NAME)                                                                          \
    extern "C" __global__ void __launch_bounds__(MG_THREADS) gptq_mma_gemm_w##BITS##_m##BM##_##NAME(            \
        const __nv_bfloat16* x, const uint2* words, const __half* zeros, const __half* scales, OUT* y, int M,    \
        int N, int K, int group_size, int k_split) {                                                             \
        const MgArgs a{x, words, zeros, scales, M, N, K, group_size, (int)blockIdx.y * (BM),                    \
                       (int)blockIdx.x * MG_BN, nullptr};                                                        \
        gptq_mma_gemm<BITS, BM, MG_TW(BM), OUT, false>(a, blockIdx.z, k_split, y + (size_t)blockIdx.z * M * N); \
    }
// The prefill's routed experts, all in one launch per projection (experts_prefill.rs): blockIdx.y is a tile of
// up to 64 pairs (row, expert) of one expert, tiles[3·t..] = (expert, first pair, pairs); blockIdx.z the matrix
// (gate, up: tables at z·n_experts + expert, output y0 or y1). The gate/up launch reads x's row pair_x[p] for
// pair p (`_gather`); the down launch reads row p of h (one row per pair). y [pairs, N]: pair p's row p.
template <int BITS, typename OUT, bool GATHER>
__device__ __forceinline__ void mma_gemm_grouped(const __nv_bfloat16* x, const int* pair_x, const int* tiles,
                                                 const u64* qw, const u64* zr, const u64* sc, int n_experts,
                                                 OUT* y0, OUT* y1, int N, int K, int group_size) {
    const int t = blockIdx.y, e = blockIdx.z * n_experts + tiles[3 * t], p0 = tiles[3 * t + 1];
    const MgArgs a{GATHER ? x : x + (size_t)p0 * K, (const uint2*)qw[e], (const __half*)zr[e], (const __half*)sc[e],
                   tiles[3 * t + 2], N, K, group_size, 0, (int)blockIdx.x * MG_BN, GATHER ? pair_x + p0 : nullptr};
    gptq_mma_gemm<BITS, 64, MG_TW(64), OUT, GATHER>(a, 0, K, (blockIdx.z == 0 ? y0 : y1) + (size_t)p0 * N);
}
#define MMA_GROUPED_T(BITS, OUT, NAME, GATHER)                                                                   \
    extern "C" __global__ void __launch_bounds__(MG_THREADS) gptq_mma_gemm_grouped_w##BITS##_##NAME(            \
        const __nv_bfloat16* x, const int* pair_x, const int* tiles, const u64* qw, const u64* zr,              \
        const u64* sc, int n_experts, OUT* y0, OUT* y1, int N, int K, int group_size) {                         \
        mma_gemm_grouped<BITS, OUT, GATHER>(x, pair_x, tiles, qw, zr, sc, n_experts, y0, y1, N, K, group_size); \
    }
#define MMA_GEMM(BITS)                                                                                           \
    MMA_GEMM_T(BITS, 32, __nv_bfloat16, bf16) MMA_GEMM_T(BITS, 32, float, f32)                                   \
    MMA_GEMM_T(BITS, 64, __nv_bfloat16, bf16)                                                                    \
    MMA_GEMM_T(BITS, 64, float, f32) MMA_GEMM_T(BITS, 128, __nv_bfloat16, bf16) MMA_GEMM_T(BITS, 128, float, f32) \
    MMA_GROUPED_T(BITS, __nv_bfloat16, gather_bf16, true) MMA_GROUPED_T(BITS, float, f32, false)
MMA_GEMM(2)
MMA_GEMM(3)
MMA_GEMM(4)
