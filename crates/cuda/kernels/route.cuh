// The MoE router's choice for one row (MODEL_SPEC §2.7), included by route.cu (route_f32: a block a row;
// router_route and add_norm_route: their last block). Bit-for-bit with the host's
// `pipemoe_model::routing::route_logits`: orders are Rust's f32::total_cmp (as an integer key) with ties to the
// lower index; exp is taken in f64 and rounded once to f32 (the host's glibc expf is correctly rounded but for rare
// inputs; fast math would make expf a several-ulp __expf), and divisions are __fdiv_rn (fast math makes `/`
// approximate). Sums run in the host's order. Differences left: a score one ulp off where glibc's expf is not
// correctly rounded; scores below 1.2e-38 (logits < -87) flushed to 0 by fast math's ftz.
// (After common.cuh.)
#pragma once

#define ROUTE_MAX_EXPERTS 256

// The thread's expert's router bias for route_row, 0 past the experts. The fused routers load it at their start,
// in every block beside the row's loads: the last block read it only once it had arrived, after a layer's weights
// had passed through L2, so a DRAM round trip in series (session 38's suspect for that block's tail).
__device__ __forceinline__ float route_bias(const float* bias, int n_experts) {
    return threadIdx.x < n_experts ? bias[threadIdx.x] : 0.f;
}

// route_row's shared memory: the row's scores and biased scores, its groups' keys, kept flags and the chosen
// experts' scores, slot by slot.
struct RouteScratch {
    float score[ROUTE_MAX_EXPERTS];
    float choice[ROUTE_MAX_EXPERTS];
    u32 group_key[ROUTE_MAX_EXPERTS];
    int kept[ROUTE_MAX_EXPERTS];
    float chosen[ROUTE_MAX_EXPERTS];
};

// An expert's score from its router logit and its choice (the score plus its correction bias), as the host's
// `route_logits` takes them.
__device__ __forceinline__ float2 route_score(float logit, float bias) {
    const float ex = (float)exp(-(double)logit);
    const float sc = __fdiv_rn(1.f, 1.f + ex);
    return make_float2(sc, sc + bias);
}

// The choice of one row (route_row, route_row_scored) once every expert's score and choice are in `s`: the first
// warp alone (the block's other threads return).
__device__ void route_pick(RouteScratch& s, u32* experts, float* weights, int n_experts, int n_group, int topk_group,
                           int top_k, int norm_topk_prob, float scaling);

// One row by one block of blockDim.x ≥ n_experts threads (a multiple of 32; every thread calls it, n_experts ≤
// ROUTE_MAX_EXPERTS, top_k ≤ n_experts): logits [n_experts] (read past L1) and the thread's expert's bias
// (bias[threadIdx.x], loaded by the caller: route_bias) → experts [top_k] (best first), weights [top_k]. A thread an
// expert takes its score (one round trip to memory for all), then the first warp alone chooses (route_pick): lane L
// holds experts [L·p, L·p + p), p = ⌈n_experts / 32⌉, in registers, so that a lower lane holds lower indices, and
// each slot is the lanes' best remaining key (__reduce_max_sync), the lowest lane among equals and in that lane its
// lowest index: the host's order (key descending, then index ascending). It replaced a rank of every expert against all the others through
// shared memory (128 loads a thread) behind five barriers. H200, 2 layers at 4K (docs/bench/2026-12-02n-*): the
// decode row's add_norm_route 12.45 -> 12.08 us a call (within the noise), a 4,096-row prefill's route 107.5 ->
// 106.3 us (apart). A warp alone taking the scores too, 4 a lane, was slower (14.0 us): its loads ran in turn.
__device__ void route_row(const float* logits, float bias, u32* experts, float* weights, int n_experts, int n_group,
                          int topk_group, int top_k, int norm_topk_prob, float scaling) {
    __shared__ RouteScratch s;
    if (threadIdx.x < n_experts) {
        const float2 sc = route_score(__ldcg(logits + threadIdx.x), bias);
        s.score[threadIdx.x] = sc.x;
        s.choice[threadIdx.x] = sc.y;
    }
    __syncthreads();
    route_pick(s, experts, weights, n_experts, n_group, topk_group, top_k, norm_topk_prob, scaling);
}

