// Quantized GEMV on tensor cores for bf16 decode batches (≤ 16 rows), its entry points: one matrix (the split
// sums added by the last block of a column range), the grouped experts, and the repacked weight's dequantizer.
// The block's work, the weights' layout and the ring are mma_gemv.cuh's.
#include "common.cuh"
#include "mma_pack.cuh"
#include "experts.cuh"
#include "mma.cuh"
#include "mma_gemv.cuh"
#include "rows.cuh"

// After a split launch's blocks stored their partial sums [splits, B, N]: the last block of each column range
// (counters[blockIdx.x], left at 0 again) adds them in split order and stores y.
template <int MB, typename YT>
__device__ __forceinline__ void add_splits(const float* partial, YT* y, int* counters, int B, int N) {
    const int splits = gridDim.y;
    if (!arrive_last(&counters[blockIdx.x], splits)) return;
    constexpr int cols = block_tiles<MB, MMA_WARPS>() * 16;
    const int n0 = blockIdx.x * cols;
    for (int i = threadIdx.x; i < B * cols; i += blockDim.x) {
        const int b = i / cols, n = n0 + i % cols;
        if (n >= N) continue;
        float v = 0.f;
        for (int s = 0; s < splits; s++) v += __ldcg(&partial[((size_t)s * B + b) * N + n]);
        store_y(y, (size_t)b * N + n, v);
    }
}

// One matrix, rows 0..B of x: grid (⌈N / (16·TPW)⌉, splits), split K. One split stores y; several store partial
// sums [splits, B, N] and the last block of each column range (counters[blockIdx.x], left at 0 again) adds them.
// REORDERED: the weight has a row order of K (perm); without, none is read.
template <int BITS, int MB, bool REORDERED, bool SYM, typename YT>
__device__ void mma_gemv(const __nv_bfloat16* x, const int* perm, const uint2* words, const __half* zeros,
                         const __half* scales, float* partial, YT* y, int* counters, int B, int K, int N,
                         int group_size, int k_chunk, int stages) {
    const int splits = gridDim.y;
    auto run = [&](auto store) {
        mma_gemv_block<BITS, MB, REORDERED, MMA_WARPS, SYM>(x, nullptr, B, perm, words, zeros, scales, K, N, group_size,
                                                    k_chunk, stages, blockIdx.x, blockIdx.y, store);
    };
    if (splits == 1) {
        run(SumStore<MB, YT>{y, (size_t)N});
        return;
    }
    run(SumStore<MB, float>{partial + (size_t)blockIdx.y * B * N, (size_t)N});
    add_splits<MB>(partial, y, counters, B, N);
}

// A layer's input norm in its first projection (src/addnorm.rs): y = W · RMSNorm(h) for ≤ 8 bf16 rows in the plain
// one-matrix launch's grid and sums — bit for bit rms_norm (ops.cu, 512 threads a row) then that GEMV, with one
// launch and its gap fewer. With `add`, the norm of h + add, and h_out = h + add (the new residual): add_rms_norm
// then the GEMV (the serving path adds the MoE block's output in its combine instead: FUSE_COMBINE_ADD). The x after the ring (XPRE): each
// block norms the rows itself. Every block reads the whole rows (14 KB each at DeepSeek's 7,168) for the sum of
// squares, taken as rms_norm_row's 512 threads take it: the block's 128 threads play them (thread t is t, t + 128,
// t + 256 and t + 384, each with its pieces of 8 at u·8 and (u + 512)·8; its warp w the 512's warps w, w + 4, w + 8
// and w + 12, with the same lanes), so the butterflies and the 16 warps' sum run in the same order. It then writes
// only its split's chunks of the normed rows into shared memory, and the blocks of column block 0 store that range
// of h_out (a buffer of its own: the other blocks still read h). K % 128 == 0, K ≤ 8,192, 16-byte aligned rows.
template <typename YT>
struct AddNormStore : SumStore<8, YT> {
    const __nv_bfloat16* h;    // [rows, K]: the residual before the add
    const __nv_bfloat16* add;  // [rows, K], or null: the norm of h alone (h_out then null too)
    const float* g;            // [K]: the norm's weight
    float eps;
    __nv_bfloat16* h_out;      // [rows, K]: h + add, or null: not stored
    int K, split0, in_split;   // the block's chunks of 128: [split0, split0 + in_split)

