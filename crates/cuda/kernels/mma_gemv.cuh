// The tensor-core GEMV's block (mma_gemv_run) and what its entry points share: gptq_mma.cu (the plain and
// grouped launches) and gptq_rope.cu (a projection whose store ropes its roped columns). After common.cuh,
// mma_pack.cuh, experts.cuh and mma.cuh.
//
// Quantized GEMV on tensor cores for bf16 decode batches (≤ 16 rows): y[b, n] = Σ_k x[b, k] · W[n, k].
//
// The weights are repacked at load (src/mma.rs) so that each lane's share of an `mma.m16n8k16` A fragment is in
// its own words: for every tile of 16 output columns and every chunk of 128 rows of K, lane L owns 64 values
// (8 k-steps × 4 pairs), stored as two blocks of BITS words; `mma_pair` (mma_pack.cuh) turns a pair into a bf16x2
// register holding base + q (base 128 for the lower 8 rows of each k-step, 128 or — 3 bits — 16 for the upper 8).
// Layout in memory: [tile][chunk][BITS][lane] uint2, so each load instruction of a warp reads 256 contiguous bytes.
//
// The multiply runs on tensor cores with fp32 accumulation; per chunk the zero and scale enter once:
// acc += s · (Σ x·(base + q) − Σ_lo x·(128 + z) − Σ_hi x·(base_hi + z)). The sums of x over the lower and upper
// 8 rows of each k-step come from one more mma whose A is ones on the lower half for rows 0..7 and ones on the
// upper half for rows 8..15, so they land in the very registers (batch row, lane) where the correction needs them,
// summed from the bf16 x the tensor cores see. The 16-row kernels (MMA_ZSUB_MIN_MB) instead subtract base + z
// from A before the mma (exact), acc += s · Σ x·(q − z), and need no sums. A symmetric weight (every zero
// 2^(BITS−1), src/gemv.rs) comes with null zeros: its zero is that constant and no zero is read from memory (the
// SYM kernels leave the per-column zero terms out altogether).
//
// A warp takes TPW tiles of 16 columns (4 tiles, 64 columns, for ≤ 8 rows; 2 tiles for 9..16 rows, whose
// accumulators are twice as many) over a run of chunks of K, and a block's 4 warps are laid out in 4 / KW groups
// of KW warps (KW, a template argument: the host picks the kernel, src/mma.rs `Layout`), each group on its own
// tiles and each of its warps over its KW-th of the block's chunks: KW = 4, split K, all 4 on the same tiles,
// their sums then added in shared memory in warp order (every plain GEMV, the grouped experts' of ≤ 8 rows); KW =
// 2, two pairs (the grouped experts' of ≤ 8 rows and short K: the one-row down), each pair's sums added so; KW =
// 1, warp columns, each warp on its own tiles over all of the block's chunks, storing its own sums (4 times the
// columns a block, no barrier after the start, and each warp's run 4 times as long, so a block's start and end are
// paid over 4 times the bytes: the grouped experts' of more rows).
// Every warp streams its weights, their scales and zeros *and* its x rows through a private ring of cp.async
// slots (no block-wide staging or barrier in the loop, and no load the math waits on that was not requested a
// whole ring ahead). A grid with
// several splits of K (gridDim.y) writes partial sums [splits, B, N]; for the plain GEMV the last block of a
// column range to finish (a counter per range) adds the splits in split order and stores y — deterministic, one
// launch. The grouped experts keep their partial sums for their own reductions (SiLU·up, the routing weights).
#pragma once

#define MMA_CHUNK 128
#define MMA_WARPS 4
#define MMA_XS 136      // bf16 per x row of a ring slot: +8 staggers the rows over the banks
#define MMA_MAX_STAGES 8
// Kernels of at least this many rows take the zeros out of A (one bf16x2 FMA a register) instead of out of sums of
// x (8 more mma a chunk per 8 rows: a fifth of the 8-row kernels' mma, a third of the 16-row kernels'). H200: the
// 16-row GEMV gains (bench_gemv o_proj batch 16 40.6 -> 33.9 us); the 8-row kernels, with +21% instructions a
// chunk and mma to spare there, are even in bench_gemv but 1.5-3% slower in the serving A/B (one-row step 0.373 ->
// 0.386 ms), so they keep the sums. A 3090 has ~76 tensor flop a byte of bandwidth (71 TFLOPS with f32 sums, 936
// GB/s; the H200 ~200): its one-row mma need ~70% of its tensor rate with the sums, ~56% without (arithmetic) —
// PIPEMOE_NVRTC_DEFINES=-DMMA_ZSUB_MIN_MB=8 (every kernel) is the first thing to time there; 32: none.
#ifndef MMA_ZSUB_MIN_MB
#define MMA_ZSUB_MIN_MB 16
#endif

