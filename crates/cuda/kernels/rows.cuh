// Row-wise building blocks of ops.cu and route.cu (after common.cuh): loads and stores of activations of type T
// (float or bf16) widened to f32 and rounded once on store, the norms' piece layout, and the dense GEMV.
#pragma once

__device__ __forceinline__ float ld(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float ld(const __nv_bfloat16* p, size_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void st(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void st(__nv_bfloat16* p, size_t i, float v) { p[i] = __float2bfloat16(v); }
// 8 values (16-byte aligned) copied as they are; 8 f32 stored as `st` stores each (round to nearest even).
template <typename T>
__device__ __forceinline__ void copy8(T* d, const T* s) {
#pragma unroll
    for (int i = 0; i < (int)sizeof(T) / 2; i++) ((uint4*)d)[i] = ((const uint4*)s)[i];
}
__device__ __forceinline__ void save8(float* p, const float* v) {
    ((float4*)p)[0] = make_float4(v[0], v[1], v[2], v[3]), ((float4*)p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ void save8(__nv_bfloat16* p, const float* v) {
    u32 w[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const __nv_bfloat162 t = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
        w[i] = *(const u32*)&t;
    }
    *(uint4*)p = make_uint4(w[0], w[1], w[2], w[3]);
}
// v as a T holds it (what a store then a load gives back).
__device__ __forceinline__ float rnd(const float*, float v) { return v; }
__device__ __forceinline__ float rnd(const __nv_bfloat16*, float v) { return __bfloat162float(__float2bfloat16(v)); }

// Pieces of 8 values a thread of a 512-thread row block holds (8,192 values): rms_norm_row's layout, which
// add_norm_route (route.cu) repeats so that its sums are the norm's, bit for bit.
#define NORM_PIECES 2

// For a 128-thread block playing rms_norm_row's 512 (gptq_rope.cu's normed query, gptq_mma.cu's input norm), once
// every played warp's sum of squares is in scratch[0, 16): their total as block_reduce adds them (the first warp's
// butterflies over 16 lanes), and the row's 1 / rms as rms_norm_row takes it. Every thread calls it; scratch[16]
// holds the total until the caller's next barrier.
__device__ __forceinline__ float played_inv_rms(float* scratch, int cols, float eps) {
    __syncthreads();
    if (threadIdx.x < 32) {
        const int lane = threadIdx.x;
        const float u = warp_sum(lane < 16 ? scratch[lane] : 0.f);
        if (lane == 0) scratch[16] = u;
    }
    __syncthreads();
    return rsqrtf(scratch[16] / cols + eps);
}

// y[r, o] = Σ_i x[r, i] · w[o, i] for a dense weight [out, in] in the activation dtype: a block of 8 warps per
// output o and DENSE_ROWS rows (blockIdx.y), the warps splitting the row (a single warp per output leaves a decode
// row's few hundred warps waiting on memory), so the weight row is read from memory once per DENSE_ROWS rows and
// from L1 for the others; f32 sums, output in O (f32 for the router's logits, T otherwise). The blocks run output
// by output, a row block at a time, so a weight larger than L2 is read once per row block: the bf16 lm_head
// (1.85 GB) at 32 decode rows twice. (Blocks of 4 rows took the router at 32 rows from 22.9 to 21.8 µs a layer,
// session 17, and would read the head 8 times.) src/gemv.rs `dense_grid` mirrors this.
#define DENSE_ROWS 16
// Rounds of 16-byte loads (8 values a thread) the dense kernels issue before using any: a 7168-wide bf16 row at 256
// threads is 3.5 rounds, one batch (src/gemv.rs `dense_kernel` mirrors this; add_norm_route's sums use it too).
#define DENSE_BATCH 4
// A batch of dense_gemv's rounds into its two sums (alternate values, in order): also add_norm_route's, whose
// logits are dense_gemv's bit for bit.
template <int BATCH>
__device__ __forceinline__ void dense_batch_sums(const float (&xv)[BATCH][8], const float (&wv)[BATCH][8], float& a0,
                                                 float& a1) {
#pragma unroll
    for (int u = 0; u < BATCH; u++) {
#pragma unroll
        for (int j = 0; j < 8; j += 2) {
            a0 += xv[u][j] * wv[u][j];
            a1 += xv[u][j + 1] * wv[u][j + 1];
        }
    }
}

// Rows of a block whose x loads dense_gemv_rows issues together (121 registers at 4, sm_90 and sm_86).
#ifndef DENSE_GROUP
#define DENSE_GROUP 4
#endif

// The block's rows r0.. (nr of them) of output o: each row's 8 warps' sums added in warp order (both dense kernels).
template <typename O>
__device__ __forceinline__ void dense_store(const float (&part)[DENSE_ROWS][8], O* y, int r0, int nr, int out, int o) {
    __syncthreads();
    if (threadIdx.x < nr) {
        float v = 0.f;
        for (int g = 0; g < 8; g++) v += part[threadIdx.x][g];
        st(y, (size_t)(r0 + threadIdx.x) * out + o, v);
    }
}

template <typename T, typename O>
__device__ void dense_gemv(const T* x, const T* w, O* y, int rows, int in, int out) {
    __shared__ float part[DENSE_ROWS][8];
    const int o = blockIdx.x, warp = threadIdx.x / 32, lane = threadIdx.x & 31;
    const int r0 = blockIdx.y * DENSE_ROWS, nr = min(DENSE_ROWS, rows - r0);
    const size_t wr = (size_t)o * in;
    for (int k = 0; k < nr; k++) {
        const size_t xr = (size_t)(r0 + k) * in;
        float a0 = 0.f, a1 = 0.f;
        if (in % 8 == 0) {
            // 16-byte loads of 8 values (rows start 16-byte aligned), DENSE_BATCH rounds' loads issued before any
            // is used; rounds past the row add 0·w (w read again from the row's start: finite weights, as the
            // CPU's sum assumes too). (A plain unrolled loop tests the bound between one round's loads and the
            // next and left one round in flight: tools/sass.py.)
            const int round = blockDim.x * 8;
            for (int i0 = threadIdx.x * 8; i0 < in; i0 += DENSE_BATCH * round) {
                float xv[DENSE_BATCH][8], wv[DENSE_BATCH][8];
#pragma unroll
                for (int u = 0; u < DENSE_BATCH; u++) {
                    // Past the row: x read as zeros (predicated loads: no branch between the batch's loads).
                    const bool in_row = i0 + u * round < in;
                    const int i = in_row ? i0 + u * round : 0;
                    load8(x + xr + i, xv[u]);
                    load8(w + wr + i, wv[u]);
#pragma unroll
                    for (int j = 0; j < 8; j++) xv[u][j] = in_row ? xv[u][j] : 0.f;
                }
                dense_batch_sums<DENSE_BATCH>(xv, wv, a0, a1);
            }
        } else {
            int i = threadIdx.x;
#pragma unroll 4
            for (; i + 256 < in; i += 512) {
                a0 += ld(x, xr + i) * ld(w, wr + i);
                a1 += ld(x, xr + i + 256) * ld(w, wr + i + 256);
            }
            if (i < in) a0 += ld(x, xr + i) * ld(w, wr + i);
        }
        const float s = warp_sum(a0 + a1);
        if (lane == 0) part[k][warp] = s;
    }
    dense_store(part, y, r0, nr, out, o);
}

// dense_gemv for more than one row whose `in` is 8·k ≤ DENSE_BATCH · 8 · 256 (src/gemv.rs `dense_kernel`):
// grid and output as dense_gemv's; the kernels are compiled for 2 blocks an SM, so ptxas keeps every x load of a
// group in flight (at 72 registers, left to itself, it kept ~2 of a group's 8: tools/sass.py --inflight).
template <typename T, typename O>
__device__ void dense_gemv_rows(const T* x, const T* w, O* y, int rows, int in, int out) {
    __shared__ float part[DENSE_ROWS][8];
    const int o = blockIdx.x, warp = threadIdx.x / 32, lane = threadIdx.x & 31;
    const int r0 = blockIdx.y * DENSE_ROWS, nr = min(DENSE_ROWS, rows - r0);
    const size_t wr = (size_t)o * in;
    const int round = blockDim.x * 8;
    // The output's weights loaded once for all the block's rows, and DENSE_GROUP rows' x loads issued before any
    // is used (dense_gemv takes the rows one after another, each waiting out its own round trip: 16 a block, most
    // of the router's 23 us a layer at 32 rows, session 29). The same sums as dense_gemv's, bit for bit: a round
    // past the row adds x·0 here (its w zeroed once) where it adds 0·w there, an exact zero either way that a sum
    // starting at +0 cannot tell apart. x stays as loaded until every load of the group is issued.
    const int i0 = threadIdx.x * 8;
    float wv[DENSE_BATCH][8];
#pragma unroll
    for (int u = 0; u < DENSE_BATCH; u++) {
        const bool in_row = i0 + u * round < in;
        load8(w + wr + (in_row ? i0 + u * round : 0), wv[u]);
#pragma unroll
        for (int j = 0; j < 8; j++) wv[u][j] = in_row ? wv[u][j] : 0.f;
    }
    constexpr int V = sizeof(T) / 2;
    const T* xb = x + (size_t)r0 * in;
    int off[DENSE_BATCH];
#pragma unroll
    for (int u = 0; u < DENSE_BATCH; u++) off[u] = i0 + u * round < in ? i0 + u * round : 0;
    for (int k0 = 0; k0 < nr; k0 += DENSE_GROUP) {
        uint4 raw[DENSE_GROUP][DENSE_BATCH][V];
#pragma unroll
        for (int g = 0; g < DENSE_GROUP; g++) {
            const T* xr = xb + (size_t)min(k0 + g, nr - 1) * in;  // past nr: a row again, unused
#pragma unroll
            for (int u = 0; u < DENSE_BATCH; u++) {
#pragma unroll
                for (int q = 0; q < V; q++) raw[g][u][q] = ((const uint4*)(xr + off[u]))[q];
            }
        }
#pragma unroll
        for (int g = 0; g < DENSE_GROUP; g++) {
            float xv[DENSE_BATCH][8];
#pragma unroll
            for (int u = 0; u < DENSE_BATCH; u++) load8((const T*)raw[g][u], xv[u]);
            float a0 = 0.f, a1 = 0.f;
            dense_batch_sums<DENSE_BATCH>(xv, wv, a0, a1);
            const float s = warp_sum(a0 + a1);
            if (lane == 0 && k0 + g < nr) part[k0 + g][warp] = s;
        }
    }
    dense_store(part, y, r0, nr, out, o);
}