    __device__ __forceinline__ void stage_x(unsigned char*, int) const {}

    // The sum of squares of played threads q0..q0 + Q of row (hr, ar) into scratch: their 2·Q (with ADD 4·Q) loads
    // in flight together. Each played thread's pieces in order, then its warp's butterfly: rms_norm_row's order.
    template <int Q, bool ADD>
    __device__ __forceinline__ void squares(const __nv_bfloat16* hr, const __nv_bfloat16* ar, int q0,
                                            float* scratch) const {
        const int t = threadIdx.x, lane = t & 31, warp = t / 32;
        uint4 hv[Q][2], av[Q][2];
#pragma unroll
        for (int q = 0; q < Q; q++)
#pragma unroll
            for (int j = 0; j < 2; j++) {
                const int c = (t + 128 * (q0 + q) + 512 * j) * 8;
                hv[q][j] = av[q][j] = make_uint4(0u, 0u, 0u, 0u);
                if (c < K) {
                    hv[q][j] = *(const uint4*)(hr + c);
                    if (ADD) av[q][j] = *(const uint4*)(ar + c);
                }
            }
#pragma unroll
        for (int q = 0; q < Q; q++) {
            float ss = 0.f;
#pragma unroll
            for (int j = 0; j < 2; j++) {
                float v[8], a[8];
                bf16x8_to_f32(hv[q][j], v);
                if (ADD) bf16x8_to_f32(av[q][j], a);
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    if (ADD) v[i] = rnd(h, v[i] + a[i]);
                    ss += v[i] * v[i];
                }
            }
            const float w = warp_sum(ss);
            if (lane == 0) scratch[warp + 4 * (q0 + q)] = w;
        }
    }

    __device__ __forceinline__ void fill_x(unsigned char* xs, int nrows) const {
        static_assert(MMA_WARPS == 4, "128 threads play rms_norm_row's 512");
        static_assert(NORM_PIECES == 2, "rms_norm_row's pieces: u and u + 512");
        __shared__ float scratch[32];
        const int t = threadIdx.x;
        // The norm's weight for the thread's first piece of the split, loaded before the rows' sums need a round
        // trip each (with in_split ≤ 8, the thread's only piece).
        const int pieces = in_split * (MMA_CHUNK / 8);
        float g0[8];
        if (t < pieces) load8(g + split0 * MMA_CHUNK + t * 8, g0);
        for (int r = 0; r < nrows; r++) {
            const __nv_bfloat16 *hr = h + (size_t)r * K, *ar = add != nullptr ? add + (size_t)r * K : nullptr;
            // The four played threads' 8 loads at once; with add, two threads' 8 at a time as before (16 registers
            // of uint4 at once, not checked for spills).
            if (add == nullptr) {
                squares<4, false>(hr, nullptr, 0, scratch);
            } else {
                squares<2, true>(hr, ar, 0, scratch);
                squares<2, true>(hr, ar, 2, scratch);
            }
            const float inv = played_inv_rms(scratch, K, eps);
            // The split's pieces again (from L1), normed into the ring's x layout [chunk][row][MMA_XS].
            for (int p = t; p < pieces; p += blockDim.x) {
                const int c = split0 * MMA_CHUNK + p * 8;
                float v[8], a[8], gw[8], o[8];
                load8(hr + c, v);
                if (add != nullptr) load8(ar + c, a);
#pragma unroll
                for (int i = 0; i < 8; i++) gw[i] = g0[i];
                if (p != t) load8(g + c, gw);
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    if (add != nullptr) v[i] = rnd(h, v[i] + a[i]);
                    o[i] = gw[i] * (v[i] * inv);
                }
                save8((__nv_bfloat16*)xs + ((size_t)(p / (MMA_CHUNK / 8)) * nrows + r) * MMA_XS + p % (MMA_CHUNK / 8) * 8,
                      o);
                if (h_out != nullptr && blockIdx.x == 0) save8(h_out + (size_t)r * K + c, v);
            }
            __syncthreads();  // scratch again for the next row
        }
    }
};