// Tiles of 16 columns per warp (and per block) for MB rows: more tiles share each chunk's x fragments, sums of x
// and ring bookkeeping (src/mma.rs `tiles_per_block` mirrors this).
template <int MB>
__host__ __device__ constexpr int mma_tpw() {
    return MB == 8 ? 4 : 2;
}

// Tiles of 16 columns a block: a warp's times the groups of KW warps side by side.
template <int MB, int KW>
__device__ __forceinline__ constexpr int block_tiles() {
    return mma_tpw<MB>() * (MMA_WARPS / KW);
}

// cp.async.wait_group takes an immediate: the ring depth is chosen at launch (it depends on the batch). The
// depths the launch picks by default (src/mma.rs: 2 or 3 stages) are tested first: a switch compiles to a table
// load and an indirect branch every chunk; deeper rings (the tuning knobs) still go through it.
__device__ __forceinline__ void cp_async_wait_n(int n) {
    if (n <= 2) {
        if (n >= 2) cp_async_wait<2>();
        else if (n >= 1) cp_async_wait<1>();
        else cp_async_wait<0>();
        return;
    }
    switch (n) {
        case 0: cp_async_wait<0>(); break;
        case 1: cp_async_wait<1>(); break;
        case 2: cp_async_wait<2>(); break;
        case 3: cp_async_wait<3>(); break;
        case 4: cp_async_wait<4>(); break;
        case 5: cp_async_wait<5>(); break;
        case 6: cp_async_wait<6>(); break;
        default: cp_async_wait<MMA_MAX_STAGES - 1>(); break;
    }
}

// Bytes of one ring slot: the warp's weight words of one chunk, the scales then the zeros of its TPW·16 columns
// (f16), then `rows` rows of x, then (PRESUM) the 8 rows' sums of x of the chunk, (lo, hi) f32 a row. (src/mma.rs
// mirrors this.)
template <int TPW>
__device__ __forceinline__ constexpr int sz_bytes() {
    return TPW * 16 * 2 * 2;
}
#define MMA_XSUM_BYTES (8 * 8)
template <int BITS, int TPW, bool PRESUM>
__device__ __forceinline__ int slot_bytes(int rows) {
    return TPW * BITS * 32 * 8 + sz_bytes<TPW>() + rows * MMA_XS * 2 + (PRESUM ? MMA_XSUM_BYTES : 0);
}

// A lane's weight words of a ring slot's TPW tiles (its two blocks of BITS words a tile), as src/mma.rs lays a
// chunk out: tile t's word pairs at uint2 t·BITS·32 + j·32 + lane.
template <int BITS, int TPW>
__device__ __forceinline__ void slot_words(const unsigned char* sl, int lane, u32 (&w)[TPW][2 * BITS]) {
#pragma unroll
    for (int t = 0; t < TPW; t++) {
        const uint2* src = (const uint2*)sl + t * BITS * 32 + lane;
#pragma unroll
        for (int j = 0; j < BITS; j++) {
            const uint2 v = src[j * 32];
            w[t][2 * j] = v.x;
            w[t][2 * j + 1] = v.y;
        }
    }
}

