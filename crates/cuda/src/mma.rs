//! The tensor-core GEMV (kernels/gptq_mma.cu): the repacking of GPTQ weights into per-lane `mma.m16n8k16`
//! fragments at load, and its launches. Used for bf16 activations when the shape allows (`eligible`).

use std::sync::OnceLock;

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use crate::act::{ActView, ActViewMut};
use crate::error::{Error, Result, drv};
use crate::gemv::GpuGptq;
use crate::gpu::Gpu;
use crate::launch::ArgOrNull;

/// Rows of K per chunk (one scale per chunk: group sizes must be multiples of it).
pub const CHUNK: usize = 128;
pub(crate) const THREADS: u32 = 128;

/// Whether a weight can take the tensor-core layout: 2/3/4 bits (the bf16 trick holds 128 + q exactly up to
/// 7 bits, and the packing is written for these), whole chunks of K, whole groups per chunk, whole column tiles.
pub fn eligible(bits: u32, k: usize, n: usize, group_size: usize) -> bool {
    matches!(bits, 2..=4) && k.is_multiple_of(CHUNK) && group_size.is_multiple_of(CHUNK) && n.is_multiple_of(16)
}

/// Word and shift of pair `i` (0..16) inside a block of `bits` words; `None` for 3-bit pair 15 (bit 15 of each
/// of the three words holds one of its bits, word j bit j). The 3-bit places are chosen for the kernels'
/// `mma_pair` (kernels/mma_pack.cuh): pairs `i % 4 < 2` at bits 0, 6 or 12 (read after a shift as 128 + q),
/// pairs `i % 4 >= 2` at bits 3, 9 or, in word 2, 12 (read as 16 + q).
fn slot(bits: u32, i: usize) -> Option<(usize, u32)> {
    const THREE: [(usize, u32); 15] = [
        (0, 0),
        (1, 0),
        (0, 3),
        (1, 3),
        (0, 6),
        (1, 6),
        (0, 9),
        (1, 9),
        (0, 12),
        (1, 12),
        (2, 3),
        (2, 9),
        (2, 0),
        (2, 6),
        (2, 12),
    ];
    match bits {
        2 => Some((i / 8, 2 * (i % 8) as u32)),
        4 => Some((i / 4, 4 * (i % 4) as u32)),
        _ => THREE.get(i).copied(),
    }
}

/// The checkpoint packing (`[K·bits/32, N]`, rows already in group order) → `[tile][chunk][bits][lane]` pairs of
/// words, lane L of tile t and chunk c holding the A fragments of `mma.m16n8k16` for its 8 k-steps.
///
/// Runs at load for every linear (tens of thousands on a real model), so it is written for speed: the values
/// are first unpacked column-major (`[N][K]` bytes: one tile then touches 16 contiguous columns), and tiles are
/// shared out among the host's threads.
pub fn repack(qweight: &[u32], bits: u32, k: usize, n: usize) -> Vec<u32> {
    let b = bits as usize;
    let mask = (1u32 << b) - 1;
    let (tiles, chunks) = (n / 16, k / CHUNK);
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get()).min(tiles.max(1));
    let tiles_per_thread = tiles.div_ceil(threads.max(1)).max(1);
    // q[col][row]: 32 rows of a column come from `bits` words of one packed row block; columns shared out.
    let mut q = vec![0u8; k * n];
    std::thread::scope(|scope| {
        for (part, cols) in q.chunks_mut(16 * tiles_per_thread * k).enumerate() {
            scope.spawn(move || {
                for (i, column) in cols.chunks_mut(k).enumerate() {
                    let col = part * 16 * tiles_per_thread + i;
                    for blk in 0..k / 32 {
                        let mut acc: u128 = 0;
                        for j in 0..b {
                            acc |= u128::from(qweight[(blk * b + j) * n + col]) << (32 * j);
                        }
                        for (r, v) in column[blk * 32..blk * 32 + 32].iter_mut().enumerate() {
                            *v = ((acc >> (r * b)) as u32 & mask) as u8;
                        }
                    }
                }
            });
        }
    });
    let per_tile = chunks * b * 64;
    let mut out = vec![0u32; tiles * per_tile];
    std::thread::scope(|scope| {
        for (part, region) in out.chunks_mut(tiles_per_thread * per_tile).enumerate() {
            let q = &q;
            scope.spawn(move || {
                for (i, tile_out) in region.chunks_mut(per_tile).enumerate() {
                    repack_tile(q, bits, k, part * tiles_per_thread + i, tile_out);
                }
            });
        }
    });
    out
}

