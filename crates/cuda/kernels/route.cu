// noaux_tc group-limited routing on the device (route.cuh has the choice and its rounding), each expert's (row,
// slot) pairs for a grouped launch, and a decode row's router in one launch: its GEMV and the choice
// (router_route), with the residual add and norm before it too (add_norm_route).
#include "common.cuh"
#include "rows.cuh"
#include "route.cuh"

// A block per row (blockDim.x ≥ n_experts): logits [rows, n_experts], bias [n_experts] → experts [rows, top_k],
// weights [rows, top_k].
extern "C" __global__ void __launch_bounds__(ROUTE_MAX_EXPERTS)
    route_f32(const float* logits, const float* bias, u32* experts, float* weights, int n_experts, int n_group,
              int topk_group, int top_k, int norm_topk_prob, float scaling) {
    const size_t row = blockIdx.x;
    route_row(logits + row * n_experts, route_bias(bias, n_experts), experts + row * top_k, weights + row * top_k,
              n_experts, n_group, topk_group, top_k, norm_topk_prob, scaling);
}

// counts [n_experts]: how many of the n entries of experts [rows·top_k] chose each expert. One block per expert.
extern "C" __global__ void route_count_u32(const u32* experts, int n, u32* counts) {
    __shared__ u32 scratch[32];
    u32 c = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) c += experts[i] == blockIdx.x;
    c = __reduce_add_sync(0xffffffffu, c);
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x / 32] = c;
    __syncthreads();
    if (threadIdx.x == 0) {
        u32 total = 0;
        for (u32 w = 0; w < blockDim.x / 32; ++w) total += scratch[w];
        counts[blockIdx.x] = total;
    }
}

// From counts [n_experts]: offsets [n_experts + 1] (exclusive sums), active [n_experts] (the experts with pairs,
// ascending; the first n_active[0] are set) and pairs [n]: for each expert in turn, the flat indices
// row·top_k + slot of the entries that chose it, ascending. One block per expert; no atomics, so the layout is
// the same on every run.
extern "C" __global__ void route_place_u32(const u32* experts, int n, const u32* counts, int n_experts,
                                           u32* offsets, u32* active, u32* n_active, u32* pairs) {
    __shared__ u32 scratch[32];
    __shared__ u32 base;
    const u32 e = blockIdx.x, count = counts[e];
    if (threadIdx.x == 0) {
        u32 off = 0, slot = 0;
        for (u32 j = 0; j < e; ++j) {
            off += counts[j];
            slot += counts[j] > 0;
        }
        offsets[e] = off;
        if (count > 0) active[slot] = e;
        if (e + 1 == (u32)n_experts) {
            offsets[n_experts] = off + count;
            n_active[0] = slot + (count > 0);
        }
        base = off;
    }
    __syncthreads();
    u32 done = 0;
    for (int start = 0; start < n && done < count; start += blockDim.x) {
        const int i = start + threadIdx.x;
        const bool hit = i < n && experts[i] == e;
        u32 total;
        const u32 before = block_count_before(hit, &total, scratch);
        if (hit) pairs[base + done + before] = (u32)i;
        done += total;
    }
}

