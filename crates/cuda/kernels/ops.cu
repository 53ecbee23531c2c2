// Elementwise and row-wise operations of the backend on activations [rows, cols] of type T (float or bf16; the
// symbols end in _f32 / _bf16). Arithmetic is f32: values are widened on load and rounded once on store.
#include "common.cuh"
#include "attention.cuh"
#include "rows.cuh"

#define GRID_INDEX(i, n)                                         \
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; \
    if (i >= (size_t)(n)) return;

// y[r, :] = table[ids[r], :] (the table in the activation dtype).
template <typename T>
__device__ void embed(const T* table, const int* ids, T* y, int rows, int cols) {
    GRID_INDEX(i, (size_t)rows * cols);
    int r = i / cols, c = i % cols;
    y[i] = table[(size_t)ids[r] * cols + c];
}

// One block per row; the sum of squares in f32. A decode row is one block, so what bounds it is memory latency:
// rows of up to 16 values per thread (8,192 at 512 threads: the model's 7,168) hold x and w in registers, every
// load in flight at once (one round trip instead of one per value and pass).
#define NORM_HELD 16
// Rows of 8-value pieces (16-byte aligned, cols % 8 == 0) take 16-byte loads and stores instead: up to
// NORM_PIECES (rows.cuh) a thread. A thread's scalar loads of two bytes each (48 for the model's row with the add)
// kept one SM's load pipe busy for microseconds.
// With `add` (the residual add before a norm, fused): x += add first, stored and normed as rounded to T, so the
// result is the one an add then a norm give, bit for bit.
// One row: x and y point at the row (add too, when given).
template <typename T>
__device__ void rms_norm_row(T* x, const T* add, const float* w, T* y, int cols, float eps) {
    __shared__ float scratch[32];
    float ss = 0.f;
    const size_t addr = (size_t)x | (size_t)y | (size_t)w | (size_t)(add != nullptr ? add : x);
    if (cols % 8 == 0 && cols <= (int)blockDim.x * 8 * NORM_PIECES && addr % 16 == 0) {
        // Every load before any store (a store to x could alias them, so the compiler keeps the order written).
        float v[NORM_PIECES][8], wv[NORM_PIECES][8], a[NORM_PIECES][8];
#pragma unroll
        for (int j = 0; j < NORM_PIECES; j++) {
            const int c = (threadIdx.x + j * blockDim.x) * 8;
#pragma unroll
            for (int i = 0; i < 8; i++) v[j][i] = wv[j][i] = a[j][i] = 0.f;
            if (c < cols) {
                load8(x + c, v[j]);
                load8(w + c, wv[j]);
                if (add != nullptr) load8(add + c, a[j]);
            }
        }
#pragma unroll
        for (int j = 0; j < NORM_PIECES; j++) {
            const int c = (threadIdx.x + j * blockDim.x) * 8;
            if (add != nullptr) {
#pragma unroll
                for (int i = 0; i < 8; i++) v[j][i] = rnd(x, v[j][i] + a[j][i]);
                if (c < cols) save8(x + c, v[j]);
            }
#pragma unroll
            for (int i = 0; i < 8; i++) ss += v[j][i] * v[j][i];
        }
        const float inv = rsqrtf(block_sum(ss, scratch) / cols + eps);
#pragma unroll
        for (int j = 0; j < NORM_PIECES; j++) {
            const int c = (threadIdx.x + j * blockDim.x) * 8;
            if (c < cols) {
                float o[8];
#pragma unroll
                for (int i = 0; i < 8; i++) o[i] = wv[j][i] * (v[j][i] * inv);
                save8(y + c, o);
            }
        }
        return;
    }
    if (cols <= (int)blockDim.x * NORM_HELD) {
        float v[NORM_HELD], wv[NORM_HELD];
#pragma unroll
        for (int j = 0; j < NORM_HELD; j++) {
            const int i = threadIdx.x + j * blockDim.x;
            v[j] = i < cols ? ld(x, i) : 0.f;
            if (add != nullptr && i < cols) v[j] += ld(add, i);
            wv[j] = i < cols ? w[i] : 0.f;
        }
        if (add != nullptr) {
#pragma unroll
            for (int j = 0; j < NORM_HELD; j++) {
                const int i = threadIdx.x + j * blockDim.x;
                v[j] = rnd(x, v[j]);
                if (i < cols) st(x, i, v[j]);
            }
        }
#pragma unroll
        for (int j = 0; j < NORM_HELD; j++) ss += v[j] * v[j];
        const float inv = rsqrtf(block_sum(ss, scratch) / cols + eps);
#pragma unroll
        for (int j = 0; j < NORM_HELD; j++) {
            const int i = threadIdx.x + j * blockDim.x;
            if (i < cols) st(y, i, wv[j] * (v[j] * inv));
        }
        return;
    }
#pragma unroll 8
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        float v = ld(x, i);
        if (add != nullptr) {
            v = rnd(x, v + ld(add, i));
            st(x, i, v);  // read back below by this same thread
        }
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    const float inv = rsqrtf(ss / cols + eps);
#pragma unroll 8
    for (int i = threadIdx.x; i < cols; i += blockDim.x) st(y, i, w[i] * (ld(x, i) * inv));
}