/// One 16-column tile of `repack`, from the column-major values.
fn repack_tile(q: &[u8], bits: u32, k: usize, t: usize, out: &mut [u32]) {
    let b = bits as usize;
    let mut words = [0u32; 8];
    for c in 0..k / CHUNK {
        for lane in 0..32 {
            words[..2 * b].fill(0);
            for p in 0..32 {
                let (ks, reg) = (p / 4, p % 4);
                let col = 16 * t + lane / 4 + 8 * (reg & 1);
                let row = CHUNK * c + 16 * ks + 2 * (lane % 4) + 8 * (reg >> 1);
                let (lo, hi) = (u32::from(q[col * k + row]), u32::from(q[col * k + row + 1]));
                let blk = &mut words[(p / 16) * b..(p / 16 + 1) * b];
                match slot(bits, p % 16) {
                    Some((w, sh)) => blk[w] |= (lo << sh) | (hi << (sh + 16)),
                    None => {
                        for (j, word) in blk.iter_mut().enumerate() {
                            *word |= ((lo >> j) & 1) << 15 | ((hi >> j) & 1) << 31;
                        }
                    }
                }
            }
            for (wi, &word) in words[..2 * b].iter().enumerate() {
                out[((c * b + wi / 2) * 32 + lane) * 2 + wi % 2] = word;
            }
        }
    }
}

/// Kernel rows per launch: 8 (one n8 half) or 16.
fn bucket(batch: usize) -> usize {
    if batch <= 8 { 8 } else { 16 }
}

/// The block's shape (kernels/gptq_mma.cu): warps, tiles of 16 columns, bf16 per x row of a ring slot, deepest ring.
const WARPS: usize = 4;
pub(crate) const XS: usize = CHUNK + 8;
const MAX_STAGES: usize = 8;

/// Launch tuning, read once from the environment so a sweep on a new GPU needs no rebuild (docs/CUDA.md):
/// `PIPEMOE_GEMV_WARPS_PER_SM` — warps worth having per multiprocessor before a warp's run of K is cut shorter
/// (more splits), default 8; `PIPEMOE_GEMV_STAGES` — the deepest ring (2..=8), default 8;
/// `PIPEMOE_GEMV_SMEM_KIB` — shared memory a block stays within (16..=200), default 44, which needs no opt-in
/// and lets a 3090's 100 KiB hold two blocks; `PIPEMOE_GEMV_WARP_COLS` — which grouped experts' launches lay a
/// block's warps side by side over the columns, each over the whole split of K ([`Layout::WarpCols`]): 0 none, 1
/// those of more than [`WARP_COLS_ROWS`] rows (default), 2 all (the plain GEMV's kernels are split-K only: with
/// warp columns they were as fast or slower, session 18);
/// `PIPEMOE_GEMV_SPLITS` — the splits of K of every plain GEMV launch (0, the default: chosen by [`shape`]), a
/// sweep's knob for the one-wave launches' balance over the SMs (o_proj at one row: 448 blocks are 4 on 52 SMs and
/// 3 on 80). A value that does not parse or is out of range is reported once on stderr and the default used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tuning {
    warps_per_sm: usize,
    max_stages: usize,
    smem_block: usize,
    warp_cols: usize,
    splits: usize,
}

