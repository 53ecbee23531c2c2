// noaux_tc group-limited routing on the device (MODEL_SPEC §2.7): the same experts, in the same order, as the
// host's `pipemoe_model::routing::route_logits`, and each expert's (row, slot) pairs for a grouped launch.
//
// Bit-for-bit with the host: orders are Rust's f32::total_cmp (as an integer key) with ties to the lower
// index; exp is taken in f64 and rounded once to f32 (the host's glibc expf is correctly rounded but for rare
// inputs; fast math would make expf a several-ulp __expf), and divisions are __fdiv_rn (fast math makes `/`
// approximate). Sums run in the host's order. Differences left: a score one ulp off where glibc's expf is not
// correctly rounded; scores below 1.2e-38 (logits < -87) flushed to 0 by fast math's ftz.
#include "common.cuh"

#define ROUTE_MAX_EXPERTS 256

// Place of item i among n keys by key descending, then index ascending (the host's `top_k`).
__device__ __forceinline__ int rank_desc(const u32* keys, int n, int i) {
    const u32 k = keys[i];
    int r = 0;
    for (int j = 0; j < n; ++j) r += keys[j] > k || (keys[j] == k && j < i);
    return r;
}

// One block per row, one thread per expert (blockDim.x ≥ n_experts, a multiple of 32, ≤ 256).
// logits [rows, n_experts], bias [n_experts] → experts [rows, top_k] (best first), weights [rows, top_k].
extern "C" __global__ void __launch_bounds__(ROUTE_MAX_EXPERTS)
    route_f32(const float* logits, const float* bias, u32* experts, float* weights, int n_experts, int n_group,
              int topk_group, int top_k, int norm_topk_prob, float scaling) {
    __shared__ float score[ROUTE_MAX_EXPERTS];   // sigmoid, unbiased: the weights
    __shared__ float choice[ROUTE_MAX_EXPERTS];  // score + bias: the selection
    __shared__ u32 key[ROUTE_MAX_EXPERTS];
    __shared__ u32 group_key[ROUTE_MAX_EXPERTS];
    __shared__ int chosen[ROUTE_MAX_EXPERTS];
    __shared__ float denom;
    const int e = threadIdx.x;
    const size_t row = blockIdx.x;
    if (e < n_experts) {
        // Both loads before the exponential (the bias was read after it: two round trips one after the other).
        const float logit = logits[row * n_experts + e], b = bias[e];
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
        experts[row * top_k + e] = (u32)chosen[e];
        weights[row * top_k + e] = __fmul_rn(w, scaling);
    }
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