template <typename T>
__device__ void rms_norm(T* x, const T* add, const float* w, T* y, int cols, float eps) {
    const size_t base = (size_t)blockIdx.x * cols;
    rms_norm_row(x + base, add ? add + base : nullptr, w, y + base, cols, eps);
}

template <typename T>
__device__ void layer_norm_row(const T* x, const float* w, const float* b, T* y, int cols, float eps) {
    __shared__ float scratch[32];
    if (cols <= (int)blockDim.x) {
        // One value a thread (the indexer key's 128): the weights loaded beside x, not after the two sums. The
        // same arithmetic as the loop below (0 + v is v).
        const int i = threadIdx.x;
        const bool in = i < cols;
        const float xv = in ? ld(x, i) : 0.f, wv = in ? w[i] : 0.f, bv = in ? b[i] : 0.f;
        const float mean = block_sum(xv, scratch) / cols;
        const float d = in ? xv - mean : 0.f;
        const float inv = rsqrtf(block_sum(d * d, scratch) / cols + eps);
        if (in) st(y, i, (xv - mean) * inv * wv + bv);
        return;
    }
    float s = 0.f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) s += ld(x, i);
    const float mean = block_sum(s, scratch) / cols;
    float v = 0.f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) v += (ld(x, i) - mean) * (ld(x, i) - mean);
    const float inv = rsqrtf(block_sum(v, scratch) / cols + eps);
    for (int i = threadIdx.x; i < cols; i += blockDim.x) st(y, i, (ld(x, i) - mean) * inv * w[i] + b[i]);
}

template <typename T>
__device__ void layer_norm(const T* x, const float* w, const float* b, T* y, int cols, float eps) {
    const size_t base = (size_t)blockIdx.x * cols;
    layer_norm_row(x + base, w, b, y + base, cols, eps);
}

template <typename T>
__device__ void add(T* x, const T* y, size_t n) {
    GRID_INDEX(i, n);
    st(x, i, ld(x, i) + ld(y, i));
}

template <typename T>
__device__ void scale(T* x, float s, size_t n) {
    GRID_INDEX(i, n);
    st(x, i, ld(x, i) * s);
}

template <typename T>
__device__ void silu_mul(const T* g, const T* u, T* y, size_t n) {
    GRID_INDEX(i, n);
    float a = ld(g, i);
    st(y, i, a / (1.f + __expf(-a)) * ld(u, i));
}

// y[r, c] = x[rows ? rows[r] : r, start + c] for r < n_rows, c < cols: gather_rows and columns in one kernel.
template <typename T>
__device__ void copy_rows_cols(const T* x, int x_cols, const int* rows, int start, T* y, int n_rows, int cols) {
    GRID_INDEX(i, (size_t)n_rows * cols);
    int r = i / cols, c = i % cols;
    int src = rows ? rows[r] : r;
    y[i] = x[(size_t)src * x_cols + start + c];
}

// The columns of x [rows, cols] cut into consecutive runs of widths w0..w3 (Σ = cols), each its own [rows, w]
// tensor: a fused projection's outputs in one launch.
template <typename T>
__device__ void split_cols(const T* x, int cols, int rows, T* y0, int w0, T* y1, int w1, T* y2, int w2, T* y3,
                           int w3) {
    GRID_INDEX(i, (size_t)rows * cols);
    const size_t r = i / cols;
    int c = i % cols;
    T* y = y3;
    int w = w3;
    if (c < w0) y = y0, w = w0;
    else if ((c -= w0) < w1) y = y1, w = w1;
    else if ((c -= w1) < w2) y = y2, w = w2;
    else c -= w2;
    y[r * w + c] = x[i];
}