fn tuning() -> Tuning {
    static T: OnceLock<Tuning> = OnceLock::new();
    *T.get_or_init(|| Tuning {
        warps_per_sm: knob("PIPEMOE_GEMV_WARPS_PER_SM", 8, 1..=64),
        max_stages: knob("PIPEMOE_GEMV_STAGES", MAX_STAGES, 2..=MAX_STAGES),
        smem_block: knob("PIPEMOE_GEMV_SMEM_KIB", 44, 16..=200) * 1024,
        warp_cols: knob("PIPEMOE_GEMV_WARP_COLS", 1, 0..=2),
        splits: knob("PIPEMOE_GEMV_SPLITS", 0, 0..=128),
    })
}

/// How a block's 4 warps share its work (`KW` in kernels/mma_gemv.cuh: the grouped kernels' ``, `_k2`, `_cols`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    /// On the same tiles, each over a quarter of the split's chunks, the sums added in shared memory at the end.
    SplitK,
    /// On 4 neighbouring groups of tiles, each over all of the split's chunks and storing its own sums: a block
    /// covers 4 times the columns, and its start and end are paid over 4 times the bytes.
    WarpCols,
    /// In 2 pairs on 2 groups of tiles, each warp over half of the split's chunks: twice the columns and each
    /// warp's run twice as long as [`Layout::SplitK`]'s, for launches whose runs are short ([`HALF_K_CHUNKS`]).
    HalfK,
}

/// Chunks of K under which a grouped launch of at most [`WARP_COLS_ROWS`] rows pairs its warps ([`Layout::HalfK`]):
/// the one-row down launch's 16 (4 a warp split four ways) spent as many warp samples in its blocks' starts and
/// ends as in its chunks (ncu, session 28), and its 1,008 blocks ran in two rounds.
pub(crate) const HALF_K_CHUNKS: usize = 24;

/// Rows of a step above which the grouped experts' launches lay their warps over the columns. H200, 2 layers at
/// 4K (docs/PERF.md, session 18): at 32 rows down 228 -> 209 us a layer (16K blocks of 4 chunks a warp became 4K
/// of 16, each block's start and its warps' reduction paid a quarter as often), gate/up unchanged; at one row
/// gate/up 46 -> 50 and down 32 -> 38 us (one round of fewer, longer blocks kept fewer warps resident than the
/// split layout's two), and the plain GEMVs unchanged or slower (the fused q_a/kv_a/wk 14 -> 17 us).
pub(crate) const WARP_COLS_ROWS: usize = 8;

impl Layout {
    /// The layout of a grouped experts' launch over `rows` rows of a step and `k` rows of K ([`Tuning`]'s
    /// `warp_cols`; a plain GEMV is always [`Layout::SplitK`]); `pairs`: whether [`Layout::HalfK`] may be taken
    /// (its kernels have no row-order path; [`crate::gpu::Apart::QuarterK`] keeps the split layout).
    pub(crate) fn for_grouped(rows: usize, k: usize, pairs: bool) -> Layout {
        match tuning().warp_cols {
            2 => Layout::WarpCols,
            1 if rows > WARP_COLS_ROWS => Layout::WarpCols,
            _ if pairs && k / CHUNK < HALF_K_CHUNKS => Layout::HalfK,
            _ => Layout::SplitK,
        }
    }

    /// The grouped kernel's name part (`gptq_mma_gemv_grouped_w<B>_b8<part>[_perm]_bf16`).
    pub(crate) fn kernel_part(self) -> &'static str {
        match self {
            Layout::SplitK => "",
            Layout::WarpCols => "_cols",
            Layout::HalfK => "_k2",
        }
    }

    /// Warps of a block that share a run of K.
    pub(crate) fn k_warps(self) -> usize {
        match self {
            Layout::SplitK => WARPS,
            Layout::WarpCols => 1,
            Layout::HalfK => 2,
        }
    }
}