// The fused routers' scratch [3 · n_experts]: the logits, then (ROUTE_PRESCORE) each expert's score, then its
// choice (score + bias), each block its own expert's (route_score), which the last block reads (route_row_scored)
// instead of exponentiating every logit itself. EXPERIMENT, NOT yet run on a GPU (docs/PERF.md session 39): on with
// PIPEMOE_NVRTC_DEFINES=-DROUTE_PRESCORE=1; device_ops' router tests check it bit for bit.
#ifndef ROUTE_PRESCORE
#define ROUTE_PRESCORE 0
#endif
// The router of one row in one launch: dense_gemv's logits (a block an expert), then the block that finishes
// last (an arrival counter, back to 0 after) routes the row as route_f32 does — the same sums and route_row's
// arithmetic, so the same experts and weights, bit for bit. grid (n_experts), block ROUTE_MAX_EXPERTS.
template <typename T>
__device__ void router_route(const T* x, const T* w, float* scratch, int in, const float* bias, u32* experts,
                             float* weights, int n_experts, int n_group, int topk_group, int top_k, int norm,
                             float scaling, int* counter) {
    const int e = blockIdx.x;
    // With the row's loads, not after them: the block's expert's bias, or the thread's for route_row.
    const float b = ROUTE_PRESCORE ? bias[e] : route_bias(bias, n_experts);
    dense_gemv<T, float>(x, w, scratch, 1, in, n_experts);
    if (ROUTE_PRESCORE && threadIdx.x == 0) {
        // Thread 0 stored the block's logit (dense_store): its own store, read back.
        const float2 sc = route_score(scratch[e], b);
        scratch[n_experts + e] = sc.x;
        scratch[2 * n_experts + e] = sc.y;
    }
    if (!arrive_last(counter, gridDim.x)) return;
    if (ROUTE_PRESCORE)
        route_row_scored(scratch + n_experts, scratch + 2 * n_experts, experts, weights, n_experts, n_group,
                         topk_group, top_k, norm, scaling);
    else
        route_row(scratch, b, experts, weights, n_experts, n_group, topk_group, top_k, norm, scaling);
}

// The post-attention residual add and norm of one row with its router, in one launch (a block an expert, of
// NORM_ROUTE_THREADS: rms_norm_row's width): every block adds and norms the whole row as rms_norm_row does (the
// same sums, so the same bits), stores its share of the normed row (pieces of 8), and takes its expert's logit
// from the normed row in dense_gemv's order at 256 threads (the same bits as router_route), with ROUTE_PRESCORE its
// score and choice too (scratch as router_route's). The last block to arrive stores the new residual row (every block has read it
// by then) and routes the row as route_f32 does. So
// add_rms_norm then router_route, bit for bit, with one launch and one pass over the row fewer. cols % 8 == 0,
// cols ≤ 8 · NORM_ROUTE_THREADS · NORM_PIECES (one batch of dense_gemv's rounds too), 16-byte aligned rows
// (src/route.rs checks).
#define NORM_ROUTE_THREADS 512
template <typename T>
__device__ void add_norm_route(T* x, const T* add, const float* nw, float eps, T* y, const T* w, float* scratch,
                               int cols, const float* bias, u32* experts, float* weights, int n_experts, int n_group,
                               int topk_group, int top_k, int norm, float scaling, int* counter) {
    __shared__ float red[32];
    __shared__ float part[8];
    __shared__ __align__(16) T normed[8 * NORM_ROUTE_THREADS * NORM_PIECES];
    const int e = blockIdx.x, t = threadIdx.x, lane = t & 31, warp = t / 32;
    constexpr int BATCH = DENSE_BATCH, ROUND = 256 * 8;  // dense_gemv's batch of rounds, and a round at 256 threads
    // The expert's weights first, so that their loads overlap the row's, and the bias (router_route's).
    const float b = ROUTE_PRESCORE ? bias[e] : route_bias(bias, n_experts);
    float wv[BATCH][8];
    if (t < 256) {
#pragma unroll
        for (int u = 0; u < BATCH; u++) {
            const bool in_row = t * 8 + u * ROUND < cols;
            load8(w + (size_t)e * cols + (in_row ? t * 8 + u * ROUND : 0), wv[u]);
        }
    }
    // rms_norm_row's pieces, sums and roundings.
    float v[NORM_PIECES][8], g[NORM_PIECES][8], a[NORM_PIECES][8];
#pragma unroll
    for (int j = 0; j < NORM_PIECES; j++) {
        const int c = (t + j * NORM_ROUTE_THREADS) * 8;
#pragma unroll
        for (int i = 0; i < 8; i++) v[j][i] = g[j][i] = a[j][i] = 0.f;
        if (c < cols) {
            load8(x + c, v[j]);
            load8(nw + c, g[j]);
            load8(add + c, a[j]);
        }
    }
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < NORM_PIECES; j++) {
#pragma unroll
        for (int i = 0; i < 8; i++) v[j][i] = rnd(x, v[j][i] + a[j][i]);
#pragma unroll
        for (int i = 0; i < 8; i++) ss += v[j][i] * v[j][i];
    }
    const float inv = rsqrtf(block_sum(ss, red) / cols + eps);
    const int share = (cols / 8 + gridDim.x - 1) / gridDim.x;  // pieces of y this block stores
