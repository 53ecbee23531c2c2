//! The grouped experts' launches' shapes (`experts.rs`): which kernel, how many blocks and splits of K for a step
//! of some rows, and the tuning knobs a sweep sets without a rebuild (docs/CUDA.md).

use std::sync::OnceLock;

use crate::backend::CudaBackend;
use crate::gemv::{GpuGptq, Packing, THREADS};
use crate::mma::{Layout, Shape};

/// Rows of one tile of the grouped launch: the scalar kernel keeps them in registers per thread (4), the
/// tensor-core kernel in one n8 half of an mma (8).
pub(crate) fn tile_rows(packing: Packing) -> usize {
    match packing {
        Packing::Gptq => 4,
        Packing::Mma => 8,
    }
}

/// The most tiles of `tile` rows a step's plan can make (experts_plan): expert e's c_e pairs (rows · top_k of
/// them over at most `n_experts` experts) take ⌈c_e / tile⌉ tiles, so Σ ≤ (rows · top_k + (tile − 1) · experts
/// chosen) / tile; the shared expert, one pair a row, ⌈rows / tile⌉ more. The grid's tiles past the plan's count
/// return at once but still take their turn on the SMs: at 32 rows a tile a pair (288) left 174 of them a launch,
/// 11K blocks of the gate/up launch that only read the count (ncu, docs/PERF.md session 17); this bound is 148.
pub(crate) fn max_tiles(rows: usize, top_k: usize, n_experts: usize, shared: bool, tile: usize) -> usize {
    let routed = rows * top_k;
    let chosen = routed.min(n_experts);
    ((routed + (tile - 1) * chosen) / tile).min(routed) + if shared { rows.div_ceil(tile) } else { 0 }
}

/// One grouped launch: its kernel, blocks along x (all matrices), the split/ring shape (the scalar kernel has no
/// ring: stages 0), and whether the kernel reads the sums of x its input's producer wrote (`_xs`).
pub(crate) struct Launch {
    pub name: String,
    pub bx: usize,
    pub shape: Shape,
    pub sums: bool,
}

/// One grouped launch's shape for a step of `rows` rows: matrices like `w` over `tiles` tiles of `mb` rows, `mats`
/// matrices side by side. `reordered`: some expert has a row order of K (the tensor-core kernel that can gather x
/// through it); `symmetric`: every expert's zeros are the constant (the kernel that reads none:
/// [`crate::mma::variant_of`]); `sums`: the sums of x can be had from x's producer, which the warp-column kernels
/// then read (the others, whose launches have fewer rows, compute them: the producers there are fused away).
pub(crate) fn launch_shape(
    b: &CudaBackend,
    w: &GpuGptq,
    (rows, mb): (usize, usize),
    tiles: usize,
    mats: usize,
    (reordered, symmetric, sums): (bool, bool, bool),
) -> Launch {
    let (k, n, g) = (w.in_features, w.out_features, &b.gpu);
    match w.packing {
        Packing::Gptq => {
            let bx = n.div_ceil(THREADS as usize);
            let chunk = w.k_chunk_for(g, mb, mats * bx * tiles);
            let name = format!("gptq_gemv_grouped_w{}_b{mb}_{}", w.bits, b.act.suffix());
            let smem = w.smem_bytes(mb, chunk);
            let shape = Shape { chunk, splits: k.div_ceil(chunk), stages: 0, smem, layout: Layout::SplitK };
            Launch { name, bx: mats * bx, shape, sums: false }
        }
        Packing::Mma => {
            let pairs = !reordered && !b.gpu.is_apart(crate::gpu::Apart::QuarterK);
            let layout = Layout::for_grouped(rows, k, pairs);
            let sums = sums && !reordered && layout == Layout::WarpCols;
            let bx = crate::mma::blocks_x(n, mb, layout);
            let variant = crate::mma::variant_of(reordered, symmetric);
            let xs = if sums { "_xs" } else { "" };
            let name = format!("gptq_mma_gemv_grouped_w{}_b8{}{variant}{xs}_bf16", w.bits, layout.kernel_part());
            let mut shape = crate::mma::shape(w, g, mb, mats * bx * tiles, layout, sums);
            if let Some((gate_up, down)) = swept_splits()
                && rows <= crate::mma::WARP_COLS_ROWS
            {
                shape = shape.with_splits(k, if mats == 2 { gate_up } else { down });
            }
            Launch { name, bx: mats * bx, shape, sums }
        }
    }
}

/// One row's MoE block as one launch (gptq_mma.cu `gptq_mma_moe_row_*`, src/experts.rs): the kernel for these
/// two launches' shapes where one is compiled — the gate/up half's warps 4 or 2 on a run of K, the down half's 2, no
/// sums of x from a producer — of a weight without a row order (`symmetric`: the `_sym` kernel).
pub(crate) fn moe_row_kernel(gate_up: &Launch, down: &Launch, bits: u32, symmetric: bool) -> Option<String> {
    let (g, d) = (gate_up.shape.layout.k_warps(), down.shape.layout.k_warps());
    let compiled = matches!((g, d), (4, 2) | (2, 2)) && (2..=4).contains(&bits);
    if !compiled || gate_up.sums || down.sums || gate_up.shape.stages == 0 || down.shape.stages == 0 {
        return None;
    }
    let variant = if symmetric { "_sym" } else { "" };
    Some(format!("gptq_mma_moe_row_w{bits}_g{g}d{d}{variant}_bf16"))
}

