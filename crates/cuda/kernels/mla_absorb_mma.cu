// MLA's two absorptions on tensor cores for bf16 activations and steps of more than one row (attention.cu keeps
// the single row and f32): mla_out (the flash kernel's key shares merged, then through W_UV) and mla_absorb_q
// (q_nope through W_UK). Their f32 inputs enter as bf16 value + remainder (mma.cuh's split_bf16x2), as in the flash
// kernel (flash_mma.cu).
#include "common.cuh"
#include "attention.cuh"
#include "mma.cuh"

// mla_out on tensor cores for bf16 activations and more than one row (attention.cu's mla_out keeps the single
// row and f32): out[row0 + r, h, i] = Σ_l W_UV[h, i, l] · o_lat[r, h, l], with o_lat the row's key shares merged
// as mla_out merges them. Block (h, b) of grid (heads, ⌈n_rows / 64⌉), 8 warps: head h, rows b·64.. . The
// fragment's 16 rows are 16 outputs i (warp w: i = 16·w.., vdim ≤ 128 per pass of the grid's z), its 8 columns
// 8 rows of the block, its K 8 latent values twice — o_lat rounded to bf16, then what the rounding left — against
// the same 8 values of W_UV (the A registers repeat), so the f32 o_lat enters to ~2^-16 as in the flash kernel.
// The latent runs in chunks of OM_LC: the merged o_lat of the block's rows staged in shared memory (both halves),
// W_UV's fragments read from global memory (a head's 128 KB stay in L2 for its row blocks).
// Shared: [2][64][OM_LC + 8] bf16 (rows 4 mod 8 words apart: conflict-free fragment loads), weights [64][16] f32.
#define OM_ROWS 64
#define OM_LC 64
#define OM_LS (OM_LC + 8)