template <int BITS, bool SYM>
__device__ void mma_gemv_addnorm(const __nv_bfloat16* h, const __nv_bfloat16* add, const float* g, float eps,
                                 __nv_bfloat16* h_out, const uint2* words, const __half* zeros, const __half* scales,
                                 float* partial, __nv_bfloat16* y, int* counters, int B, int K, int N,
                                 int group_size, int k_chunk, int stages) {
    const int split0 = blockIdx.y * (k_chunk / MMA_CHUNK);
    const int in_split = max(0, min(k_chunk / MMA_CHUNK, K / MMA_CHUNK - split0));
    const int row = threadIdx.x < B ? threadIdx.x : 0;
    auto run = [&](auto store) {
        mma_gemv_run<BITS, 8, false, MMA_WARPS, SYM, false, true>(h, row, B, nullptr, words, zeros, scales, K, N,
                                                                  group_size, k_chunk, stages, blockIdx.x,
                                                                  blockIdx.y, store);
    };
    if (gridDim.y == 1) {
        run(AddNormStore<__nv_bfloat16>{{y, (size_t)N}, h, add, g, eps, h_out, K, split0, in_split});
        return;
    }
    run(AddNormStore<float>{{partial + (size_t)blockIdx.y * B * N, (size_t)N}, h, add, g, eps, h_out, K, split0,
                            in_split});
    add_splits<8>(partial, y, counters, B, N);
}

// What a grouped launch's last block does after the others (`fuse`): nothing (the partial sums are reduced by
// gptq_reduce_silu / gptq_reduce_combine), SiLU·up (gate/up launch) or the routing-weighted sum (down launch).
#define FUSE_NONE 0
#define FUSE_SILU 1
#define FUSE_COMBINE 2
#define FUSE_COMBINE_ADD 3

// One row's MoE block as one launch (gptq_mma_moe_row below): how its gate/up blocks tell its down blocks that a
// tile's input is there. ready [tiles] counts, per tile, the plan's entries (once) and the column ranges whose SiLU·up
// is stored (bx of them); a gate/up block (need 0) adds to it with release semantics after its stores, a down block
// (need = 1 + bx) waits for its tile's count with acquire semantics — for 1 alone where the slice lacks the expert
// (its blocks read no input; the combine still reads the plan). ready null: the launches apart.
struct MoeSync {
    int* ready;
    int need;
};

__device__ __forceinline__ void moe_signal(int* ready) {
    asm volatile("red.release.gpu.global.add.s32 [%0], 1;" ::"l"(ready) : "memory");
}

// Thread 0 waits until *ready reaches `target`, and the block with it (the barrier passes the acquire on).
__device__ __forceinline__ void moe_wait(const int* ready, int target) {
    if (threadIdx.x == 0) {
        for (;;) {
            int v;
            asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(ready) : "memory");
            if (v >= target) break;
            __nanosleep(64);
        }
    }
    __syncthreads();
}