// One block: tiles [block_x·BT, +BT) with BT = (4 / KW)·TPW, TPW a warp's (its group's), over chunks
// [blockIdx.y·k_chunk, +k_chunk) of K, for `nrows` ≤ MB rows of x (thread b < MB gives row b's x row as `row`,
// which mma_gemv_block reads: `xrow[b]`, or b when xrow is null).
// MB = 8 or 16: one or two n8 halves of the mma. PERM: the checkpoint reorders K (x is gathered through perm with
// plain stores instead of copied). SYM: a symmetric weight's kernel (null zeros): no per-column zero is read or
// applied, z_all alone (5-8% fewer instructions a chunk, sm_90; the host picks it, src/mma.rs `variant`).
// PRESUM (8 rows, no row order): the sums of x come with x, `xsums` [x row][K / 128] (lo, hi) — Σ over the chunk
// of x at k % 16 < 8 and at k % 16 ≥ 8, of the bf16 values — written by x's producer (experts_plan for the gate/up
// launch, gptq_reduce_silu for down), instead of by 8 more mma a chunk in every warp of every block.
// Shared: [MMA_WARPS][stages] slots (≥ the warps' sums at the end, MMA_WARPS · 16 · 32 floats).
// The block's sums go to its Store, every (b < nrows, n of the block's tiles) exactly once:
// - KW = 1: each warp stores its own columns' finished values, store(b, n, v) (a lambda);
// - KW > 1: the warps' sums meet in shared memory, red [MMA_WARPS][TPW·H·4][32] as the accumulators leave them,
//   and every thread of the block calls store.block(red, tile0, tiles, nrows) — the block's first tile and how many
//   of its BT are in the matrix — (SumStore below adds each group's up and stores them; gptq_rope.cu's ropes the
//   pairs of columns first). Every thread also calls store.prepare(nrows)
//   before its ring's first copies (cp.async copies of its own then join the first chunk's group) and
//   store.after_loop(nrows) after its loop.
// The block store rather than warp 0 adding the sums alone: H200, in-process A/B over 2 layers at 4K (session 27)
// about -4 us a step of 0.333 ms on top of no row-order path (-5.2; see mma_gemv_block), -8.6 to -9.4 with it.
// XPRE (no row order): x is not copied chunk by chunk, and the ring's slots hold none. store.stage_x(xs, nrows)
// may copy the block's split's x rows into shared memory after the rings ([chunks of the split][nrows][MMA_XS]
// bf16) as a cp.async group of its own, before the ring's first copies; once it has landed (the weights still in
// flight), store.fill_x(xs, nrows) makes them in place, and the loop reads them there (gptq_rope.cu's normed query:
// the rows RMS-normed on the way in; gptq_mma.cu's AddNormStore: the layer's input norm, from global memory).
template <int BITS, int MB, bool PERM, int KW, bool SYM, bool PRESUM = false, bool XPRE = false, typename Store>
__device__ void mma_gemv_run(const __nv_bfloat16* __restrict__ x, int row, int nrows,
                             const int* __restrict__ perm, const uint2* __restrict__ words,
                             const __half* __restrict__ zeros, const __half* __restrict__ scales, int K, int N,
                             int group_size, int k_chunk, int stages, int block_x, int split, Store store,
                             const float2* __restrict__ xsums = nullptr) {
    static_assert(!PRESUM || (MB == 8 && !PERM), "sums of x from the producer: 8 rows in K's own order");
    static_assert(!XPRE || (!PERM && !PRESUM), "x from the store: in K's own order, sums made in the loop");
    extern __shared__ __align__(16) unsigned char smem[];
    __shared__ int rows_of[MB];
    __shared__ const __nv_bfloat16* xrows[MB];
    __shared__ __align__(16) u32 sums_word[4];
    constexpr int H = MB / 8, TPW = mma_tpw<MB>();
    const int lane = threadIdx.x & 31, warp = threadIdx.x / 32, group = lane >> 2, quad = lane & 3;
    const int n_tiles = N / 16, k_chunks = K / MMA_CHUNK;
    // This warp's tiles (a warp past the matrix's last, KW < 4, has none and runs no chunk; its addresses stay on
    // the last tile) and its run of the split's chunks: its KW-th.
    const int tile_at = (block_x * (MMA_WARPS / KW) + warp / KW) * TPW;
    const int tiles = max(0, min(TPW, n_tiles - tile_at)), tile0 = min(tile_at, n_tiles - 1);
    const int split0 = split * (k_chunk / MMA_CHUNK);
    const int in_split = max(0, min(k_chunk / MMA_CHUNK, k_chunks - split0));
    const int per = (in_split + KW - 1) / KW;
    const int kw = warp % KW;  // this warp's place among those sharing the tiles
    const int c0 = split0 + min(in_split, kw * per);
    const int chunks = tiles > 0 ? min(in_split, (kw + 1) * per) - min(in_split, kw * per) : 0;
    constexpr int wbytes = TPW * BITS * 32 * 8;
    const int slot = slot_bytes<BITS, TPW, PRESUM>(XPRE ? 0 : nrows);  // XPRE: no x in the ring
    unsigned char* ring = smem + (size_t)warp * stages * slot;
    if (threadIdx.x < MB) {
        rows_of[threadIdx.x] = row;
        xrows[threadIdx.x] = x + (size_t)row * K;
    }
    if (threadIdx.x == 0) {
        sums_word[0] = sums_word[3] = 0x3F803F80u;  // bf16x2 ones
        sums_word[1] = sums_word[2] = 0u;
    }
    __syncthreads();

    // Chunks are requested in order, so where the next one comes from and goes to advances without a division:
    // its slot, its weight words, the row of its scales and zeros. Tiles past the matrix's last (N / 16 not a
    // multiple of TPW) read tile 0 again, are computed and store nothing: no branch in the loop.
    const u32 ring_at = smem_addr(ring);
    const int ring_bytes = stages * slot;
    int next_off = 0, next_k = c0 * MMA_CHUNK;
    const int cpg = group_size / MMA_CHUNK;  // chunks per group: group sizes are whole chunks (mma.rs `eligible`)
    int in_group = c0 % cpg;
    // Weights: a chunk of one tile is BITS·16 pieces of 16 bytes, contiguous; the slot holds the TPW tiles' pieces
    // in order, and lane L copies pieces L, L + 32, ...: their sources, as byte offsets from the chunk of tile 0.
    constexpr int PIECES = BITS * TPW / 2;  // per lane
    u32 piece_src[PIECES];
#pragma unroll
    for (int i = 0; i < PIECES; i++) {
        const int p = lane + 32 * i, t = p / (BITS * 16);
        piece_src[i] = (u32)((t < tiles ? t : 0) * (size_t)k_chunks * BITS * 256 + (p % (BITS * 16)) * 16);
    }
    const unsigned char* wsrc = (const unsigned char*)(words + ((size_t)tile0 * k_chunks + c0) * BITS * 32);
    // Scales then zeros of the TPW tiles: 2·TPW pieces of 8 columns each; a piece of a tile past the matrix is
    // zero-filled, and so are the zeros of a symmetric weight (no array: every zero is 2^(BITS−1), added below as
    // a constant), which then cost no bytes from memory.
    constexpr int SZ_LANES = 4 * TPW;
    const bool sym = SYM || zeros == nullptr, scale_lane = lane < 2 * TPW;
    const int sz_part = lane % (2 * TPW);
    const int sz_ok = lane < SZ_LANES && (sz_part >> 1) < tiles && (scale_lane || !sym);
    const __half* szsrc =
        (scale_lane || sym ? scales : zeros) + (size_t)(c0 / cpg) * N + tile0 * 16 + (sz_ok ? sz_part * 8 : 0);
    // x: lane copies 16 bytes of rows lane / 16, + 2, ... of each chunk; the first from a register.
    const int xcol = (lane & 15) * 8, xr0 = lane >> 4;
    const bool x0_ok = xr0 < nrows;
    const __nv_bfloat16* xsrc0 = xrows[x0_ok ? xr0 : 0] + xcol + next_k;
    const u32 sz_at = ring_at + wbytes + lane * 16;
    const u32 x_at = ring_at + wbytes + sz_bytes<TPW>() + xcol * 2;
    // PRESUM: lane b < nrows copies row b's (lo, hi) of each chunk after the slot's x rows.
    const int xsum_off = wbytes + sz_bytes<TPW>() + nrows * MMA_XS * 2;
    const float2* ssrc = PRESUM ? xsums + (size_t)rows_of[min(lane, MB - 1)] * k_chunks + c0 : nullptr;
    const unsigned long long wpol = weight_policy();
    auto issue = [&](bool real) {
        if (real) {
#pragma unroll
            for (int i = 0; i < PIECES; i++)
                cp_async16_w_at(ring_at + next_off + (lane + 32 * i) * 16, wsrc + piece_src[i], wpol);
            if (lane < SZ_LANES) cp_async16_at(sz_at + next_off, szsrc, sz_ok ? 16 : 0);
            if constexpr (XPRE) {
                // x is in shared memory already (fill_x)
            } else if (!PERM) {
                // x through L1: a block's warps on other columns (KW < 4), and other blocks of the SM on the same
                // rows and chunks, copy the same x of a chunk at about the same time. Through L2 alone each warp's
                // copy is its own L2 read: 256 bytes a row beside 3 KB of weights (8 rows: 2 KB; the 16-row kernels'
                // 2 tiles: 4 KB beside 1.5 KB), and L2 was the busiest unit of the 32-row grouped launches (ncu,
                // session 17: 86% against DRAM's 69%).
                if (x0_ok) cp_async16_ca_at(x_at + next_off + xr0 * (MMA_XS * 2), xsrc0);
                // Not unrolled: unrolled, its copies for rows up to MB were issued (predicated off) every chunk
                // whatever nrows — ~45 instructions a chunk of the one-row loop's ~500 (tools/sass.py, sm_90).
#pragma unroll 1
                for (int r = xr0 + 2; r < nrows; r += 2)
                    cp_async16_ca_at(x_at + next_off + r * (MMA_XS * 2), xrows[r] + next_k + xcol);
            } else {
                // Four values a lane at a time, loaded before any is stored: a store to shared memory between one
                // load and the next (rows_of is shared too) kept them one after another, two round trips each.
                __nv_bfloat16* xd = (__nv_bfloat16*)(ring + next_off + wbytes + sz_bytes<TPW>());
                const int n = nrows * MMA_CHUNK;
                for (int i0 = lane; i0 < n; i0 += 4 * 32) {
                    __nv_bfloat16 v[4];
#pragma unroll
                    for (int u = 0; u < 4; u++) {
                        const int i = min(i0 + 32 * u, n - 1);
                        v[u] = x[(size_t)rows_of[i >> 7] * K + perm[next_k + (i & 127)]];
                    }
#pragma unroll
                    for (int u = 0; u < 4; u++) {
                        const int i = i0 + 32 * u;
                        if (i < n) xd[(i >> 7) * MMA_XS + (i & 127)] = v[u];
                    }
                }
            }
            if (PRESUM && lane < nrows) cp_async8_at(ring_at + next_off + xsum_off + lane * 8, ssrc);
            if (PRESUM) ssrc++;
            next_off += slot;
            if (next_off == ring_bytes) next_off = 0;
            next_k += MMA_CHUNK;
            xsrc0 += MMA_CHUNK;
            wsrc += BITS * 256;
            if (++in_group == cpg) {
                in_group = 0;
                szsrc += N;
            }
        }
        cp_async_commit();
    };
    // XPRE: the block's x after the rings (every warp's): copied first, made while the first chunks' weights are on
    // their way (the wait leaves the ring's stages − 1 groups pending: only x's, the oldest, must have landed).
    unsigned char* xpre = smem + (size_t)MMA_WARPS * stages * slot;
    const u32 xpre_at = smem_addr(xpre);
    if constexpr (XPRE) store.stage_x(xpre, nrows);
    if constexpr (KW > 1) store.prepare(nrows);
    for (int c = 0; c < stages - 1; c++) issue(c < chunks);
    if constexpr (XPRE) {
        cp_async_wait_n(stages - 1);
        __syncthreads();
        store.fill_x(xpre, nrows);
        __syncthreads();
    }

    float acc[TPW][H][4];
#pragma unroll
    for (int t = 0; t < TPW; t++)
#pragma unroll
        for (int h = 0; h < H; h++)
#pragma unroll
            for (int i = 0; i < 4; i++) acc[t][h][i] = 0.f;
    // A for the sums of x: rows 0..7 ones on the lower 8 rows of K of a step, rows 8..15 ones on the upper 8.
    // Loaded from shared memory by an asm the compiler cannot see through: as constants (and a plain load of
    // sums_word, which LLVM folds to the one value ever stored there) it rebuilt them before every mma, the mma's
    // result taking their registers (24 moves a chunk of the 3-bit one-row loop's 508 instructions, sm_86). As
    // two loaded words (ones, zero) it still built a quad {ones, zero, zero, ones} of copies before each chain of
    // the sums (~20 moves a chunk, sm_90): four words, each its own register to the compiler, are used in place
    // (the one-row loops 495-504 -> 484-489 instructions and 964-1003 -> 942-968 fixed stall cycles, sm_90).
    u32 sums_a[4];
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(sums_a[0]), "=r"(sums_a[1]), "=r"(sums_a[2]), "=r"(sums_a[3])
                 : "r"(smem_addr(sums_word)));
    // x fragments by ldmatrix: lane L gives the address of row L % 8 (+ 8 for the second half of 16 rows) of
    // matrix L / 8 — k 0..7 and 8..15 of one step, then of the next. Rows past nrows read row nrows − 1, whose
    // products only reach outputs that are never stored.
    u32 xrow_at[H];