extern "C" __global__ void __launch_bounds__(256) mla_out_mma_bf16(
    const float* o_part,          // [n_rows, heads, splits, lora]
    const float* ml_part,         // [n_rows, heads, splits, 2]
    int splits,
    const __nv_bfloat16* kv_b,    // [heads, nope + vdim, lora]
    int row0, int n_rows, int heads, int nope, int vdim, int lora,
    __nv_bfloat16* out) {         // [rows, heads, vdim]
    __shared__ __align__(16) __nv_bfloat16 ol[2][OM_ROWS][OM_LS];
    __shared__ float wts[OM_ROWS][MLA_MAX_SPLITS];
    const int h = blockIdx.x, r0 = blockIdx.y * OM_ROWS, i0 = (blockIdx.z * 8 + threadIdx.x / 32) * 16;
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, group = lane >> 2, quad = lane & 3;
    // Warp w weighs rows w, w + 8, ...: lane s split s.
    for (int k = warp; k < OM_ROWS; k += 8) {
        const float wt = split_weight(ml_part, r0 + k, n_rows, heads, h, splits, lane);
        if (lane < MLA_MAX_SPLITS) wts[k][lane] = wt;
    }
    // W_UV rows i0 + group and + 8 of this warp (zero past vdim).
    const __nv_bfloat16* w = kv_b + (size_t)h * (nope + vdim) * lora + (size_t)nope * lora;
    const int ia = i0 + group, ib = ia + 8;
    float acc[OM_ROWS / 8][4] = {};
    constexpr int PER = OM_ROWS * OM_LC / 4 / 256;  // float4 entries of o_lat a thread merges per chunk
    static_assert(PER * 256 * 4 == OM_ROWS * OM_LC, "whole passes of the block's threads");
    for (int l0 = 0; l0 < lora; l0 += OM_LC) {
        // This chunk's W_UV fragments, requested first: they do not wait for the barrier or the merge.
        u32 a[OM_LC / 8][2];
#pragma unroll
        for (int ks = 0; ks < OM_LC / 8; ks++) {
            const int l = l0 + ks * 8 + quad * 2;
            a[ks][0] = ia < vdim && l < lora ? *(const u32*)(w + (size_t)ia * lora + l) : 0u;
            a[ks][1] = ib < vdim && l < lora ? *(const u32*)(w + (size_t)ib * lora + l) : 0u;
        }
        __syncthreads();  // the weights are set; everyone is done with the last chunk
        // Stage o_lat[rows, l0 .. l0 + OM_LC) merged, as bf16 and remainder: a thread's PER entries of four values
        // merged a split at a time, so their PER loads are in flight together (an entry at a time, each load
        // waited a round trip).
        const float* op[PER];
        float4 v[PER];
#pragma unroll
        for (int j = 0; j < PER; j++) {
            const int e = threadIdx.x + j * 256, k = e / (OM_LC / 4), c = (e % (OM_LC / 4)) * 4;
            const bool live = r0 + k < n_rows && l0 + c < lora;
            op[j] = live ? o_part + ((size_t)(r0 + k) * heads + h) * splits * lora + l0 + c : nullptr;
            v[j] = make_float4(0.f, 0.f, 0.f, 0.f);
        }
        for (int s = 0; s < splits; s++) {
            float4 p[PER];
#pragma unroll
            for (int j = 0; j < PER; j++)
                p[j] = op[j] ? *(const float4*)(op[j] + (size_t)s * lora) : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
            for (int j = 0; j < PER; j++) {
                const float ws = wts[(threadIdx.x + j * 256) / (OM_LC / 4)][s];
                v[j].x += ws * p[j].x, v[j].y += ws * p[j].y, v[j].z += ws * p[j].z, v[j].w += ws * p[j].w;
            }
        }
#pragma unroll
        for (int j = 0; j < PER; j++) {
            const int e = threadIdx.x + j * 256, k = e / (OM_LC / 4), c = (e % (OM_LC / 4)) * 4;
            u32 hi0, lo0, hi1, lo1;
            split_bf16x2(v[j].x, v[j].y, hi0, lo0);
            split_bf16x2(v[j].z, v[j].w, hi1, lo1);
            *(uint2*)&ol[0][k][c] = make_uint2(hi0, hi1);
            *(uint2*)&ol[1][k][c] = make_uint2(lo0, lo1);
        }
        __syncthreads();
#pragma unroll
        for (int ks = 0; ks < OM_LC / 8; ks++) {
            const u32 af[4] = {a[ks][0], a[ks][1], a[ks][0], a[ks][1]};
#pragma unroll
            for (int nt = 0; nt < OM_ROWS / 8; nt++) {
                const int c = ks * 8 + quad * 2;
                const u32 b0 = *(const u32*)&ol[0][nt * 8 + group][c], b1 = *(const u32*)&ol[1][nt * 8 + group][c];
                asm volatile(
                    "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                    "{%0,%1,%2,%3};\n"
                    : "+f"(acc[nt][0]), "+f"(acc[nt][1]), "+f"(acc[nt][2]), "+f"(acc[nt][3])
                    : "r"(af[0]), "r"(af[1]), "r"(af[2]), "r"(af[3]), "r"(b0), "r"(b1));
            }
        }
    }
    // acc[nt]: outputs ia (0, 1) and ib (2, 3) of rows nt·8 + 2·quad, + 1.
#pragma unroll
    for (int nt = 0; nt < OM_ROWS / 8; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int i = e < 2 ? ia : ib, k = r0 + nt * 8 + quad * 2 + (e & 1);
            if (i < vdim && k < n_rows) out[((size_t)(row0 + k) * heads + h) * vdim + i] = __float2bfloat16(acc[nt][e]);
        }
}

// mla_absorb_q on tensor cores for bf16 activations and more than one row: q_lat[r, h, l] = Σ_d q_nope[row0 + r,
// h, d] · W_UK[h, d, l], f32 out (bf16 products are exact in the f32 accumulators, as on the scalar path). Block
// (h, b, z) of grid (heads, ⌈n_rows / 64⌉, ⌈lora / 128⌉), 8 warps: head h, rows b·64.., latent columns z·128..;
// warp w the 16 rows (w % 4)·16.. and 64 columns (w / 4)·64.. . The block's q rows and W_UK columns are staged in
// shared memory ([64][nope + 8] and [nope][136] bf16: rows 4 mod 8 words apart, conflict-free ldmatrix), the
// fragments come by ldmatrix (W_UK's transposed: it is stored k-major). nope % 16 == 0 (attention.rs checks).
#define AQ_ROWS 64
#define AQ_COLS 128
#define AQ_WS (AQ_COLS + 8)