// Grouped experts, as gemv_grouped in gptq_gemv.cu: block `at.z` is a tile of up to 8 pairs routed to one expert;
// the matrix m of expert e comes from the tables at m·n_experts + e (words, zeros, scales, row order: read only
// REORDERED, when some expert of the launch has one). KW: warps of the block on the same tiles, each over its KW-th
// of K (mma_gemv.cuh; src/mma.rs `Layout`). `at` is the block's place in the grid (mats·⌈N / (16·block_tiles)⌉,
// splits, max tiles): blockIdx for a launch of its own, a ticket's for gptq_mma_moe_row. partial [splits, pairs,
// mats·N].
// FUSE_SILU (mats 2, gate then up): the last of a tile's column range's 2·splits blocks (counters[tile·bx + x])
// writes y[pair, n] = SiLU(Σ gate)·Σ up — what gptq_reduce_silu computes, in the same order.
// FUSE_COMBINE (mats 1): the last of a column range's n_tiles·splits blocks (counters[x]) writes y[r, n] for every
// row, as gptq_reduce_combine (pair_of, routing weights rw [rows, top_k], a shared slot weighted 1);
// FUSE_COMBINE_ADD adds it into y, the residual (src/experts.rs `into`).
// One row without a plan (`route`, the row's top_k expert ids): tile t is slot t of the row (the shared expert
// last), one pair, x row 0 (gptq_mma_moe_row's down blocks: pair_x[t]) — none when this slice lacks the expert (its
// gate address is 0).
// The gate/up launch's tile's first block writes what experts_plan would (tiles, n_tiles, pair_of) for the down
// launch, whose blocks of an empty tile only count themselves in for the combine.
template <int BITS, int KW, bool REORDERED, bool SYM, bool PRESUM>
__device__ void mma_gemv_grouped(const __nv_bfloat16* x, int* tiles, int* n_tiles, const int* pair_x, int pairs,
                                 const u64* w_tab, const u64* zr_tab, const u64* sc_tab, const u64* perm_tab,
                                 int n_experts, int mats, float* partial, int K, int N, int group_size, int k_chunk,
                                 int stages, int fuse, int* counters, __nv_bfloat16* y, int* pair_of,
                                 const float* rw, int rows, int top_k, int shared, const u32* route,
                                 const float2* xsums, uint3 at, int splits, MoeSync sync = {nullptr, 0}) {
    constexpr int MB = 8;
    const int t = at.z;
    constexpr int bt = block_tiles<MB, KW>();
    const int bx = (N / 16 + bt - 1) / bt;
    const int m = at.x / bx, cb = at.x % bx;
    int expert, p0, np, count;
    // The matrix's four table entries, loaded together as soon as the expert is known (one round trip of the
    // block's start, not one to learn whether the slice holds the expert and then one for its addresses).
    u64 wa, za, sa, pa;
    auto entries = [&]() {
        const int e = m * n_experts + expert;
        wa = w_tab[e], za = zr_tab[e], sa = sc_tab[e], pa = REORDERED ? perm_tab[e] : 0;
    };
    if (route != nullptr) {
        const int slots = top_k + shared;
        if (t >= slots) return;
        expert = t < top_k ? (int)route[t] : n_experts - 1;
        p0 = t;
        entries();
        np = wa != 0;  // a slice lacking the expert has zeros for each of its matrices (src/experts.rs)
        if (sync.need == 0 && at.x == 0 && at.y == 0 && threadIdx.x == 0) {
            tiles[3 * t] = expert;
            tiles[3 * t + 1] = t;
            tiles[3 * t + 2] = np;
            pair_of[t] = np ? t : -1;
            if (t == 0) *n_tiles = slots;
            if (sync.ready) moe_signal(sync.ready + t);
        }
        if (sync.need > 0) moe_wait(sync.ready + t, np ? sync.need : 1);
        if (np == 0 && sync.need == 0) return;  // a down block of it still counts itself in for the combine
        count = slots;
    } else {
        // The count and the tile's entry in one round trip, not one after the other (the grid's tiles stay within
        // the plan's room, 3·pairs entries; an entry past the count is read and not used — selected away, since a
        // test before the loads let the compiler issue them after it), and the count kept for the combine's
        // arrivals (re-read there after the block's stores, a round trip at its end: ncu, session 28).
        count = *n_tiles;
        const int e = tiles[3 * t], p = tiles[3 * t + 1], n = tiles[3 * t + 2];
        const bool live = t < count;
        expert = live ? e : 0, p0 = live ? p : 0, np = live ? n : 0;
        entries();
        if (!live) return;
    }
    const size_t width = (size_t)mats * N;
    float* out = partial + ((size_t)at.y * pairs + p0) * width + (size_t)m * N;
    if (np > 0) {
        const int* xrow = route == nullptr || sync.need > 0 ? pair_x + p0 : nullptr;
        auto run = [&](auto store) {
            mma_gemv_block<BITS, MB, REORDERED, KW, SYM, PRESUM>(
                x, xrow, np, (const int*)pa, (const uint2*)wa, (const __half*)za, (const __half*)sa, K, N,
                group_size, k_chunk, stages, cb, at.y, store, xsums);
        };
        if constexpr (KW == 1)
            run([&](int b, int n, float v) { out[b * width + n] = v; });
        else
            run(SumStore<MB, float, KW>{out, width});
    }
    if (fuse == FUSE_NONE) return;
    const int cols = bt * 16, n0 = cb * cols;
    if (fuse == FUSE_SILU) {
        if (!arrive_last(&counters[t * bx + cb], 2 * splits)) return;
        for (int i = threadIdx.x; i < np * cols; i += blockDim.x) {
            const int p = p0 + i / cols, n = n0 + i % cols;
            if (n < N) y[(size_t)p * N + n] = __float2bfloat16(expert_silu_up(partial, splits, pairs, N, p, n));
        }
        if (sync.ready) {
            __syncthreads();  // every thread's stores before thread 0's release (cumulative over them)
            if (threadIdx.x == 0) moe_signal(sync.ready + t);
        }
        return;
    }
    if (!arrive_last(&counters[cb], count * splits)) return;
    for (int i = threadIdx.x; i < rows * cols; i += blockDim.x) {
        const int r = i / cols, n = n0 + i % cols;
        if (n >= N) continue;
        const __nv_bfloat16 v =
            __float2bfloat16(expert_combine(partial, splits, pairs, N, pair_of, rw, r, n, top_k, shared));
        // FUSE_COMBINE_ADD: y is the residual, and gets the block's output added as add_rms_norm adds it (the
        // output rounded to bf16, then the sum): every column has one owner, and nothing else reads y meanwhile.
        const size_t at_y = (size_t)r * N + n;
        y[at_y] = fuse == FUSE_COMBINE_ADD ? __float2bfloat16(__bfloat162float(y[at_y]) + __bfloat162float(v)) : v;
    }
}

