// The indexer's top-k (src/indexer.rs): each row's topk largest scores as positions in ascending order, exactly the
// set of pipemoe_model::cpu::kernels::top_k (total_cmp order, ties to the lower index). A row of up to 8,192 keys
// is one block's (topk_one_tile); a longer row either one block's radix select over its tiles, or — few rows, the
// decode case — the multi-block path at the end of this file.

#include "common.cuh"

#define TOPK_THREADS 512  // indexer::TOPK_THREADS
#define TOPK_WARPS (TOPK_THREADS / 32)

// Exclusive prefix sum of v over the block's TOPK_THREADS threads in one barrier: each warp scans its own values
// by shuffles and leaves its total in wsum[warp]; after the barrier every warp adds up the totals of the warps
// before it (and `*total` all of them). The caller puts a barrier between two uses of one `wsum`.
__device__ __forceinline__ int block_scan_once(int v, int* wsum, int* total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
    int x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) wsum[warp] = x;
    __syncthreads();
    const int w = lane < TOPK_WARPS ? wsum[lane] : 0;
    int before = lane < warp ? w : 0, all = w;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        before += __shfl_xor_sync(0xffffffffu, before, o);
        all += __shfl_xor_sync(0xffffffffu, all, o);
    }
    *total = all;
    return before + x - v;
}

#define TOPK_PER 16       // keys a thread holds of a tile: a tile is TOPK_THREADS · TOPK_PER = 8,192 keys
#define TOPK_BINS 2048    // radix digits of 11, 11 and 10 bits: three passes cover a key

// Thread t's keys of the tile from t0: `per` consecutive ones (so one scan orders the last pass's output), as
// order keys in registers; `valid` bit j says key j exists. Every load is issued before any is used: past the
// row's end a thread reads its last key again and drops it.
__device__ __forceinline__ unsigned topk_load(const float* sc, int n, int t0, u32 key[TOPK_PER], int* per) {
    const int left = min(n - t0, TOPK_THREADS * TOPK_PER);
    *per = (left + TOPK_THREADS - 1) / TOPK_THREADS;
    const int first = t0 + threadIdx.x * *per;
    float v[TOPK_PER];
#pragma unroll
    for (int j = 0; j < TOPK_PER; j++) v[j] = sc[min(first + j, n - 1)];
    unsigned valid = 0;
#pragma unroll
    for (int j = 0; j < TOPK_PER; j++) {
        key[j] = total_order_key(v[j]);
        if (j < *per && first + j < n) valid |= 1u << j;
    }
    return valid;
}

#define TOPK_SLOTS 16  // keys a thread holds of a row of one tile (thread t: keys t, t + TOPK_THREADS, ...)
#define TOPK_SEG (TOPK_THREADS * TOPK_SLOTS)  // one block's keys: a row of one tile, a segment of a long row

