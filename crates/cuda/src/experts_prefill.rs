//! A prefill step's routed experts in three launches and a SiLU (steps over [`GROUPED_MAX_ROWS`] rows whose
//! experts share the tensor-core layout): every (row, expert) pair is sorted by expert on the host (the routing
//! is read back for prefill anyway) and cut into tiles of up to 64 pairs of one expert; one launch computes gate
//! and up for every tile (`gptq_mma_gemm_grouped_*_gather_bf16`: each block finds its expert's packed words
//! through the device tables of addresses and reads its pairs' rows of x), `silu_mul` makes h, one launch computes
//! down (f32, one row per pair) and `gptq_reduce_combine` adds each row's experts with their routing weights in
//! slot order. One expert at a time this was ~8 launches and a gather per expert (1,000 a layer in a 512-row
//! chunk), each expert's GEMM a fraction of the device. Experts that differ in format still run that way
//! (`one_by_one`).
//!
//! [`GROUPED_MAX_ROWS`]: crate::experts::GROUPED_MAX_ROWS

use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};
use pipemoe_model::backend::{Backend, ExpertWeights, Routing};

use crate::act::ActDtype;
use crate::backend::{CudaBackend, GpuTensor, MResult, m, md, shape};
use crate::experts::Tables;
use crate::gemv::Packing;
use crate::launch::grid;

/// Pairs per tile: the grouped kernels' 64-row block.
const TILE: usize = 64;
/// Threads per block of the tensor-core GEMM (`MG_THREADS`) and columns per block (`MG_BN`).
const THREADS: u32 = 256;
const BN: usize = 128;

/// The layout of one step's pairs: `tiles [n_tiles, 3]` (expert, first pair, pairs), `pair_x[p]` the row of pair
/// `p`, `pair_of[i]` the pair of routing entry `i = row · top_k + slot` (−1 for experts this slice lacks).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct PairsByExpert {
    pub tiles: Vec<i32>,
    pub pair_x: Vec<i32>,
    pub pair_of: Vec<i32>,
}

impl PairsByExpert {
    /// Pairs sorted by expert and in row order within one; tiles of at most `tile` pairs. `held(e)`: whether this
    /// slice holds expert `e` (< `n_experts`).
    pub(crate) fn new(r: &Routing, n_experts: usize, held: impl Fn(usize) -> bool, tile: usize) -> PairsByExpert {
        let mine = |e: u32| (e as usize) < n_experts && held(e as usize);
        let mut start = vec![0usize; n_experts + 1];
        for &e in r.experts.iter().filter(|&&e| mine(e)) {
            start[e as usize + 1] += 1;
        }
        for e in 0..n_experts {
            start[e + 1] += start[e];
        }
        let pairs = start[n_experts];
        let (mut pair_x, mut pair_of) = (vec![0i32; pairs], vec![-1i32; r.experts.len()]);
        let mut next = start.clone();
        for (i, &e) in r.experts.iter().enumerate() {
            if mine(e) {
                let p = next[e as usize];
                (pair_x[p], pair_of[i]) = ((i / r.top_k) as i32, p as i32);
                next[e as usize] += 1;
            }
        }
        let mut tiles = Vec::new();
        for e in 0..n_experts {
            for p0 in (start[e]..start[e + 1]).step_by(tile.max(1)) {
                tiles.extend([e as i32, p0 as i32, (tile.min(start[e + 1] - p0)) as i32]);
            }
        }
        PairsByExpert { tiles, pair_x, pair_of }
    }

    pub(crate) fn tile_count(&self) -> usize {
        self.tiles.len() / 3
    }
}

impl Tables {
    /// Whether a step of `x` can take the grouped GEMM: bf16 activations and experts in the tensor-core layout
    /// without an act-order row order (the grouped kernels read x's rows as they are).
    pub(crate) fn takes_prefill(&self, x: &GpuTensor) -> bool {
        x.data.dtype() == ActDtype::Bf16 && self.packing == Packing::Mma && !self.reordered && x.cols == self.hidden
    }
}

