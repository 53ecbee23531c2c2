//! The routed experts of one MoE layer on the device (MODEL_SPEC §2.8) and their forward pass.
//!
//! Decode steps (≤ [`GROUPED_MAX_ROWS`] rows) run **grouped**: every (row, expert) pair of the step is sorted by expert and cut into
//! tiles of rows sharing an expert; one launch computes gate and up for every tile (each block finds its
//! expert's packed weights through device tables of addresses), SiLU·up is applied (by the tensor-core kernel's
//! last block of each column range, or a reduction), one launch computes down, and each row's experts are added
//! with their routing weights in slot order (deterministic; by the down launch's last blocks for a few rows with
//! the shared expert in the launch, else a reduction). One row with the shared expert in the launch takes both
//! launches as one (`moe_row`, gptq_mma.cu `gptq_mma_moe_row_*`): the down launch's blocks start as the gate/up
//! launch's last wave drains, each waiting for its tile's input.
//! Longer steps (prefill) loop over the selected experts with the backend's `linear`, which takes the GEMM path.

use std::sync::OnceLock;

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use pipemoe_model::backend::{Backend, ExpertWeights, Routing};

use crate::act::Act;
use crate::backend::{CudaBackend, GpuTensor, GpuWeight, GpuWeightKind, MResult, m, md, shape};
use crate::experts_launch::{Launch, launch_shape, loop_sums, max_tiles, moe_row_kernel, tile_rows};
use crate::gemv::{GpuGptq, Packing, THREADS, bucket};
use crate::launch::grid;
use crate::route::DeviceRouting;

/// Rows a step may have for the grouped path (one set of launches: tiles of ≤ 8 rows per expert, so an expert
/// chosen by several rows is read once per tile, not once per 16-row chunk); more (prefill) runs one GEMM per
/// expert. The plan kernel holds rows · (top_k + 1) ≤ 1024 entries.
pub const GROUPED_MAX_ROWS: usize = 64;
/// Rows up to which the tensor-core launches' last blocks apply SiLU·up and add the experts' outputs (`FUSE_*` in
/// gptq_mma.cu): at one row they save two launches (MoE block 91.7 -> 89.8 us on the H200); at 32 rows the
/// reductions' own wide grids were faster (688 vs 723 us).
const FUSED_ROWS: usize = 8;
/// The tensor-core grouped kernel's `fuse` argument.
const FUSE_NONE: i32 = 0;
const FUSE_SILU: i32 = 1;
const FUSE_COMBINE: i32 = 2;
const FUSE_COMBINE_ADD: i32 = 3;

/// The routing of a step, on the device (the router's kernel), read back only when a host needs it (prefill's
/// expert-by-expert path, tests).
pub struct GpuRoutes {
    pub dev: DeviceRouting,
    host: OnceLock<Routing>,
}

impl GpuRoutes {
    pub fn new(dev: DeviceRouting) -> GpuRoutes {
        GpuRoutes { dev, host: OnceLock::new() }
    }

    /// A routing chosen elsewhere (tests), uploaded.
    pub fn from_host(b: &CudaBackend, r: &Routing, n_experts: usize) -> MResult<GpuRoutes> {
        let s = &b.gpu.stream;
        let dev = DeviceRouting {
            rows: r.experts.len() / r.top_k.max(1),
            top_k: r.top_k,
            n_experts,
            experts: s.clone_htod(&r.experts).map_err(md("upload routing"))?,
            weights: s.clone_htod(&r.weights).map_err(md("upload routing"))?,
        };
        Ok(GpuRoutes { dev, host: OnceLock::from(r.clone()) })
    }

    pub fn host(&self) -> MResult<&Routing> {
        if self.host.get().is_none() {
            let _ = self.host.set(self.dev.to_host().map_err(m)?);
        }
        self.host.get().ok_or_else(|| shape("routing", "download".into()))
    }
}

/// The plan's buffers of a one-row MoE launch (its gate/up half writes them, as experts_plan would).
struct Plan<'a> {
    tiles: &'a mut CudaSlice<i32>,
    count: &'a mut CudaSlice<i32>,
    pair_ids: &'a CudaSlice<i32>,
    pair_of: &'a mut CudaSlice<i32>,
}