extern "C" __global__ void __launch_bounds__(256) mla_absorb_q_mma_bf16(
    const __nv_bfloat16* q,       // [rows, heads, nope + rope]
    const __nv_bfloat16* kv_b,    // [heads, nope + vdim, lora]
    int row0, int n_rows, int heads, int nope, int rope, int vdim, int lora,
    float* q_lat) {               // [n_rows, heads, lora]
    extern __shared__ __align__(16) unsigned char aq_smem[];
    const int QS = nope + 8;
    __nv_bfloat16* qs = (__nv_bfloat16*)aq_smem;  // [AQ_ROWS][QS]
    __nv_bfloat16* ws = qs + AQ_ROWS * QS;        // [nope][AQ_WS]
    const int h = blockIdx.x, r0 = blockIdx.y * AQ_ROWS, l0 = blockIdx.z * AQ_COLS;
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, group = lane >> 2, quad = lane & 3;
    // Stage 8 values a copy: the rows' q_nope (zeros past n_rows), W_UK's columns (zeros past lora).
    const int qv = nope / 8;
    for (int e = threadIdx.x; e < AQ_ROWS * qv; e += blockDim.x) {
        const int k = e / qv, d = (e % qv) * 8;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (r0 + k < n_rows) v = *(const uint4*)(q + ((size_t)(row0 + r0 + k) * heads + h) * (nope + rope) + d);
        *(uint4*)(qs + k * QS + d) = v;
    }
    const __nv_bfloat16* w = kv_b + (size_t)h * (nope + vdim) * lora;
    for (int e = threadIdx.x; e < nope * (AQ_COLS / 8); e += blockDim.x) {
        const int d = e / (AQ_COLS / 8), c = (e % (AQ_COLS / 8)) * 8;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (l0 + c < lora) v = *(const uint4*)(w + (size_t)d * lora + l0 + c);
        *(uint4*)(ws + d * AQ_WS + c) = v;
    }
    __syncthreads();
    const int wm = warp & 3, wn = warp >> 2;
    float acc[8][4] = {};
    // ldmatrix rows: A's four matrices are (rows 0..7 | 8..15) × (k 0..7 | 8..15), B's (k 0..7 | 8..15) × (tile j
    // | j + 1): lane L the row L % 8 of matrix L / 8.
    const int lr = (lane & 7) + ((lane >> 3) & 1) * 8;
    const __nv_bfloat16* arow = qs + (wm * 16 + lr) * QS + (lane >> 4) * 8;
    const __nv_bfloat16* brow = ws + lr * AQ_WS + wn * 64 + (lane >> 4) * 8;
    for (int ks = 0; ks < nope / 16; ks++) {
        u32 a[4];
        ldmatrix_x4(a, arow + ks * 16);
#pragma unroll
        for (int j = 0; j < 8; j += 2) {
            u32 b[4];
            ldmatrix_x4_trans(b, brow + ks * 16 * AQ_WS + j * 8);
#pragma unroll
            for (int u = 0; u < 2; u++)
                asm volatile(
                    "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                    "{%0,%1,%2,%3};\n"
                    : "+f"(acc[j + u][0]), "+f"(acc[j + u][1]), "+f"(acc[j + u][2]), "+f"(acc[j + u][3])
                    : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[2 * u]), "r"(b[2 * u + 1]));
        }
    }
    // acc[j]: rows wm·16 + group (0, 1) and + 8 (2, 3), columns j·8 + 2·quad, + 1 of the warp's 64.
#pragma unroll
    for (int j = 0; j < 8; j++) {
        const int l = l0 + wn * 64 + j * 8 + quad * 2;
        if (l >= lora) continue;
#pragma unroll
        for (int hh = 0; hh < 2; hh++) {
            const int k = r0 + wm * 16 + group + 8 * hh;
            if (k < n_rows)
                *(float2*)(q_lat + ((size_t)k * heads + h) * lora + l) = make_float2(acc[j][2 * hh], acc[j][2 * hh + 1]);
        }
    }
}