impl CudaBackend {
    /// The grouped GEMM `gptq_mma_gemm_grouped_w{bits}_{variant}` and its launch over `n` outputs, `n_tiles` tiles
    /// of pairs and `mats` matrices side by side: BN columns and one tile a block, the m64 plan's shared memory.
    fn grouped_gemm(
        &self,
        bits: usize,
        variant: &str,
        n: usize,
        n_tiles: usize,
        mats: u32,
    ) -> MResult<(&CudaFunction, LaunchConfig)> {
        let f = self.f(&format!("gptq_mma_gemm_grouped_w{bits}_{variant}"))?;
        let smem = crate::gemm::mma_smem_bytes(bits, TILE);
        self.gpu.allow_smem(f, smem).map_err(m)?;
        let grid_dim = (n.div_ceil(BN) as u32, n_tiles as u32, mats);
        Ok((f, LaunchConfig { grid_dim, block_dim: (THREADS, 1, 1), shared_mem_bytes: smem as u32 }))
    }

    /// The routed experts of `x` (no shared expert in the tables) by the grouped GEMM; see the module doc. `r`:
    /// the routing read back, `weights`: its weights where they already are, on the device.
    pub(crate) fn grouped_prefill(
        &self,
        x: &GpuTensor,
        t: &Tables,
        r: &Routing,
        weights: &CudaSlice<f32>,
    ) -> MResult<GpuTensor> {
        if !t.takes_prefill(x) || t.shared || r.experts.len() != x.rows * r.top_k || weights.len() < r.experts.len() {
            return Err(shape("experts", format!("a grouped prefill of {} rows that does not fit", x.rows)));
        }
        let plan = PairsByExpert::new(r, t.entries, |e| t.held[e], TILE);
        let pairs = plan.pair_x.len();
        if pairs == 0 {
            return self.tensor_from_f32_sum(self.zeros(x.rows * x.cols)?, x.rows, x.cols, x.data.dtype());
        }
        let mut out = self.output(x.rows, x.cols)?;
        let (hidden, inter, n_tiles) = (t.hidden, t.inter, plan.tile_count());
        if pairs * inter.max(hidden) > i32::MAX as usize {
            return Err(shape("experts", format!("{pairs} pairs of {hidden} → {inter} are too many for one launch")));
        }
        // One upload: tiles | pair_x | pair_of.
        let mut all = plan.tiles.clone();
        all.extend(&plan.pair_x);
        all.extend(&plan.pair_of);
        let dev = self.upload_i32(&all)?;
        let tl = plan.tiles.len();
        let (tiles, pair_x, pair_of) =
            (dev.slice(0..tl), dev.slice(tl..tl + pairs), dev.slice(tl + pairs..tl + pairs + plan.pair_of.len()));
        let (e, gs) = (t.entries as i32, t.group_size as i32);
        let s = &self.gpu.stream;
        let span = |what: &'static str| self.gpu.span(move || format!("grouped prefill: {what} x{pairs}"));

        // gate and up of every pair, bf16 [pairs, inter] each, then h = SiLU(gate)·up.
        let (mut yg, mut yu) = (self.output(pairs, inter)?, self.output(pairs, inter)?);
        let p = span("gate/up");
        let (f, cfg) = self.grouped_gemm(t.bits, "gather_bf16", inter, n_tiles, 2)?;
        let (ni, ki) = (inter as i32, hidden as i32);
        let mut l = s.launch_builder(f);
        l.arg(&x.data).arg(&pair_x).arg(&tiles).arg(&t.gate_up[0]).arg(&t.gate_up[1]).arg(&t.gate_up[2]).arg(&e);
        l.arg(&mut yg.data).arg(&mut yu.data).arg(&ni).arg(&ki).arg(&gs);
        // SAFETY: matches gptq_mma_gemm_grouped_w*_gather_bf16: x bf16 [rows, hidden] (every pair_x < rows), the
        // gate/up tables 2·entries addresses of Mma-packed hidden → inter matrices, yg and yu [pairs, inter]; the
        // tiles cover pairs 0..pairs once; the shared memory is the kernel's m64 plan.
        unsafe { l.launch(cfg) }.map_err(md("grouped prefill gate/up"))?;
        drop(p);
        let h = self.silu_mul(&yg, &yu)?;
        drop((yg, yu));

        // down, f32 [pairs, hidden], h's row p for pair p.
        let p = span("down");
        // SAFETY: the down launch writes every row of every tile, i.e. all pairs · hidden values.
        let mut yd = unsafe { s.alloc::<f32>(pairs * hidden) }.map_err(md("alloc expert outputs"))?;
        let (f, cfg) = self.grouped_gemm(t.bits, "f32", hidden, n_tiles, 1)?;
        let (ni, ki, null) = (hidden as i32, inter as i32, 0u64);
        let mut l = s.launch_builder(f);
        l.arg(&h.data).arg(&null).arg(&tiles).arg(&t.down[0]).arg(&t.down[1]).arg(&t.down[2]).arg(&e);
        l.arg(&mut yd).arg(&null).arg(&ni).arg(&ki).arg(&gs);
        // SAFETY: matches gptq_mma_gemm_grouped_w*_f32 with no pair_x (h holds one row per pair), the down tables
        // `entries` addresses of inter → hidden matrices, y0 = yd [pairs, hidden] (y1, null, belongs to a second
        // matrix, and this grid has one).
        unsafe { l.launch(cfg) }.map_err(md("grouped prefill down"))?;
        drop(p);
        let _p = span("combine");

        // out[r] = Σ_j w[r, j] · yd[pair_of[r, j]] in slot order (one split).
        let sx = x.data.dtype().suffix();
        let (one, pi, hi, rows, k, no_shared) = (1i32, pairs as i32, hidden as i32, x.rows as i32, r.top_k as i32, 0);
        let mut l = s.launch_builder(self.f(&format!("gptq_reduce_combine_{sx}"))?);
        l.arg(&yd).arg(&one).arg(&pi).arg(&hi).arg(&pair_of).arg(weights).arg(&mut out.data).arg(&rows);
        l.arg(&k).arg(&no_shared);
        // SAFETY: matches gptq_reduce_combine_*: yd [1, pairs, hidden], pair_of rows·top_k entries (< pairs or
        // −1), weights rows·top_k, out rows·hidden.
        unsafe { l.launch(grid(x.rows * hidden, 256)) }.map_err(md("combine experts"))?;
        Ok(out)
    }

