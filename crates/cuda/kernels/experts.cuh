// The grouped experts' two reductions over split partial sums (src/experts.rs): gptq_reduce_silu /
// gptq_reduce_combine (gptq_gemv.cu) and the tensor-core launches' last blocks (gptq_mma.cu) compute them with these,
// so the fused and separate paths give the same values in the same order.
#pragma once

// SiLU(Σ_s gate) · Σ_s up for pair p, column n: partial [splits, P, 2N], gate then up, summed in split order.
__device__ __forceinline__ float expert_silu_up(const float* partial, int splits, int P, int N, int p, int n) {
    float g = 0.f, u = 0.f;
    for (int s = 0; s < splits; s++) {
        const float* row = partial + ((size_t)s * P + p) * 2 * N;
        g += __ldcg(&row[n]);
        u += __ldcg(&row[N + n]);
    }
    return g / (1.f + __expf(-g)) * u;
}

// Row r's experts at column n: Σ_j w[r, j] · Σ_s partial[s, pair_of[r, j], n] in slot order, partial [splits, P, N];
// pair_of −1 for experts this slice lacks; with `shared` each row has one more slot, last, weighted 1. The slots'
// pairs and weights are read together, then every slot's partial sum of a split together: two round trips to L2 a
// split, where a slot at a time took three a slot one after another (27 for DeepSeek's 9 slots, at the end of the
// one-row down launch). The sums are the same, in the same order.
#define EXPERT_SLOTS 16  // slots read together (a row's top_k + shared; more take further passes)
__device__ __forceinline__ float expert_combine(const float* partial, int splits, int P, int N, const int* pair_of,
                                                const float* w, int r, int n, int top_k, int shared) {
    const int slots = top_k + shared;
    float acc = 0.f;
    for (int j0 = 0; j0 < slots; j0 += EXPERT_SLOTS) {
        int p[EXPERT_SLOTS];
        float wt[EXPERT_SLOTS], v[EXPERT_SLOTS];
#pragma unroll
        for (int u = 0; u < EXPERT_SLOTS; u++) {
            const int j = j0 + u;
            p[u] = j < slots ? pair_of[r * slots + j] : -1;
            wt[u] = j < top_k ? w[r * top_k + j] : 1.f;
            v[u] = 0.f;
        }
        for (int s = 0; s < splits; s++) {
            // Every slot's load before any add (an add after each load made each wait for the one before). A load
            // must not depend on its pair: predicated on p ≥ 0, ptxas put each add after its load again (session
            // 22). A missing pair reads pair 0's row (P ≥ 1 wherever a combine runs) and the select drops it.
            float t[EXPERT_SLOTS];
            const float* ps = partial + (size_t)s * P * N + n;
#pragma unroll
            for (int u = 0; u < EXPERT_SLOTS; u++)
                if (j0 + u < slots) t[u] = __ldcg(&ps[(size_t)max(p[u], 0) * N]);
#pragma unroll
            for (int u = 0; u < EXPERT_SLOTS; u++)
                if (j0 + u < slots) v[u] += p[u] >= 0 ? t[u] : 0.f;
        }
#pragma unroll
        for (int u = 0; u < EXPERT_SLOTS; u++)
            if (p[u] >= 0) acc += wt[u] * v[u];
    }
    return acc;
}