// One rotated pair (a, b) → (da, db): the angle in f32 as the reference computes it; sin and cos in f64, since
// fast-math's f32 sincos loses ~1e-3 at the angles of long contexts (pos · inv_freq reaches 6.5e4 radians at 64K).
template <typename T>
__device__ __forceinline__ void rope_pair(const T* a, const T* b, T* da, T* db, int pos, float inv_freq) {
    double s, c;
    sincos((double)((float)pos * inv_freq), &s, &c);
    const float2 v = rotate(ld(a, 0), ld(b, 0), (float)c, (float)s);
    st(da, 0, v.x);
    st(db, 0, v.y);
}

// The indexer key's LayerNorm epsilon (pipemoe_model::backend::INDEXER_NORM_EPS).
#define INDEXER_NORM_EPS 1e-6f

// RoPE in place on heads of a [rows, heads*head_dim] tensor: pairs (2i, 2i+1) (interleaved) or (i, i+d/2),
// starting at column `offset` of each head; angle pos[r] * inv_freq[i] in f32 (as the CPU reference).
template <typename T>
__device__ void rope(T* x, const int* pos, const float* inv_freq, int rows, int heads, int head_dim, int offset,
                     int half, int interleaved) {
    GRID_INDEX(i, (size_t)rows * heads * half);
    int p = i % half;
    int h = (i / half) % heads;
    int r = i / ((size_t)half * heads);
    size_t v = ((size_t)r * heads + h) * head_dim + offset;
    size_t a = v + (interleaved ? 2 * p : p), b = v + (interleaved ? 2 * p + 1 : p + half);
    rope_pair(x + a, x + b, x + a, x + b, pos[r], inv_freq[p]);
}

// Columns start.. of x [rows, cols] as y [rows, heads·head_dim], roped as `rope` does, in one launch: what
// `columns` then `rope` give, bit for bit. A thread per rotated pair (rope_pair, as `rope`) or per copied value:
// a head's head_dim − half units are its `half` pairs, then its other columns in order. (A fused projection's parts
// without a split copy.)
// Unit i of rope_cols.
template <typename T>
__device__ __forceinline__ void rope_cols_unit(const T* x, int cols, int start, T* y, const int* pos,
                                               const float* inv_freq, int heads, int head_dim, int offset, int half,
                                               int interleaved, size_t i) {
    const int units = head_dim - half;
    const int r = i / ((size_t)heads * units), h = (i / units) % heads, k = i % units;
    const T* src = x + (size_t)r * cols + start + (size_t)h * head_dim;
    T* dst = y + ((size_t)r * heads + h) * head_dim;
    if (k < half) {
        const int a = offset + (interleaved ? 2 * k : k), b = a + (interleaved ? 1 : half);
        rope_pair(src + a, src + b, dst + a, dst + b, pos[r], inv_freq[k]);
    } else {
        const int c = k - half, col = c < offset ? c : c + 2 * half;
        dst[col] = src[col];
    }
}

template <typename T>
__device__ void rope_cols(const T* x, int cols, int start, T* y, const int* pos, const float* inv_freq, int rows,
                          int heads, int head_dim, int offset, int half, int interleaved) {
    GRID_INDEX(i, (size_t)rows * heads * (head_dim - half));
    rope_cols_unit(x, cols, start, y, pos, inv_freq, heads, head_dim, offset, half, interleaved, i);
}

// Two parts of x cut and roped as rope_cols cuts and ropes each, in one launch (attention's q and the indexer's
// query, both from the fused q_b + wq_b output): the first part's units, then the second's. Same bits.
template <typename T>
__device__ void rope_cols2(const T* x, int cols, const int* pos, const float* inv_freq, int rows, int half, int s1,
                           T* y1, int h1, int d1, int o1, int il1, int s2, T* y2, int h2, int d2, int o2, int il2) {
    const size_t n1 = (size_t)rows * h1 * (d1 - half);
    GRID_INDEX(i, n1 + (size_t)rows * h2 * (d2 - half));
    if (i < n1) rope_cols_unit(x, cols, s1, y1, pos, inv_freq, h1, d1, o1, half, il1, i);
    else rope_cols_unit(x, cols, s2, y2, pos, inv_freq, h2, d2, o2, half, il2, i - n1);
}