#pragma unroll
    for (int h = 0; h < H; h++)
        xrow_at[h] = (max(0, min(h * 8 + (lane & 7), nrows - 1)) * MMA_XS + (lane >> 3) * 8) * 2;
    constexpr float BASE_HI = mma_base_hi<BITS>();
    constexpr bool ZSUB = MB >= MMA_ZSUB_MIN_MB;
    // The zero every column shares when the weight is symmetric (its zeros in the ring are 0), else 0 (the ring
    // holds each column's).
    const float z_all = SYM ? sym_zero<BITS>() : shared_zero<BITS>(zeros);
    u32 negz_sym[4];
#pragma unroll
    for (int r = 0; r < 4; r++) negz_sym[r] = bf16x2_splat(-((r < 2 ? 128.f : BASE_HI) + z_all));
    int read_off = 0;
    for (int c = 0; c < chunks; c++) {
        __syncwarp();  // every lane has read the slot the next issue refills
        issue(c + stages - 1 < chunks);
        cp_async_wait_n(stages - 1);
        __syncwarp();  // and every lane's copies of this chunk (x rows are read across lanes) have landed
        const unsigned char* sl = ring + read_off;
        const u32 xs_at = XPRE ? xpre_at + (u32)((c0 - split0 + c) * nrows * MMA_XS * 2)
                               : ring_at + read_off + wbytes + sz_bytes<TPW>();
        // PRESUM: the (lo, hi) sums of rows 2·quad and 2·quad + 1, where the mma of the sums would leave them.
        float pre[4];
        if constexpr (PRESUM)
            asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];"
                         : "=f"(pre[0]), "=f"(pre[1]), "=f"(pre[2]), "=f"(pre[3])
                         : "r"(ring_at + read_off + xsum_off + quad * 16));
        read_off += slot;
        if (read_off == ring_bytes) read_off = 0;
        const __half* szs = (const __half*)(sl + wbytes);  // scales [TPW·16], zeros [TPW·16]
        u32 w[TPW][2 * BITS];
        slot_words<BITS, TPW>(sl, lane, w);
        // ZSUB: A is q − z itself, (base + q) − (base + z) by one bf16x2 FMA a register — exact, both small
        // integers (z ≤ 2^BITS) — so no sums of x are needed: −(base + z) of pair r's column (a0, a2: group; a1,
        // a3: group + 8) and base (r < 2: 128, else BASE_HI), per tile.
        // SYM: every column's, the loop's constants (negz_sym).
        u32 negz[TPW][4];
        if constexpr (ZSUB) {
#pragma unroll
            for (int t = 0; t < TPW; t++)
#pragma unroll
                for (int r = 0; r < 4; r++) {
                    if constexpr (SYM) {
                        negz[t][r] = negz_sym[r];
                    } else {
                        const float z = __half2float(szs[TPW * 16 + t * 16 + group + 8 * (r & 1)]) + z_all;
                        negz[t][r] = bf16x2_splat(-((r < 2 ? 128.f : BASE_HI) + z));
                    }
                }
        }
        // The sums of x in two chains, the even k-steps' and the odd ones' (added after the loop): in one, its 8 mma
        // one after another were the chunk's longest chain, and the compiler issued them first, each waiting out
        // the last's latency (sm_90: the loop's fixed stall cycles 1,132 -> 1,030 a chunk; sm_86 1,207 -> 1,115).
        float cacc[TPW][H][4], xsum[2][H][4];