// One row's MoE block in one launch (src/experts.rs, one row with the shared expert in the launches): the gate/up
// launch's G blocks and the down launch's D blocks as tickets 0..G and G..G + D, taken in the order blocks start
// (ctl[0]), so every gate/up block has started, and will end without waiting on anything, before a down block
// waits on its tile (MoeSync): down's blocks fill the SMs as gate/up's last wave drains, with no launch between.
// Each half runs as its own launch would, on its own shape (KWG / KWD warps on a run of K, chunk, stages, splits),
// and computes the same values in the same order. counters: gate/up's SiLU arrivals [tiles·bx_g], down's combine
// arrivals after them [bx_d]; ctl [2 + tiles]: the ticket, the down blocks' arrivals, ready — all left at 0 by the
// last down block. Dynamic shared memory: the larger half's.
struct MoeHalf {
    int x, y, z, w;  // blocks along x, splits of K, k_chunk, stages
};
template <int BITS, int KWG, int KWD, bool SYM>
__device__ void mma_moe_row(const __nv_bfloat16* x, int* tiles, int* n_tiles, const int* pair_ids, int pairs,
                            const u64* gu_w, const u64* gu_z, const u64* gu_s, const u64* d_w, const u64* d_z,
                            const u64* d_s, int n_experts, float* gu_part, float* d_part, int hidden, int inter,
                            int group_size, MoeHalf gu_shape, MoeHalf d_shape, int fuse, int* counters, int* ctl,
                            __nv_bfloat16* h, __nv_bfloat16* y, int* pair_of, const float* rw, int top_k,
                            int shared, const u32* route) {
    __shared__ int ticket;
    const int n = top_k + shared;
    const int g = gu_shape.x * gu_shape.y * n, d = d_shape.x * d_shape.y * n;
    if (threadIdx.x == 0) ticket = atomicAdd(ctl, 1);
    __syncthreads();
    int k = ticket;
    const int bx_g = gu_shape.x / 2;
    int* ready = ctl + 2;
    if (k < g) {
        const uint3 at = make_uint3(k % gu_shape.x, k / gu_shape.x % gu_shape.y, k / (gu_shape.x * gu_shape.y));
        mma_gemv_grouped<BITS, KWG, false, SYM, false>(
            x, tiles, n_tiles, nullptr, pairs, gu_w, gu_z, gu_s, nullptr, n_experts, 2, gu_part, hidden, inter,
            group_size, gu_shape.z, gu_shape.w, FUSE_SILU, counters, h, pair_of, rw, 1, top_k, shared, route, nullptr,
            at, gu_shape.y, MoeSync{ready, 0});
        return;
    }
    k -= g;
    const uint3 at = make_uint3(k % d_shape.x, k / d_shape.x % d_shape.y, k / (d_shape.x * d_shape.y));
    mma_gemv_grouped<BITS, KWD, false, SYM, false>(
        h, tiles, n_tiles, pair_ids, pairs, d_w, d_z, d_s, nullptr, n_experts, 1, d_part, inter, hidden, group_size,
        d_shape.z, d_shape.w, fuse, counters + n * bx_g, y, pair_of, rw, 1, top_k, shared, route, nullptr, at,
        d_shape.y, MoeSync{ready, 1 + bx_g});
    if (arrive_last(ctl + 1, d) && threadIdx.x == 0) {
        // Every block has taken its ticket (the last ones went to down blocks, all of which have ended).
        for (int i = 0; i < n; i++) ready[i] = 0;
        ctl[0] = 0;
    }
}