// rope_cols by 8-value pieces (16 bytes of bf16), what it gives bit for bit: grid (rows, ⌈heads / hpb⌉), 128
// threads, `hpb` heads a block (few at a decode step's few rows, so that the grid still fills the GPU). A block
// works out its row's `half` (cos, sin) once into shared memory (rope_pair's f64 sincos, rounded to f32 as it
// rounds them) instead of once per head and pair; then a thread per piece copies it, rotates the 4
// interleaved pairs it holds, or (paired halves) rotates it with its partner piece `half` columns on. The host
// takes it when start, cols, head_dim, offset and the rotated pieces are multiples of 8 values, half ≤ 128 and
// the step has 8 rows or more (rowops.rs says why).
template <typename T>
__device__ void rope_cols8(const T* x, int cols, int start, T* y, const int* pos, const float* inv_freq, int heads,
                           int head_dim, int offset, int half, int interleaved, int hpb) {
    __shared__ float2 cs[128];
    const int r = blockIdx.x, h0 = blockIdx.y * hpb, nh = min(hpb, heads - h0);
    for (int p = threadIdx.x; p < half; p += blockDim.x) {
        double s, c;
        sincos((double)((float)pos[r] * inv_freq[p]), &s, &c);
        cs[p] = make_float2((float)c, (float)s);
    }
    __syncthreads();
    const int pieces = head_dim / 8, rot = interleaved ? half / 4 : half / 8, units = pieces - (interleaved ? 0 : rot);
    for (int u = threadIdx.x; u < nh * units; u += blockDim.x) {
        const int h = h0 + u / units, k = u % units;
        const T* src = x + (size_t)r * cols + start + (size_t)h * head_dim;
        T* dst = y + ((size_t)r * heads + h) * head_dim;
        if (k >= rot) {  // a copied piece: before the rotated columns or after them
            const int c = (k - rot) * 8, col = c < offset ? c : c + 2 * half;
            copy8(dst + col, src + col);
            continue;
        }
        float a[8], b[8];
        if (interleaved) {
            load8(src + offset + 8 * k, a);
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const float2 t = cs[4 * k + j], v = rotate(a[2 * j], a[2 * j + 1], t.x, t.y);
                a[2 * j] = v.x, a[2 * j + 1] = v.y;
            }
            save8(dst + offset + 8 * k, a);
        } else {
            load8(src + offset + 8 * k, a), load8(src + offset + half + 8 * k, b);
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const float2 t = cs[8 * k + j], v = rotate(a[j], b[j], t.x, t.y);
                a[j] = v.x, b[j] = v.y;
            }
            save8(dst + offset + 8 * k, a), save8(dst + offset + half + 8 * k, b);
        }
    }
}

// The attention inputs of a fused projection row [q_a | latent | k_pe | index key | index weights] (widths q_a,
// lora, rope, idx, iw; q_a, idx or iw 0 when absent), what split_cols, rms_norm, rope, layer_norm and scale give
// one after another, bit for bit (the norms' block sums at the same 512 threads): grid (rows, 5), blockIdx.y the
// part. Outputs [rows, width]. With `c->slots`, the latent, k_pe and indexer key also go into the cache at the
// rows' slots as cache_store puts them (the block that made a part stores it, reading back what it wrote).
struct CacheDst {
    const int* slots;  // [rows], or null: no store
    void* lat;
    void* pe;
    void* idx;
    float* scales;
    int dtype;
};

