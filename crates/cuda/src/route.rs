//! The MoE router on the device (MODEL_SPEC §2.7; kernels/route.cu): from router logits, the experts and
//! weights `pipemoe_model::routing::route_logits` chooses, in the same order (its rounding exceptions are in
//! the kernel's header), and each expert's (row, slot) pairs laid out for a grouped experts launch.

use cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use pipemoe_model::backend::{RouterDims, Routing};

use crate::backend::{CudaBackend, GpuTensor, GpuWeight, GpuWeightKind, MResult, m, md};
use crate::error::{Error, Result, drv};
use crate::gemv::dense_grid;
use crate::gpu::Gpu;

/// The most experts one router block handles (a thread each; its first warp 8 a lane: kernels/route.cuh).
pub const MAX_EXPERTS: usize = 256;

/// The experts chosen for a step's rows, on the device.
pub struct DeviceRouting {
    pub rows: usize,
    pub top_k: usize,
    pub n_experts: usize,
    /// `[rows, top_k]`: each row's experts, best first (`route_logits`' order).
    pub experts: CudaSlice<u32>,
    /// `[rows, top_k]`: their unbiased sigmoid scores, normalized when `norm_topk_prob`, times `scaling`.
    pub weights: CudaSlice<f32>,
}

/// Each expert's share of a routing, laid out for one grouped launch. A pair is the flat index
/// `row · top_k + slot` into the routing's `experts`/`weights`.
pub struct ExpertPairs {
    pub n_experts: usize,
    /// `[n_experts]`: how many pairs chose each expert.
    pub counts: CudaSlice<u32>,
    /// `[n_experts + 1]`: where each expert's pairs start in `pairs`; the last is the number of pairs.
    pub offsets: CudaSlice<u32>,
    /// `[rows · top_k]`: expert by expert (ascending), each expert's pairs in row order.
    pub pairs: CudaSlice<u32>,
    /// `[n_experts]`: the experts with at least one pair, ascending; the first `n_active[0]` are set.
    pub active: CudaSlice<u32>,
    /// `[1]`.
    pub n_active: CudaSlice<u32>,
}

/// `ExpertPairs` read back (tests, diagnostics); `active` holds only the set entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPairs {
    pub counts: Vec<u32>,
    pub offsets: Vec<u32>,
    pub pairs: Vec<u32>,
    pub active: Vec<u32>,
}

fn shape(reason: String) -> Error {
    Error::Shape { what: "route", reason }
}

/// The router's shapes as the kernels need them: logits `[rows, n_experts]` of at least `logits` values.
pub(crate) fn check(logits: usize, rows: usize, bias: usize, d: &RouterDims) -> Result<()> {
    let e = d.n_experts;
    if e == 0 || e > MAX_EXPERTS {
        return Err(shape(format!("{e} experts (1..={MAX_EXPERTS} on the device)")));
    }
    if d.n_group == 0 || !e.is_multiple_of(d.n_group) || d.topk_group == 0 || d.topk_group > d.n_group {
        return Err(shape(format!("{e} experts in {} groups, {} kept", d.n_group, d.topk_group)));
    }
    if d.top_k == 0 || d.top_k > e {
        return Err(shape(format!("top_k {} of {e} experts", d.top_k)));
    }
    if logits < rows * e || bias != e {
        return Err(shape(format!("{logits} logits for [{rows}, {e}], {bias} biases")));
    }
    Ok(())
}