// The plain kernels gptq_mma_gemv_w<BITS>_b<MB>[_perm|_sym]_to_<bf16|f32> and the grouped ones
// gptq_mma_gemv_grouped_w<BITS>_b8[_k2|_cols][_perm|_sym][_xs]_bf16 (KW 4, 2 or 1; REORDERED — no _k2_perm:
// src/mma.rs; SYM: a symmetric weight's, every zero the constant and none read or applied — mma_gemv.cuh — picked
// by the host when the weight, or every expert of the launch, has null zeros and no row order; PRESUM, `_xs`: the
// sums of x read from `xsums`, which the other kernels do not read — warp columns only, the launches of more rows
// than src/experts.rs FUSED_ROWS, whose inputs' producers write them).
#define MMA_PLAIN(BITS, MB, SUFFIX, REORDERED, SYM, YNAME, YT)                                                   \
    extern "C" __global__ void MMA_BOUNDS(MB) gptq_mma_gemv_w##BITS##_b##MB##SUFFIX##_to_##YNAME(                \
        const __nv_bfloat16* x, const int* perm, const uint2* words, const __half* zeros, const __half* scales,  \
        float* partial, YT* y, int* counters, int B, int K, int N, int group_size, int k_chunk, int stages) {   \
        mma_gemv<BITS, MB, REORDERED, SYM>(x, perm, words, zeros, scales, partial, y, counters, B, K, N,        \
                                           group_size, k_chunk, stages);                                       \
    }
#define MMA_GROUPED(BITS, NAME, KW, REORDERED, SYM, PRESUM)                                                     \
    extern "C" __global__ void MMA_BOUNDS(8) gptq_mma_gemv_grouped_w##BITS##_b8##NAME##_bf16(                   \
        const __nv_bfloat16* x, int* tiles, int* n_tiles, const int* pair_x, int pairs,                         \
        const u64* w, const u64* zr, const u64* sc, const u64* perm, int n_experts, int mats, float* partial,    \
        int K, int N, int group_size, int k_chunk, int stages, int fuse, int* counters, __nv_bfloat16* y,        \
        int* pair_of, const float* rw, int rows, int top_k, int shared, const u32* route,                       \
        const float2* xsums) {                                                                                  \
        mma_gemv_grouped<BITS, KW, REORDERED, SYM, PRESUM>(x, tiles, n_tiles, pair_x, pairs, w, zr, sc, perm,   \
                                                           n_experts, mats, partial, K, N, group_size, k_chunk, \
                                                           stages, fuse, counters, y, pair_of, rw, rows, top_k, \
                                                           shared, route, xsums, blockIdx, gridDim.y);          \
    }
