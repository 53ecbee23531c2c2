// noaux_tc group-limited routing on the device (route.cuh has the choice and its rounding), and each expert's
// (row, slot) pairs for a grouped launch.
#include "common.cuh"
#include "route.cuh"

// A block per row: logits [rows, n_experts], bias [n_experts] → experts [rows, top_k], weights [rows, top_k].
extern "C" __global__ void __launch_bounds__(ROUTE_MAX_EXPERTS)
    route_f32(const float* logits, const float* bias, u32* experts, float* weights, int n_experts, int n_group,
              int topk_group, int top_k, int norm_topk_prob, float scaling) {
    const size_t row = blockIdx.x;
    route_row(logits + row * n_experts, bias, experts + row * top_k, weights + row * top_k, n_experts, n_group,
              topk_group, top_k, norm_topk_prob, scaling);
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
