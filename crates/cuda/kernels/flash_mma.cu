// MLA attention on tensor cores for bf16 activations (the serving path; attention.cu's kernels are the exact f32
// path and the single-row absorptions): the flash kernel (mla_absorb_mma.cu has both absorptions, mla_out and
// mla_absorb_q, for steps of more than one row).
//
// The flash kernel (attention.cu's `mla_flash_f32` is its f32 twin). Same contract as mla_flash, with FM_HEADS heads a block: block (g, r, s) of grid
// (⌈heads / FM_HEADS⌉, n_rows, splits) takes heads g·FM_HEADS.. of row row0 + r over the s-th share of the row's
// keys and leaves the share's unnormalised latent mix and (max, Σ e^{s − max}) per head for mla_out to merge.
//
// Absorbed MLA is MQA over the cached rows [c | k_pe] (D = lora + rope values), so both products are small
// matrix multiplications on `mma.m16n8k16` (FlashMLA's shape, on sm_80 instructions): scores S = Q · Kᵀ over a
// tile of FM_KT keys and the mix O += P · C with C the latent part of the same tile; the f32 online softmax sits
// between. The fragment's 16 rows are 16 heads, and its 16 values of K are 8 values twice: k 0..7 carry q (or P)
// rounded to bf16, k 8..15 what that rounding left (v − bf16(v), in bf16), against the same 8 keys' values (the
// B fragment's two registers are one), so each product adds up f32 q and P to ~2^-16 in one accumulator — only
// the cached keys carry bf16 rounding, as on the scalar path.
//
// Warp w's share of the scores is its eighth of the query dims (both key groups of the tile): its q fragments
// sit in registers for the whole block, loaded once (no q in shared memory; a tile's scores cost a warp 36 mma
// and 36 shared loads at D = 576 with q exact, 20 mma and 10 ldmatrix with q in bf16). The eight partial scores
// meet in shared memory for the softmax (a warp two heads, a lane a key); the mix gives warp w latent column tiles
// w, w + 8, ...
//
// Tiles go through a ring of ST buffers (FM_ST; 3 in the two-group kernel): while the math runs on tile i, tiles
// i + 1.. are on their way — 16-byte cp.async copies of each key's row for a bf16 cache (whole rows in flight, not
// a load per value), or converted from an f32 / fp8 cache by plain loads. The keys' cache slots are found FM_SLOTS
// (a thread each) at a time, the next run's loads spread over the current run's tiles (position, then block table,
// then the store), so no lookup stands between two tiles. Keys past the share or outside 0..pos are zero rows with
// probability 0.
//
// Shared: ST tiles [FM_KT][CS] bf16, then per head group partial scores [8][FM_HEADS][FM_SCS] f32, P [2][FM_HEADS]
// [FM_PS] bf16 (the rounded values, then the remainders) and the heads' corrections [FM_HEADS], then slots
// [2][FM_SLOTS]. CS = DP + 8 with DP = D rounded up to 16 (zero columns): row strides of 4 mod 8 words keep the
// fragment loads and ldmatrix free of bank conflicts. (attention::flash mirrors this.)
#include "common.cuh"
#include "attention.cuh"
#include "mma.cuh"

#define FM_HEADS 16   // heads per block: the fragment's 16 rows
#define FM_KT 32      // keys per tile: a warp's lanes in the softmax
#define FM_PS 40      // bf16 per head row of P (32 + 8: conflict-free fragment loads)
#define FM_SCS 40     // f32 per head row of the partial scores (32 + 8: a fragment's 8 heads on 4 octets of banks)
#define FM_WARPS 8
#define FM_ST 2       // tiles in flight
#define FM_SLOTS 256  // keys whose slots are found together: one a thread, FM_SLOTS / FM_KT tiles
#define FM_QK 9       // k-steps of 8 query dims per warp: D rounded up to 16 ≤ 8 · 9 · 8 = 576 (attention.rs checks)

// c += A·B for one m16n8k16 step whose B registers are both `b` (the K-split above).
__device__ __forceinline__ void fm_mma(float* c, const u32* a, u32 b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%8}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b));
}