// The topk largest of a row of n ≤ TOPK_THREADS · TOPK_SLOTS keys (n > topk), as indexer_topk_f32 writes them. The
// keys are held in registers, slot j of thread t being key t + j·TOPK_THREADS, so a slot is one coalesced load and
// every thread holds the same slots of the row. The topk-th largest key is found two bits a step from the highest
// bit where the keys differ (those above it are every key's): the block counts the keys at or above the three
// candidates the next two bits make (one barrier), keeps the largest candidate with at least topk keys at or above
// it, and stops when that count is exactly topk. Then positions in index order, i.e. slot by slot: each (slot,
// warp)'s taken keys by ballots, one warp's scan over them in that order, and the stores — two more barriers.
// (The radix passes over this row: ~1,430 instructions a warp, 21K cycles; a bisection a bit a step with a
// warp's finish: ~2,300, as long: ncu, docs/PERF.md session 25.)
__device__ __forceinline__ void topk_one_tile(const float* sc, int n, int topk, int* out, const int* pos = nullptr) {
    __shared__ u32 agree[2][TOPK_WARPS];
    __shared__ int counted[2][TOPK_WARPS];
    __shared__ int total;
    __shared__ int before[TOPK_SLOTS * TOPK_WARPS];  // (slot, warp) in index order: taken keys before it
    const int t = threadIdx.x, lane = t & 31, warp = t / 32;
    const int slots = (n + TOPK_THREADS - 1) / TOPK_THREADS;
    u32 key[TOPK_SLOTS];
    {
        // Every load issued before any is used: past the row, a thread reads its last key again and drops it.
        float v[TOPK_SLOTS];
#pragma unroll
        for (int j = 0; j < TOPK_SLOTS; j++) v[j] = sc[min(t + j * TOPK_THREADS, n - 1)];
#pragma unroll
        for (int j = 0; j < TOPK_SLOTS; j++) key[j] = t + j * TOPK_THREADS < n ? total_order_key(v[j]) : 0u;
    }
    // A key not held is 0: below every candidate (each has a bit set), and left out of the bits keys share.
    u32 all = ~0u, any = 0u;
#pragma unroll
    for (int j = 0; j < TOPK_SLOTS; j++) {
        all &= t + j * TOPK_THREADS < n ? key[j] : ~0u;
        any |= key[j];
    }
    all = __reduce_and_sync(0xffffffffu, all);
    any = __reduce_or_sync(0xffffffffu, any);
    if (lane == 0) {
        agree[0][warp] = all;
        agree[1][warp] = any;
    }
    __syncthreads();
    all = __reduce_and_sync(0xffffffffu, lane < TOPK_WARPS ? agree[0][lane] : ~0u);
    any = __reduce_or_sync(0xffffffffu, lane < TOPK_WARPS ? agree[1][lane] : 0u);
    const u32 differ = all ^ any;
    int b = differ ? 31 - __clz(differ) : -1;
    u32 pre = b < 0 ? all : all & ~((2u << b) - 1u);  // b = 31: no bit above it (2u << 31 is 0)
    bool exact = false;
#pragma unroll 1
    for (int parity = 0; b >= 0 && !exact; b -= 2, parity ^= 1) {
        // Candidates pre | 11, | 10, | 01 on bits b, b − 1 (at b = 0 only | 1, three times).
        const u32 hi = 1u << b, lo = b > 0 ? 1u << (b - 1) : hi;
        const u32 c3 = pre | hi | lo, c2 = pre | hi, c1 = pre | lo;
        int n3 = 0, n2 = 0, n1 = 0;
#pragma unroll
        for (int j = 0; j < TOPK_SLOTS; j++) {
            if (j >= slots) break;  // the block's: a uniform branch
            n3 += key[j] >= c3;
            n2 += key[j] >= c2;
            n1 += key[j] >= c1;
        }
        // A warp's counts (≤ 512 each) in one word, 10 bits apart; two slots a warp, a step's in turn (a warp
        // writes one again two steps on, past the barrier every warp passes only once it has read it).
        const int packed = __reduce_add_sync(0xffffffffu, n3 | (n2 << 10) | (n1 << 20));
        if (lane == 0) counted[parity][warp] = packed;
        __syncthreads();
        const int w = lane < TOPK_WARPS ? counted[parity][lane] : 0;
        const int m3 = __reduce_add_sync(0xffffffffu, w & 1023);
        const int m2 = __reduce_add_sync(0xffffffffu, (w >> 10) & 1023);
        const int m1 = __reduce_add_sync(0xffffffffu, (w >> 20) & 1023);
        const int kept = m3 >= topk ? m3 : m2 >= topk ? m2 : m1 >= topk ? m1 : -1;
        pre = m3 >= topk ? c3 : m2 >= topk ? c2 : m1 >= topk ? c1 : pre;
        exact = kept == topk;
    }
    // Keys above `prefix`, then the lowest-index ones equal to it: with an exact count, those at or above pre.
    const u32 prefix = exact ? pre - 1u : pre;
    const unsigned below = (1u << lane) - 1u;
#pragma unroll
    for (int j = 0; j < TOPK_SLOTS; j++) {
        if (j >= slots) break;
        const bool held = t + j * TOPK_THREADS < n;
        const unsigned g = __ballot_sync(0xffffffffu, held && key[j] > prefix);
        const unsigned e = __ballot_sync(0xffffffffu, held && key[j] == prefix);
        if (lane == 0) before[j * TOPK_WARPS + warp] = __popc(g) | (__popc(e) << 16);
    }
    __syncthreads();
    if (warp == 0) {
        // Exclusive scan of the (slot, warp) counts in index order (above in the low half, equal in the high: a
        // row has < 2^16 keys), TOPK_SLOTS · TOPK_WARPS / 32 a lane; the last lane leaves the total.
        constexpr int PER = TOPK_SLOTS * TOPK_WARPS / 32;
        int c[PER], run = 0;
#pragma unroll
        for (int i = 0; i < PER; i++) {
            const int k = lane * PER + i;
            c[i] = k < slots * TOPK_WARPS ? before[k] : 0;
            run += c[i];
        }
        int x = run;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int y = __shfl_up_sync(0xffffffffu, x, o);
            if (lane >= o) x += y;
        }
        if (lane == 31) total = x;
        x -= run;
#pragma unroll
        for (int i = 0; i < PER; i++) {
            const int k = lane * PER + i;
            if (k < slots * TOPK_WARPS) before[k] = x;
            x += c[i];
        }
    }
    __syncthreads();
    const int need = topk - (total & 0xffff);  // the keys equal to the prefix still to take