pub(crate) fn knob(name: &str, default: usize, range: std::ops::RangeInclusive<usize>) -> usize {
    let Ok(text) = std::env::var(name) else { return default };
    match parse_knob(&text, &range) {
        Some(v) => v,
        None => {
            eprintln!("pipemoe: ignoring {name}={text:?} (want an integer in {range:?}); using {default}");
            default
        }
    }
}

fn parse_knob(text: &str, range: &std::ops::RangeInclusive<usize>) -> Option<usize> {
    text.trim().parse().ok().filter(|v| range.contains(v))
}

/// One launch's shape: rows of K per split, splits, ring depth (chunks per warp's ring), shared bytes and how
/// the block's warps share the work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Shape {
    pub chunk: usize,
    pub splits: usize,
    pub stages: usize,
    pub smem: u32,
    pub layout: Layout,
}

impl Shape {
    /// This shape with `splits` splits of `k` rows of K (at most one a chunk): whole chunks a split, so the count
    /// may come out lower.
    pub(crate) fn with_splits(self, k: usize, splits: usize) -> Shape {
        let k_chunks = k / CHUNK;
        let chunk = k_chunks.div_ceil(splits.clamp(1, k_chunks.max(1))) * CHUNK;
        Shape { chunk, splits: k.div_ceil(chunk), ..self }
    }
}

/// Bytes of one ring slot (`slot_bytes` in the kernel): a warp's weight words of one chunk, the scales and zeros
/// of its tiles' columns (f16), `rows` rows of x and, for a kernel that reads them (`sums`, the grouped `_xs`
/// kernels), 8 rows' sums of x (two f32 each).
pub(crate) fn slot_bytes(bits: u32, rows: usize, sums: bool) -> usize {
    let tiles = tiles_per_warp(rows);
    tiles * bits as usize * 32 * 8 + 2 * tiles * 16 * 2 + rows * XS * 2 + if sums { 8 * 8 } else { 0 }
}

/// Tiles of 16 output columns per warp (`mma_tpw` in the kernel): 4 for the ≤ 8-row kernels, 2 for the 16-row
/// ones (twice the accumulators per tile).
pub(crate) fn tiles_per_warp(rows: usize) -> usize {
    if bucket(rows) == 8 { 4 } else { 2 }
}

/// A tensor-core GEMV kernel's variant for a weight (the `_perm` and `_sym` names of kernels/gptq_mma.cu and
/// gptq_rope.cu): with a row order of K, the kernel that gathers x through it; symmetric without one (null zeros),
/// the kernel that neither reads nor applies per-column zeros; else the general one.
pub(crate) fn variant(w: &GpuGptq) -> &'static str {
    variant_of(w.perm.is_some(), w.symmetric())
}

/// [`variant`] from its two facts (a grouped launch's: any expert reordered, every expert symmetric).
pub(crate) fn variant_of(reordered: bool, symmetric: bool) -> &'static str {
    match (reordered, symmetric) {
        (true, _) => "_perm",
        (false, true) => "_sym",
        (false, false) => "",
    }
}

