//! A stage's step on one GPU: every layer's cache slots reserved first, the step's inputs on the device once for
//! every layer, and decode steps recorded as CUDA graphs and replayed.
//!
//! The inputs a step's kernels read — the rows' positions, their cache slots, the attention tables — are one
//! buffer (`GpuLayerCache::step_inputs`) whose layout depends only on the row count and the tables' capacity.
//! Everything else a decode step launches depends on shapes alone, except the flash kernel's key shares (from the
//! longest row, up to `max_splits()` shares of `min_split_keys` keys) and the cache pools' addresses. Those make a
//! step's [`GraphKey`]. A key seen twice in a row is recorded: its inputs and the residual stream get buffers of
//! their own, the stream is captured while the layers run once, and the graph is launched. A later step with the
//! key copies its inputs and residual stream into those buffers, launches the graph and copies the stream back:
//! three copies and one launch instead of ~25 launches a layer, and no gaps between kernels on the device.
//!
//! The V3.2 indexer reads the same tables (its scores' row stride is the tables' capacity in positions, so it does
//! not change every step) and attention over its selection counts at most the selection's keys a row; which
//! layers select is the stage's `variant`, part of the key.
//!
//! Anything a capture cannot hold (an upload from host memory, a synchronization) fails the capture, not the step:
//! the key is refused and the step runs as launches. Steps of more than [`GRAPH_ROWS`] rows, or profiled, always
//! run as launches.

use std::any::Any;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, CudaSlice, CudaView};
use pipemoe_model::backend::{LayersBody, Row};

use crate::act::{Act, ActDtype};
use crate::attention::{max_splits, min_split_keys};
use crate::backend::{CudaBackend, GpuTensor, MResult, m, md, shape};
use crate::cache::GpuLayerCache;

/// Rows of a step recorded at most (decode batches; prefill chunks run as launches).
pub const GRAPH_ROWS: usize = 64;
/// Recorded steps kept (the least recently replayed goes first).
const GRAPHS: usize = 8;
/// Refused keys remembered before the list starts over.
const REFUSED: usize = 64;

/// What a recorded step's launches depend on besides its inputs' values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GraphKey {
    rows: usize,
    cols: usize,
    dtype: ActDtype,
    /// The inputs' length (from the rows, their sequences and the table entries per sequence).
    inputs: usize,
    /// The flash kernel's key shares as the longest row asks for them.
    shares: usize,
    /// Each layer's cache pool.
    pools: Vec<u64>,
    /// The stage's path through its layers (`Backend::run_layers`).
    variant: u64,
    /// The `Apart` switches on while it was recorded (`Gpu::set_apart`).
    apart: u32,
}

/// The step's inputs on the device (`[positions | slots | meta | tables]`, `GpuLayerCache::step_inputs`).
pub struct StepInputs {
    rows: Vec<Row>,
    slots: Vec<i32>,
    buf: Arc<CudaSlice<i32>>,
    /// Table entries per sequence.
    pub cap: usize,
}

impl StepInputs {
    /// `meta` and the tables it points into.
    pub fn tables(&self) -> (CudaView<'_, i32>, CudaView<'_, i32>) {
        let n = self.rows.len();
        (self.buf.slice(2 * n..6 * n), self.buf.slice(6 * n..))
    }
}

/// Small integer inputs of one launch: part of the step's inputs, or uploaded for the call.
pub enum Ints {
    Step(Arc<StepInputs>, Range<usize>),
    Own(Arc<CudaSlice<i32>>),
}

impl Ints {
    pub fn view(&self) -> CudaView<'_, i32> {
        match self {
            Ints::Step(s, r) => s.buf.slice(r.clone()),
            Ints::Own(v) => v.slice(..),
        }
    }
}

/// The rows' positions (RoPE): the step's, or uploaded while recent.
pub fn positions(b: &CudaBackend, rows: &[Row]) -> MResult<Ints> {
    if let Some(s) = b.gpu.steps.inputs_for(rows) {
        return Ok(Ints::Step(s, 0..rows.len()));
    }
    let pos: Vec<i32> = rows.iter().map(|r| r.pos as i32).collect();
    Ok(Ints::Own(b.gpu.uploaded_i32(&pos).map_err(m)?))
}

/// The rows' cache slots: the step's when they are these, or uploaded while recent.
pub fn slots(b: &CudaBackend, rows: &[Row], slots: &[i32]) -> MResult<Ints> {
    if let Some(s) = b.gpu.steps.inputs_for(rows).filter(|s| s.slots == slots) {
        return Ok(Ints::Step(s, rows.len()..2 * rows.len()));
    }
    Ok(Ints::Own(b.gpu.uploaded_i32(slots).map_err(m)?))
}