#define MMA_PLAIN_MB(BITS, MB)                                                                                  \
    MMA_PLAIN(BITS, MB, , false, false, bf16, __nv_bfloat16)                                                    \
    MMA_PLAIN(BITS, MB, , false, false, f32, float)                                                             \
    MMA_PLAIN(BITS, MB, _perm, true, false, bf16, __nv_bfloat16)                                                \
    MMA_PLAIN(BITS, MB, _perm, true, false, f32, float)                                                         \
    MMA_PLAIN(BITS, MB, _sym, false, true, bf16, __nv_bfloat16)                                                 \
    MMA_PLAIN(BITS, MB, _sym, false, true, f32, float)
#define MMA_T(BITS)                                                                                             \
    MMA_PLAIN_MB(BITS, 8)                                                                                       \
    MMA_PLAIN_MB(BITS, 16)                                                                                      \
    MMA_GROUPED(BITS, , 4, false, false, false)                                                                 \
    MMA_GROUPED(BITS, _k2, 2, false, false, false)                                                              \
    MMA_GROUPED(BITS, _cols, 1, false, false, false)                                                            \
    MMA_GROUPED(BITS, _cols_xs, 1, false, false, true)                                                          \
    MMA_GROUPED(BITS, _perm, 4, true, false, false)                                                             \
    MMA_GROUPED(BITS, _cols_perm, 1, true, false, false)                                                        \
    MMA_GROUPED(BITS, _sym, 4, false, true, false)                                                              \
    MMA_GROUPED(BITS, _k2_sym, 2, false, true, false)                                                           \
    MMA_GROUPED(BITS, _cols_sym, 1, false, true, false)                                                         \
    MMA_GROUPED(BITS, _cols_sym_xs, 1, false, true, true)
MMA_T(2)
MMA_T(3)
MMA_T(4)
// gptq_mma_moe_row_w<BITS>_g<KWG>d<KWD>[_sym]_bf16: one row's MoE block in one launch (mma_moe_row), the gate/up
// half's warps KWG on a run of K (4: hidden of ≥ 24 chunks, DeepSeek's; 2: shorter), the down half's KWD (2: the
// one-row down's pairs, src/mma.rs `Layout::HalfK`); no row order. The host takes the two launches for any other.
#define MMA_MOE_ROW(BITS, NAME, KWG, KWD, SYM)                                                                  \
    extern "C" __global__ void MMA_BOUNDS(8) gptq_mma_moe_row_w##BITS##NAME##_bf16(                             \
        const __nv_bfloat16* x, int* tiles, int* n_tiles, const int* pair_ids, int pairs, const u64* gu_w,      \
        const u64* gu_z, const u64* gu_s, const u64* d_w, const u64* d_z, const u64* d_s, int n_experts,        \
        float* gu_part, float* d_part, int hidden, int inter, int group_size, int g_bx, int g_splits,           \
        int g_chunk, int g_stages, int d_bx, int d_splits, int d_chunk, int d_stages, int fuse, int* counters,  \
        int* ctl, __nv_bfloat16* h, __nv_bfloat16* y, int* pair_of, const float* rw, int top_k, int shared,     \
        const u32* route) {                                                                                     \
        mma_moe_row<BITS, KWG, KWD, SYM>(x, tiles, n_tiles, pair_ids, pairs, gu_w, gu_z, gu_s, d_w, d_z, d_s,   \
                                         n_experts, gu_part, d_part, hidden, inter, group_size,                 \
                                         MoeHalf{g_bx, g_splits, g_chunk, g_stages},                            \
                                         MoeHalf{d_bx, d_splits, d_chunk, d_stages}, fuse, counters, ctl, h, y, \
                                         pair_of, rw, top_k, shared, route);                                    \
    }