template <typename T>
__device__ void mla_prep(const T* proj, int q_a, int lora, int rope, int idx, int iw, float iw_scale,
                         const float* q_norm, const float* kv_norm, const float* k_w, const float* k_b, float eps,
                         const int* pos, const float* inv_freq, int half, T* q_out, T* lat_out, T* kpe_out,
                         T* key_out, T* iw_out, CacheDst c) {
    const int r = blockIdx.x, total = q_a + lora + rope + idx + iw;
    const T* row = proj + (size_t)r * total;
    // The row's position, cache slot and the thread's first pair's frequency first, beside the row's loads (each
    // read where it is used was one more round trip after a reduction or a barrier).
    const int at = pos[r], slot = c.slots != nullptr ? c.slots[r] : 0;
    const float f0 = (int)threadIdx.x < half ? inv_freq[threadIdx.x] : 0.f;
    const auto freq = [&](int p) { return p == (int)threadIdx.x ? f0 : inv_freq[p]; };
    // After a part's last store, every thread's values are visible to the block: the store reads them back.
    const auto cached = [&](const T* out, int n, int part, void* dst) {
        if (c.slots == nullptr || n == 0) return;
        __syncthreads();
        cache_put_row(out, n, slot, part, dst, c.scales, c.dtype);
    };
    switch (blockIdx.y) {
        case 0:  // none without q_out: a query launch norms q_a itself (src/prep.rs)
            if (q_a > 0 && q_out != nullptr)
                rms_norm_row(const_cast<T*>(row), (const T*)nullptr, q_norm, q_out + (size_t)r * q_a, q_a, eps);
            return;
        case 1:
            rms_norm_row(const_cast<T*>(row + q_a), (const T*)nullptr, kv_norm, lat_out + (size_t)r * lora, lora, eps);
            cached(lat_out + (size_t)r * lora, lora, 0, c.lat);
            return;
        case 2: {  // one head, interleaved pairs from column 0
            const T* src = row + q_a + lora;
            T* dst = kpe_out + (size_t)r * rope;
            for (int i = threadIdx.x; i < rope; i += blockDim.x)
                if (i >= 2 * half) dst[i] = src[i];  // columns past the rotated pairs, as split copies them
            for (int p = threadIdx.x; p < half; p += blockDim.x)
                rope_pair(src + 2 * p, src + 2 * p + 1, dst + 2 * p, dst + 2 * p + 1, at, freq(p));
            cached(dst, rope, 1, c.pe);
            return;
        }
        case 4: {  // the indexer's head weights, scaled as `scale` does
            const T* src = row + q_a + lora + rope + idx;
            for (int i = threadIdx.x; i < iw; i += blockDim.x) st(iw_out + (size_t)r * iw, i, ld(src, i) * iw_scale);
            return;
        }
        default: {  // layer norm, stored, then one head's half-split pairs from column 0 in place
            if (idx == 0) return;
            T* key = key_out + (size_t)r * idx;
            layer_norm_row(row + q_a + lora + rope, k_w, k_b, key, idx, INDEXER_NORM_EPS);
            __syncthreads();  // the row as stored, before its pairs are read across threads
            for (int p = threadIdx.x; p < half; p += blockDim.x)
                rope_pair(key + p, key + p + half, key + p, key + p + half, at, freq(p));
            cached(key, idx, 2, c.idx);
        }
    }
}

// out[rows[i], :] += w[i] · y[i, :] into an f32 sum (each target row appears once per launch: no race).
template <typename T>
__device__ void scatter_add_scaled(float* out, const T* y, const int* rows, const float* w, int n, int cols) {
    GRID_INDEX(i, (size_t)n * cols);
    int r = i / cols, c = i % cols;
    out[(size_t)rows[r] * cols + c] += w[r] * ld(y, i);
}

template <typename S, typename D>
__device__ void cast(const S* x, D* y, size_t n) {
    GRID_INDEX(i, n);
    st(y, i, ld(x, i));
}