/// Routes `rows` rows of `logits` (`[rows, n_experts]` f32, `x · gateᵀ`) with the correction `bias`
/// (`[n_experts]`): one block per row on the GPU's stream.
pub fn route_on_device(
    gpu: &Gpu,
    logits: &CudaView<f32>,
    rows: usize,
    bias: &CudaSlice<f32>,
    dims: &RouterDims,
) -> Result<DeviceRouting> {
    check(logits.len(), rows, bias.len(), dims)?;
    let s = &gpu.stream;
    let (mut experts, mut weights) = routing_buffers(gpu, rows, dims.top_k)?;
    if rows > 0 {
        let ints = [dims.n_experts, dims.n_group, dims.topk_group, dims.top_k].map(|v| v as i32);
        let norm = i32::from(dims.norm_topk_prob);
        let mut l = s.launch_builder(gpu.function("route_f32")?);
        l.arg(logits).arg(bias).arg(&mut experts).arg(&mut weights);
        l.arg(&ints[0]).arg(&ints[1]).arg(&ints[2]).arg(&ints[3]).arg(&norm).arg(&dims.scaling);
        // A block a row, a thread an expert (route_row's scores).
        let threads = dims.n_experts.next_multiple_of(32) as u32;
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the buffers hold [rows, n_experts], [n_experts] and [rows, top_k] (checked and allocated
        // above); the kernel reads and writes nothing else.
        unsafe { l.launch(cfg) }.map_err(drv("launch route"))?;
    }
    Ok(DeviceRouting { rows, top_k: dims.top_k, n_experts: dims.n_experts, experts, weights })
}

/// A routing's `experts` and `weights`, `[rows, top_k]` each, for a kernel that writes them all.
pub(crate) fn routing_buffers(gpu: &Gpu, rows: usize, top_k: usize) -> Result<(CudaSlice<u32>, CudaSlice<f32>)> {
    let n = (rows * top_k).max(1);
    // SAFETY: route_f32 and router_route write every one of the rows·top_k entries (a block per row, its top_k
    // ranks are a permutation's first top_k); with no rows nothing is read (DeviceRouting truncates to rows·top_k).
    let experts = unsafe { gpu.stream.alloc::<u32>(n) }.map_err(drv("alloc routing"))?;
    let weights = unsafe { gpu.stream.alloc::<f32>(n) }.map_err(drv("alloc routing"))?;
    Ok((experts, weights))
}

/// `Backend::route`: the router's logits in f32 (HF applies the router in f32), then the choice on the device —
/// at one row both in one launch (`router_route`: its last block routes).
pub(crate) fn route(
    b: &CudaBackend,
    x: &GpuTensor,
    gate: &GpuWeight,
    bias: &CudaSlice<f32>,
    dims: &RouterDims,
) -> MResult<DeviceRouting> {
    let _p = b.gpu.span(|| "route".into());
    let GpuWeightKind::Dense(g) = &gate.kind else {
        return Err(crate::backend::shape("route", "the router is quantized".into()));
    };
    if x.cols != gate.in_features || gate.out_features != dims.n_experts {
        return Err(crate::backend::shape(
            "route",
            format!("[{}, {}] through a router of {} experts", x.rows, x.cols, dims.n_experts),
        ));
    }
    let (ri, ki, ni) = (x.rows as i32, x.cols as i32, dims.n_experts as i32);
    // SAFETY: the router GEMV below writes all rows·n_experts logits; at one row router_route's blocks also write
    // each expert's score and choice after them (the fused routers' scratch, 3·n_experts: kernels/route.cu).
    let len = (x.rows * dims.n_experts).max(3 * dims.n_experts).max(1);
    let mut logits = unsafe { b.gpu.stream.alloc::<f32>(len) }.map_err(md("alloc"))?;
    if x.rows == 1 {
        // A decode row: the GEMV and the choice in one launch (router_route: its last block routes).
        check(dims.n_experts, 1, bias.len(), dims).map_err(m)?;
        let (mut experts, mut weights) = routing_buffers(&b.gpu, 1, dims.top_k).map_err(m)?;
        let d = [dims.n_experts, dims.n_group, dims.topk_group, dims.top_k].map(|v| v as i32);
        let norm = i32::from(dims.norm_topk_prob);
        let mut l = b.gpu.stream.launch_builder(b.op("router_route", &x.data)?);
        l.arg(&x.data).arg(g).arg(&mut logits).arg(&ki).arg(bias).arg(&mut experts).arg(&mut weights);
        l.arg(&d[0]).arg(&d[1]).arg(&d[2]).arg(&d[3]).arg(&norm).arg(&dims.scaling).arg(&b.gpu.counters);
        // SAFETY: matches router_route_*: x [1, in], the gate [n_experts, in], the scratch 3·n_experts floats, the
        // routing [1, top_k] (shapes checked above, n_experts ≤ 256 = the block); the counter is 0 between
        // launches (its last block puts it back), and no other kernel runs beside it on this stream.
        unsafe { l.launch(dense_grid(dims.n_experts, 1)) }.map_err(md("router_route"))?;
        let (top_k, n_experts) = (dims.top_k, dims.n_experts);
        return Ok(DeviceRouting { rows: 1, top_k, n_experts, experts, weights });
    }
    let name = format!("{}_f32out", crate::gemv::dense_kernel(x.rows, x.cols));
    let mut l = b.gpu.stream.launch_builder(b.op(&name, &x.data)?);
    l.arg(&x.data).arg(g).arg(&mut logits).arg(&ri).arg(&ki).arg(&ni);
    // SAFETY: matches dense_gemv_f32out_*; logits hold rows·n_experts floats.
    unsafe { l.launch(dense_grid(dims.n_experts, x.rows)) }.map_err(md("router"))?;
    route_on_device(&b.gpu, &logits.as_view(), x.rows, bias, dims).map_err(m)
}

/// Widest row `add_norm_route` holds (8 values a thread, two pieces, 512 threads: kernels/route.cu).
const NORM_ROUTE_COLS: usize = 8 * 2 * 512;

/// `Backend::add_rms_norm_route` at one row: `x += y`, its RMSNorm by `norm` (weight, eps) and the router's choice
/// in one launch (`add_norm_route`: every block norms the row, its last routes), bit for bit what `add_rms_norm`
/// then `route` give. `None` where that kernel does not apply — more rows, a quantized router, a row wider than it
/// holds or not of whole 8-value pieces, or `Apart::NormRoute` — and the caller runs the two apart.
pub(crate) fn add_norm_route(
    b: &CudaBackend,
    x: &mut GpuTensor,
    y: &GpuTensor,
    (norm, eps): (&CudaSlice<f32>, f32),
    gate: &GpuWeight,
    bias: &CudaSlice<f32>,
    dims: &RouterDims,
) -> MResult<Option<(GpuTensor, DeviceRouting)>> {
    let GpuWeightKind::Dense(g) = &gate.kind else { return Ok(None) };
    let cols = x.cols;
    let fits = cols.is_multiple_of(8) && cols <= NORM_ROUTE_COLS && g.dtype() == x.data.dtype();
    if x.rows != 1 || !fits || b.gpu.is_apart(crate::gpu::Apart::NormRoute) {
        return Ok(None);
    }
    crate::backend::same_layout("add_rms_norm_route", x, y)?;
    if y.rows != 1 || norm.len() != cols || gate.in_features != cols || gate.out_features != dims.n_experts {
        return Err(crate::backend::shape(
            "add_rms_norm_route",
            format!(
                "[1, {cols}] += [{}, {}], a norm of {}, a router [{}, {}]",
                y.rows,
                y.cols,
                norm.len(),
                gate.out_features,
                gate.in_features
            ),
        ));
    }
    check(dims.n_experts, 1, bias.len(), dims).map_err(m)?;
    let _p = b.gpu.span(|| "add+rms_norm+route".into());
    let mut out = b.output(1, cols)?;
    // SAFETY: add_norm_route's blocks write every expert's logit, score and choice (3·n_experts floats: its
    // scratch, kernels/route.cu) before its last block reads them.
    let mut logits = unsafe { b.gpu.stream.alloc::<f32>(3 * dims.n_experts) }.map_err(md("alloc"))?;
    let (mut experts, mut weights) = routing_buffers(&b.gpu, 1, dims.top_k).map_err(m)?;
    let d = [cols, dims.n_experts, dims.n_group, dims.topk_group, dims.top_k].map(|v| v as i32);
    let norm_topk = i32::from(dims.norm_topk_prob);
    let mut l = b.gpu.stream.launch_builder(b.op("add_norm_route", &x.data)?);
    l.arg(&mut x.data).arg(&y.data).arg(norm).arg(&eps).arg(&mut out.data).arg(g).arg(&mut logits).arg(&d[0]);
    l.arg(bias).arg(&mut experts).arg(&mut weights).arg(&d[1]).arg(&d[2]).arg(&d[3]).arg(&d[4]).arg(&norm_topk);
    l.arg(&dims.scaling).arg(&b.gpu.counters);
    let cfg = LaunchConfig { grid_dim: (dims.n_experts as u32, 1, 1), block_dim: (512, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: matches add_norm_route_*: x, y and out [1, cols] of one dtype, whole allocations (16-byte aligned),
    // cols a multiple of 8 and at most NORM_ROUTE_COLS; the norm cols floats, the gate [n_experts, cols] in that
    // dtype, the scratch 3·n_experts floats, the routing [1, top_k] (n_experts ≤ 256 < the block: `check`); the
    // counter is 0 between launches (the last block puts it back), and no other kernel runs beside it on this
    // stream.
    unsafe { l.launch(cfg) }.map_err(md("add_norm_route"))?;
    let (top_k, n_experts) = (dims.top_k, dims.n_experts);
    Ok(Some((out, DeviceRouting { rows: 1, top_k, n_experts, experts, weights })))
}

impl DeviceRouting {
    /// The routing as the host's `route_logits` returns it (waits for the stream).
    pub fn to_host(&self) -> Result<Routing> {
        let n = self.rows * self.top_k;
        let mut experts = self.experts.stream().clone_dtoh(&self.experts).map_err(drv("download routing"))?;
        let mut weights = self.weights.stream().clone_dtoh(&self.weights).map_err(drv("download routing"))?;
        experts.truncate(n);
        weights.truncate(n);
        Ok(Routing { top_k: self.top_k, experts, weights })
    }

    /// Each expert's pairs of this routing.
    pub fn pairs(&self, gpu: &Gpu) -> Result<ExpertPairs> {
        expert_pairs(gpu, &self.experts.as_view(), self.rows * self.top_k, self.n_experts)
    }
}

/// Groups the first `entries` expert ids of `experts` (`[rows · top_k]`, each < n_experts) by expert: two
/// launches of one block per expert, no atomics, so the layout never varies between runs.
pub fn expert_pairs(gpu: &Gpu, experts: &CudaView<u32>, entries: usize, n_experts: usize) -> Result<ExpertPairs> {
    if n_experts == 0 || experts.len() < entries || entries > i32::MAX as usize {
        return Err(shape(format!("{entries} entries of {} for {n_experts} experts", experts.len())));
    }
    let s = &gpu.stream;
    let alloc = |n: usize| s.alloc_zeros::<u32>(n.max(1)).map_err(drv("alloc pairs"));
    let mut p = ExpertPairs {
        n_experts,
        counts: alloc(n_experts)?,
        offsets: alloc(n_experts + 1)?,
        pairs: alloc(entries)?,
        active: alloc(n_experts)?,
        n_active: alloc(1)?,
    };
    let (n, e) = (entries as i32, n_experts as i32);
    let cfg = LaunchConfig { grid_dim: (n_experts as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut l = s.launch_builder(gpu.function("route_count_u32")?);
    l.arg(experts).arg(&n).arg(&mut p.counts);
    // SAFETY: experts holds ≥ entries values (checked); counts holds n_experts, one per block.
    unsafe { l.launch(cfg) }.map_err(drv("launch route_count"))?;
    let mut l = s.launch_builder(gpu.function("route_place_u32")?);
    l.arg(experts).arg(&n).arg(&p.counts).arg(&e);
    l.arg(&mut p.offsets).arg(&mut p.active).arg(&mut p.n_active).arg(&mut p.pairs);
    // SAFETY: as above; offsets holds n_experts + 1, active n_experts, pairs ≥ entries (the counts of ids below
    // n_experts sum to at most entries).
    unsafe { l.launch(cfg) }.map_err(drv("launch route_place"))?;
    Ok(p)
}

impl ExpertPairs {
    /// Waits for the stream and reads everything back.
    pub fn to_host(&self) -> Result<HostPairs> {
        let get = |v: &CudaSlice<u32>| v.stream().clone_dtoh(v).map_err(drv("download pairs"));
        let offsets = get(&self.offsets)?;
        let n_active = get(&self.n_active)?[0] as usize;
        let mut active = get(&self.active)?;
        active.truncate(n_active);
        let mut pairs = get(&self.pairs)?;
        pairs.truncate(offsets[self.n_experts] as usize);
        Ok(HostPairs { counts: get(&self.counts)?, offsets, pairs, active })
    }
}