#pragma unroll
    for (int j = 0; j < TOPK_SLOTS; j++) {
        if (j >= slots) break;
        const bool held = t + j * TOPK_THREADS < n;
        const bool above = held && key[j] > prefix, equal = held && key[j] == prefix;
        const unsigned g = __ballot_sync(0xffffffffu, above), e = __ballot_sync(0xffffffffu, equal);
        const int at = before[j * TOPK_WARPS + warp];
        const int gs = (at & 0xffff) + __popc(g & below), es = (at >> 16) + __popc(e & below);
        const int i = t + j * TOPK_THREADS;
        if (above) out[gs + min(es, need)] = pos ? pos[i] : i;
        else if (equal && es < need) out[gs + es] = pos ? pos[i] : i;
    }
}

// The topk largest of each row's n = pos + 1 scores, as positions in ascending order: exactly the set of
// pipemoe_model::cpu::kernels::top_k (total_cmp order, ties to the lower index). Radix select finds the k-th
// largest key 11 bits at a time (a histogram of the keys that share the prefix found so far; it stops early when
// the chosen bin holds exactly the keys still needed), then one ordered pass writes every key above the prefix
// and the lowest-index keys equal to it; the row is read a tile at a time each pass. A row of up to 8,192 keys
// takes topk_one_tile instead, and so does a longer row's list of candidates when indexer_topk_gather_f32 made one
// (cand, cand_pos [n_rows][TOPK_SEG] and info [n_rows][4] from it, or null). Rows with n ≤ topk take 0..n-1.
// grid (n_rows), block TOPK_THREADS.
extern "C" __global__ void __launch_bounds__(TOPK_THREADS) indexer_topk_f32(const float* scores,  // [n_rows, stride]
                                                                           int stride, const int* meta, int row0,
                                                                           int topk,
                                                                           int* sel,  // [rows, topk]
                                                                           const float* cand, const int* cand_pos,
                                                                           const int* info) {
    // Two histograms: a pass counts into one while its threads clear the other for the next pass, so no barrier
    // stands between one pass's choice and the next pass's counting.
    __shared__ int hist[2][TOPK_BINS];
    __shared__ int wsum[TOPK_WARPS];
    // Its own 16 bytes: the three reads after the barrier are one 16-byte load, which would otherwise take in a
    // neighbour's word — wsum's last, which the ordered pass's first scan writes with no barrier between
    // (compute-sanitizer's racecheck: a hazard on that word, the value unused).
    __shared__ __align__(16) int pick[4];
    const int lr = blockIdx.x, r = row0 + lr, n = meta[r * 4] + 1;
    int* out = sel + (size_t)r * topk;
    if (n <= topk) {
        for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = i;
        return;
    }
    const float* sc = scores + (size_t)lr * stride;
    // A long row whose candidates indexer_topk_gather_f32 (or _gather2) found: they hold its top-k (or are exactly it).
    const int c = n > TOPK_SEG && info ? (info[lr * 4] != -2 ? info[lr * 4] : info[lr * 4 + 3]) : -1;
    if (c >= 0) {
        const int* cp = cand_pos + (size_t)lr * TOPK_SEG;
        if (c <= topk) {
            for (int i = threadIdx.x; i < c; i += blockDim.x) out[i] = cp[i];
            return;
        }
        topk_one_tile(cand + (size_t)lr * TOPK_SEG, c, topk, out, cp);
        return;
    }
    if (n <= TOPK_SEG) {
        topk_one_tile(sc, n, topk, out);
        return;
    }
    const int tile = TOPK_THREADS * TOPK_PER, tiles = (n + tile - 1) / tile, lane = threadIdx.x & 31;
    u32 key[TOPK_PER];
    int per = 0;
    unsigned valid = 0;
    u32 prefix = 0, mask = 0;
    int need = topk;  // how many keys matching the prefix are still to take
    for (int i = threadIdx.x; i < 2 * TOPK_BINS; i += TOPK_THREADS) (&hist[0][0])[i] = 0;
    __syncthreads();
    for (int pass = 0; pass < 3; pass++) {
        const int shift = pass == 0 ? 21 : pass == 1 ? 10 : 0;
        const u32 digit = pass == 2 ? 1023u : 2047u;
        int* hs = hist[pass & 1];
        // Pass 2 counts into pass 0's histogram, last read before pass 0's final barrier: pass 1 clears it (pass
        // 1's own was cleared at the start).
        if (pass == 1)
            for (int i = threadIdx.x; i < TOPK_BINS; i += TOPK_THREADS) hist[0][i] = 0;
        for (int t = 0; t < tiles; t++) {
            valid = topk_load(sc, n, t * tile, key, &per);
#pragma unroll
            for (int j = 0; j < TOPK_PER; j++) {
                const bool counted = ((valid >> j) & 1u) && (key[j] & mask) == prefix;
                if (pass == 0) {
                    // Lanes of a warp that share a bin add to it once, through their leader (the first pass's bins
                    // are the sign, exponent and top mantissa bits: a row's scores share a few); warps with nothing
                    // to count skip the match.
                    if (__any_sync(0xffffffffu, counted)) {
                        const u32 bin = counted ? (key[j] >> shift) & digit : TOPK_BINS + lane;
                        const u32 peers = __match_any_sync(0xffffffffu, bin);
                        if (counted && lane == __ffs(peers) - 1) atomicAdd(&hs[bin], __popc(peers));
                    }
                } else if (counted) {
                    // Later passes count only keys within the chosen bin, on the next 11 bits: spread over the
                    // bins, so plain atomics (the match's cost grows with the distinct bins of a warp).
                    atomicAdd(&hs[(key[j] >> shift) & digit], 1);
                }
            }
        }
        __syncthreads();
        // The highest bin whose keys and those above reach `need`: thread t holds bins 2047 − 4t down to 2044 − 4t,
        // a scan over the threads gives the count above them, and the one thread where `need` is crossed says so.
        int h[TOPK_BINS / TOPK_THREADS], mine = 0, total;
#pragma unroll
        for (int j = 0; j < TOPK_BINS / TOPK_THREADS; j++)
            mine += h[j] = hs[TOPK_BINS - 1 - (TOPK_BINS / TOPK_THREADS) * threadIdx.x - j];
        int above = block_scan_once(mine, wsum, &total);
#pragma unroll
        for (int j = 0; j < TOPK_BINS / TOPK_THREADS; j++) {
            if (above < need && above + h[j] >= need) {
                pick[0] = TOPK_BINS - 1 - (TOPK_BINS / TOPK_THREADS) * threadIdx.x - j;
                pick[1] = need - above;
                pick[2] = h[j];
            }
            above += h[j];
        }
        __syncthreads();
        prefix |= (u32)pick[0] << shift;
        mask |= digit << shift;
        need = pick[1];
        // Every key of the chosen bin is taken: the prefix so far is the threshold. (pick is rewritten only after
        // the next pass's barriers.)
        if (pick[2] == need) break;
    }
    // A taken key's place: the keys above the prefix before it, plus those equal to it before it (at most need).
    int gt_seen = 0, eq_seen = 0;
    for (int t = 0; t < tiles; t++) {
        valid = topk_load(sc, n, t * tile, key, &per);
        int gt = 0, eq = 0;
#pragma unroll
        for (int j = 0; j < TOPK_PER; j++) {
            const u32 m = key[j] & mask;
            gt += ((valid >> j) & 1u) && m > prefix;
            eq += ((valid >> j) & 1u) && m == prefix;
        }
        // One scan of both counts (a tile has < 2^16 keys): above in the low half, equal in the high.
        int both;
        if (t > 0) __syncthreads();  // every warp has read the previous tile's wsum
        const int before = block_scan_once(gt | (eq << 16), wsum, &both);
        int g = gt_seen + (before & 0xffff), e = eq_seen + (before >> 16);
        const int first = t * tile + threadIdx.x * per;
#pragma unroll
        for (int j = 0; j < TOPK_PER; j++) {
            if (!((valid >> j) & 1u)) continue;
            const u32 m = key[j] & mask;
            if (m > prefix) {
                out[g + min(e, need)] = first + j;
                g++;
            } else if (m == prefix) {
                if (e < need) out[g + e] = first + j;
                e++;
            }
        }
        gt_seen += both & 0xffff;
        eq_seen += both >> 16;
    }
}