#define OPS(T, S)                                                                                                  \
    extern "C" __global__ void embed_##S(const T* t, const int* ids, T* y, int rows, int cols) {                   \
        embed<T>(t, ids, y, rows, cols);                                                                           \
    }                                                                                                              \
    extern "C" __global__ void rms_norm_##S(const T* x, const float* w, T* y, int cols, float eps) {               \
        rms_norm<T>(const_cast<T*>(x), nullptr, w, y, cols, eps);                                                  \
    }                                                                                                              \
    extern "C" __global__ void add_rms_norm_##S(T* x, const T* add, const float* w, T* y, int cols, float eps) {   \
        rms_norm<T>(x, add, w, y, cols, eps);                                                                      \
    }                                                                                                              \
    extern "C" __global__ void layer_norm_##S(const T* x, const float* w, const float* b, T* y, int cols,          \
                                              float eps) {                                                         \
        layer_norm<T>(x, w, b, y, cols, eps);                                                                      \
    }                                                                                                              \
    extern "C" __global__ void add_##S(T* x, const T* y, size_t n) { add<T>(x, y, n); }                            \
    extern "C" __global__ void scale_##S(T* x, float s, size_t n) { scale<T>(x, s, n); }                           \
    extern "C" __global__ void silu_mul_##S(const T* g, const T* u, T* y, size_t n) { silu_mul<T>(g, u, y, n); }   \
    extern "C" __global__ void copy_rows_cols_##S(const T* x, int xc, const int* rows, int start, T* y, int nr,    \
                                                  int cols) {                                                      \
        copy_rows_cols<T>(x, xc, rows, start, y, nr, cols);                                                        \
    }                                                                                                              \
    extern "C" __global__ void split_cols_##S(const T* x, int cols, int rows, T* y0, int w0, T* y1, int w1, T* y2, \
                                              int w2, T* y3, int w3) {                                             \
        split_cols<T>(x, cols, rows, y0, w0, y1, w1, y2, w2, y3, w3);                                              \
    }                                                                                                              \
    extern "C" __global__ void dense_gemv_##S(const T* x, const T* w, T* y, int rows, int in, int out) {           \
        dense_gemv<T, T>(x, w, y, rows, in, out);                                                                  \
    }                                                                                                              \
    extern "C" __global__ void dense_gemv_f32out_##S(const T* x, const T* w, float* y, int rows, int in,           \
                                                     int out) {                                                    \
        dense_gemv<T, float>(x, w, y, rows, in, out);                                                              \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(256, 2)                                                           \
        dense_rows_##S(const T* x, const T* w, T* y, int rows, int in, int out) {                                  \
        dense_gemv_rows<T, T>(x, w, y, rows, in, out);                                                             \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(256, 2)                                                           \
        dense_rows_f32out_##S(const T* x, const T* w, float* y, int rows, int in, int out) {                       \
        dense_gemv_rows<T, float>(x, w, y, rows, in, out);                                                         \
    }                                                                                                              \
    extern "C" __global__ void rope_##S(T* x, const int* pos, const float* f, int rows, int heads, int hd,         \
                                        int offset, int half, int il) {                                            \
        rope<T>(x, pos, f, rows, heads, hd, offset, half, il);                                                     \
    }                                                                                                              \
    extern "C" __global__ void rope_cols_##S(const T* x, int cols, int start, T* y, const int* pos, const float* f, \
                                             int rows, int heads, int hd, int offset, int half, int il) {          \
        rope_cols<T>(x, cols, start, y, pos, f, rows, heads, hd, offset, half, il);                                \
    }                                                                                                              \
    extern "C" __global__ void rope_cols2_##S(const T* x, int cols, const int* pos, const float* f, int rows,      \
                                              int half, int s1, T* y1, int h1, int d1, int o1, int il1, int s2,    \
                                              T* y2, int h2, int d2, int o2, int il2) {                            \
        rope_cols2<T>(x, cols, pos, f, rows, half, s1, y1, h1, d1, o1, il1, s2, y2, h2, d2, o2, il2);              \
    }                                                                                                              \
    extern "C" __global__ void rope_cols8_##S(const T* x, int cols, int start, T* y, const int* pos,              \
                                              const float* f, int heads, int hd, int offset, int half, int il,     \
                                              int hpb) {                                                           \
        rope_cols8<T>(x, cols, start, y, pos, f, heads, hd, offset, half, il, hpb);                                \
    }                                                                                                              \
    extern "C" __global__ void mla_prep_##S(const T* proj, int q_a, int lora, int rope, int idx, int iw,          \
                                            float iw_scale, const float* qn, const float* kvn, const float* kw,    \
                                            const float* kb, float eps, const int* pos, const float* f, int half,  \
                                            T* q, T* lat, T* kpe, T* key, T* w, const int* slots, void* c_lat,     \
                                            void* c_pe, void* c_idx, float* scales, int dtype) {                   \
        mla_prep<T>(proj, q_a, lora, rope, idx, iw, iw_scale, qn, kvn, kw, kb, eps, pos, f, half, q, lat, kpe,     \
                    key, w, CacheDst{slots, c_lat, c_pe, c_idx, scales, dtype});                                   \
    }                                                                                                              \
    extern "C" __global__ void scatter_add_scaled_##S(float* out, const T* y, const int* rows, const float* w,     \
                                                      int n, int cols) {                                           \
        scatter_add_scaled<T>(out, y, rows, w, n, cols);                                                           \
    }
OPS(float, f32)
OPS(__nv_bfloat16, bf16)

extern "C" __global__ void cast_f32_bf16(const float* x, __nv_bfloat16* y, size_t n) { cast(x, y, n); }
extern "C" __global__ void cast_bf16_f32(const __nv_bfloat16* x, float* y, size_t n) { cast(x, y, n); }