// A barrier of head group hg's warps alone (the partial scores, P and corrections are the group's own): with two
// groups a block, each runs its softmax between its own barriers, as two blocks an SM did, and the block's
// barrier stands only where the shared key tiles change hands (a named barrier a group; 0 is __syncthreads').
template <int HG>
__device__ __forceinline__ void group_sync(int hg) {
    if constexpr (HG == 1) {
        __syncthreads();
    } else {
        asm volatile("bar.sync %0, %1;\n" ::"r"(1 + hg), "r"(32 * FM_WARPS) : "memory");
    }
}

// EXACT: q and P enter as value + remainder (above); otherwise as bf16 alone, each k-step 16 distinct values — half
// the tensor-core work, the precision of HF's own bf16 attention (scores of bf16 q, P cast to bf16 for the mix).
// LORA, ROPE: the cache's dims fixed at compile time (DeepSeek's 512 + 64: every shared-memory offset, copy loop
// and column test folds to constants — a fifth of the kernel's instructions were integer address arithmetic), or
// 0 for the dims of the arguments.
// ST: tiles in the ring (FM_ST; at most RUN / 2 + 1, so a run's slots are stored before its first tile's copy).
// HG: groups of FM_HEADS heads a block, each its own FM_WARPS warps, scores, P and softmax, over one copy of each
// key tile: a tile crosses L2 once per HG · FM_HEADS heads (its shared memory, 157 KB at HG 2 with 3 tiles, fits
// an H200's SM, not a 3090's). The first 32 · FM_WARPS threads find the slots and copy the tiles.
template <bool EXACT, int LORA, int ROPE, int HG = 1, int ST = FM_ST>
__device__ __forceinline__ void mla_flash_mma(
    const float* q_lat,           // [n_rows, heads, lora]
    const __nv_bfloat16* q,       // [rows, heads, nope + rope]: q_pe is each head's tail
    const void* c_lat,            // [slots, lora] in the cache dtype
    const void* c_pe,             // [slots, rope]
    const float* scales,          // [slots, 3]
    int dtype, const int* meta, const int* tables,
    const int* keys,              // [rows, key_stride], or null: every position 0..count-1
    int key_stride, int row0, int heads, int nope, int rope_arg, int lora_arg, float scale,
    float* o_part,                // [n_rows, heads, splits, lora]
    float* ml_part) {             // [n_rows, heads, splits, 2]
    extern __shared__ __align__(16) unsigned char fm_smem[];
    const int lora = LORA ? LORA : lora_arg, rope = LORA ? ROPE : rope_arg;
    // Fixed dims of exactly 8 warps' FM_QK steps each, and of 8 column tiles a warp in the mix: no warp's share
    // is short, no column test.
    constexpr bool FULL_STEPS = LORA && (LORA + ROPE) == FM_WARPS * FM_QK * 8;
    constexpr bool FULL_COLS = LORA == FM_WARPS * 8 * 8;
    const int D = lora + rope, DP = (D + 15) / 16 * 16, CS = DP + 8;
    static_assert(FM_SLOTS == 32 * FM_WARPS && FM_SLOTS % FM_KT == 0, "a thread finds one key's slot");
    static_assert(FM_KT == 32 && FM_HEADS == 2 * FM_WARPS, "a lane a key, a warp two heads in the softmax");
    constexpr int TPK = 32 * FM_WARPS / FM_KT;  // threads copying each key of a tile
    constexpr int RUN = FM_SLOTS / FM_KT;  // tiles per run of slots
    static_assert(ST >= 2 && ST <= RUN / 2 + 1, "a run's slots are stored (at its predecessor's half) before its first copy");
    __nv_bfloat16* tile = (__nv_bfloat16*)fm_smem;                   // [ST][FM_KT][CS]
    float* sc_all = (float*)(tile + ST * FM_KT * CS);             // [HG][FM_WARPS][FM_HEADS][FM_SCS]
    __nv_bfloat16* ps_all = (__nv_bfloat16*)(sc_all + HG * FM_WARPS * FM_HEADS * FM_SCS);  // [HG][2][FM_HEADS][FM_PS]
    float* corr_all = (float*)(ps_all + HG * 2 * FM_HEADS * FM_PS);  // [HG][FM_HEADS]
    int* slot = (int*)(corr_all + HG * FM_HEADS);                    // [2][FM_SLOTS]

    const int lr = blockIdx.y, r = row0 + lr, split = blockIdx.z, splits = gridDim.z;
    // Warp `warp` of head group hg; a group's warps, scores, P and corrections are those of a block of one group.
    const int hg = HG > 1 ? (int)threadIdx.x / (32 * FM_WARPS) : 0, warp = threadIdx.x / 32 % FM_WARPS;
    const int h0 = (blockIdx.x * HG + hg) * FM_HEADS, lane = threadIdx.x & 31;
    const bool finder = HG == 1 || threadIdx.x < FM_SLOTS;  // finds a key's slot, copies tiles
    float* sc = sc_all + hg * FM_WARPS * FM_HEADS * FM_SCS;
    __nv_bfloat16* ps = ps_all + hg * 2 * FM_HEADS * FM_PS;
    float* corr = corr_all + hg * FM_HEADS;
    const int group = lane >> 2, quad = lane & 3;
    // A selection holds at most key_stride keys a row: a step's tables count every causal key (pos + 1), which
    // serve the dense and the selecting layers alike.
    const int pos = meta[r * 4], n = keys ? min(meta[r * 4 + 2], key_stride) : meta[r * 4 + 2];
    const int* table = tables + meta[r * 4 + 1];
    const int* kr = keys ? keys + (size_t)r * key_stride : nullptr;
    const int per = ((n + FM_KT - 1) / FM_KT + splits - 1) / splits;
    const int begin = min(n, split * per * FM_KT), end = min(n, (split + 1) * per * FM_KT);
    const int n_tiles = (end - begin + FM_KT - 1) / FM_KT;

    // Thread t's key of run u of slots: its position (−1 past the share), its block's table entry, its slot.
    auto run_pos = [&](int u) {
        const int t = begin + u * FM_SLOTS + (int)threadIdx.x;
        const int p = t < end ? (kr ? kr[t] : t) : -1;
        return p <= pos ? p : -1;
    };
    auto slot_of = [&](int i) -> const int* { return slot + ((i / RUN) & 1) * FM_SLOTS + (i % RUN) * FM_KT; };
    // Tile i into buffer i % ST (a bf16 cache by 16-byte copies; the others converted, warp w keys w, w + 8).
    const bool raw = dtype == 1 && lora % 8 == 0 && rope % 8 == 0;
    auto load_tile = [&](int i) {
        if (i < n_tiles) {
            __nv_bfloat16* buf = tile + (i % ST) * FM_KT * CS;
            const int* sl = slot_of(i);
            if (raw && finder) {
                // Thread t copies key t / TPK's pieces of 8 values t % TPK, + TPK, ... of the latent, then of the
                // rope part: one slot a thread and plain strides (a warp's two keys by lanes over the whole row,
                // with a select between the parts per piece, took a third of a tile's instructions).
                const int s = sl[threadIdx.x / TPK], c0 = threadIdx.x % TPK;
                __nv_bfloat16* row = buf + (threadIdx.x / TPK) * CS;
                const __nv_bfloat16* lat = (const __nv_bfloat16*)c_lat + (size_t)max(s, 0) * lora;
                const __nv_bfloat16* pe = (const __nv_bfloat16*)c_pe + (size_t)max(s, 0) * rope;
                const int bytes = s >= 0 ? 16 : 0;  // 0: the copy writes zeros
                if (!EXACT && LORA && (LORA / 8) % TPK == 0 && (ROPE / 8) % TPK == 0) {  // fixed counts, unrolled
                    // One shared address and one source a part, the pieces at constant offsets from them (a
                    // generic-to-shared conversion and 64-bit sums a copy were two thirds of the copies' work).
                    // (Not in the exact kernel: at its 128 registers, sm_90 then spills inside the tile loop.)
                    const u32 dst = smem_addr(row) + c0 * 16;
                    const unsigned char* src_lat = (const unsigned char*)lat + c0 * 16;
                    const unsigned char* src_pe = (const unsigned char*)pe + c0 * 16;
#pragma unroll
                    for (int k = 0; k < LORA / 8 / TPK; k++)
                        cp_async16_at(dst + k * TPK * 16, src_lat + k * TPK * 16, bytes);
#pragma unroll
                    for (int k = 0; k < ROPE / 8 / TPK; k++)
                        cp_async16_at(dst + LORA * 2 + k * TPK * 16, src_pe + k * TPK * 16, bytes);
                } else if (LORA && (LORA / 8) % TPK == 0 && (ROPE / 8) % TPK == 0) {
#pragma unroll
                    for (int k = 0; k < LORA / 8 / TPK; k++)
                        cp_async16(row + (c0 + k * TPK) * 8, lat + (c0 + k * TPK) * 8, bytes);
#pragma unroll
                    for (int k = 0; k < ROPE / 8 / TPK; k++)
                        cp_async16(row + LORA + (c0 + k * TPK) * 8, pe + (c0 + k * TPK) * 8, bytes);
                } else {
                    for (int c = c0; c < lora / 8; c += TPK) cp_async16(row + c * 8, lat + c * 8, bytes);
                    for (int c = c0; c < rope / 8; c += TPK) cp_async16(row + lora + c * 8, pe + c * 8, bytes);
                }
            } else if (!raw) {
                for (int t = threadIdx.x / 32; t < FM_KT; t += FM_WARPS * HG) {
                    const int s = sl[t];
                    __nv_bfloat16* row = buf + t * CS;
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

    // Warp w's q values, loaded first: their round trip then overlaps the first run's slot lookups (a chain of
    // three: the row's meta, its keys, the block table) rather than following them (ncu, session 30: a one-row
    // block's start was half its stall samples, most at the q values' first use). Every load before any use: as
    // one lambda with a branch per value (latent f32 or rope bf16) ptxas issued them one at a time, each waiting
    // on its own global round trip (ncu, session 23).
    float2 v[FM_QK][2];
#pragma unroll
    for (int j = 0; j < FM_QK; j++)
#pragma unroll
        for (int u = 0; u < 2; u++) {
            const int h = h0 + group + 8 * u, d = (warp * FM_QK + j) * 8 + quad * 2;
            const bool ok = h < heads && d < D, in_lat = d < lora;
            const float* pl = q_lat + ((size_t)lr * heads + h) * lora + d;
            const __nv_bfloat16* pp = q + ((size_t)r * heads + h) * (nope + rope) + nope + d - lora;
            float2 x = make_float2(0.f, 0.f);
            if (ok && in_lat) x = *(const float2*)pl;
            if (ok && !in_lat) x.x = __bfloat162float(pp[0]);
            if (ok && !in_lat && d + 1 < D) x.y = __bfloat162float(pp[1]);
            v[j][u] = x;
        }
    // The first run's slots at once, the first tiles requested before anything else but the q values.
    {
        const int p = finder ? run_pos(0) : -1;
        if (finder) slot[threadIdx.x] = p >= 0 ? kv_slot(table, p) : -1;
    }
    // Columns D..CS of every buffer, which no copy writes, are zeros: they meet the zero q dims past D, and the
    // bf16 scores' last step of a warp reads 8 of them as its upper half (zero q against zero keys, not against
    // whatever shared memory held).
    for (int i = threadIdx.x; i < ST * FM_KT * (CS - D); i += blockDim.x) {
        const int row = i / (CS - D), d = D + i % (CS - D);
        tile[row * CS + d] = __float2bfloat16(0.f);
    }
    __syncthreads();
    for (int i = 0; i < ST - 1; i++) load_tile(i);

    // Warp w's q fragments: k-steps w·FM_QK.. of 8 dims, heads h0 + group and + 8, dims 2·quad, +1 of each step;
    // a0/a1 the rounded values of the two heads, a2/a3 the remainders. Dims past D and heads past `heads` are 0.
    u32 qa[FM_QK][4];
    {
#pragma unroll
        for (int j = 0; j < FM_QK; j++) {
            const float2 a = v[j][0], b = v[j][1];
            if (EXACT) {
                split_bf16x2(a.x, a.y, qa[j][0], qa[j][2]);
                split_bf16x2(b.x, b.y, qa[j][1], qa[j][3]);
            } else {
                // Pairs of the warp's steps of 8 dims make one of 16: even j the lower half, odd j the upper (the
                // ninth step's upper half, the next warp's dims, stays zero).
                u32 hi, lo;
                split_bf16x2(a.x, a.y, hi, lo);
                qa[j / 2][(j & 1) * 2] = hi;
                split_bf16x2(b.x, b.y, hi, lo);
                qa[j / 2][(j & 1) * 2 + 1] = hi;
                if (j == FM_QK - 1) qa[j / 2][2] = qa[j / 2][3] = 0u;
            }
        }
    }
    const int ksteps = DP / 8;
    const int my_steps = FULL_STEPS ? FM_QK : max(0, min(FM_QK, ksteps - warp * FM_QK));

    // The mix: warp w owns latent column tiles w, w + 8, ... (8 columns each; lora ≤ 512 gives ≤ 8 per warp),
    // rows group and group + 8 (heads h0 + group, + 8) of each fragment. The softmax state of heads h0 + 2·w and
    // h0 + 2·w + 1 lives in warp w (every lane holds it; lane k scores key k of a tile).
    const int col_tiles = lora / 8;
    float acc[8][4];
#pragma unroll
    for (int j = 0; j < 8; j++)
#pragma unroll
        for (int i = 0; i < 4; i++) acc[j][i] = 0.f;
    float m[2] = {NEG_INF, NEG_INF}, sum[2] = {0.f, 0.f};

    // The next run's lookups, spread over this run's tiles: its position at the first, its block's table entry a
    // quarter in, the slot stored at half (the next run's first tile is requested ST − 1 tiles before its end).
    int next_p = -1, next_b = -1;
    for (int i = 0; i < n_tiles; i++) {
        const int u = i / RUN + 1, phase = i % RUN;
        if (finder && u * RUN < n_tiles) {
            if (phase == 0) next_p = run_pos(u);
            if (phase == RUN / 4 && next_p >= 0) next_b = table[next_p / KV_BLOCK];
            if (phase == RUN / 2) slot[(u & 1) * FM_SLOTS + threadIdx.x] = next_p >= 0 ? next_b * KV_BLOCK + next_p % KV_BLOCK : -1;
        }
        // One barrier for both: tile i has landed (every thread's copies and stores), and everyone is done with tile
        // i − 1's buffer, scores and P and has set the next run's slots — then the next tile is requested (two
        // barriers a tile before, the request between them: it waited for nothing the second one gave).
        cp_async_wait<ST - 2>();
        __syncthreads();
        load_tile(i + ST - 1);
        const __nv_bfloat16* buf = tile + (i % ST) * FM_KT * CS;
        const int cnt = min(FM_KT, end - (begin + i * FM_KT));
        // Whether lane's key of the tile counts (read here: after the scores' barrier every warp's loads would
        // queue behind each other's).
        const bool live = lane < cnt && slot_of(i)[lane] >= 0;

        // Scores over warp w's dims, the tile's four groups of 8 keys (four chains of FM_QK steps, interleaved).
        {
            float c[FM_KT / 8][4] = {};
            const __nv_bfloat16* k0 = buf + group * CS + warp * FM_QK * 8 + quad * 2;
if (EXACT) {
#pragma unroll
                for (int j = 0; j < FM_QK; j++) {
                    if (j < my_steps) {
#pragma unroll
                        for (int g = 0; g < FM_KT / 8; g++)
                            fm_mma(c[g], qa[j], *(const u32*)(k0 + g * 8 * CS + j * 8));
                    }
                }
            } else {
                // Step j2 covers the warp's 8-dim steps 2·j2 and 2·j2 + 1; past my_steps (or the warp's last) the
                // upper half's q is zero, against the next warp's dims or the zeroed columns past D. B by ldmatrix,
                // two key groups at once: matrices (keys 16·gp.., lower 8 dims), (the same keys, upper 8), (keys
                // 16·gp + 8.., lower), (upper) — lane L the row L % 8 of matrix L / 8; one load where four were.
                const int kr = (lane >> 4) * 8 + (lane & 7), kc = warp * FM_QK * 8 + ((lane >> 3) & 1) * 8;
                const u32 kb = smem_addr(buf) + (kr * CS + kc) * 2;
#pragma unroll
                for (int j2 = 0; j2 < (FM_QK + 1) / 2; j2++) {
                    if (2 * j2 < my_steps) {
#pragma unroll
                        for (int gp = 0; gp < FM_KT / 16; gp++) {
                            u32 b[4];
                            ldmatrix_x4_at(b, kb + (gp * 16 * CS + j2 * 16) * 2);
                            mma_16816(c[2 * gp], qa[j2], b[0], b[1]);
                            mma_16816(c[2 * gp + 1], qa[j2], b[2], b[3]);
                        }
                    }
                }
            }
#pragma unroll
            for (int g = 0; g < FM_KT / 8; g++) {
                // Rows of 40 floats: a store's 8 heads fall on 4 octets of banks (as rows of 32 on one, each of
                // these stores took 4 times its ideal wavefronts: ncu, session 23).
                float* out = sc + (warp * FM_HEADS + group) * FM_SCS + g * 8 + quad * 2;
                *(float2*)out = make_float2(c[g][0], c[g][1]);
                *(float2*)(out + 8 * FM_SCS) = make_float2(c[g][2], c[g][3]);
            }
        }
        group_sync<HG>(hg);

        // A warp two heads, a lane a key: the eight partial scores added in warp order, the online softmax,
        // P rounded and its remainder for the mix. The two heads' maxima go through one ladder of shuffles, and
        // each lane keeps its own keys' running sum (added across the warp once, at the end): a tile's softmax
        // is one chain of dependent shuffles, not four.
        {
            float s[2];
#pragma unroll
            for (int u = 0; u < 2; u++) {
                s[u] = NEG_INF;
                if (live) {
                    float v = 0.f;
#pragma unroll
                    for (int w = 0; w < FM_WARPS; w++) v += sc[(w * FM_HEADS + 2 * warp + u) * FM_SCS + lane];
                    s[u] = v * scale;
                }
            }
            float mx[2] = {s[0], s[1]};
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
                const float a = __shfl_xor_sync(0xffffffffu, mx[0], o), b = __shfl_xor_sync(0xffffffffu, mx[1], o);
                mx[0] = fmaxf(mx[0], a);
                mx[1] = fmaxf(mx[1], b);
            }
#pragma unroll
            for (int u = 0; u < 2; u++) {
                const int sh = 2 * warp + u;
                const float mn = fmaxf(m[u], mx[u]);
                const float cf = m[u] == mn ? 1.f : __expf(m[u] - mn);
                const float p = s[u] == NEG_INF ? 0.f : __expf(s[u] - mn);
                sum[u] = sum[u] * cf + p;
                m[u] = mn;
                const __nv_bfloat16 hi = __float2bfloat16(p);
                ps[sh * FM_PS + lane] = hi;
                if (EXACT) ps[(FM_HEADS + sh) * FM_PS + lane] = __float2bfloat16(p - __bfloat162float(hi));
                if (lane == 0) corr[sh] = cf;
            }
        }
        group_sync<HG>(hg);

        // O[head, col] = O · corr[head] + Σ_key P[head, key] · C[key, col]: per k-step of 8 keys, a0/a1 the
        // rounded P of heads group and group + 8, a2/a3 the remainders.
        const float cr0 = corr[group], cr1 = corr[group + 8];
        // Not EXACT: a k-step of 16 keys, a0/a1 keys 16·kk + 2·quad.., a2/a3 those 8 keys on (pa[kk], kk < 2).
        u32 pa[FM_KT / 8][4];
#pragma unroll
        for (int ks = 0; ks < FM_KT / 8; ks++) {
            const __nv_bfloat16* p = ps + group * FM_PS + ks * 8 + quad * 2;
            if (EXACT) {
                pa[ks][0] = *(const u32*)p;
                pa[ks][1] = *(const u32*)(p + 8 * FM_PS);
                pa[ks][2] = *(const u32*)(p + FM_HEADS * FM_PS);
                pa[ks][3] = *(const u32*)(p + (FM_HEADS + 8) * FM_PS);
            } else {
                pa[ks / 2][(ks & 1) * 2] = *(const u32*)p;
                pa[ks / 2][(ks & 1) * 2 + 1] = *(const u32*)(p + 8 * FM_PS);
            }
        }
        // ldmatrix, per 16 keys k0: matrices (keys k0..+7, tile ct), (keys k0+8..+15, tile ct), (keys k0..+7,
        // tile ct + 8), (keys k0+8..+15, tile ct + 8) — lane L the row L % 8 of matrix L / 8. A second tile past
        // the latent reads the first again (computed, never stored).
        const u32 vrow = smem_addr(buf + (((lane >> 3) & 1) * 8 + (lane & 7)) * CS);
        // The running mix is rescaled only when some head's max moved (the correction is exactly 1 otherwise):
        // after the first tiles that is rare, and skipping it saves 32 multiplies a tile.
        if (__any_sync(0xffffffffu, cr0 != 1.f || cr1 != 1.f)) {
#pragma unroll
            for (int j = 0; j < 8; j++) {
                acc[j][0] *= cr0;
                acc[j][1] *= cr0;
                acc[j][2] *= cr1;
                acc[j][3] *= cr1;
            }
        }
#pragma unroll
        for (int j = 0; j < 8; j += 2) {
            const int ct = warp + 8 * j;
            if (FULL_COLS || ct < col_tiles) {
                const u32 v = vrow + (lane >= 16 && (FULL_COLS || ct + 8 < col_tiles) ? ct + 8 : ct) * 16;
#pragma unroll
                for (int kk = 0; kk < FM_KT / 16; kk++) {
                    u32 b[4];
                    ldmatrix_x4_trans_at(b, v + kk * 16 * CS * 2);
#pragma unroll
                    for (int u = 0; u < 2; u++) {
                        if (EXACT) {
                            fm_mma(acc[j + u], pa[2 * kk], b[2 * u]);
                            fm_mma(acc[j + u], pa[2 * kk + 1], b[2 * u + 1]);
                        } else {
                            mma_16816(acc[j + u], pa[kk], b[2 * u], b[2 * u + 1]);
                        }
                    }
                }
            }
        }
    }
    cp_async_wait<0>();

#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
        const int h = h0 + group + 8 * hh;
        if (h < heads) {
            const size_t at = (((size_t)lr * heads + h) * splits + split) * lora;
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const int ct = warp + 8 * j;
                if (FULL_COLS || ct < col_tiles) *(float2*)(o_part + at + ct * 8 + quad * 2) = make_float2(acc[j][2 * hh], acc[j][2 * hh + 1]);
            }
        }
    }
#pragma unroll
    for (int u = 0; u < 2; u++) {
        const int h = h0 + 2 * warp + u;
        sum[u] = warp_sum(sum[u]);
        if (h < heads && lane == 0) {
            const size_t at = ((size_t)lr * heads + h) * splits + split;
            ml_part[at * 2] = m[u];
            ml_part[at * 2 + 1] = sum[u];
        }
    }
}

#define FM_ARGS                                                                                                   \
    const float *q_lat, const __nv_bfloat16 *q, const void *c_lat, const void *c_pe, const float *scales,         \
        int dtype, const int *meta, const int *tables, const int *keys, int key_stride, int row0, int heads,      \
        int nope, int rope, int lora, float scale, float *o_part, float *ml_part
#define FM_PASS q_lat, q, c_lat, c_pe, scales, dtype, meta, tables, keys, key_stride, row0, heads, nope, rope, lora, \
                scale, o_part, ml_part
extern "C" __global__ void __launch_bounds__(32 * FM_WARPS, 2) mla_flash_mma_bf16(FM_ARGS) {
    mla_flash_mma<true, 0, 0>(FM_PASS);
}
extern "C" __global__ void __launch_bounds__(32 * FM_WARPS, 2) mla_flash_mma_fast_bf16(FM_ARGS) {
    mla_flash_mma<false, 0, 0>(FM_PASS);
}
// DeepSeek V3's cache rows (kv_lora 512 + rope 64), every dim a constant.
extern "C" __global__ void __launch_bounds__(32 * FM_WARPS, 2) mla_flash_mma_bf16_d576(FM_ARGS) {
    mla_flash_mma<true, 512, 64>(FM_PASS);
}
extern "C" __global__ void __launch_bounds__(32 * FM_WARPS, 2) mla_flash_mma_fast_bf16_d576(FM_ARGS) {
    mla_flash_mma<false, 512, 64>(FM_PASS);
}
// Two head groups a block (HG): 32 heads over each tile, one 512-thread block an SM where two of 256 were; a ring
// of 3 tiles (157 KB; H200, 32 rows: flash 181 -> 177 µs a layer against 2 tiles, session 22).
extern "C" __global__ void __launch_bounds__(64 * FM_WARPS, 1) mla_flash_mma_fast_bf16_d576_g2(FM_ARGS) {
    mla_flash_mma<false, 512, 64, 2, 3>(FM_PASS);
}