/// Where a down launch's combine writes: the residual it adds into, or a new output the caller gets back.
enum Target<'a> {
    Into(&'a mut GpuTensor),
    Out(GpuTensor),
}

impl Target<'_> {
    fn data(&mut self) -> &mut Act {
        match self {
            Target::Into(h) => &mut h.data,
            Target::Out(o) => &mut o.data,
        }
    }

    /// The new output, none where the residual took the rows' experts.
    fn out(self) -> Option<GpuTensor> {
        match self {
            Target::Into(_) => None,
            Target::Out(o) => Some(o),
        }
    }
}

pub struct GpuExperts {
    pub weights: Vec<Option<ExpertWeights<CudaBackend>>>,
    grouped: Option<Tables>,
    /// The tables with a shared expert appended, made on the first step that brings one (keyed by its gate's
    /// address, so another shared expert is never run through them); `None` when it cannot join the launch.
    with_shared: OnceLock<(u64, Option<Tables>)>,
}

/// Device address tables of the packed experts: `[mats · entries]` each of qweight, zeros, scales, row order,
/// where `entries` is the layer's expert count, plus one when the shared expert is appended (`shared`).
pub(crate) struct Tables {
    pub(crate) gate_up: [CudaSlice<u64>; 4],
    pub(crate) down: [CudaSlice<u64>; 4],
    pub(crate) group_size: usize,
    pub(crate) hidden: usize,
    pub(crate) inter: usize,
    pub(crate) entries: usize,
    pub(crate) shared: bool,
    /// Per entry, whether this slice holds that expert.
    pub(crate) held: Vec<bool>,
    pub(crate) bits: usize,
    pub(crate) packing: Packing,
    /// Whether any matrix has an act-order row order (`perm`).
    pub(crate) reordered: bool,
    /// Whether every held matrix is symmetric (null zeros: `GpuGptq::symmetric`).
    pub(crate) symmetric: bool,
}

fn gptq(w: &GpuWeight) -> Option<&GpuGptq> {
    match &w.kind {
        GpuWeightKind::Gptq(g) => Some(g),
        GpuWeightKind::Dense(_) => None,
    }
}

impl GpuExperts {
    pub fn new(b: &CudaBackend, weights: Vec<Option<ExpertWeights<CudaBackend>>>) -> MResult<GpuExperts> {
        let grouped = Tables::build(b, &weights, None)?;
        Ok(GpuExperts { weights, grouped, with_shared: OnceLock::new() })
    }

    /// The tables with `shared` appended, when it has the routed experts' format and shape.
    fn tables_with(&self, b: &CudaBackend, shared: &ExpertWeights<CudaBackend>) -> MResult<Option<&Tables>> {
        let key = gptq(&shared.gate).map_or(0, |g| g.addresses(&b.gpu)[0]);
        if self.with_shared.get().is_none() {
            let t = Tables::build(b, &self.weights, Some(shared))?;
            let _ = self.with_shared.set((key, t));
        }
        Ok(self.with_shared.get().and_then(|(k, t)| if *k == key { t.as_ref() } else { None }))
    }
}