/// A recorded step: its graph and the buffers it reads and updates.
struct Recorded {
    key: GraphKey,
    graph: CudaGraph,
    inputs: Arc<CudaSlice<i32>>,
    hidden: GpuTensor,
    /// Uploads the graph reads that the backend keeps only while recent (`Gpu::uploaded_*`).
    _keep: Vec<Arc<dyn Any + Send + Sync>>,
}

// SAFETY: a CUDA graph may be launched and destroyed from any thread as long as calls on it are serialized; a
// `Recorded` is only reached through `Steps::graphs`' lock.
unsafe impl Send for Recorded {}

#[derive(Default)]
struct Graphs {
    recorded: Vec<Recorded>,
    /// The last step's key run as launches (a key seen twice in a row is recorded).
    last: Option<GraphKey>,
    refused: Vec<GraphKey>,
}

/// A GPU's step state (`Gpu::steps`).
pub struct Steps {
    /// Whether decode steps are recorded and replayed.
    enabled: AtomicBool,
    current: Mutex<Option<Arc<StepInputs>>>,
    graphs: Mutex<Graphs>,
    capturing: AtomicBool,
    keep: Mutex<Vec<Arc<dyn Any + Send + Sync>>>,
    /// Steps run by launching a recorded graph, since this GPU was opened.
    replayed: AtomicUsize,
}

impl Default for Steps {
    /// Graphs on unless `PIPEMOE_CUDA_GRAPHS` is `0`, `off` or `false`.
    fn default() -> Self {
        let off = matches!(std::env::var("PIPEMOE_CUDA_GRAPHS").as_deref(), Ok("0" | "off" | "false"));
        Steps {
            enabled: AtomicBool::new(!off),
            current: Default::default(),
            graphs: Default::default(),
            capturing: Default::default(),
            keep: Default::default(),
            replayed: Default::default(),
        }
    }
}

impl Steps {
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// The running step's inputs when `rows` are its rows.
    pub fn inputs_for(&self, rows: &[Row]) -> Option<Arc<StepInputs>> {
        let cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        cur.as_ref().filter(|s| s.rows == rows).cloned()
    }

    /// Keeps `v` alive as long as the graph being recorded, if one is.
    pub fn keep_if_capturing(&self, v: Arc<dyn Any + Send + Sync>) {
        if self.capturing.load(Ordering::Relaxed) {
            self.keep.lock().unwrap_or_else(|e| e.into_inner()).push(v);
        }
    }

    fn set(&self, s: Option<Arc<StepInputs>>) {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = s;
    }

    /// How many steps are recorded now (tests, diagnostics).
    pub fn recorded(&self) -> usize {
        self.graphs.lock().unwrap_or_else(|e| e.into_inner()).recorded.len()
    }

    /// Steps run by launching a recorded graph so far (tests, diagnostics).
    pub fn replayed(&self) -> usize {
        self.replayed.load(Ordering::Relaxed)
    }
}

/// `Backend::run_layers` on the GPU (the module's text says how).
pub fn run_layers(
    b: &CudaBackend,
    caches: &mut [GpuLayerCache],
    rows: &[Row],
    variant: u64,
    mut h: GpuTensor,
    body: &mut LayersBody<'_, CudaBackend>,
) -> MResult<GpuTensor> {
    if rows.is_empty() || caches.is_empty() {
        body(&mut h, caches)?;
        return Ok(h);
    }
    let slots = caches[0].reserve_ahead(&b.gpu, rows)?;
    let mut alike = true;
    for c in &mut caches[1..] {
        alike &= c.reserve_ahead(&b.gpu, rows)? == slots;
    }
    // The layers' caches place positions alike (same budget, same history): one buffer serves them all. If they
    // ever differ, each layer uploads its own as it runs.
    if !alike || !caches[1..].iter().all(|c| c.same_tables(&caches[0], rows)) {
        body(&mut h, caches)?;
        return Ok(h);
    }
    let cap = caches[0].table_cap(rows);
    let packed = caches[0].step_inputs(rows, &slots, cap)?;
    let max_keys = rows.iter().map(|r| r.pos + 1).max().unwrap_or(1);
    let key = GraphKey {
        rows: rows.len(),
        cols: h.cols,
        dtype: h.data.dtype(),
        inputs: packed.len(),
        shares: max_keys.div_ceil(min_split_keys()).min(max_splits()),
        pools: caches.iter().map(|c| c.pool().map_or(0, |p| p.id)).collect(),
        variant,
        apart: b.gpu.apart(),
    };
    let step = |buf: Arc<CudaSlice<i32>>| Arc::new(StepInputs { rows: rows.to_vec(), slots: slots.clone(), buf, cap });
    let steps = &b.gpu.steps;
    if steps.enabled() && rows.len() <= GRAPH_ROWS && !b.gpu.profiling() {
        let mut g = steps.graphs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = g.recorded.iter().position(|r| r.key == key) {
            let mut r = g.recorded.remove(i);
            let ran = replay(b, &mut r, &packed, &mut h);
            g.recorded.push(r);
            ran?;
            return Ok(h);
        }
        let record_now = g.last.as_ref() == Some(&key) && !g.refused.contains(&key);
        g.last = Some(key.clone());
        drop(g);
        if record_now {
            // A recording whose first launch fails (its graph memory did not fit, say) ran nothing: the step runs
            // as launches, as does every later step of its key.
            let recorded = record(b, key.clone(), &packed, &step, &h, caches, body)
                .and_then(|mut r| replay_recorded(b, &mut r, &mut h).map(|()| r));
            match recorded {
                Ok(r) => {
                    let mut g = steps.graphs.lock().unwrap_or_else(|e| e.into_inner());
                    if g.recorded.len() >= GRAPHS {
                        // A launch of the oldest may still be queued: it finishes before its graph goes.
                        b.gpu.stream.synchronize().map_err(md("synchronize"))?;
                        g.recorded.remove(0);
                    }
                    g.recorded.push(r);
                    return Ok(h);
                }
                Err(e) => {
                    tracing::warn!("a decode step of {} rows could not be recorded as a CUDA graph: {e}", rows.len());
                    let mut g = steps.graphs.lock().unwrap_or_else(|e| e.into_inner());
                    if g.refused.len() >= REFUSED {
                        g.refused.clear();
                    }
                    g.refused.push(key);
                }
            }
        }
    }
    let buf = Arc::new(b.gpu.stream.clone_htod(&packed).map_err(md("upload step inputs"))?);
    steps.set(Some(step(buf)));
    let ran = body(&mut h, caches);
    steps.set(None);
    ran?;
    Ok(h)
}

