// Elementwise and row-wise operations of the backend, on f32 activations [rows, cols] (first version: the
// activations stay f32 between kernels; GEMV inputs are cast to bf16). Symbols `<op>_f32`.
#include "common.cuh"

// y[r, :] = table[ids[r], :]
extern "C" __global__ void embed_f32(const float* table, const int* ids, float* y, int rows, int cols) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= (size_t)rows * cols) return;
    int r = i / cols, c = i % cols;
    y[i] = table[(size_t)ids[r] * cols + c];
}

// One block per row.
extern "C" __global__ void rms_norm_f32(const float* x, const float* w, float* y, int cols, float eps) {
    __shared__ float scratch[32];
    const float* xr = x + (size_t)blockIdx.x * cols;
    float ss = 0.f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss, scratch);
    const float inv = rsqrtf(ss / cols + eps);
    for (int i = threadIdx.x; i < cols; i += blockDim.x) y[(size_t)blockIdx.x * cols + i] = w[i] * (xr[i] * inv);
}

extern "C" __global__ void layer_norm_f32(const float* x, const float* w, const float* b, float* y, int cols,
                                          float eps) {
    __shared__ float scratch[32];
    const float* xr = x + (size_t)blockIdx.x * cols;
    float s = 0.f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) s += xr[i];
    const float mean = block_sum(s, scratch) / cols;
    float v = 0.f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) v += (xr[i] - mean) * (xr[i] - mean);
    const float inv = rsqrtf(block_sum(v, scratch) / cols + eps);
    for (int i = threadIdx.x; i < cols; i += blockDim.x)
        y[(size_t)blockIdx.x * cols + i] = (xr[i] - mean) * inv * w[i] + b[i];
}

extern "C" __global__ void add_f32(float* x, const float* y, size_t n) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

extern "C" __global__ void scale_f32(float* x, float s, size_t n) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i < n) x[i] *= s;
}

extern "C" __global__ void silu_mul_f32(const float* g, const float* u, float* y, size_t n) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i < n) y[i] = g[i] / (1.f + __expf(-g[i])) * u[i];
}

// y[r, c] = x[rows ? rows[r] : r, start + c] for r < n_rows, c < cols: gather_rows and columns in one kernel.
extern "C" __global__ void copy_rows_cols_f32(const float* x, int x_cols, const int* rows, int start, float* y,
                                              int n_rows, int cols) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= (size_t)n_rows * cols) return;
    int r = i / cols, c = i % cols;
    int src = rows ? rows[r] : r;
    y[i] = x[(size_t)src * x_cols + start + c];
}

// out[rows[i], :] += w[i] · y[i, :]  (each target row appears once per launch: no race)
extern "C" __global__ void scatter_add_scaled_f32(float* out, const float* y, const int* rows, const float* w,
                                                  int n, int cols) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= (size_t)n * cols) return;
    int r = i / cols, c = i % cols;
    out[(size_t)rows[r] * cols + c] += w[r] * y[i];
}

// f32 → bf16 (the GEMV's input).
extern "C" __global__ void cast_bf16_f32(const float* x, __nv_bfloat16* y, size_t n) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i < n) y[i] = __float2bfloat16(x[i]);
}

// y[r, o] = Σ_i x[r, i] · w[o, i] for an f32 weight [out, in]: one warp per (r, o).
extern "C" __global__ void dense_gemv_f32(const float* x, const float* w, float* y, int rows, int in, int out) {
    size_t warp = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x & 31;
    if (warp >= (size_t)rows * out) return;
    int r = warp / out, o = warp % out;
    const float* xr = x + (size_t)r * in;
    const float* wr = w + (size_t)o * in;
    float acc = 0.f;
    for (int i = lane; i < in; i += 32) acc += xr[i] * wr[i];
    acc = warp_sum(acc);
    if (lane == 0) y[warp] = acc;
}

// RoPE in place on heads of a [rows, heads*head_dim] tensor: pairs (2i, 2i+1) (interleaved) or (i, i+d/2),
// starting at column `offset` of each head; angle pos[r] * inv_freq[i] in f32 (as the CPU reference).
extern "C" __global__ void rope_f32(float* x, const int* pos, const float* inv_freq, int rows, int heads,
                                    int head_dim, int offset, int half, int interleaved) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= (size_t)rows * heads * half) return;
    int p = i % half;
    int h = (i / half) % heads;
    int r = i / ((size_t)half * heads);
    float* v = x + ((size_t)r * heads + h) * head_dim + offset;
    int a = interleaved ? 2 * p : p, b = interleaved ? 2 * p + 1 : p + half;
    float s, c;
    sincosf((float)pos[r] * inv_freq[p], &s, &c);
    float xa = v[a], xb = v[b];
    v[a] = xa * c - xb * s;
    v[b] = xb * c + xa * s;
}

// W[n, k] = s[g(k), n] · (q[k, n] − z[g(k), n]) for a 3-bit... any-bit GPTQ weight, rows already in group order
// (the inverse permutation maps them back): used once per weight where attention needs kv_b_proj dense.
template <int BITS>
__device__ void dequant(const u32* qweight, const __half* zeros, const __half* scales, const int* perm, float* w,
                        int K, int N, int group_size) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= (size_t)K * N) return;
    int k = i / N, n = i % N;   // k: reordered row
    const u32* col = qweight + (size_t)(k / 32 * BITS) * N + n;
    u32 words[BITS];
    for (int j = 0; j < BITS; j++) words[j] = col[(size_t)j * N];
    int idx = k % 32, bit = idx * BITS;
    u64 block = 0;
    // Gather the (up to) 64 bits around the field: fine for BITS ≤ 8 since a field never crosses two words.
    int wi = bit / 32, sh = bit % 32;
    block = (u64)words[wi] | (wi + 1 < BITS ? ((u64)words[wi + 1] << 32) : 0ull);
    float q = (float)((u32)(block >> sh) & ((1u << BITS) - 1u));
    int g = k / group_size;
    float v = __half2float(scales[(size_t)g * N + n]) * (q - __half2float(zeros[(size_t)g * N + n]));
    int src = perm ? perm[k] : k;
    w[(size_t)n * K + src] = v;
}

#define DEQUANT(BITS)                                                                                       \
    extern "C" __global__ void gptq_dequant_w##BITS##_f32(const u32* q, const __half* z, const __half* s,    \
                                                          const int* perm, float* w, int K, int N, int gs) { \
        dequant<BITS>(q, z, s, perm, w, K, N, gs);                                                           \
    }
DEQUANT(2)
DEQUANT(3)
DEQUANT(4)
DEQUANT(8)