impl Tables {
    /// The tables, when every held expert (and `shared`) is GPTQ with one bit width and group size (else the
    /// experts run one by one).
    fn build(
        b: &CudaBackend,
        experts: &[Option<ExpertWeights<CudaBackend>>],
        shared: Option<&ExpertWeights<CudaBackend>>,
    ) -> MResult<Option<Tables>> {
        let held: Vec<&ExpertWeights<CudaBackend>> = experts.iter().flatten().chain(shared).collect();
        let Some(first) = held.first() else { return Ok(None) };
        let Some(g0) = gptq(&first.gate) else { return Ok(None) };
        let same = |w: &GpuWeight, k: usize, n: usize| {
            gptq(w).is_some_and(|g| {
                g.bits == g0.bits
                    && g.group_size == g0.group_size
                    && g.packing == g0.packing
                    && g.in_features == k
                    && g.out_features == n
            })
        };
        let (hidden, inter) = (g0.in_features, g0.out_features);
        let uniform = held
            .iter()
            .all(|e| same(&e.gate, hidden, inter) && same(&e.up, hidden, inter) && same(&e.down, inter, hidden));
        // The down projection's groups must divide its K like gate/up's (group size ≤ inter, else "whole input").
        if !uniform || inter % 32 != 0 {
            return Ok(None);
        }
        let e = experts.len() + usize::from(shared.is_some());
        let mut gu = vec![[0u64; 4]; 2 * e];
        let mut dn = vec![[0u64; 4]; e];
        let mut held = vec![false; e];
        for (i, ew) in experts.iter().map(Option::as_ref).chain(shared.map(Some)).enumerate() {
            let Some(ew) = ew else { continue };
            let addr = |w: &GpuWeight| gptq(w).map(|g| g.addresses(&b.gpu)).unwrap_or_default();
            gu[i] = addr(&ew.gate);
            gu[e + i] = addr(&ew.up);
            dn[i] = addr(&ew.down);
            held[i] = true;
        }
        let reordered = gu.iter().chain(&dn).any(|a| a[3] != 0);
        // A held matrix has a qweight address; its zeros' is 0 when symmetric (`GpuGptq::addresses`).
        let symmetric = gu.iter().chain(&dn).filter(|a| a[0] != 0).all(|a| a[1] == 0);
        let column = |t: &[[u64; 4]], j: usize| -> MResult<CudaSlice<u64>> {
            let v: Vec<u64> = t.iter().map(|a| a[j]).collect();
            b.gpu.stream.clone_htod(&v).map_err(md("upload expert table"))
        };
        Ok(Some(Tables {
            gate_up: [column(&gu, 0)?, column(&gu, 1)?, column(&gu, 2)?, column(&gu, 3)?],
            down: [column(&dn, 0)?, column(&dn, 1)?, column(&dn, 2)?, column(&dn, 3)?],
            group_size: g0.group_size,
            hidden,
            inter,
            entries: e,
            shared: shared.is_some(),
            held,
            bits: g0.bits as usize,
            packing: g0.packing,
            reordered,
            symmetric,
        }))
    }
}

impl CudaBackend {
    /// The routed experts, plus `shared` (the layer's shared expert) when given: as one more expert of the
    /// grouped launches where it has the routed experts' format (one set of launches for the whole MoE block),
    /// else on its own and added. Profiled as each grouped launch ("grouped experts: …"), or as one op
    /// ("experts[+shared] x rows") on the other paths.
    pub(crate) fn run_experts(
        &self,
        x: &GpuTensor,
        experts: &GpuExperts,
        routes: &GpuRoutes,
        shared: Option<&ExpertWeights<CudaBackend>>,
    ) -> MResult<GpuTensor> {
        let y = self.run_experts_into(None, x, experts, routes, shared)?;
        y.ok_or_else(|| shape("experts", "the output went into no residual".into()))
    }

