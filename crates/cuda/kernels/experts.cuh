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
// pair_of −1 for experts this slice lacks; with `shared` each row has one more slot, last, weighted 1.
__device__ __forceinline__ float expert_combine(const float* partial, int splits, int P, int N, const int* pair_of,
                                                const float* w, int r, int n, int top_k, int shared) {
    const int slots = top_k + shared;
    float acc = 0.f;
    for (int j = 0; j < slots; j++) {
        const int p = pair_of[r * slots + j];
        if (p < 0) continue;
        float v = 0.f;
        for (int s = 0; s < splits; s++) v += __ldcg(&partial[((size_t)s * P + p) * N + n]);
        acc += (j < top_k ? w[r * top_k + j] : 1.f) * v;
    }
    return acc;
}