// A long row in few blocks (src/indexer.rs `Long`: rows of more than TOPK_SEG keys in steps of few rows, i.e.
// decode at long context, where one block a row reads the row four times alone on one SM: ~175-230 µs at 128K keys
// on the H200). The row is cut in segments of TOPK_SEG keys, a block each. indexer_topk_hist_f32 counts each
// segment's keys by their top 11 bits (sign, exponent and two mantissa bits of the order key: TOPK_BINS bins in key
// order) into hist [rows][segs][bins]. Each block of indexer_topk_gather_f32 adds the segments' counts and finds
// the bin B holding the row's topk-th largest key. If the keys in bins ≥ B number at most TOPK_SEG, it writes its
// segment's such keys with their positions to cand / cand_pos [rows][TOPK_SEG], at their place in index order;
// otherwise (close keys: a row of scores around 100 ± 1 is one bin) it counts its keys of bin B by their next 11
// bits into hist2, and indexer_topk_gather2_f32 does the same over those: the keys above B and those of B at or
// above the second level's bin. indexer_topk_f32 then takes the top-k of the candidates, the row's own: every key
// in a bin below the chosen one is below every key at or above it, and keys equal to the k-th share its bins, in
// index order. Where even two levels leave too many (ties), it reads the whole row as before. info [rows][4]: the
// first level's count of candidates (−2: to the second level), B, the keys above B, the second level's count (−1:
// too many). Nothing outlives a step: each histogram is written whole, info by every long row's first blocks
// (the second level's count in its own word: the other blocks of its launch read the first's).
#define TOPK_TOP_SHIFT 21  // an order key's first-level bin: its top 11 bits
#define TOPK_MID_SHIFT 10  // its second-level bin within that: the next 11