/// The shape for `rows` rows of x over `blocks_x` column blocks of `layout` (times the grouped launch's tiles):
/// each warp gets enough chunks of K that `warps_per_sm` warps per multiprocessor ([`Tuning`]) cover the work, a
/// whole run when the matrix is large (no split, no partial sums), and the ring as deep as the shared budget
/// allows; then the splits are raised where that fills the device's resident blocks more evenly
/// ([`even_splits`]). `sums`: the kernel reads the sums of x with x ([`slot_bytes`]).
pub(crate) fn shape(w: &GpuGptq, gpu: &Gpu, rows: usize, blocks_x: usize, layout: Layout, sums: bool) -> Shape {
    let k_chunks = w.in_features / CHUNK;
    let slot = slot_bytes(w.bits, rows, sums);
    let t = tuning();
    let stages = (t.smem_block / (WARPS * slot)).clamp(2, t.max_stages);
    let target = gpu.sm_count as usize * t.warps_per_sm;
    let kw = layout.k_warps();
    let warp_runs = blocks_x.max(1) * (WARPS / kw) * k_chunks;
    let per_warp = warp_runs.div_ceil(target).clamp(1, k_chunks.div_ceil(kw));
    // The warps' sums at the end (split K): [WARPS][tiles · halves · 4][32] floats, 16 values a lane either way.
    let smem = (WARPS * stages * slot).max(WARPS * 16 * 32 * 4);
    let least = k_chunks.div_ceil(kw * per_warp);
    // The grouped kernels hold as many registers as the plain one within a few: its residency stands for both.
    let (bits, mb) = (w.bits, bucket(rows));
    let symbol = || format!("gptq_mma_gemv_w{bits}_b{mb}_to_bf16");
    let splits = match gpu.resident_blocks((bits, mb as u32, 0), symbol, THREADS, smem as u32) {
        Some(resident) if resident > 0 => even_splits(k_chunks, blocks_x.max(1), least, resident, kw),
        _ => least,
    };
    Shape { chunk: 0, splits, stages, smem: smem as u32, layout }.with_splits(w.in_features, splits)
}

/// Splits of `k_chunks` chunks for `blocks` blocks per split, from `least` up to twice that: the count whose
/// rounds of `resident` blocks times each warp's chunks (plus one for a block's start and end) is least — a last
/// round of a few blocks costs as long as a full one (576 blocks on 528 resident took two rounds of 14 chunks;
/// two splits take three of 7). Splits that leave a warp fewer than 4 chunks (or than `least` does) are not taken:
/// there a block's fixed costs and the partial sums outweigh the rounds. `k_warps`: a block's warps that share
/// each split's chunks ([`Layout`]).
pub(crate) fn even_splits(k_chunks: usize, blocks: usize, least: usize, resident: usize, k_warps: usize) -> usize {
    let per_warp = |s: usize| k_chunks.div_ceil(s).div_ceil(k_warps);
    let floor = per_warp(least).min(4);
    let cost = |s: usize| (blocks * s).div_ceil(resident) * (per_warp(s) + 1);
    (least..=(2 * least).min(k_chunks)).filter(|&s| per_warp(s) >= floor).min_by_key(|&s| (cost(s), s)).unwrap_or(least)
}

/// Column blocks of a matrix of `n` outputs for `rows` rows of x: a block's warps on the same tiles, or (warp
/// columns) on 4 groups side by side.
pub(crate) fn blocks_x(n: usize, rows: usize, layout: Layout) -> usize {
    n.div_ceil(16 * tiles_per_warp(rows) * (WARPS / layout.k_warps()))
}

/// A plain GEMV's column blocks and shape for `batch` rows: what `gemv` launches and `scratch_len` sizes.
pub(crate) fn plain_shape(w: &GpuGptq, gpu: &Gpu, batch: usize) -> (usize, Shape) {
    let bx = blocks_x(w.out_features, batch, Layout::SplitK);
    let s = shape(w, gpu, batch, bx, Layout::SplitK, false);
    match tuning().splits {
        0 => (bx, s),
        forced => (bx, s.with_splits(w.in_features, forced)),
    }
}

/// `plain`, [`plain_shape`]'s shape of a launch, for the same launch with its x after the ring (`XPRE`: the normed
/// query launch, the input norm's GEMV): its slots without x rows, and `x_bytes` of x taken out of the same shared
/// budget, so that as many blocks fit an SM. `None` where even a ring of 2 no longer fits the budget with the x
/// (more rows or a longer K: that launch would hold fewer blocks an SM).
pub(crate) fn staged_x_shape(w: &GpuGptq, plain: Shape, batch: usize, x_bytes: usize) -> Option<Shape> {
    let slot = slot_bytes(w.bits, batch, false) - batch * XS * 2;
    let t = tuning();
    let room = t.smem_block.checked_sub(x_bytes).filter(|&r| r >= WARPS * 2 * slot)?;
    let stages = (room / (WARPS * slot)).clamp(2, t.max_stages);
    let smem = (WARPS * stages * slot + x_bytes).max(WARPS * 16 * 32 * 4);
    Some(Shape { stages, smem: smem as u32, ..plain })
}