// route_row from the experts' scores and choices as route_score gave them (score [n_experts], choice [n_experts],
// read past L1: the fused routers' blocks each wrote their expert's), so that the exponential and the division run
// in every block beside the others and not in the last block's tail (on a 3090, whose f64 rate is 1/64 of its
// f32, the block's 128 exponentials come to an estimated ~1 µs there; not measured: docs/PERF.md session 39).
__device__ void route_row_scored(const float* score, const float* choice, u32* experts, float* weights,
                                 int n_experts, int n_group, int topk_group, int top_k, int norm_topk_prob,
                                 float scaling) {
    __shared__ RouteScratch s;
    if (threadIdx.x < n_experts) {
        s.score[threadIdx.x] = __ldcg(score + threadIdx.x);
        s.choice[threadIdx.x] = __ldcg(choice + threadIdx.x);
    }
    __syncthreads();
    route_pick(s, experts, weights, n_experts, n_group, topk_group, top_k, norm_topk_prob, scaling);
}

__device__ void route_pick(RouteScratch& s, u32* experts, float* weights, int n_experts, int n_group, int topk_group,
                           int top_k, int norm_topk_prob, float scaling) {
    constexpr int P = ROUTE_MAX_EXPERTS / 32;
    if (threadIdx.x >= 32) return;
    const int lane = threadIdx.x, p = (n_experts + 31) / 32, e0 = lane * p;
    float choice[P];
#pragma unroll
    for (int i = 0; i < P; i++) choice[i] = i < p && e0 + i < n_experts ? s.choice[e0 + i] : 0.f;
    if (n_group > 1) {
        const int per = n_experts / n_group;
        for (int g = lane; g < n_group; g += 32) {
            // The group's two best in the host's order; scanning upwards, a tie keeps the earlier index.
            int best = g * per, second = -1;
            u32 kb = total_order_key(s.choice[best]), ks = 0;
#pragma unroll 4
            for (int j = best + 1; j < (g + 1) * per; ++j) {
                const u32 kj = total_order_key(s.choice[j]);
                if (kj > kb) {
                    second = best;
                    ks = kb;
                    best = j;
                    kb = kj;
                } else if (second < 0 || kj > ks) {
                    second = j;
                    ks = kj;
                }
            }
            s.group_key[g] = total_order_key(second < 0 ? s.choice[best] : s.choice[best] + s.choice[second]);
        }
        __syncwarp();
        for (int g = lane; g < n_group; g += 32) {
            const u32 k = s.group_key[g];
            int r = 0;
            for (int j = 0; j < n_group; ++j) r += s.group_key[j] > k || (s.group_key[j] == k && j < g);
            s.kept[g] = r < topk_group;
        }
        __syncwarp();
#pragma unroll
        for (int i = 0; i < P; i++)
            if (i < p && e0 + i < n_experts && !s.kept[(e0 + i) / per]) choice[i] = NEG_INF;
    }
    // The lane's experts as (key, 0xffff − index) in one word, sorted once (descending: the best first, the lower
    // index among equal keys); an absent one is 0, below every expert.
    u64 c[P];
#pragma unroll
    for (int i = 0; i < P; i++)
        c[i] = i < p && e0 + i < n_experts ? (u64)total_order_key(choice[i]) << 32 | (u32)(0xffff - (e0 + i)) : 0ull;
#pragma unroll
    for (int i = 1; i < P; i++)
#pragma unroll
        for (int j = i; j > 0; j--) {
            const u64 hi = c[j - 1] > c[j] ? c[j - 1] : c[j], lo = c[j - 1] > c[j] ? c[j] : c[j - 1];
            c[j - 1] = hi;
            c[j] = lo;
        }
    for (int slot = 0; slot < top_k; ++slot) {
        // The lanes' heads: the highest key, and among equal keys the lowest lane (the lower indices).
        const bool has = c[0] != 0ull;
        const u32 head = (u32)(c[0] >> 32), top = __reduce_max_sync(0xffffffffu, has ? head : 0u);
        const u32 won = __ballot_sync(0xffffffffu, has && head == top);
        if (lane == __ffs(won) - 1) {
            const int e = 0xffff - (int)(u32)c[0];
            s.chosen[slot] = s.score[e];
            experts[slot] = (u32)e;
#pragma unroll
            for (int i = 0; i + 1 < P; i++) c[i] = c[i + 1];
            c[P - 1] = 0ull;
        }
    }
    __syncwarp();
    // Σ in slot order from -0 (Rust's f32 sum), then HF's 1e-20; every lane the same.
    float sum = -0.f;
#pragma unroll 8
    for (int i = 0; i < top_k; ++i) sum += s.chosen[i];
    const float denom = sum + 1e-20f;
    for (int i = lane; i < top_k; i += 32) {
        float w = s.chosen[i];
        if (norm_topk_prob) w = __fdiv_rn(w, denom);
        weights[i] = __fmul_rn(w, scaling);
    }
}