// grid (segs, rows), block TOPK_THREADS; hist [rows][segs][TOPK_BINS].
extern "C" __global__ void __launch_bounds__(TOPK_THREADS)
    indexer_topk_hist_f32(const float* scores, int stride, const int* meta, int row0, int topk, int* hist) {
    __shared__ int h[TOPK_BINS];
    const int lr = blockIdx.y, n = meta[(row0 + lr) * 4] + 1, s = blockIdx.x;
    if (n <= TOPK_SEG || n <= topk) return;  // indexer_topk_f32's own
    const int left = n - s * TOPK_SEG;      // this segment's keys: min(left, TOPK_SEG); none past the row
    const float* sc = scores + (size_t)lr * stride + (size_t)s * TOPK_SEG;
    float v[TOPK_SLOTS];
#pragma unroll
    for (int j = 0; j < TOPK_SLOTS; j++) {
        const int i = threadIdx.x + j * TOPK_THREADS;
        v[j] = i < left ? sc[i] : 0.f;
    }
    for (int i = threadIdx.x; i < TOPK_BINS; i += TOPK_THREADS) h[i] = 0;
    __syncthreads();
#pragma unroll
    for (int j = 0; j < TOPK_SLOTS; j++)
        if (threadIdx.x + j * TOPK_THREADS < left) atomicAdd(&h[total_order_key(v[j]) >> TOPK_TOP_SHIFT], 1);
    __syncthreads();
    int* out = hist + ((size_t)lr * gridDim.x + s) * TOPK_BINS;
    for (int i = threadIdx.x; i < TOPK_BINS; i += TOPK_THREADS) out[i] = h[i];
}

