// MLA flash attention on tensor cores for bf16 activations (the serving path; attention.cu's `mla_flash_f32` is
// the exact f32 path). Same contract as mla_flash: block (g, r, s) of grid (⌈heads / 8⌉, n_rows, splits) takes
// heads g·8.. of row row0 + r over the s-th share of the row's keys and leaves the share's unnormalised latent mix
// and (max, Σ e^{s − max}) per head for mla_out to merge.
//
// Absorbed MLA is MQA over the cached rows [c | k_pe] (D = lora + rope values), so both products are small
// matrix multiplications on `mma.m16n8k16` (FlashMLA's shape, on sm_80 instructions): scores S = Q · Kᵀ over a
// tile of 32 keys and the mix O += P · C with C the latent part of the same tile; the f32 online softmax sits
// between. The fragment's 16 rows are the block's 8 heads twice: rows 0..7 take q (or P) rounded to bf16, rows
// 8..15 what that rounding left (v − bf16(v), in bf16), so the two halves of each result add up to products of
// f32 q and P to ~2^-16 — only the cached keys carry bf16 rounding, as on the scalar path.
//
// Tiles are double-buffered: while the math runs on tile i, tile i + 1 is on its way — 16-byte cp.async copies of
// each key's row for a bf16 cache (whole rows in flight, not a load per value), or converted from an f32 / fp8
// cache by plain loads. Keys past the share or outside 0..pos are zero rows with probability 0.
//
// Shared: q [16][CS] bf16 (rounded, then remainders), two tiles [32][CS] bf16, partial scores [2][8][32] f32,
// P [16][40] bf16 (the same split), the heads' corrections [8], slots [2][32]. CS = DP + 8 with DP = D rounded
// up to 16 (zero columns): row strides of 4 mod 8 words keep the fragment loads and ldmatrix free of bank
// conflicts.
#include "common.cuh"
#include "attention.cuh"

#define FM_KT 32  // keys per tile
#define FM_PS 40  // bf16 per head row of P (32 + 8: conflict-free fragment loads)

// c += A·B with A the 16 × 16 block of a [16][stride] bf16 matrix (rows 0..7 rounded values, 8..15 remainders)
// whose lane pair starts at `a`: a0/a2 from row `group` at columns k and k + 8, a1/a3 from row group + 8.
__device__ __forceinline__ void fm_mma(float* c, const __nv_bfloat16* a, int stride, u32 b0, u32 b1) {
    const u32 a0 = *(const u32*)a, a2 = *(const u32*)(a + 8);
    const u32 a1 = *(const u32*)(a + 8 * stride), a3 = *(const u32*)(a + 8 * stride + 8);
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// v as bf16 (hi) and what that rounding left, as bf16 (lo): hi + lo = v to ~2^-16 relative.
__device__ __forceinline__ void split_bf16(float v, __nv_bfloat16* hi, __nv_bfloat16* lo) {
    const __nv_bfloat16 h = __float2bfloat16(v);
    *hi = h;
    *lo = __float2bfloat16(v - __bfloat162float(h));
}

// Two 8×8 b16 matrices transposed (the B fragment of a 16×8 block stored k-major): lanes 0..15 give the rows.
__device__ __forceinline__ void ldmatrix_x2_trans(u32& r0, u32& r1, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r0), "=r"(r1)
                 : "r"(smem_addr(p)));
}