/// Captures the body into a graph over buffers of the step's own; nothing runs yet.
fn record(
    b: &CudaBackend,
    key: GraphKey,
    packed: &[i32],
    step: &dyn Fn(Arc<CudaSlice<i32>>) -> Arc<StepInputs>,
    h: &GpuTensor,
    caches: &mut [GpuLayerCache],
    body: &mut LayersBody<'_, CudaBackend>,
) -> MResult<Recorded> {
    let (gpu, s) = (&b.gpu, &b.gpu.stream);
    let inputs = Arc::new(s.clone_htod(packed).map_err(md("upload step inputs"))?);
    let mut hidden =
        GpuTensor { rows: h.rows, cols: h.cols, data: Act::zeros(gpu, h.data.dtype(), h.data.len()).map_err(m)? };
    hidden.data.copy_from(gpu, &h.data).map_err(m)?;
    gpu.steps.set(Some(step(inputs.clone())));
    gpu.steps.capturing.store(true, Ordering::Relaxed);
    let began = s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).map_err(md("begin capture"));
    let ran = began.and_then(|()| body(&mut hidden, caches));
    // Ends the capture whatever happened in it (the stream leaves capture mode either way).
    let graph = s.end_capture(CUgraphInstantiate_flags(0));
    gpu.steps.capturing.store(false, Ordering::Relaxed);
    gpu.steps.set(None);
    let keep = std::mem::take(&mut *gpu.steps.keep.lock().unwrap_or_else(|e| e.into_inner()));
    if ran.is_err() || graph.is_err() {
        // Drops inside a failed capture record their errors on the context; they belong to the capture.
        let _ = gpu.ctx.check_err();
    }
    ran?;
    let graph = graph.map_err(md("end capture"))?.ok_or_else(|| shape("step graph", "the capture is empty".into()))?;
    Ok(Recorded { key, graph, inputs, hidden, _keep: keep })
}

/// Replays a recorded step with this step's inputs and residual stream.
fn replay(b: &CudaBackend, r: &mut Recorded, packed: &[i32], h: &mut GpuTensor) -> MResult<()> {
    let inputs = Arc::get_mut(&mut r.inputs).ok_or_else(|| shape("step graph", "its inputs are shared".into()))?;
    if inputs.len() != packed.len() || (h.rows, h.cols) != (r.hidden.rows, r.hidden.cols) {
        return Err(shape("step graph", "a step's inputs differ in size from the recorded step's".into()));
    }
    b.gpu.stream.memcpy_htod(packed, inputs).map_err(md("upload step inputs"))?;
    r.hidden.data.copy_from(&b.gpu, &h.data).map_err(m)?;
    replay_recorded(b, r, h)
}

/// Launches the graph over its own buffers and copies the residual stream out.
fn replay_recorded(b: &CudaBackend, r: &mut Recorded, h: &mut GpuTensor) -> MResult<()> {
    r.graph.launch().map_err(md("launch step graph"))?;
    b.gpu.steps.replayed.fetch_add(1, Ordering::Relaxed);
    h.data.copy_from(&b.gpu, &r.hidden.data).map_err(m)
}