#pragma unroll
        for (int h = 0; h < H; h++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                xsum[0][h][i] = xsum[1][h][i] = 0.f;
#pragma unroll
                for (int t = 0; t < TPW; t++) cacc[t][h][i] = 0.f;
            }
#pragma unroll
        for (int kp = 0; kp < 4; kp++) {  // two k-steps per ldmatrix
            u32 xb[H][4];
#pragma unroll
            for (int h = 0; h < H; h++) ldmatrix_x4_at(xb[h], xs_at + xrow_at[h] + kp * 64);
#pragma unroll
            for (int s = 0; s < 2; s++) {
                const int ks = kp * 2 + s;
                if constexpr (!ZSUB && !PRESUM) {
#pragma unroll
                    for (int h = 0; h < H; h++) mma_16816(xsum[s][h], sums_a, xb[h][2 * s], xb[h][2 * s + 1]);
                }
#pragma unroll
                for (int t = 0; t < TPW; t++) {
                    const u32* blk = w[t] + (ks / 4) * BITS;
                    u32 a[4];
#pragma unroll
                    for (int r = 0; r < 4; r++) {
                        a[r] = mma_pair<BITS>(blk, (ks % 4) * 4 + r);
                        if constexpr (ZSUB) a[r] = bf16x2_add(a[r], negz[t][r]);
                    }
#pragma unroll
                    for (int h = 0; h < H; h++) mma_16816(cacc[t][h], a, xb[h][2 * s], xb[h][2 * s + 1]);
                }
            }
        }
        // Per batch row: Σ_lo·128 + Σ_hi·base_hi (+ the shared zero's z_all·(Σ_lo + Σ_hi)) and Σ_lo + Σ_hi (xsum:
        // [Σ_lo b, Σ_lo b+1, Σ_hi b, Σ_hi b+1]).
        float based[H][2], total[H][2];