// Thread t's four bins from the top (TOPK_BINS − 1 − 4t − j), summed over segments [0, segs) of one row's
// histograms, only bins ≥ from. Every segment's loads are issued before they are added.
__device__ __forceinline__ void topk_bin_counts(const int* hr, int segs, int from, int (&c)[4]) {
    const int b0 = TOPK_BINS - 1 - 4 * (int)threadIdx.x;
#pragma unroll
    for (int j = 0; j < 4; j++) c[j] = 0;
#pragma unroll 8
    for (int g = 0; g < segs; g++)
#pragma unroll
        for (int j = 0; j < 4; j++) c[j] += b0 - j >= from ? hr[(size_t)g * TOPK_BINS + b0 - j] : 0;
}

// The bin where the row's counts c (thread t's four bins from the top, as topk_bin_counts gives them), added from
// the top, reach `need` (the row has more keys: exactly one thread finds it), the keys above it and in it: pick[0],
// [1], [2], read by all after the barrier. Uses wsum as block_scan_once does; the caller's barrier before its next
// use.
__device__ __forceinline__ void topk_pick(const int (&c)[4], int need, int* wsum, int* pick) {
    int total;
    int above = block_scan_once(c[0] + c[1] + c[2] + c[3], wsum, &total);
#pragma unroll
    for (int j = 0; j < 4; j++) {
        if (above < need && above + c[j] >= need) {
            pick[0] = TOPK_BINS - 1 - 4 * (int)threadIdx.x - j;
            pick[1] = above;
            pick[2] = c[j];
        }
        above += c[j];
    }
    __syncthreads();
}

// The segment's candidates (thread t's keys v of positions first.., `take` bit j for key j) to cand / cand_pos at
// `offset` + their rank in index order. Barriers as topk_pick's.
__device__ __forceinline__ void topk_write(const float (&v)[TOPK_SLOTS], unsigned take, int first, int offset,
                                           int* wsum, float* cand, int* cand_pos) {
    int all;
    int at = offset + block_scan_once(__popc(take), wsum, &all);
#pragma unroll
    for (int j = 0; j < TOPK_SLOTS; j++) {
        if ((take >> j) & 1u) {
            cand[at] = v[j];
            cand_pos[at] = first + j;
            at++;
        }
    }
}

// Thread t's keys of segment s of a row of n, TOPK_SLOTS consecutive ones (so one scan orders the candidates).
__device__ __forceinline__ int topk_seg_keys(const float* sc, int s, int n, float (&v)[TOPK_SLOTS]) {
    const int first = s * TOPK_SEG + threadIdx.x * TOPK_SLOTS;
#pragma unroll
    for (int j = 0; j < TOPK_SLOTS; j++) v[j] = first + j < n ? sc[first + j] : 0.f;
    return first;
}

