// The MoE router's choice for one row (MODEL_SPEC §2.7), included by route.cu (route_f32: a warp a row; router_route and
// add_norm_route: the last block's first warp). Bit-for-bit with the host's
// `pipemoe_model::routing::route_logits`: orders are Rust's f32::total_cmp (as an integer key) with ties to the
// lower index; exp is taken in f64 and rounded once to f32 (the host's glibc expf is correctly rounded but for rare
// inputs; fast math would make expf a several-ulp __expf), and divisions are __fdiv_rn (fast math makes `/`
// approximate). Sums run in the host's order. Differences left: a score one ulp off where glibc's expf is not
// correctly rounded; scores below 1.2e-38 (logits < -87) flushed to 0 by fast math's ftz.
// (After common.cuh.)
#pragma once

#define ROUTE_MAX_EXPERTS 256

// One warp's scratch for route_row (shared memory): the row's biased scores, its groups' keys, kept flags and the
// chosen experts' scores, slot by slot.
struct RouteScratch {
    float choice[ROUTE_MAX_EXPERTS];
    u32 group_key[ROUTE_MAX_EXPERTS];
    int kept[ROUTE_MAX_EXPERTS];
    float chosen[ROUTE_MAX_EXPERTS];
};

// One row by one warp (every lane calls it; n_experts ≤ ROUTE_MAX_EXPERTS, top_k ≤ n_experts): logits
// [n_experts] (read past L1: the fused router's other blocks wrote them), bias [n_experts] → experts [top_k] (best
// first), weights [top_k]. Lane L holds experts [L·p, L·p + p), p = ⌈n_experts / 32⌉, in registers, so that a
// lower lane holds lower indices; each slot is the lanes' best remaining key (__reduce_max_sync), the lowest lane
// among equals, and in that lane its lowest index: the host's order (key descending, then index ascending).
// The block-wide form it replaced ranked every expert against all the others through shared memory, 128 dependent
// loads a thread and five barriers: ~4 us of the decode row's add_norm_route, its last block alone (session 37's
// trace).
__device__ void route_row(const float* logits, const float* bias, u32* experts, float* weights, int n_experts,
                          int n_group, int topk_group, int top_k, int norm_topk_prob, float scaling,
                          RouteScratch& s) {
    constexpr int P = ROUTE_MAX_EXPERTS / 32;
    const int lane = threadIdx.x & 31, p = (n_experts + 31) / 32, e0 = lane * p;
    float score[P], choice[P];
#pragma unroll
    for (int i = 0; i < P; i++) {
        const int e = e0 + i;
        score[i] = choice[i] = 0.f;
        if (i < p && e < n_experts) {
            const float logit = __ldcg(logits + e), b = bias[e];
            const float ex = (float)exp(-(double)logit);
            score[i] = __fdiv_rn(1.f, 1.f + ex);
            choice[i] = score[i] + b;
            s.choice[e] = choice[i];
        }
    }
    __syncwarp();
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
    u32 key[P];
    unsigned taken = 0;  // bit i: this lane's expert e0 + i is chosen (or absent)
#pragma unroll
    for (int i = 0; i < P; i++) {
        key[i] = total_order_key(choice[i]);
        if (i >= p || e0 + i >= n_experts) taken |= 1u << i;
    }
    for (int slot = 0; slot < top_k; ++slot) {
        // This lane's best remaining: the highest key, the lowest index among equals (scanning upwards).
        int at = -1;
        u32 kb = 0;
#pragma unroll
        for (int i = 0; i < P; i++)
            if (!(taken >> i & 1) && (at < 0 || key[i] > kb)) at = i, kb = key[i];
        const bool has = at >= 0;
        const u32 top = __reduce_max_sync(0xffffffffu, has ? kb : 0u);
        const u32 won = __ballot_sync(0xffffffffu, has && kb == top);
        if (lane == __ffs(won) - 1) {
            taken |= 1u << at;
#pragma unroll
            for (int i = 0; i < P; i++)
                if (i == at) s.chosen[slot] = score[i];
            experts[slot] = (u32)(e0 + at);
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