/// `PIPEMOE_LOOP_SUMS=1`: every step as under [`crate::gpu::Apart::LoopSums`] (the grouped launches sum x in
/// their loops) — a one-binary A/B's knob (docs/CUDA.md).
pub(crate) fn loop_sums() -> bool {
    static K: OnceLock<bool> = OnceLock::new();
    *K.get_or_init(|| crate::mma::knob("PIPEMOE_LOOP_SUMS", 0, 0..=1) == 1)
}

/// `PIPEMOE_GROUPED_SPLITS=G,D`: the splits of K of the grouped gate/up and down launches of steps of up to
/// [`crate::mma::WARP_COLS_ROWS`] rows, in place of the shape's choice — a sweep's knob (docs/CUDA.md). Unset, or
/// not two integers in 1..=64, the shape's own (the latter reported once on stderr).
fn swept_splits() -> Option<(usize, usize)> {
    static S: OnceLock<Option<(usize, usize)>> = OnceLock::new();
    *S.get_or_init(|| {
        let text = std::env::var("PIPEMOE_GROUPED_SPLITS").ok()?;
        let parsed = parse_splits(&text);
        if parsed.is_none() {
            eprintln!("pipemoe: ignoring PIPEMOE_GROUPED_SPLITS={text:?} (want G,D with each in 1..=64)");
        }
        parsed
    })
}

fn parse_splits(text: &str) -> Option<(usize, usize)> {
    let (g, d) = text.split_once(',')?;
    let one = |t: &str| t.trim().parse::<usize>().ok().filter(|v| (1..=64).contains(v));
    Some((one(g)?, one(d)?))
}

#[cfg(test)]
mod tests {
    use super::{Launch, max_tiles, moe_row_kernel, parse_splits};
    use crate::mma::{Layout, Shape};

    fn launch(layout: Layout, stages: usize, sums: bool) -> Launch {
        let shape = Shape { chunk: 128 * 28, splits: 2, stages, smem: 40_000, layout };
        Launch { name: String::new(), bx: 64, shape, sums }
    }

    /// The one-launch MoE kernel exists for the layouts it is compiled for, named as gptq_mma.cu names it; any
    /// other pair of shapes takes the two launches.
    #[test]
    fn the_one_launch_moe_kernel_is_named_only_where_compiled() {
        let (split, half) = (launch(Layout::SplitK, 3, false), launch(Layout::HalfK, 3, false));
        assert_eq!(moe_row_kernel(&split, &half, 3, true).as_deref(), Some("gptq_mma_moe_row_w3_g4d2_sym_bf16"));
        assert_eq!(moe_row_kernel(&half, &half, 2, false).as_deref(), Some("gptq_mma_moe_row_w2_g2d2_bf16"));
        assert_eq!(moe_row_kernel(&split, &split, 4, true), None, "down over quarters of K (Apart::QuarterK)");
        assert_eq!(moe_row_kernel(&split, &launch(Layout::WarpCols, 3, false), 3, true), None);
        assert_eq!(moe_row_kernel(&split, &launch(Layout::HalfK, 3, true), 3, true), None, "sums of x");
        assert_eq!(moe_row_kernel(&launch(Layout::SplitK, 0, false), &half, 3, true), None, "no ring");
        assert_eq!(moe_row_kernel(&split, &half, 8, true), None, "8 bits: no tensor-core kernel");
    }

    #[test]
    fn swept_splits_take_two_counts_in_range() {
        assert_eq!(parse_splits("8,4"), Some((8, 4)));
        assert_eq!(parse_splits(" 7 , 2 "), Some((7, 2)));
        assert_eq!(parse_splits("8"), None);
        assert_eq!(parse_splits("0,4"), None);
        assert_eq!(parse_splits("8,65"), None);
        assert_eq!(parse_splits("a,b"), None);
    }

    /// The tiles experts_plan makes for a routing: ⌈c_e / tile⌉ per expert, plus the shared expert's.
    fn plan_tiles(experts: &[usize], n_experts: usize, rows: usize, shared: bool, tile: usize) -> usize {
        let mut counts = vec![0usize; n_experts];
        for &e in experts {
            counts[e] += 1;
        }
        counts.iter().map(|c| c.div_ceil(tile)).sum::<usize>() + if shared { rows.div_ceil(tile) } else { 0 }
    }

    #[test]
    fn max_tiles_bounds_every_plan() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: usize| {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) as usize % n
        };
        for (rows, top_k, n_experts) in [(1, 8, 128), (4, 8, 128), (16, 8, 128), (32, 8, 128), (64, 8, 128), (40, 2, 8)]
        {
            for shared in [false, true] {
                let bound = max_tiles(rows, top_k, n_experts, shared, 8);
                for round in 0..200 {
                    // Distinct experts a row; every other round from a few popular experts (long tiles).
                    let pool = if round % 2 == 0 { n_experts } else { top_k + 2 };
                    let mut experts = Vec::new();
                    for _ in 0..rows {
                        let mut row: Vec<usize> = Vec::new();
                        while row.len() < top_k {
                            let e = next(pool);
                            if !row.contains(&e) {
                                row.push(e);
                            }
                        }
                        experts.extend(row);
                    }
                    let got = plan_tiles(&experts, n_experts, rows, shared, 8);
                    assert!(got <= bound, "rows {rows} top_k {top_k} shared {shared}: {got} tiles > {bound}");
                }
            }
        }
        // Tight where every pair can be its own tile; 32 decode rows of the real model: 148 against 288 pairs.
        assert_eq!(max_tiles(8, 8, 128, false, 8), 64);
        assert_eq!(max_tiles(32, 8, 128, true, 8), 148);
    }
}