#define MMA_MOE_ROW_T(BITS)                                                                                     \
    MMA_MOE_ROW(BITS, _g4d2, 4, 2, false)                                                                       \
    MMA_MOE_ROW(BITS, _g4d2_sym, 4, 2, true)                                                                    \
    MMA_MOE_ROW(BITS, _g2d2, 2, 2, false)                                                                       \
    MMA_MOE_ROW(BITS, _g2d2_sym, 2, 2, true)
MMA_MOE_ROW_T(2)
MMA_MOE_ROW_T(3)
MMA_MOE_ROW_T(4)
#define MMA_ADDNORM(BITS, SYMNAME, SYM)                                                                        \
    extern "C" __global__ void MMA_BOUNDS(8) gptq_mma_gemv_addnorm_w##BITS##_b8##SYMNAME##_bf16(               \
        const __nv_bfloat16* h, const __nv_bfloat16* add, const float* g, float eps, __nv_bfloat16* h_out,     \
        const uint2* words, const __half* zeros, const __half* scales, float* partial, __nv_bfloat16* y,      \
        int* counters, int B, int K, int N, int group_size, int k_chunk, int stages) {                         \
        mma_gemv_addnorm<BITS, SYM>(h, add, g, eps, h_out, words, zeros, scales, partial, y, counters, B, K, N, \
                                    group_size, k_chunk, stages);                                              \
    }
#define MMA_ADDNORM_T(BITS) MMA_ADDNORM(BITS, , false) MMA_ADDNORM(BITS, _sym, true)
MMA_ADDNORM_T(2)
MMA_ADDNORM_T(3)
MMA_ADDNORM_T(4)

// The repacked weight back to f32 [N, K] in the checkpoint's row order (attention's absorbed kv_b_proj, tests).
template <int BITS>
__device__ void mma_dequant(const uint2* words, const __half* zeros, const __half* scales, const int* perm, float* w,
                            int K, int N, int group_size) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= (size_t)K * N) return;
    const int n = i / K, k = i % K;  // k: reordered row
    const int tile = n / 16, r16 = n % 16, chunk = k / MMA_CHUNK, kk = k % MMA_CHUNK;
    const int ks = kk / 16, k16 = kk % 16;
    const int lane = (r16 % 8) * 4 + (k16 % 8) / 2;
    const int reg = (r16 / 8) + 2 * (k16 / 8);
    const int p = ks * 4 + reg;  // pair 0..31 of the lane in this chunk
    const uint2* src = words + ((size_t)tile * (K / MMA_CHUNK) + chunk) * BITS * 32 + lane;
    u32 wv[2 * BITS];
    for (int j = 0; j < BITS; j++) {
        uint2 v = src[j * 32];
        wv[2 * j] = v.x;
        wv[2 * j + 1] = v.y;
    }
    const u32 v = mma_pair<BITS>(wv + (p / 16) * BITS, p % 16);
    const float q = __uint_as_float(((k16 % 2) ? (v >> 16) : (v & 0xFFFFu)) << 16) - mma_pair_base<BITS>(p % 16);
    const int g = k / group_size;
    const int src_k = perm ? perm[k] : k;
    const float z = gptq_zero<BITS>(zeros, (size_t)g * N + n);
    w[(size_t)n * K + src_k] = __half2float(scales[(size_t)g * N + n]) * (q - z);
}
#define MMA_DEQUANT(BITS)                                                                                    \
    extern "C" __global__ void gptq_mma_dequant_w##BITS##_f32(const uint2* q, const __half* z, const __half* s, \
                                                              const int* perm, float* w, int K, int N, int gs) { \
        mma_dequant<BITS>(q, z, s, perm, w, K, N, gs);                                                       \
    }
MMA_DEQUANT(2)
MMA_DEQUANT(3)
MMA_DEQUANT(4)