#pragma unroll
        for (int h = 0; h < H; h++)
#pragma unroll
            for (int j = 0; j < 2; j++) {
                float lo, hi;
                if constexpr (PRESUM) {
                    lo = pre[2 * j];
                    hi = pre[2 * j + 1];
                } else {
                    lo = xsum[0][h][j] + xsum[1][h][j];
                    hi = xsum[0][h][2 + j] + xsum[1][h][2 + j];
                }
                total[h][j] = lo + hi;
                based[h][j] = 128.f * lo + BASE_HI * hi + z_all * total[h][j];
            }
        // Scale and zero of the lane's two columns per tile (group and group + 8); SYM: no zero but z_all (in
        // `based`), neither read nor applied.
#pragma unroll
        for (int t = 0; t < TPW; t++) {
            float sc[2], z[2] = {0.f, 0.f};
#pragma unroll
            for (int j = 0; j < 2; j++) {
                sc[j] = __half2float(szs[t * 16 + group + 8 * j]);
                if constexpr (!SYM) z[j] = __half2float(szs[TPW * 16 + t * 16 + group + 8 * j]);
            }
#pragma unroll
            for (int h = 0; h < H; h++)
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    float v = cacc[t][h][i];
                    if constexpr (!ZSUB) v -= based[h][i & 1];
                    if constexpr (!ZSUB && !SYM) v -= z[i >> 1] * total[h][i & 1];
                    acc[t][h][i] += sc[i >> 1] * v;
                }
        }
    }

    if constexpr (KW == 1) {  // the warp's own columns
#pragma unroll
        for (int t = 0; t < TPW; t++)
#pragma unroll
            for (int h = 0; h < H; h++)
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const int b = h * 8 + quad * 2 + (i & 1);
                    const int n = (tile0 + t) * 16 + group + 8 * (i >> 1);
                    if (t < tiles && b < nrows) store(b, n, acc[t][h][i]);
                }
    } else {
        store.after_loop(nrows);
        constexpr int V = TPW * H * 4;
        __syncthreads();  // every warp is done with its ring
        float* red = (float*)smem;  // [MMA_WARPS][V][32]
#pragma unroll
        for (int t = 0; t < TPW; t++)
#pragma unroll
            for (int h = 0; h < H; h++)
#pragma unroll
                for (int i = 0; i < 4; i++) red[(warp * V + (t * H + h) * 4 + i) * 32 + lane] = acc[t][h][i];
        __syncthreads();
        constexpr int BT = block_tiles<MB, KW>();
        const int blk0 = block_x * BT;
        store.block(red, min(blk0, n_tiles - 1), max(0, min(BT, n_tiles - blk0)), nrows);
    }
}

