// The MoE router's choice for one row (MODEL_SPEC §2.7), included by route.cu (route_f32: a block a row) and ops.cu
// (router_route: the router's GEMV and the choice in one launch at one row). Bit-for-bit with the host's
// `pipemoe_model::routing::route_logits`: orders are Rust's f32::total_cmp (as an integer key) with ties to the
// lower index; exp is taken in f64 and rounded once to f32 (the host's glibc expf is correctly rounded but for rare
// inputs; fast math would make expf a several-ulp __expf), and divisions are __fdiv_rn (fast math makes `/`
// approximate). Sums run in the host's order. Differences left: a score one ulp off where glibc's expf is not
// correctly rounded; scores below 1.2e-38 (logits < -87) flushed to 0 by fast math's ftz.
// (After common.cuh.)
#pragma once

#define ROUTE_MAX_EXPERTS 256

// Place of item i among n keys by key descending, then index ascending (the host's `top_k`).
__device__ __forceinline__ int rank_desc(const u32* keys, int n, int i) {
    const u32 k = keys[i];
    int r = 0;
    for (int j = 0; j < n; ++j) r += keys[j] > k || (keys[j] == k && j < i);
    return r;
}

// One row by one block, a thread per expert (blockDim.x ≥ n_experts, a multiple of 32, ≤ 256): logits
// [n_experts] (read past L1: the fused router's other blocks wrote them), bias [n_experts] → experts [top_k] (best
// first), weights [top_k].
__device__ void route_row(const float* logits, const float* bias, u32* experts, float* weights, int n_experts,
                          int n_group, int topk_group, int top_k, int norm_topk_prob, float scaling) {
    __shared__ float score[ROUTE_MAX_EXPERTS];   // sigmoid, unbiased: the weights
    __shared__ float choice[ROUTE_MAX_EXPERTS];  // score + bias: the selection
    __shared__ u32 key[ROUTE_MAX_EXPERTS];
    __shared__ u32 group_key[ROUTE_MAX_EXPERTS];
    __shared__ int chosen[ROUTE_MAX_EXPERTS];
    __shared__ float denom;
    const int e = threadIdx.x;
    if (e < n_experts) {
        // Both loads before the exponential (the bias was read after it: two round trips one after the other).
        const float logit = __ldcg(logits + e), b = bias[e];
        const float ex = (float)exp(-(double)logit);
        const float s = __fdiv_rn(1.f, 1.f + ex);
        score[e] = s;
        choice[e] = s + b;
    }
    __syncthreads();
    if (n_group > 1) {
        const int per = n_experts / n_group;
        if (e < n_group) {
            // The group's two best in the host's order; scanning upwards, a tie keeps the earlier index.
            int best = e * per, second = -1;
            u32 kb = total_order_key(choice[best]), ks = 0;
            for (int j = best + 1; j < (e + 1) * per; ++j) {
                const u32 kj = total_order_key(choice[j]);
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
            group_key[e] = total_order_key(second < 0 ? choice[best] : choice[best] + choice[second]);
        }
        __syncthreads();
        if (e < n_experts && rank_desc(group_key, n_group, e / per) >= topk_group) choice[e] = NEG_INF;
        __syncthreads();
    }
    if (e < n_experts) key[e] = total_order_key(choice[e]);
    __syncthreads();
    if (e < n_experts) {
        const int r = rank_desc(key, n_experts, e);
        if (r < top_k) chosen[r] = e;
    }
    __syncthreads();
    if (e == 0) {
        // Σ in slot order from -0 (Rust's f32 sum), then HF's 1e-20.
        float sum = -0.f;
        for (int i = 0; i < top_k; ++i) sum += score[chosen[i]];
        denom = sum + 1e-20f;
    }
    __syncthreads();
    if (e < top_k) {
        float w = score[chosen[e]];
        if (norm_topk_prob) w = __fdiv_rn(w, denom);
        experts[e] = (u32)chosen[e];
        weights[e] = __fmul_rn(w, scaling);
    }
}