pub(crate) fn scratch_len(w: &GpuGptq, gpu: &Gpu, batch: usize) -> usize {
    let (_, s) = plain_shape(w, gpu, batch);
    // At least one float: a zero-length allocation is an error.
    if s.splits > 1 { s.splits * batch * w.out_features } else { 1 }
}

/// `y[b, :] = W · x[b, :]` for `batch` ≤ 16 bf16 rows, one launch: splits of K (when any) leave partial sums in
/// `partial` that the last block of each column range adds, counted in `gpu.counters`.
pub(crate) fn gemv(
    w: &GpuGptq,
    gpu: &Gpu,
    x: &ActView<'_>,
    batch: usize,
    partial: &mut CudaSlice<f32>,
    y: &mut ActViewMut<'_>,
) -> Result<()> {
    if x.dtype() != crate::act::ActDtype::Bf16 {
        return Err(Error::Shape { what: "gemv", reason: "weights packed for tensor cores take bf16 inputs".into() });
    }
    // One row over about one block an SM: one wide block per 64 columns, no split of K (wide.rs).
    if let Some(p) = crate::wide::plan(w, gpu, batch, x.dtype(), y.dtype()) {
        return crate::wide::launch(w, gpu, x, y, p);
    }
    let (k, n) = (w.in_features, w.out_features);
    let (bx, s) = plain_shape(w, gpu, batch);
    if s.splits > 1 && (partial.len() < s.splits * batch * n || bx > gpu.counters.len()) {
        return Err(Error::Shape {
            what: "gemv scratch",
            reason: format!(
                "{} floats, {} counters for {} splits of {batch}×{n}",
                partial.len(),
                gpu.counters.len(),
                s.splits
            ),
        });
    }
    let name = format!("gptq_mma_gemv_w{}_b{}{}_to_{}", w.bits, bucket(batch), variant(w), y.dtype().suffix());
    let cfg = LaunchConfig {
        grid_dim: (bx as u32, s.splits as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: s.smem,
    };
    let (b, ki, ni, gs, ci, st) =
        (batch as i32, k as i32, n as i32, w.group_size as i32, s.chunk as i32, s.stages as i32);
    let f = gpu.function(&name)?;
    gpu.allow_smem(f, s.smem as usize)?;
    let mut l = gpu.stream.launch_builder(f);
    l.arg(x);
    l.arg_or_null(w.perm.as_ref());
    l.arg(&w.qweight);
    l.arg_or_null(w.zeros.as_ref());
    l.arg(&w.scales).arg(&mut *partial).arg(y).arg(&gpu.counters);
    l.arg(&b).arg(&ki).arg(&ni).arg(&gs).arg(&ci).arg(&st);
    // SAFETY: matches gptq_mma_gemv_*_to_*: x [batch, k] bf16, y [batch, n], zeros null for a symmetric weight
    // (the kernel then reads none; the `_sym` kernels are picked only then), perm null but in the `_perm`
    // kernels; partial and counters were checked above for a split launch (a single split touches neither).
    unsafe { l.launch(cfg) }.map_err(drv("launch gptq_mma_gemv"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_fill_the_resident_blocks_evenly() {
        // The H200's grouped gate/up at one row: 576 blocks, 528 resident, 56 chunks: 2 splits (3 rounds of 7
        // chunks a warp) beat 1 (2 rounds of 14).
        assert_eq!(even_splits(56, 576, 1, 528, WARPS), 2);
        // With room for every block at once, one split.
        assert_eq!(even_splits(56, 576, 1, 660, WARPS), 1);
        // o_proj at one row: 112 blocks, 128 chunks, 3 splits least: 4 still fit in one round with fewer chunks.
        assert_eq!(even_splits(128, 112, 3, 528, WARPS), 4);
        // The grouped down at one row (16 chunks): 2 splits would leave warps 2 chunks — not taken.
        assert_eq!(even_splits(16, 1008, 1, 528, WARPS), 1);
        // A short matrix already split to 2 chunks a warp stays where it is.
        assert_eq!(even_splits(56, 35, 7, 528, WARPS), 7);
        // Warps over columns, each over its split's every chunk. The grouped down at one row (9 tiles of 28
        // blocks): 2 splits fill one round of 504 blocks, 8 chunks a warp.
        assert_eq!(even_splits(16, 252, 1, 528, 1), 2);
        // gate/up at one row (9 tiles of 16 blocks, 2 splits least): 3 splits are one round of 19 chunks a warp.
        assert_eq!(even_splits(56, 144, 2, 528, 1), 3);
        // Warps over columns: a block 4 times the columns (the down projection's 7,168 at ≤ 8 and at 16 rows).
        assert_eq!((blocks_x(7168, 8, Layout::SplitK), blocks_x(7168, 8, Layout::WarpCols)), (112, 28));
        assert_eq!((blocks_x(7168, 16, Layout::SplitK), blocks_x(7168, 16, Layout::WarpCols)), (224, 56));
        // A last block whose warps past the matrix have no tiles (576 columns: 36 tiles, 3 blocks of 16).
        assert_eq!(blocks_x(576, 1, Layout::WarpCols), 3);
        assert_eq!(blocks_x(7168, 1, Layout::HalfK), 56);
    }

    /// The kernels' `mma_pair` (kernels/mma_pack.cuh), bit for bit: pair `i` of a block as bf16x2 base + q.
    fn mma_pair(bits: u32, w: &[u32], i: usize) -> u32 {
        const B128: u32 = 0x4300_4300;
        const B16: u32 = 0x4180_4180;
        let (lo3, hi3) = (0x0007_0007, 0x0038_0038);
        match bits {
            2 => ((w[i / 8] >> (2 * (i % 8))) & 0x0003_0003) | B128,
            4 => ((w[i / 4] >> (4 * (i % 4))) & 0x000F_000F) | B128,
            _ => match i {
                0 => (w[0] & lo3) | B128,
                1 => (w[1] & lo3) | B128,
                2 => (w[0] & hi3) | B16,
                3 => (w[1] & hi3) | B16,
                4 => ((w[0] >> 6) & lo3) | B128,
                5 => ((w[1] >> 6) & lo3) | B128,
                6 => ((w[0] >> 6) & hi3) | B16,
                7 => ((w[1] >> 6) & hi3) | B16,
                8 => ((w[0] >> 12) & lo3) | B128,
                9 => ((w[1] >> 12) & lo3) | B128,
                10 => (w[2] & hi3) | B16,
                11 => ((w[2] >> 6) & hi3) | B16,
                12 => (w[2] & lo3) | B128,
                13 => ((w[2] >> 6) & lo3) | B128,
                14 => ((w[2] >> 9) & hi3) | B16,
                _ => {
                    ((w[0] >> 12) & 0x0008_0008)
                        | (((w[1] >> 12) & 0x0008_0008) << 1)
                        | ((w[2] >> 10) & 0x0020_0020)
                        | B16
                }
            },
        }
    }

    /// Reads value (row, col) back from the repacked words the way the kernels do: the lane's words, its pair's
    /// bf16 half, minus the pair's base (128, or 16 for 3-bit pairs `i % 4 >= 2`).
    fn unpack(words: &[u32], bits: u32, k: usize, col: usize, row: usize) -> u32 {
        let b = bits as usize;
        let (t, r16, c, kk) = (col / 16, col % 16, row / CHUNK, row % CHUNK);
        let (ks, k16) = (kk / 16, kk % 16);
        let lane = (r16 % 8) * 4 + (k16 % 8) / 2;
        let p = ks * 4 + (r16 / 8) + 2 * (k16 / 8);
        let lw: Vec<u32> =
            (0..2 * b).map(|wi| words[((((t * (k / CHUNK) + c) * b + wi / 2) * 32 + lane) * 2) + wi % 2]).collect();
        let pair = mma_pair(bits, &lw[(p / 16) * b..(p / 16 + 1) * b], p % 16);
        let half = if k16 % 2 == 1 { pair >> 16 } else { pair & 0xFFFF };
        let base = if bits == 3 && p % 4 >= 2 { 16.0 } else { 128.0 };
        let v = f32::from_bits(half << 16) - base;
        assert!(v.fract() == 0.0 && v >= 0.0, "pair {p}: {v} is not a field value");
        v as u32
    }

    #[test]
    fn splits_are_whole_chunks() {
        let s = Shape { chunk: 0, splits: 0, stages: 2, smem: 0, layout: Layout::SplitK };
        // gate/up's 56 chunks in 3 splits: 19 chunks each (the last 18).
        assert_eq!((s.with_splits(7168, 3).chunk, s.with_splits(7168, 3).splits), (19 * CHUNK, 3));
        // 8 splits of 14 chunks come out as 7 of 2 (whole chunks a split); more splits than chunks, one a chunk.
        assert_eq!(s.with_splits(14 * CHUNK, 8).splits, 7);
        assert_eq!((s.with_splits(2048, 64).chunk, s.with_splits(2048, 64).splits), (CHUNK, 16));
    }

    #[test]
    fn tuning_knobs_take_integers_in_range_only() {
        assert_eq!(parse_knob(" 12 ", &(1..=64)), Some(12));
        assert_eq!(parse_knob("0", &(1..=64)), None);
        assert_eq!(parse_knob("65", &(1..=64)), None);
        assert_eq!(parse_knob("8.5", &(1..=64)), None);
        assert_eq!(parse_knob("", &(2..=8)), None);
    }

    #[test]
    fn repacking_keeps_every_value() {
        for bits in [2u32, 3, 4] {
            let (k, n) = (256, 32);
            let layout = pipemoe_quant::GptqLayout::new(
                k,
                n,
                pipemoe_quant::Bits::new(bits).unwrap(),
                pipemoe_quant::GroupSize::Rows(128),
            )
            .unwrap();
            let q: Vec<u8> = (0..k * n).map(|i| ((i * 7 + i / 13) % (1 << bits)) as u8).collect();
            let packed = pipemoe_quant::pack::pack_qweight(&q, &layout).unwrap();
            let words = repack(&packed, bits, k, n);
            assert_eq!(words.len(), packed.len(), "{bits}-bit: same bytes");
            for row in 0..k {
                for col in 0..n {
                    assert_eq!(
                        unpack(&words, bits, k, col, row),
                        u32::from(q[row * n + col]),
                        "{bits}-bit ({row},{col})"
                    );
                }
            }
        }
        // The real expert shape, timed (a load-time cost paid for every linear of the model).
        let (k, n) = (7168, 2048);
        let packed: Vec<u32> = (0..k * 3 / 32 * n).map(|i| (i as u32).wrapping_mul(2_654_435_761)).collect();
        let t0 = std::time::Instant::now();
        let words = repack(&packed, 3, k, n);
        eprintln!("repack 7168x2048 3-bit: {:?}", t0.elapsed());
        assert_eq!(words.len(), packed.len());
        assert!(eligible(3, 7168, 2048, 128) && !eligible(8, 7168, 2048, 128) && !eligible(3, 7168, 2048, 64));
    }
}