    /// [`CudaBackend::run_experts`], its output added into `into` (the residual stream, as `add_assign` adds) by
    /// the grouped down launch's combine where that launch combines the rows itself (≤ `FUSED_ROWS` rows of bf16
    /// with the shared expert): `None` then, else the output as `run_experts` gives it.
    pub(crate) fn run_experts_into(
        &self,
        into: Option<&mut GpuTensor>,
        x: &GpuTensor,
        experts: &GpuExperts,
        routes: &GpuRoutes,
        shared: Option<&ExpertWeights<CudaBackend>>,
    ) -> MResult<Option<GpuTensor>> {
        if routes.dev.rows != x.rows || routes.dev.n_experts != experts.weights.len() {
            return Err(shape(
                "experts",
                format!("a routing of {} rows over {} experts", routes.dev.rows, routes.dev.n_experts),
            ));
        }
        if x.rows == 0 {
            return self.tensor(0, x.cols).map(Some);
        }
        if let Some(sh) = shared {
            if x.rows <= GROUPED_MAX_ROWS
                && let Some(t) = experts.tables_with(self, sh)?
                && x.cols == t.hidden
            {
                return self.grouped(x, experts, t, &routes.dev, into);
            }
            let _p = self.gpu.span(|| format!("experts+shared x{}", x.rows));
            let mut y = self.run_experts(x, experts, routes, None)?;
            let h = self.silu_mul(&self.linear(x, &sh.gate)?, &self.linear(x, &sh.up)?)?;
            self.add_assign(&mut y, &self.linear(&h, &sh.down)?)?;
            return Ok(Some(y));
        }
        match &experts.grouped {
            Some(t) if x.rows <= GROUPED_MAX_ROWS && x.cols == t.hidden => {
                self.grouped(x, experts, t, &routes.dev, None)
            }
            Some(t) if t.takes_prefill(x) => {
                let _p = self.gpu.span(|| format!("experts (grouped GEMM) x{}", x.rows));
                self.grouped_prefill(x, t, routes.host()?, &routes.dev.weights).map(Some)
            }
            _ => {
                let _p = self.gpu.span(|| format!("experts x{}", x.rows));
                self.one_by_one(x, &experts.weights, routes.host()?).map(Some)
            }
        }
    }

    /// Partial sums of a grouped launch, not cleared ([`CudaBackend::grouped`] says why none is read unwritten).
    fn partial(&self, n: usize) -> MResult<CudaSlice<f32>> {
        // SAFETY: f32 has no invalid bit patterns; which values are written before they are read is argued in
        // `grouped`.
        unsafe { self.gpu.stream.alloc::<f32>(n.max(1)) }.map_err(md("alloc partial sums"))
    }

