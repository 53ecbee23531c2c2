// What the indexer's scores kernels (indexer.cu) and the top-k (topk.cu) share: the top-k block's shape and a long
// row's first-level histogram, which the scores kernels count as they write the scores (src/indexer.rs `Long`).
// After common.cuh.
#pragma once

#define TOPK_THREADS 512  // indexer::TOPK_THREADS
#define TOPK_WARPS (TOPK_THREADS / 32)
#define TOPK_BINS 2048    // radix digits of 11, 11 and 10 bits: three passes cover a key
#define TOPK_SLOTS 16     // keys a thread holds of a row of one tile (thread t: keys t, t + TOPK_THREADS, ...)
#define TOPK_SEG (TOPK_THREADS * TOPK_SLOTS)  // one block's keys: a row of one tile, a segment of a long row
#define TOPK_TOP_SHIFT 21  // an order key's first-level bin: its top 11 bits
#define TOPK_MID_SHIFT 10  // its second-level bin within that: the next 11

// A warp's scores into a long row's first-level histogram: lane L's score `v`, where `valid`, counted in its bin
// of `h` (one segment's TOPK_BINS counts, in global memory, zeroed before the step's scores). Lanes whose keys
// share a bin add once, through the lowest of them, a round a bin: a tile's keys share a few bins (sign, exponent
// and two mantissa bits), and a global atomic a key would queue on those few words. Rounds rather than
// `__match_any_sync`, which made the scores kernel ~4 µs slower at 128K keys (H200, docs/PERF.md session 44).
// Every lane of the warp calls it.
__device__ __forceinline__ void topk_count_top(int* h, float v, bool valid) {
    const u32 bin = total_order_key(v) >> TOPK_TOP_SHIFT;
    // `left` is the same in every lane: a lane leaves it with the first of its bin's round, never before.
    for (unsigned left = __ballot_sync(0xffffffffu, valid); left;) {
        const int first = __ffs(left) - 1;
        const u32 b = __shfl_sync(0xffffffffu, bin, first);
        const unsigned same = __ballot_sync(0xffffffffu, valid && bin == b);
        if ((int)(threadIdx.x & 31) == first) atomicAdd(h + b, __popc(same));
        left &= ~same;
    }
}