    /// One expert at a time (prefill, or experts that differ in format): gather its rows, run it, and add
    /// `w · y` into an f32 sum, cast to the activation dtype at the end. Every expert's rows and weights go to the
    /// device in one upload each (per expert they were three copies, ~400 a layer in a 512-row prefill chunk).
    pub(crate) fn one_by_one(
        &self,
        x: &GpuTensor,
        experts: &[Option<ExpertWeights<CudaBackend>>],
        r: &Routing,
    ) -> MResult<GpuTensor> {
        let mut sum = self.zeros(x.rows * x.cols)?;
        let sx = x.data.dtype().suffix();
        // The pairs of the experts this slice holds, by expert (one tile each): expert e's rows are pair_x[a..b].
        let plan = PairsByExpert::new(r, experts.len(), |e| experts[e].is_some(), usize::MAX);
        if let Some(&bad) = plan.pair_x.iter().find(|&&row| row as usize >= x.rows) {
            return Err(shape("experts", format!("routing row {bad} of {}", x.rows)));
        }
        let rows = &plan.pair_x;
        let mut ws = vec![0f32; rows.len()];
        for (&p, &w) in plan.pair_of.iter().zip(&r.weights) {
            if p >= 0 {
                ws[p as usize] = w;
            }
        }
        if rows.is_empty() {
            return self.tensor_from_f32_sum(sum, x.rows, x.cols, x.data.dtype());
        }
        let rows_d = self.upload_i32(rows)?;
        let ws_d = self.gpu.stream.clone_htod(&ws).map_err(md("upload"))?;
        for tile in plan.tiles.chunks_exact(3) {
            let (e, a) = (tile[0] as usize, tile[1] as usize);
            let (Some(ew), b) = (&experts[e], a + tile[2] as usize) else { continue };
            let (idx, w) = (rows_d.slice(a..b), ws_d.slice(a..b));
            let xin = self.copy(x, Some(&idx), b - a, 0, x.cols)?;
            let h = self.silu_mul(&self.linear(&xin, &ew.gate)?, &self.linear(&xin, &ew.up)?)?;
            let y = self.linear(&h, &ew.down)?;
            let (n, c) = ((b - a) as i32, x.cols as i32);
            let mut l = self.gpu.stream.launch_builder(self.f(&format!("scatter_add_scaled_{sx}"))?);
            l.arg(&mut sum).arg(&y.data).arg(&idx).arg(&w).arg(&n).arg(&c);
            // SAFETY: matches scatter_add_scaled_*; every index is a row of `sum` (checked above).
            unsafe { l.launch(grid((b - a) * x.cols, 256)) }.map_err(md("scatter_add"))?;
        }
        self.tensor_from_f32_sum(sum, x.rows, x.cols, x.data.dtype())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_sort_by_expert_and_tile_within_one() {
        // 4 rows, top-2 over 3 experts; expert 1 is not held.
        let r = Routing { top_k: 2, experts: vec![2, 0, 0, 1, 2, 0, 1, 2], weights: vec![1.0; 8] };
        let p = PairsByExpert::new(&r, 3, |e| e != 1, 2);
        // Expert 0: entries 1, 2, 5 (rows 0, 1, 2); expert 2: entries 0, 4, 7 (rows 0, 2, 3).
        assert_eq!(p.pair_x, vec![0, 1, 2, 0, 2, 3]);
        assert_eq!(p.pair_of, vec![3, 0, 1, -1, 4, 2, -1, 5]);
        assert_eq!(p.tiles, vec![0, 0, 2, 0, 2, 1, 2, 3, 2, 2, 5, 1]);
        assert_eq!(p.tile_count(), 4);
        // Every held entry's pair reads its own row back.
        for (i, &pp) in p.pair_of.iter().enumerate() {
            if pp >= 0 {
                assert_eq!(p.pair_x[pp as usize] as usize, i / 2);
            }
        }
    }

    #[test]
    fn an_unbounded_tile_is_one_per_expert() {
        let r = Routing { top_k: 2, experts: vec![2, 0, 0, 1, 2, 0, 1, 2], weights: vec![1.0; 8] };
        let p = PairsByExpert::new(&r, 3, |_| true, usize::MAX);
        assert_eq!(p.tiles, vec![0, 0, 3, 1, 3, 2, 2, 5, 3]);
        assert_eq!(p.pair_x, vec![0, 1, 2, 1, 3, 0, 2, 3]);
    }

    #[test]
    fn nothing_held_is_an_empty_plan() {
        let r = Routing { top_k: 1, experts: vec![0, 1], weights: vec![1.0; 2] };
        let p = PairsByExpert::new(&r, 2, |_| false, 64);
        assert!(p.tiles.is_empty() && p.pair_x.is_empty());
        assert_eq!(p.pair_of, vec![-1, -1]);
    }

    #[test]
    fn the_kernels_exist_for_every_width() {
        let src = include_str!("../kernels/gptq_gemm.cu");
        assert!(src.contains("gptq_mma_gemm_grouped_w##BITS##_##NAME("));
        assert!(src.contains("MMA_GROUPED_T(BITS, __nv_bfloat16, gather_bf16, true)"));
        assert!(src.contains("MMA_GROUPED_T(BITS, float, f32, false)"));
        assert!(
            src.contains(&format!("#define MG_THREADS {THREADS}\n")) && src.contains(&format!("#define MG_BN {BN}\n"))
        );
        assert!(src.contains(&format!("gptq_mma_gemm<BITS, {TILE}, MG_TW({TILE}), OUT, GATHER>")));
    }
}