    fn grouped(
        &self,
        x: &GpuTensor,
        experts: &GpuExperts,
        t: &Tables,
        r: &DeviceRouting,
        into: Option<&mut GpuTensor>,
    ) -> MResult<Option<GpuTensor>> {
        let first = experts.weights.iter().flatten().next().ok_or_else(|| shape("experts", "no held expert".into()))?;
        let (gate0, down0) = match (gptq(&first.gate), gptq(&first.down)) {
            (Some(g), Some(d)) => (g, d),
            _ => return Err(shape("experts", "grouped experts must be GPTQ".into())),
        };
        let mb = bucket(x.rows).min(tile_rows(gate0.packing));
        let dtype = x.data.dtype();
        // No buffer below is cleared (a memset is a launch and ~2 µs each): the combine writes every value of
        // `out`, the SiLU reduction every value of `h`; the GEMVs write every (split, pair) of the pairs that are in
        // tiles, and only those are read downstream — the plan numbers only pairs of held experts, the down GEMV
        // reads h at its tiles' pairs, the combine skips entries whose pair is −1. What the reductions compute
        // for pair numbers past the plan's count (from uninitialised partial sums) is never read.
        let rows = x.rows;
        let span = |what: &'static str| self.gpu.span(move || format!("grouped experts: {what} x{rows}"));
        let p = span("plan");
        // The layout comes from the routing on the device: the grid has as many tiles as the plan can make
        // (`max_tiles`; never more than the pairs, the tiles buffer's room), and blocks past the real count return
        // at once. A shared expert is one more slot.
        let pairs = x.rows * (r.top_k + usize::from(t.shared));
        let n_tiles = max_tiles(x.rows, r.top_k, r.n_experts, t.shared, mb).min(pairs);
        let s = &self.gpu.stream;
        // SAFETY: experts_plan writes the count and every entry of pair_of; the launches below read tiles only
        // below the count and pair_x only at the pairs those tiles hold, all of which the plan writes.
        let alloc = |n: usize| unsafe { s.alloc::<i32>(n.max(1)) }.map_err(md("alloc plan"));
        let (mut tiles, mut count, mut pair_x, mut pair_of) =
            (alloc(3 * pairs)?, alloc(1)?, alloc(pairs)?, alloc(pairs)?);
        // The same 0..pairs every step of this size: uploaded once while recent.
        let identity = self.gpu.uploaded_i32(&(0..pairs as i32).collect::<Vec<_>>()).map_err(m)?;
        let (e, with_shared) = (t.entries as i32, i32::from(t.shared));
        let (entries, k, tr) = (pairs as i32, r.top_k as i32, mb as i32);
        // Steps of more than FUSED_ROWS rows run the plan and the SiLU reduction as launches of their own, which
        // then also write the sums of their outputs (x, h) that the warp-column kernels read with them.
        let mma = gate0.packing == Packing::Mma;
        let sums = mma
            && x.rows > FUSED_ROWS
            && dtype == crate::act::ActDtype::Bf16
            && t.hidden.is_multiple_of(crate::mma::CHUNK)
            && t.inter.is_multiple_of(crate::mma::CHUNK)
            && !self.gpu.is_apart(crate::gpu::Apart::LoopSums)
            && !loop_sums();
        let kind = (t.reordered, t.symmetric, sums);
        let gate_up = launch_shape(self, gate0, (rows, mb), n_tiles, 2, kind);
        let down_launch = launch_shape(self, down0, (rows, mb), n_tiles, 1, kind);
        let (name, gx, sh) = (&gate_up.name, gate_up.bx, gate_up.shape);
        // For a few rows the tensor-core kernel's last block of each tile's column range applies SiLU·up itself
        // (one counter per tile and column range); otherwise gptq_reduce_silu does. The last block of each of the
        // down launch's column ranges adds the rows' experts itself for a few rows (its one block then reads
        // rows·slots·splits partial sums per column); more rows take gptq_reduce_combine's wide grid. Only with
        // the shared expert in the launch: a tile always exists then, so every column range has a last block (a
        // step whose rows chose no expert this slice holds has no tile, and the combine writes zeros).
        let fuse_silu = mma && x.rows <= FUSED_ROWS && n_tiles * (gx / 2) <= self.gpu.counters.len();
        let fuse_combine = mma && t.shared && x.rows <= FUSED_ROWS && down_launch.bx <= self.gpu.counters.len();
        // One row with both reductions fused needs no plan: the gate/up launch takes the routing itself, a tile a
        // slot, and writes the plan's outputs for the down launch (gptq_mma.cu).
        let one_row = x.rows == 1 && fuse_silu && fuse_combine && !self.gpu.is_apart(crate::gpu::Apart::Plan);
        // And then as one launch where its kernel is compiled (gptq_mma_moe_row), its control words after the
        // counters of the two halves.
        let ctl_at = n_tiles * (gate_up.bx / 2) + down_launch.bx;
        let row_kernel = moe_row_kernel(&gate_up, &down_launch, gate0.bits, t.symmetric).filter(|_| {
            one_row
                && !t.reordered
                && dtype == crate::act::ActDtype::Bf16
                && ctl_at + 2 + n_tiles <= self.gpu.counters.len()
                && !self.gpu.is_apart(crate::gpu::Apart::MoeSplit)
        });
        // The sums of x (gate/up's) and of h (down's) over each row's chunks of 128: (low, high) f32 pairs.
        let chunk_sums = |on: bool, rows: usize, k: usize| -> MResult<Option<CudaSlice<f32>>> {
            // SAFETY: experts_plan (x) and gptq_reduce_silu (h) write every pair before the launches read them.
            Ok(if on {
                Some(unsafe { s.alloc::<f32>(2 * rows * k / crate::mma::CHUNK) }.map_err(md("alloc sums"))?)
            } else {
                None
            })
        };
        let mut x_sums = chunk_sums(gate_up.sums, x.rows, t.hidden)?;
        let mut h_sums = chunk_sums(down_launch.sums, pairs, t.inter)?; // more rows than fuse SiLU·up
        let null = 0u64;
        if !one_row {
            let mut l = s.launch_builder(self.f("experts_plan")?);
            l.arg(&r.experts).arg(&entries).arg(&k).arg(&with_shared).arg(&t.gate_up[0]).arg(&e).arg(&tr);
            l.arg(&mut tiles).arg(&mut count).arg(&mut pair_x).arg(&mut pair_of);
            let (warps, hidden_i) = (t.entries.div_ceil(32), t.hidden as i32);
            l.arg(&x.data).arg(&hidden_i);
            // The plan's block, then (with sums) blocks of as many warps for x's rows·chunks, a warp each.
            let blocks = match &mut x_sums {
                Some(xs) => {
                    l.arg(xs);
                    1 + (x.rows * t.hidden / crate::mma::CHUNK).div_ceil(warps)
                }
                None => {
                    l.arg(&null);
                    1
                }
            };
            let threads = (32 * warps) as u32;
            let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: matches experts_plan; the routing holds rows·top_k expert ids < E (the shared slot, when
            // appended, is entry E of tables of E + 1), the gate table `entries` addresses first; outputs sized
            // pairs·3, 1, pairs, pairs; x [rows, hidden] bf16 with hidden a multiple of 128 and its sums
            // rows·hidden/128 pairs (read only with sums).
            unsafe { l.launch(cfg) }.map_err(md("experts plan"))?;
        }
        let weights = &r.weights;
        let (hidden, inter) = (t.hidden, t.inter);
        let sx = dtype.suffix();

        drop(p);
        if let Some(kernel) = row_kernel {
            let plan =
                Plan { tiles: &mut tiles, count: &mut count, pair_ids: identity.as_ref(), pair_of: &mut pair_of };
            return self.moe_row(&kernel, x, t, r, into, (&gate_up, &down_launch), plan, ctl_at);
        }
        // gate and up of every tile, side by side: partial [splits, pairs, 2·inter].
        let p = span("gate/up");
        let splits = sh.splits;
        let mut partial = self.partial(splits * pairs * 2 * inter)?;
        let f = self.f(name)?;
        self.gpu.allow_smem(f, sh.smem as usize).map_err(m)?;
        let cfg = LaunchConfig {
            grid_dim: (gx as u32, splits as u32, n_tiles as u32),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: sh.smem,
        };
        let (np, two, ki, ni, gs, ci, st) =
            (pairs as i32, 2i32, hidden as i32, inter as i32, t.group_size as i32, sh.chunk as i32, sh.stages as i32);
        let [qw, zr, sc, pm] = &t.gate_up;
        // SAFETY: the SiLU reduction (fused or not) writes all pairs·inter values (see above).
        let mut h = unsafe { Act::uninit(&self.gpu, dtype, pairs * inter) }.map_err(m)?;
        let (rows_i, sf) = (x.rows as i32, if fuse_silu { FUSE_SILU } else { FUSE_NONE });
        let mut l = s.launch_builder(f);
        l.arg(&x.data).arg(&mut tiles).arg(&mut count).arg(&pair_x).arg(&np).arg(qw).arg(zr).arg(sc).arg(pm).arg(&e);
        l.arg(&two).arg(&mut partial).arg(&ki).arg(&ni).arg(&gs).arg(&ci);
        if mma {
            l.arg(&st).arg(&sf).arg(&self.gpu.counters).arg(&mut h).arg(&mut pair_of);
            l.arg(weights).arg(&rows_i).arg(&k).arg(&with_shared);
            if one_row {
                l.arg(&r.experts)
            } else {
                l.arg(&null)
            };
            match &x_sums {
                Some(xs) => l.arg(xs),
                None => l.arg(&null),
            };
        }
        // SAFETY: argument order and types match gptq_gemv_grouped_* / gptq_mma_gemv_grouped_*; tables hold 2·E
        // addresses, buffers sized above; the counters are zero between launches and cover n_tiles·bx. One row:
        // the routing holds top_k ids < E, and the launch writes tiles, count and pair_of (pairs entries each).
        unsafe { l.launch(cfg) }.map_err(md("grouped gate/up"))?;
        drop(p);
        if !fuse_silu {
            let _p = span("silu");
            let sp = splits as i32;
            let mut l = s.launch_builder(self.f(&format!("gptq_reduce_silu_{sx}"))?);
            l.arg(&partial).arg(&mut h);
            match &mut h_sums {
                Some(hs) => l.arg(hs),
                None => l.arg(&null),
            };
            l.arg(&sp).arg(&np).arg(&ni);
            // SAFETY: matches gptq_reduce_silu_*; h holds pairs·inter values; with sums (bf16 h, inter a multiple
            // of 128, blocks of 256 threads) pairs·inter/128 pairs.
            unsafe { l.launch(grid(pairs * inter, 256)) }.map_err(md("silu reduce"))?;
        }

        // down of every tile: partial [splits, pairs, hidden], then each row's weighted sum.
        let p = span("down");
        let (name, gx, sh) = (&down_launch.name, down_launch.bx, down_launch.shape);
        let splits = sh.splits;
        let f = self.f(name)?;
        self.gpu.allow_smem(f, sh.smem as usize).map_err(m)?;
        let mut partial = self.partial(splits * pairs * hidden)?;
        let cfg = LaunchConfig {
            grid_dim: (gx as u32, splits as u32, n_tiles as u32),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: sh.smem,
        };
        let (one, ki, ni, ci, st) = (1i32, inter as i32, hidden as i32, sh.chunk as i32, sh.stages as i32);
        let [qw, zr, sc, pm] = &t.down;
        let (cf, mut target) = self.combine_target(into, fuse_combine, x, hidden)?;
        let y = target.data();
        let mut l = s.launch_builder(f);
        l.arg(&h).arg(&tiles).arg(&count).arg(identity.as_ref()).arg(&np).arg(qw).arg(zr).arg(sc).arg(pm).arg(&e);
        l.arg(&one).arg(&mut partial).arg(&ki).arg(&ni).arg(&gs).arg(&ci);
        if mma {
            l.arg(&st).arg(&cf).arg(&self.gpu.counters).arg(y).arg(&mut pair_of);
            l.arg(weights).arg(&rows_i).arg(&k).arg(&with_shared).arg(&null);
            match &h_sums {
                Some(hs) => l.arg(hs),
                None => l.arg(&null),
            };
        }
        // SAFETY: as above, for the down tables (E addresses each); y (out, or the residual: checked above) holds
        // rows·hidden values, pair_of rows·(top_k + shared) entries and weights rows·top_k; the counters cover gx.
        unsafe { l.launch(cfg) }.map_err(md("grouped down"))?;
        drop(p);
        if let (false, Target::Out(out)) = (fuse_combine, &mut target) {
            let _p = span("combine");
            let sp = splits as i32;
            let mut l = s.launch_builder(self.f(&format!("gptq_reduce_combine_{sx}"))?);
            l.arg(&partial).arg(&sp).arg(&np).arg(&ni).arg(&pair_of).arg(weights).arg(&mut out.data).arg(&rows_i);
            l.arg(&k).arg(&with_shared);
            // SAFETY: matches gptq_reduce_combine_*; out holds rows·hidden values, pair_of rows·(top_k + shared)
            // entries and weights rows·top_k.
            unsafe { l.launch(grid(x.rows * hidden, 256)) }.map_err(md("combine experts"))?;
        }
        Ok(target.out())
    }

    /// Where the down launch's combine puts the rows' experts (`fuse_combine`: it runs): into the residual `into`
    /// (bf16, the rows' shape) where asked to, else a new output — which the combine writes whole, or the reduction.
    /// The `fuse` argument and the target.
    fn combine_target<'a>(
        &self,
        into: Option<&'a mut GpuTensor>,
        fuse_combine: bool,
        x: &GpuTensor,
        hidden: usize,
    ) -> MResult<(i32, Target<'a>)> {
        let into = into.filter(|h| {
            fuse_combine && (h.rows, h.cols) == (x.rows, hidden) && h.data.dtype() == crate::act::ActDtype::Bf16
        });
        let cf = match (fuse_combine, into.is_some()) {
            (true, true) => FUSE_COMBINE_ADD,
            (true, false) => FUSE_COMBINE,
            _ => FUSE_NONE,
        };
        let target = match into {
            Some(h) => Target::Into(h),
            None => Target::Out(self.output(x.rows, x.cols)?),
        };
        Ok((cf, target))
    }