// mma_gemv_run for a launch whose weights may have a row order of K (REORDERED: each block takes the gathering path
// where its weight's perm is not null) or whose weights have none (no gathering path is compiled). The host picks
// (src/mma.rs, src/experts.rs): a kernel that carries both paths is twice the code, and its launches of weights
// without a row order were slower — H200, in-process A/B over 2 layers at 4K (session 27): -5.2 us a step of
// 0.333 ms without the path; bench_gemv o_proj at 8 rows 27.2 -> 25.5 us.
template <int BITS, int MB, bool REORDERED, int KW, bool SYM, bool PRESUM = false, typename Store>
__device__ __forceinline__ void mma_gemv_block(const __nv_bfloat16* x, const int* xrow, int nrows, const int* perm,
                                               const uint2* words, const __half* zeros, const __half* scales, int K,
                                               int N, int group_size, int k_chunk, int stages, int block_x,
                                               int split, Store store, const float2* xsums = nullptr) {
    // Thread b < MB's x row, read before the dispatch (which waits for `perm`), so both loads are in flight at once.
    const int row = threadIdx.x < MB && threadIdx.x < nrows ? (xrow ? xrow[threadIdx.x] : threadIdx.x) : 0;
    if constexpr (REORDERED) {
        if (perm != nullptr) {
            mma_gemv_run<BITS, MB, true, KW, SYM>(x, row, nrows, perm, words, zeros, scales, K, N, group_size,
                                                    k_chunk, stages, block_x, split, store);
            return;
        }
    }
    mma_gemv_run<BITS, MB, false, KW, SYM, PRESUM>(x, row, nrows, nullptr, words, zeros, scales, K, N, group_size,
                                                     k_chunk, stages, block_x, split, store, xsums);
}