extern "C" __global__ void __launch_bounds__(256, 1) mla_flash_mma_bf16(
    const float* q_lat,           // [n_rows, heads, lora]
    const __nv_bfloat16* q,       // [rows, heads, nope + rope]: q_pe is each head's tail
    const void* c_lat,            // [slots, lora] in the cache dtype
    const void* c_pe,             // [slots, rope]
    const float* scales,          // [slots, 3]
    int dtype, const int* meta, const int* tables,
    const int* keys,              // [rows, key_stride], or null: every position 0..count-1
    int key_stride, int row0, int heads, int nope, int rope, int lora, float scale,
    float* o_part,                // [n_rows, heads, splits, lora]
    float* ml_part) {             // [n_rows, heads, splits, 2]
    extern __shared__ __align__(16) unsigned char fm_smem[];
    const int D = lora + rope, DP = (D + 15) / 16 * 16, CS = DP + 8;
    __nv_bfloat16* qs = (__nv_bfloat16*)fm_smem;                 // [16][CS]
    __nv_bfloat16* tile = qs + 2 * MLA_HEADS * CS;               // [2][FM_KT][CS]
    float* sc = (float*)(tile + 2 * FM_KT * CS);                 // [2][8][FM_KT]
    __nv_bfloat16* ps = (__nv_bfloat16*)(sc + 2 * MLA_HEADS * FM_KT);  // [16][FM_PS]
    float* corr = (float*)(ps + 2 * MLA_HEADS * FM_PS);          // [8]
    int* slot = (int*)(corr + MLA_HEADS);                        // [2][FM_KT]

    const int lr = blockIdx.y, r = row0 + lr, split = blockIdx.z, splits = gridDim.z;
    const int h0 = blockIdx.x * MLA_HEADS, warp = threadIdx.x / 32, lane = threadIdx.x & 31;
    const int group = lane >> 2, quad = lane & 3;
    // A selection holds at most key_stride keys a row: a step's tables count every causal key (pos + 1), which
    // serve the dense and the selecting layers alike.
    const int pos = meta[r * 4], n = keys ? min(meta[r * 4 + 2], key_stride) : meta[r * 4 + 2];
    const int* table = tables + meta[r * 4 + 1];
    const int* kr = keys ? keys + (size_t)r * key_stride : nullptr;
    const int per = ((n + FM_KT - 1) / FM_KT + splits - 1) / splits;
    const int begin = min(n, split * per * FM_KT), end = min(n, (split + 1) * per * FM_KT);
    const int n_tiles = (end - begin + FM_KT - 1) / FM_KT;

    // Slots of tile i (threads < FM_KT), −1 for keys past the share or outside 0..pos.
    auto find_slots = [&](int i) {
        if (threadIdx.x < FM_KT) {
            const int t = begin + i * FM_KT + threadIdx.x;
            int s = -1;
            if (i < n_tiles && t < end) {
                const int p = kr ? kr[t] : t;
                if (p >= 0 && p <= pos) s = kv_slot(table, p);
            }
            slot[(i & 1) * FM_KT + threadIdx.x] = s;
        }
    };
    // Tile i into buffer i & 1: warp w copies keys w, w + 8, ...
    const bool raw = dtype == 1 && lora % 8 == 0 && rope % 8 == 0;
    auto load_tile = [&](int i) {
        if (i < n_tiles) {
            __nv_bfloat16* buf = tile + (i & 1) * FM_KT * CS;
            const int* sl = slot + (i & 1) * FM_KT;
            for (int t = warp; t < FM_KT; t += 8) {
                const int s = sl[t];
                __nv_bfloat16* row = buf + t * CS;
                if (raw) {
                    const __nv_bfloat16* lat = (const __nv_bfloat16*)c_lat + (size_t)max(s, 0) * lora;
                    const __nv_bfloat16* pe = (const __nv_bfloat16*)c_pe + (size_t)max(s, 0) * rope;
                    const int bytes = s >= 0 ? 16 : 0;  // 0: the copy writes zeros
                    for (int c = lane; c < D / 8; c += 32) {
                        const int d = c * 8;
                        cp_async16(row + d, d < lora ? lat + d : pe + d - lora, bytes);
                    }
                } else {
                    const float s_lat = s >= 0 ? scales[(size_t)s * 3] : 0.f;
                    const float s_pe = s >= 0 ? scales[(size_t)s * 3 + 1] : 0.f;
                    for (int d = lane; d < D; d += 32) {
                        float v = 0.f;
                        if (s >= 0)
                            v = d < lora ? kv_load(c_lat, (size_t)s * lora + d, dtype) * s_lat
                                         : kv_load(c_pe, (size_t)s * rope + d - lora, dtype) * s_pe;
                        row[d] = __float2bfloat16(v);
                    }
                }
            }
        }
        cp_async_commit();
    };

    // The first tile is requested before anything else, so its copies overlap the staging of q.
    find_slots(0);
    __syncthreads();
    load_tile(0);

    // Meanwhile warp g stages head h0 + g's q, split in two bf16 rows: the latent part as float4 loads all in
    // flight, then rope, then zeros to CS. Both tiles' columns D..CS are zeroed too (no copy ever writes them;
    // the loop's first barrier orders all of this before any read).
    {
        const int h = h0 + warp;
        __nv_bfloat16 *hi = qs + warp * CS, *lo = qs + (MLA_HEADS + warp) * CS;
        const float* ql = q_lat + ((size_t)lr * heads + min(h, heads - 1)) * lora;
#pragma unroll 4
        for (int d = lane * 4; d < lora; d += 128) {
            const float4 v = h < heads ? *(const float4*)(ql + d) : make_float4(0.f, 0.f, 0.f, 0.f);
            split_bf16(v.x, hi + d, lo + d);
            split_bf16(v.y, hi + d + 1, lo + d + 1);
            split_bf16(v.z, hi + d + 2, lo + d + 2);
            split_bf16(v.w, hi + d + 3, lo + d + 3);
        }
        for (int d = lora + lane; d < CS; d += 32) {
            const float v = h < heads && d < D ? act_ld(q, ((size_t)r * heads + h) * (nope + rope) + nope + d - lora) : 0.f;
            split_bf16(v, hi + d, lo + d);
        }
    }
    for (int i = threadIdx.x; i < 2 * FM_KT * (CS - D); i += blockDim.x) {
        const int row = i / (CS - D), d = D + i % (CS - D);
        tile[row * CS + d] = __float2bfloat16(0.f);
    }


    // The mix: warp w owns latent column tiles w, w + 8, ... (8 columns each; lora ≤ 512 gives ≤ 8 per warp),
    // rows group and group + 8 (both head `group`) of the fragment; the softmax state of head w lives in warp w.
    const int col_tiles = lora / 8;
    float acc[8][4];
#pragma unroll
    for (int j = 0; j < 8; j++)
#pragma unroll
        for (int i = 0; i < 4; i++) acc[j][i] = 0.f;
    float m = NEG_INF, sum = 0.f;
    const int ksteps = DP / 16, half = (ksteps + 1) / 2;

    for (int i = 0; i < n_tiles; i++) {
        find_slots(i + 1);
        __syncthreads();  // slots of i + 1 are set; everyone is done with buffer (i + 1) & 1 and with P
        load_tile(i + 1);
        cp_async_wait<1>();
        __syncthreads();  // tile i has landed, every thread's copies and stores
        const __nv_bfloat16* buf = tile + (i & 1) * FM_KT * CS;
        const int cnt = min(FM_KT, end - (begin + i * FM_KT));

        // Scores: warp w takes keys (w & 3)·8.. over k-steps [(w >> 2)·half, +half).
        {
            const int nt = warp & 3, kh = warp >> 2;
            float c[4] = {0.f, 0.f, 0.f, 0.f};
            const __nv_bfloat16* qrow = qs + group * CS + quad * 2;
            const __nv_bfloat16* krow = buf + (nt * 8 + group) * CS + quad * 2;
            for (int ks = kh * half; ks < min(ksteps, (kh + 1) * half); ks++) {
                const int k0 = ks * 16;
                fm_mma(c, qrow + k0, CS, *(const u32*)(krow + k0), *(const u32*)(krow + k0 + 8));
            }
            float* out = sc + (kh * MLA_HEADS + group) * FM_KT + nt * 8 + quad * 2;
            out[0] = c[0] + c[2];
            out[1] = c[1] + c[3];
        }
        __syncthreads();

        // Warp g: head h0 + g's online softmax over the tile (lane = key); P in bf16 for the mix.
        {
            const int sl = slot[(i & 1) * FM_KT + lane];
            float s = NEG_INF;
            if (lane < cnt && sl >= 0)
                s = (sc[warp * FM_KT + lane] + sc[(MLA_HEADS + warp) * FM_KT + lane]) * scale;
            float p;
            const float cf = online_softmax_step(s, m, sum, p);
            split_bf16(p, &ps[warp * FM_PS + lane], &ps[(MLA_HEADS + warp) * FM_PS + lane]);
            if (lane == 0) corr[warp] = cf;
        }
        __syncthreads();

        // O[head, col] = O · corr[head] + Σ_key P[head, key] · C[key, col].
        const float cr = corr[group];
        const __nv_bfloat16* prow = ps + group * FM_PS + quad * 2;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const int ct = warp + 8 * j;
            if (ct < col_tiles) {
#pragma unroll
                for (int e = 0; e < 4; e++) acc[j][e] *= cr;
                u32 b0, b1;
                ldmatrix_x2_trans(b0, b1, buf + (lane & 15) * CS + ct * 8);
                fm_mma(acc[j], prow, FM_PS, b0, b1);
                ldmatrix_x2_trans(b0, b1, buf + (16 + (lane & 15)) * CS + ct * 8);
                fm_mma(acc[j], prow + 16, FM_PS, b0, b1);
            }
        }
    }
    cp_async_wait<0>();

    const int h = h0 + group;
    if (h < heads) {
        const size_t at = ((size_t)lr * heads + h) * splits + split;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const int ct = warp + 8 * j;
            if (ct < col_tiles) {
                o_part[at * lora + ct * 8 + quad * 2] = acc[j][0] + acc[j][2];
                o_part[at * lora + ct * 8 + quad * 2 + 1] = acc[j][1] + acc[j][3];
            }
        }
    }
    if (h0 + warp < heads && lane == 0) {
        const size_t at = ((size_t)lr * heads + h0 + warp) * splits + split;
        ml_part[at * 2] = m;
        ml_part[at * 2 + 1] = sum;
    }
}