    /// One row's MoE block as one launch (`gptq_mma_moe_row_*`, `kernel`): the gate/up launch's blocks then the
    /// down launch's, each half on its own launch's shape (`halves`), the SiLU·up and the combine fused as those
    /// launches fuse them, the combine's output added into `into` where given. The plan's outputs come from the
    /// gate/up half (`plan`: `pair_ids` the identity, the down half's x rows); the launch's own counters from
    /// `ctl_at` of `Gpu::counters` (zero between launches, as it leaves them).
    #[allow(clippy::too_many_arguments)]
    fn moe_row(
        &self,
        kernel: &str,
        x: &GpuTensor,
        t: &Tables,
        r: &DeviceRouting,
        into: Option<&mut GpuTensor>,
        (gate_up, down): (&Launch, &Launch),
        plan: Plan<'_>,
        ctl_at: usize,
    ) -> MResult<Option<GpuTensor>> {
        let _p = self.gpu.span(|| "grouped experts: gate/up+down x1".to_string());
        let (hidden, inter, s) = (t.hidden, t.inter, &self.gpu.stream);
        let pairs = r.top_k + usize::from(t.shared);
        let (gs, ds) = (gate_up.shape, down.shape);
        let mut gu_part = self.partial(gs.splits * pairs * 2 * inter)?;
        let mut d_part = self.partial(ds.splits * pairs * hidden)?;
        // SAFETY: the gate/up half's SiLU·up writes all pairs·inter values before a down block reads its pair's.
        let mut h = unsafe { Act::uninit(&self.gpu, crate::act::ActDtype::Bf16, pairs * inter) }.map_err(m)?;
        let (cf, mut target) = self.combine_target(into, true, x, hidden)?;
        let y = target.data();
        let f = self.f(kernel)?;
        let smem = gs.smem.max(ds.smem);
        self.gpu.allow_smem(f, smem as usize).map_err(m)?;
        let blocks = (gate_up.bx * gs.splits + down.bx * ds.splits) * pairs;
        let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: smem };
        let i = |v: usize| v as i32;
        let (np, e, ki, ni, g) = (i(pairs), i(t.entries), i(hidden), i(inter), i(t.group_size));
        let gh = [i(gate_up.bx), i(gs.splits), i(gs.chunk), i(gs.stages)];
        let dh = [i(down.bx), i(ds.splits), i(ds.chunk), i(ds.stages)];
        let (k, with_shared) = (i(r.top_k), i32::from(t.shared));
        let ctl = self.gpu.counters.slice(ctl_at..);
        let ([gw, gz, gsc, _], [dw, dz, dsc, _]) = (&t.gate_up, &t.down);
        let mut l = s.launch_builder(f);
        l.arg(&x.data).arg(plan.tiles).arg(plan.count).arg(plan.pair_ids).arg(&np).arg(gw).arg(gz).arg(gsc);
        l.arg(dw).arg(dz).arg(dsc).arg(&e).arg(&mut gu_part).arg(&mut d_part).arg(&ki).arg(&ni).arg(&g);
        for v in gh.iter().chain(&dh) {
            l.arg(v);
        }
        l.arg(&cf).arg(&self.gpu.counters).arg(&ctl).arg(&mut h).arg(y).arg(plan.pair_of).arg(&r.weights);
        l.arg(&k).arg(&with_shared).arg(&r.experts);
        // SAFETY: matches gptq_mma_moe_row_*; the tables hold 2·E (gate/up) and E (down) addresses of weights in
        // this kernel's format; partial sums, h and the plan sized above for `pairs` = top_k + 1 tiles; y (the
        // residual, checked by combine_target, or the new output) holds hidden values; the routing holds top_k ids
        // < E and as many weights; the counters cover ctl_at + 2 + pairs entries (checked by the caller), the
        // halves' below ctl_at.
        unsafe { l.launch(cfg) }.map_err(md("grouped experts, one launch"))?;
        Ok(target.out())
    }
}