// Row b's column c (of the block's (4 / KW)·TPW·16) summed over the KW warps that shared its K, in warp order:
// red as mma_gemv_run leaves it, the value where mma_16816's accumulator put it in warps (c / (16·TPW))·KW.. —
// lane (c % 8)·4 + (b % 8) / 2, register ((c % (16·TPW) / 16)·H + b / 8)·4 + (c % 16 / 8)·2 + b % 2.
template <int MB, int KW = MMA_WARPS>
__device__ __forceinline__ float block_sum(const float* red, int b, int c) {
    constexpr int H = MB / 8, TPW = mma_tpw<MB>(), V = TPW * H * 4;
    const int g0 = c / (16 * TPW) * KW;
    c %= 16 * TPW;
    const int r = c & 15, lane = (r & 7) * 4 + ((b & 7) >> 1);
    const int i = ((c >> 4) * H + (H > 1 ? b >> 3 : 0)) * 4 + (r >> 3) * 2 + (b & 1);  // (b < MB)
    float v = 0.f;
    for (int g = g0; g < g0 + KW; g++) v += red[(g * V + i) * 32 + lane];
    return v;
}

__device__ __forceinline__ void store_y(float* y, size_t i, float v) { y[i] = v; }
__device__ __forceinline__ void store_y(__nv_bfloat16* y, size_t i, float v) { y[i] = __float2bfloat16(v); }

// A split-K block's sums stored as they are (the plain GEMV's y or partial sums, the grouped experts' partial
// sums): row b's column n at y[b·stride + n], a (row, column) a thread, consecutive threads on consecutive columns.
template <int MB, typename T, int KW = MMA_WARPS>
struct SumStore {
    T* y;
    size_t stride;
    __device__ __forceinline__ void prepare(int) const {}
    __device__ __forceinline__ void after_loop(int) const {}
    __device__ __forceinline__ void block(const float* red, int tile0, int tiles, int nrows) const {
        constexpr int COLS = mma_tpw<MB>() * 16 * (MMA_WARPS / KW);
#pragma unroll 1
        for (int o = threadIdx.x; o < nrows * COLS; o += blockDim.x) {
            const int b = o / COLS, c = o % COLS;
            if (c < tiles * 16) store_y(y, b * stride + tile0 * 16 + c, block_sum<MB, KW>(red, b, c));
        }
    }
};

// Blocks per multiprocessor the 8-row kernels are compiled for (`__launch_bounds__`' second argument): 4, at most
// 128 registers. Left to the compiler, the grouped kernel (its fused reductions' values live across the main loop)
// took 136 registers, 3 blocks per SM, and the MoE block was slower; the plain one took 129 once its warps could
// store their own sums (KW = 1). 5 caps them at 96 (5 blocks, a few more instructions a chunk: tools/sass.py;
// slower, docs/PERF.md session 7). An experiment's knob: PIPEMOE_NVRTC_DEFINES=-DMMA_MIN_BLOCKS=5 (1: unbounded).
#ifndef MMA_MIN_BLOCKS
#define MMA_MIN_BLOCKS 4
#endif
#define MMA_BOUNDS(MB) __launch_bounds__(128, (MB) == 8 ? MMA_MIN_BLOCKS : 1)