// grid (segs, rows), block TOPK_THREADS: the first level's candidates, or hist2 [rows][segs][TOPK_BINS].
extern "C" __global__ void __launch_bounds__(TOPK_THREADS)
    indexer_topk_gather_f32(const float* scores, int stride, const int* meta, int row0, int topk, const int* hist,
                            int* hist2, float* cand, int* cand_pos, int* info) {
    static_assert(TOPK_BINS == 4 * TOPK_THREADS, "four bins a thread");
    __shared__ int wsum[TOPK_WARPS];
    __shared__ int pick[3];
    __shared__ int h[TOPK_BINS];
    const int lr = blockIdx.y, n = meta[(row0 + lr) * 4] + 1, s = blockIdx.x, segs = gridDim.x;
    if (n <= TOPK_SEG || n <= topk) return;
    const int live = (n + TOPK_SEG - 1) / TOPK_SEG;  // segments holding keys
    float v[TOPK_SLOTS];  // loaded first: their round trip overlaps the counts'
    const int first = topk_seg_keys(scores + (size_t)lr * stride, s, n, v);
    const int* hr = hist + (size_t)lr * segs * TOPK_BINS;
    int c[4];
    topk_bin_counts(hr, live, 0, c);
    topk_pick(c, topk, wsum, pick);
    const int bin = pick[0], above = pick[1];
    const bool first_level = above + pick[2] <= TOPK_SEG;
    if (s == 0 && threadIdx.x == 0) {
        info[lr * 4] = first_level ? above + pick[2] : -2;
        info[lr * 4 + 1] = bin;
        info[lr * 4 + 2] = above;
    }
    if (s >= live) return;  // uniform in the block
    unsigned take = 0;
    if (first_level) {
        // After the keys in bins ≥ B of the segments before this one.
        topk_bin_counts(hr, s, bin, c);
        int offset;
        block_scan_once(c[0] + c[1] + c[2] + c[3], wsum, &offset);
#pragma unroll
        for (int j = 0; j < TOPK_SLOTS; j++)
            take |= (u32)(first + j < n && total_order_key(v[j]) >> TOPK_TOP_SHIFT >= (u32)bin) << j;
        __syncthreads();  // every warp has read the offset's wsum
        topk_write(v, take, first, offset, wsum, cand + (size_t)lr * TOPK_SEG, cand_pos + (size_t)lr * TOPK_SEG);
        return;
    }
    for (int i = threadIdx.x; i < TOPK_BINS; i += TOPK_THREADS) h[i] = 0;
    __syncthreads();
#pragma unroll
    for (int j = 0; j < TOPK_SLOTS; j++) {
        const u32 k = total_order_key(v[j]);
        if (first + j < n && k >> TOPK_TOP_SHIFT == (u32)bin) atomicAdd(&h[(k >> TOPK_MID_SHIFT) & (TOPK_BINS - 1)], 1);
    }
    __syncthreads();
    int* out = hist2 + ((size_t)lr * segs + s) * TOPK_BINS;
    for (int i = threadIdx.x; i < TOPK_BINS; i += TOPK_THREADS) out[i] = h[i];
}

// grid (segs, rows), block TOPK_THREADS: the second level's candidates, for the rows the first sent here.
extern "C" __global__ void __launch_bounds__(TOPK_THREADS)
    indexer_topk_gather2_f32(const float* scores, int stride, const int* meta, int row0, int topk, const int* hist,
                             const int* hist2, float* cand, int* cand_pos, int* info) {
    __shared__ int wsum[TOPK_WARPS];
    __shared__ int pick[3];
    const int lr = blockIdx.y, n = meta[(row0 + lr) * 4] + 1, s = blockIdx.x, segs = gridDim.x;
    if (n <= TOPK_SEG || n <= topk || info[lr * 4] != -2) return;
    const int live = (n + TOPK_SEG - 1) / TOPK_SEG, bin = info[lr * 4 + 1], above = info[lr * 4 + 2];
    float v[TOPK_SLOTS];
    const int first = topk_seg_keys(scores + (size_t)lr * stride, s, n, v);
    const int *hr = hist + (size_t)lr * segs * TOPK_BINS, *hr2 = hist2 + (size_t)lr * segs * TOPK_BINS;
    int c[4];
    topk_bin_counts(hr2, live, 0, c);
    topk_pick(c, topk - above, wsum, pick);
    const int bin2 = pick[0], count = above + pick[1] + pick[2];
    if (s == 0 && threadIdx.x == 0) info[lr * 4 + 3] = count <= TOPK_SEG ? count : -1;
    if (count > TOPK_SEG || s >= live) return;  // uniform in the block
    // After the keys above B and those of B at or above the second bin in the segments before this one.
    int c1[4];
    topk_bin_counts(hr, s, bin + 1, c1);
    topk_bin_counts(hr2, s, bin2, c);
    int offset;
    block_scan_once(c1[0] + c1[1] + c1[2] + c1[3] + c[0] + c[1] + c[2] + c[3], wsum, &offset);
    unsigned take = 0;
#pragma unroll
    for (int j = 0; j < TOPK_SLOTS; j++) {
        const u32 k = total_order_key(v[j]), b1 = k >> TOPK_TOP_SHIFT, b2 = (k >> TOPK_MID_SHIFT) & (TOPK_BINS - 1);
        take |= (u32)(first + j < n && (b1 > (u32)bin || (b1 == (u32)bin && b2 >= (u32)bin2))) << j;
    }
    __syncthreads();  // every warp has read the offset's wsum
    topk_write(v, take, first, offset, wsum, cand + (size_t)lr * TOPK_SEG, cand_pos + (size_t)lr * TOPK_SEG);
}