#pragma unroll
    for (int j = 0; j < NORM_PIECES; j++) {
        const int p = t + j * NORM_ROUTE_THREADS, c = p * 8;
        if (c < cols) {
            float o[8];
#pragma unroll
            for (int i = 0; i < 8; i++) o[i] = g[j][i] * (v[j][i] * inv);
            save8(normed + c, o);
            if (p / share == e) save8(y + c, o);
        }
    }
    __syncthreads();
    if (t < 256) {
        float xv[BATCH][8], a0 = 0.f, a1 = 0.f;
#pragma unroll
        for (int u = 0; u < BATCH; u++) {
            const bool in_row = t * 8 + u * ROUND < cols;
            load8(normed + (in_row ? t * 8 + u * ROUND : 0), xv[u]);
#pragma unroll
            for (int i = 0; i < 8; i++) xv[u][i] = in_row ? xv[u][i] : 0.f;
        }
        dense_batch_sums<BATCH>(xv, wv, a0, a1);
        const float s = warp_sum(a0 + a1);
        if (lane == 0) part[warp] = s;
    }
    __syncthreads();
    if (t == 0) {
        float l = 0.f;
        for (int k = 0; k < 8; k++) l += part[k];
        scratch[e] = l;
        if (ROUTE_PRESCORE) {
            const float2 sc = route_score(l, b);
            scratch[n_experts + e] = sc.x;
            scratch[2 * n_experts + e] = sc.y;
        }
    }
    if (!arrive_last(counter, gridDim.x)) return;
#pragma unroll
    for (int j = 0; j < NORM_PIECES; j++) {
        const int c = (t + j * NORM_ROUTE_THREADS) * 8;
        if (c < cols) save8(x + c, v[j]);
    }
    if (ROUTE_PRESCORE)
        route_row_scored(scratch + n_experts, scratch + 2 * n_experts, experts, weights, n_experts, n_group,
                         topk_group, top_k, norm, scaling);
    else
        route_row(scratch, b, experts, weights, n_experts, n_group, topk_group, top_k, norm, scaling);
}

#define ROUTERS(T, S)                                                                                              \
    extern "C" __global__ void __launch_bounds__(ROUTE_MAX_EXPERTS)                                                \
        router_route_##S(const T* x, const T* w, float* scratch, int in, const float* bias, u32* experts,          \
                         float* weights, int n_experts, int n_group, int topk_group, int top_k, int norm,          \
                         float scaling, int* counter) {                                                            \
        router_route<T>(x, w, scratch, in, bias, experts, weights, n_experts, n_group, topk_group, top_k, norm,    \
                        scaling, counter);                                                                         \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(NORM_ROUTE_THREADS)                                              \
        add_norm_route_##S(T* x, const T* add, const float* nw, float eps, T* y, const T* w, float* scratch,      \
                           int cols, const float* bias, u32* experts, float* weights, int n_experts, int n_group, \
                           int topk_group, int top_k, int norm, float scaling, int* counter) {                    \
        add_norm_route<T>(x, add, nw, eps, y, w, scratch, cols, bias, experts, weights, n_experts, n_group,        \
                          topk_group, top_k, norm, scaling, counter);                                              \
    }
ROUTERS(float, f32)
ROUTERS(__nv_bfloat16, bf16)
