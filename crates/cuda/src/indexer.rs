//! The V3.2 indexer's choice on the device (MODEL_SPEC §2.6): `I(t) = Σ_h w_h · relu(q_h·k_t)` over each row's
//! causal keys (kernels/indexer.cu), then a radix-select top-k per row (kernels/topk.cu) that picks exactly the set of
//! `pipemoe_model::cpu::kernels::top_k` (ties to the lower index). The selection stays on the device for
//! attention ([`GpuSelection`]); `to_host` is for tests and diagnostics.

use cudarc::driver::{CudaSlice, CudaStream, CudaView, LaunchConfig, PushKernelArg};
use pipemoe_model::backend::{HostSelection, IndexerDims, Row};

use crate::act::ActDtype;
use crate::attention::{MAX_GRID_Y, Tables, scratch, smem_cfg, upload_tables};
use crate::backend::{CudaBackend, GpuTensor, MResult, m, md, shape};
use crate::cache::{BLOCK, GpuLayerCache, KvDtype, Pool, StepTables};
use crate::gpu::Branch;
use crate::launch::ArgOrNull;

/// Keys per block of `indexer_scores` (`IDX_KEYS`), and threads of the top-k kernel.
const KEYS_PER_BLOCK: usize = 64;
const TOPK_THREADS: u32 = 512;
/// Warps of `indexer_scores_mma_bf16` (`IDXM_WARPS`, 16 keys each) and its most m16 tiles of heads (`IDXM_MT`).
const MMA_WARPS: u32 = 4;
const MMA_HEAD_TILES: usize = 4;
/// Tiles of keys `indexer_scores_mma_bf16` holds at once (`IDXM_STAGES`), the blocks an SM its grid aims at (~70 KB
/// of shared memory each at 64 heads of 128: three fit an H200's SM, one a 3090's), and the most tiles one block
/// takes of a row ([`mma_tiles`]; `IDXM_TILES`, the table entries it reads at its start).
const MMA_STAGES: usize = 3;
const MMA_BLOCKS_PER_SM: usize = 3;
const MMA_MAX_TILES: usize = 16;
/// Bound on the f32 scores of one launch (rows × widest row): 128 MiB.
const SCORE_FLOATS: usize = 32 << 20;
/// Keys of one top-k block (`TOPK_SEG`): a row of one tile, a segment of a long row, and the most candidates a
/// long row's gather may leave; bins of a segment's histogram (`TOPK_BINS`).
const TOPK_SEG: usize = 8192;
const TOPK_BINS: usize = 2048;

/// Per row of a step, the key positions attention uses, on the device: row `r` holds `counts[r]` ascending
/// positions at `keys[r·stride..]`.
pub struct GpuSelection {
    keys: CudaSlice<i32>,
    counts: Vec<usize>,
    stride: usize,
    /// What its launches read, kept while it lives: a selection made on a `Branch` may still be running when
    /// [`select`] returns, and the pool must not hand these buffers out again before the branch's join.
    _inputs: Option<(Tables, Vec<Part>)>,
}

impl GpuSelection {
    pub fn rows(&self) -> usize {
        self.counts.len()
    }

    pub fn stride(&self) -> usize {
        self.stride
    }

    pub fn counts(&self) -> &[usize] {
        &self.counts
    }

    pub(crate) fn keys(&self) -> &CudaSlice<i32> {
        &self.keys
    }

    /// Host lists of positions, as given (tests, or a choice made elsewhere). Positions past a row's own are
    /// skipped by attention.
    pub fn from_host(b: &CudaBackend, sel: &[Vec<u32>]) -> MResult<Self> {
        let stride = sel.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut flat = vec![0i32; sel.len() * stride];
        for (r, keys) in sel.iter().enumerate() {
            for (i, &k) in keys.iter().enumerate() {
                flat[r * stride + i] = i32::try_from(k).map_err(|_| shape("selection", format!("position {k}")))?;
            }
        }
        Ok(Self { keys: b.upload_i32(&flat)?, counts: sel.iter().map(Vec::len).collect(), stride, _inputs: None })
    }

    pub fn to_host(&self, b: &CudaBackend) -> MResult<HostSelection> {
        let flat = b.gpu.stream.clone_dtoh(&self.keys).map_err(md("download selection"))?;
        Ok(self
            .counts
            .iter()
            .enumerate()
            .map(|(r, &n)| flat[r * self.stride..r * self.stride + n].iter().map(|&k| k as u32).collect())
            .collect())
    }
}

/// `Backend::indexer_select`, its launches on `branch`'s side stream when given: every buffer is allocated on the
/// main stream first, then the branch forks, and the selection keeps what its launches read. The caller joins the
/// branch before anything reads the selection, and drops the selection (and `q`, `w`) only after that.
pub fn indexer_select(
    b: &CudaBackend,
    cache: &GpuLayerCache,
    q: &GpuTensor,
    w: &GpuTensor,
    d: &IndexerDims,
    rows: &[Row],
    branch: Option<&Branch<'_>>,
) -> MResult<GpuSelection> {
    let prepared = prepare(b, cache, q, w, d, rows)?;
    let s = match branch {
        Some(br) => br.fork().map_err(m)?,
        None => &b.gpu.stream,
    };
    prepared.launch(b, s)
}

/// A selection's buffers and tables, made on the main stream ([`prepare`]), whose launches go on any stream after
/// (the caller's: q and w must be written before them on it).
pub(crate) struct Prepared<'a> {
    cache: &'a GpuLayerCache,
    q: &'a GpuTensor,
    w: &'a GpuTensor,
    d: &'a IndexerDims,
    keys: CudaSlice<i32>,
    counts: Vec<usize>,
    stride: usize,
    /// The tables and the cache's pool (none for no rows).
    inputs: Option<(Tables, &'a Pool)>,
    parts: Vec<Part>,
}

/// Rows `r0..r0 + rows` of a step, whose scores `[rows, width]` fit one buffer, and their long-row scratch.
pub(crate) struct Part {
    r0: usize,
    rows: usize,
    width: usize,
    scores: CudaSlice<f32>,
    long: Option<Long>,
}

/// The multi-block top-k's buffers (kernels/topk.cu, `indexer_topk_hist_f32`): taken where a launch's rows may be
/// longer than one block's TOPK_SEG keys and its segments make about a wave of blocks (decode at long context: one
/// block a row would read each row four times on one SM while the others idle). Prefill's many rows keep one block
/// a row, which already fills the device. `PIPEMOE_TOPK_LONG=0` keeps one block a row everywhere (the A/B's knob).
pub(crate) struct Long {
    segs: usize,
    /// [rows, segs, TOPK_BINS] counts of the two levels, [rows, TOPK_SEG] candidates and their positions, [rows, 4]
    /// the levels' choices and counts.
    hist: CudaSlice<i32>,
    hist2: CudaSlice<i32>,
    cand: CudaSlice<f32>,
    pos: CudaSlice<i32>,
    info: CudaSlice<i32>,
}

impl Long {
    /// The buffers for `rows` rows of `width`, if the launch takes the multi-block path.
    fn new(b: &CudaBackend, rows: usize, width: usize) -> MResult<Option<Self>> {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let on = *ON.get_or_init(|| crate::mma::knob("PIPEMOE_TOPK_LONG", 1, 0..=1) == 1);
        let Some(segs) = long_segments(rows, width, b.gpu.sm_count as usize).filter(|_| on) else { return Ok(None) };
        let s = &b.gpu.stream;
        let m = || md("alloc top-k scratch");
        // SAFETY: i32 and f32 have no invalid bit patterns; the kernels write every entry they read first (each
        // histogram whole, each candidate before its count says it is there).
        unsafe {
            Ok(Some(Self {
                segs,
                hist: s.alloc::<i32>(rows * segs * TOPK_BINS).map_err(m())?,
                hist2: s.alloc::<i32>(rows * segs * TOPK_BINS).map_err(m())?,
                cand: s.alloc::<f32>(rows * TOPK_SEG).map_err(m())?,
                pos: s.alloc::<i32>(rows * TOPK_SEG).map_err(m())?,
                info: s.alloc::<i32>(rows * 4).map_err(m())?,
            }))
        }
    }
}

/// The segments of TOPK_SEG keys a row of `width` is cut into when a launch of `rows` such rows takes the
/// multi-block top-k: rows longer than one block's keys, whose segments' blocks (512 threads: 4 an SM at most) fit
/// the device's `sms` at once.
fn long_segments(rows: usize, width: usize, sms: usize) -> Option<usize> {
    let segs = width.div_ceil(TOPK_SEG);
    (width > TOPK_SEG && rows * segs <= 4 * sms).then_some(segs)
}

/// [`indexer_select`]'s checks, allocations and tables, on the main stream.
pub(crate) fn prepare<'a>(
    b: &CudaBackend,
    cache: &'a GpuLayerCache,
    q: &'a GpuTensor,
    w: &'a GpuTensor,
    d: &'a IndexerDims,
    rows: &[Row],
) -> MResult<Prepared<'a>> {
    if q.cols != d.heads * d.head_dim
        || w.cols != d.heads
        || q.rows != rows.len()
        || w.rows != rows.len()
        || q.data.dtype() != w.data.dtype()
        || cache.index_dim != d.head_dim
    {
        return Err(shape(
            "indexer_select",
            format!("q [{}, {}], w [{}, {}] for {d:?}", q.rows, q.cols, w.rows, w.cols),
        ));
    }
    // indexer_scores stages q in 16-byte pieces (V3.2's index_head_dim is 128).
    if !d.head_dim.is_multiple_of(8) {
        return Err(shape("indexer_select", format!("index head dim {} is not a multiple of 8", d.head_dim)));
    }
    let stride = d.topk.max(1);
    let counts: Vec<usize> = rows.iter().map(|r| (r.pos + 1).min(d.topk)).collect();
    // Not cleared (a memset is one more node of a decode step's graph): the top-k writes each row's first
    // counts[r] entries, and nothing reads past them (attention takes counts[r] keys a row, as does `to_host`).
    // SAFETY: i32 has no invalid bit patterns; the entries read are written first, as just said.
    let keys = unsafe { b.gpu.stream.alloc::<i32>((rows.len() * stride).max(1)) }.map_err(md("alloc selection"))?;
    if rows.is_empty() {
        return Ok(Prepared { cache, q, w, d, keys, counts, stride, inputs: None, parts: Vec::new() });
    }
    // The step's tables, made once for every layer, or this call's own. With the step's, the scores' row stride
    // is the tables' capacity in positions (a recorded step replays with more keys each time; the kernels stop at
    // each row's own count).
    let p = b.gpu.span(|| "indexer tables".into());
    let tables = Tables::of(b, cache, rows, None, b.gpu.steps.inputs_for(rows))?;
    drop(p);
    let pool = cache.pool().ok_or_else(|| shape("indexer_select", "nothing cached".into()))?;
    let widths: Vec<usize> = match &tables {
        Tables::Step(s) => vec![s.cap * BLOCK; rows.len()],
        Tables::Own(..) => rows.iter().map(|r| r.pos + 1).collect(),
    };
    // Rows in chunks whose scores fit one buffer, every buffer allocated before any launch.
    let mut parts = Vec::new();
    let mut r0 = 0;
    while r0 < rows.len() {
        let (rows, width) = chunk(&widths[r0..]);
        let long = Long::new(b, rows, width)?;
        parts.push(Part { r0, rows, width, scores: scratch(b, rows * width)?, long });
        r0 += rows;
    }
    Ok(Prepared { cache, q, w, d, keys, counts, stride, inputs: Some((tables, pool)), parts })
}

impl Prepared<'_> {
    /// The scores and top-k launches on `s`: the selection, which keeps what they read.
    pub(crate) fn launch(self, b: &CudaBackend, s: &CudaStream) -> MResult<GpuSelection> {
        let Prepared { cache, q, w, d, mut keys, counts, stride, inputs, mut parts } = self;
        let Some((tables, pool)) = inputs else { return Ok(GpuSelection { keys, counts, stride, _inputs: None }) };
        let (meta, table_view) = tables.views();
        for part in &mut parts {
            let Part { r0, rows: n, width, ref mut scores, ref long } = *part;
            if width > d.topk {
                let _p = b.gpu.span(|| format!("indexer scores {}x{}", d.heads, d.head_dim));
                let launch =
                    Scores { s, q, w, cache, pool, meta: &meta, tables: &table_view, row0: r0, rows: n, width, d };
                if mma_eligible(q, cache, d) { launch.mma(b, scores)? } else { launch.scalar(b, scores)? }
            }
            let _p = b.gpu.span(|| format!("indexer top-{}", d.topk));
            TopK { scores, width, meta: &meta, row0: r0, rows: n, topk: d.topk }.run(b, s, long.as_ref(), &mut keys)?;
        }
        Ok(GpuSelection { keys, counts, stride, _inputs: Some((tables, parts)) })
    }
}

/// Whether `indexer_scores_mma_bf16` takes the scores: bf16 activations over a bf16 cache, at most 64 heads
/// (`IDXM_MT` m tiles) and a head dim of whole k-steps within the shared memory a block may have (256).
fn mma_eligible(q: &GpuTensor, cache: &GpuLayerCache, d: &IndexerDims) -> bool {
    q.data.dtype() == ActDtype::Bf16
        && cache.dtype == KvDtype::Bf16
        && d.heads <= 16 * MMA_HEAD_TILES
        && d.head_dim.is_multiple_of(16)
        && d.head_dim <= 256
}

/// Blocks a row of `indexer_scores_mma_bf16` over `rows` rows of `width` keys on `sms` SMs, each taking every
/// so many of the row's tiles of [`KEYS_PER_BLOCK`] keys and staging the row's query once: about
/// [`MMA_BLOCKS_PER_SM`] blocks an SM over the launch (one tile a block where the rows are short: decode at 4K),
/// and at most [`MMA_MAX_TILES`] tiles a block (prefill's many rows: the longest rows' blocks finish last).
fn mma_tiles(rows: usize, width: usize, sms: usize) -> usize {
    let tiles = width.div_ceil(KEYS_PER_BLOCK).max(1);
    (MMA_BLOCKS_PER_SM * sms).div_ceil(rows.max(1)).max(tiles.div_ceil(MMA_MAX_TILES)).min(tiles)
}

/// One launch of a scores kernel: rows `row0..row0 + rows` of the step into `[rows, width]` f32.
struct Scores<'a> {
    s: &'a CudaStream,
    q: &'a GpuTensor,
    w: &'a GpuTensor,
    cache: &'a GpuLayerCache,
    pool: &'a Pool,
    meta: &'a CudaView<'a, i32>,
    tables: &'a CudaView<'a, i32>,
    row0: usize,
    rows: usize,
    width: usize,
    d: &'a IndexerDims,
}

impl Scores<'_> {
    fn grid(&self) -> (u32, u32, u32) {
        (self.width.div_ceil(KEYS_PER_BLOCK) as u32, self.rows as u32, 1)
    }

    /// The tensor-core kernel's grid: [`mma_tiles`] blocks a row.
    fn mma_grid(&self, sms: usize) -> (u32, u32, u32) {
        (mma_tiles(self.rows, self.width, sms) as u32, self.rows as u32, 1)
    }

    fn ints(&self) -> [i32; 5] {
        let d = self.d;
        [self.row0 as i32, d.heads as i32, d.head_dim as i32, d.topk as i32, self.width as i32]
    }

    /// The f32 kernel (any activation and cache dtype).
    fn scalar(&self, b: &CudaBackend, scores: &mut CudaSlice<f32>) -> MResult<()> {
        let f = b.f(&format!("indexer_scores_{}", self.q.data.dtype().suffix()))?;
        // q [dim][hp], the keys [dim][65], w [hp], partial sums [4][64] (kernels/indexer.cu).
        let (dim, hp) = (self.d.head_dim, self.d.heads.next_multiple_of(16));
        let floats = dim * hp + dim * (KEYS_PER_BLOCK + 1) + hp + 4 * KEYS_PER_BLOCK;
        let cfg = smem_cfg(b, f, self.grid(), 256, floats * 4)?;
        let code = self.cache.dtype.code();
        let [row0, heads, dim, topk, width] = self.ints();
        let mut l = self.s.launch_builder(f);
        l.arg(&self.q.data).arg(&self.w.data).arg(&self.pool.index_k).arg(&self.pool.scales).arg(&code).arg(self.meta);
        l.arg(self.tables).arg(&row0).arg(&heads).arg(&dim).arg(&topk).arg(&width).arg(scores);
        // SAFETY: matches indexer_scores_*: every row is cached to its position (step_tables checked), the
        // scores hold `rows` rows of `width` ≥ every row's key count.
        unsafe { l.launch(cfg) }.map_err(md("indexer_scores"))?;
        Ok(())
    }

    /// The tensor-core kernel ([`mma_eligible`]).
    fn mma(&self, b: &CudaBackend, scores: &mut CudaSlice<f32>) -> MResult<()> {
        let f = b.f("indexer_scores_mma_bf16")?;
        // q [hp][dim + 8] and the stages' keys [MMA_STAGES][64][dim + 8] bf16, their scales [MMA_STAGES][64] f32
        // (kernels/indexer.cu).
        let (dim, hp) = (self.d.head_dim, self.d.heads.next_multiple_of(16));
        let bytes = (hp + MMA_STAGES * KEYS_PER_BLOCK) * (dim + 8) * 2 + MMA_STAGES * KEYS_PER_BLOCK * 4;
        let cfg = smem_cfg(b, f, self.mma_grid(b.gpu.sm_count as usize), 32 * MMA_WARPS, bytes)?;
        let [row0, heads, dim, topk, width] = self.ints();
        let mut l = self.s.launch_builder(f);
        l.arg(&self.q.data)
            .arg(&self.w.data)
            .arg(&self.pool.index_k)
            .arg(&self.pool.scales)
            .arg(self.meta)
            .arg(self.tables);
        l.arg(&row0).arg(&heads).arg(&dim).arg(&topk).arg(&width).arg(scores);
        // SAFETY: matches indexer_scores_mma_bf16: bf16 q, w and cache (mma_eligible), every row cached to its
        // position, the scores hold `rows` rows of `width` ≥ every row's key count.
        unsafe { l.launch(cfg) }.map_err(md("indexer_scores_mma"))?;
        Ok(())
    }
}

/// How many of the rows (key counts `widths`) fit one score buffer, and the widest of them.
fn chunk(widths: &[usize]) -> (usize, usize) {
    let (mut n, mut width) = (0, 0);
    for &w in widths {
        let wider = width.max(w);
        if n == MAX_GRID_Y || (n > 0 && (n + 1) * wider > SCORE_FLOATS) {
            break;
        }
        (n, width) = (n + 1, wider);
    }
    (n, width)
}

/// One launch of the top-k kernel: rows `row0..row0 + rows` of the step, their scores `[rows, width]`.
struct TopK<'a> {
    scores: &'a CudaSlice<f32>,
    width: usize,
    /// The step's row descriptors (`StepTables::meta`, uploaded).
    meta: &'a CudaView<'a, i32>,
    row0: usize,
    rows: usize,
    topk: usize,
}

impl TopK<'_> {
    /// Writes each row's positions into `keys [step rows, topk]`; with `long` ([`Long::new`] for these rows and
    /// width) its rows of more than TOPK_SEG keys first go through the multi-block histograms and gathers.
    fn run(&self, b: &CudaBackend, s: &CudaStream, long: Option<&Long>, keys: &mut CudaSlice<i32>) -> MResult<()> {
        let (w, r0, k) = (self.width as i32, self.row0 as i32, self.topk as i32);
        let block = (TOPK_THREADS, 1, 1);
        if let Some(long) = long {
            let grid = (long.segs as u32, self.rows as u32, 1);
            let cfg = LaunchConfig { grid_dim: grid, block_dim: block, shared_mem_bytes: 0 };
            let mut l = s.launch_builder(b.f("indexer_topk_hist_f32")?);
            l.arg(self.scores).arg(&w).arg(self.meta).arg(&r0).arg(&k).arg(&long.hist);
            // SAFETY: matches indexer_topk_hist_f32: scores [rows, width], hist [rows, segs, TOPK_BINS] with segs
            // segments of TOPK_SEG covering width.
            unsafe { l.launch(cfg) }.map_err(md("indexer_topk_hist"))?;
            for (f, what) in [
                ("indexer_topk_gather_f32", "indexer_topk_gather"),
                ("indexer_topk_gather2_f32", "indexer_topk_gather2"),
            ] {
                let mut l = s.launch_builder(b.f(f)?);
                l.arg(self.scores).arg(&w).arg(self.meta).arg(&r0).arg(&k).arg(&long.hist).arg(&long.hist2);
                l.arg(&long.cand).arg(&long.pos).arg(&long.info);
                // SAFETY: matches indexer_topk_gather_f32 / _gather2_f32: the same grid, both levels' histograms
                // [rows, segs, TOPK_BINS], cand and pos [rows, TOPK_SEG], info [rows, 4].
                unsafe { l.launch(cfg) }.map_err(md(what))?;
            }
        }
        let mut l = s.launch_builder(b.f("indexer_topk_f32")?);
        l.arg(self.scores).arg(&w).arg(self.meta).arg(&r0).arg(&k).arg(keys);
        l.arg_or_null(long.map(|x| &x.cand)).arg_or_null(long.map(|x| &x.pos)).arg_or_null(long.map(|x| &x.info));
        let cfg = LaunchConfig { grid_dim: (self.rows as u32, 1, 1), block_dim: block, shared_mem_bytes: 0 };
        // SAFETY: matches indexer_topk_f32: meta holds ≥ row0 + rows rows, keys `topk` per row; the candidates, if
        // given, as the gather above left them.
        unsafe { l.launch(cfg) }.map_err(md("indexer_topk"))?;
        Ok(())
    }
}

/// Host rows of scores on the device as the top-k reads them (one row of `width` a list, `meta` giving each its
/// length), and the `topk` keys a row it writes.
struct HostScores {
    dev: CudaSlice<f32>,
    width: usize,
    meta: std::sync::Arc<CudaSlice<i32>>,
    rows: usize,
    topk: usize,
    keys: CudaSlice<i32>,
    long: Option<Long>,
}

impl HostScores {
    fn upload(b: &CudaBackend, scores: &[Vec<f32>], topk: usize) -> MResult<Self> {
        let width = scores.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut flat = vec![0f32; scores.len() * width];
        for (r, s) in scores.iter().enumerate() {
            flat[r * width..r * width + s.len()].copy_from_slice(s);
        }
        let meta = StepTables {
            meta: scores.iter().flat_map(|s| [s.len() as i32 - 1, 0, 0, 0]).collect(),
            tables: Vec::new(),
        };
        let (meta, _) = upload_tables(b, &meta)?;
        let dev = b.gpu.stream.clone_htod(&flat).map_err(md("upload scores"))?;
        let len = (scores.len() * topk.max(1)).max(1);
        let keys = b.gpu.stream.alloc_zeros::<i32>(len).map_err(md("alloc selection"))?;
        let long = Long::new(b, scores.len(), width)?;
        Ok(Self { dev, width, meta, rows: scores.len(), topk, keys, long })
    }

    fn top_k(&mut self, b: &CudaBackend) -> MResult<()> {
        if self.rows == 0 {
            return Ok(());
        }
        let (width, rows, topk) = (self.width, self.rows, self.topk);
        let top = TopK { scores: &self.dev, width, meta: &self.meta.slice(..), row0: 0, rows, topk };
        top.run(b, &b.gpu.stream, self.long.as_ref(), &mut self.keys)
    }
}

/// The device top-k on host scores, one row per list (row `r` has `scores[r].len()` keys): what the indexer
/// selects from its scores, exposed so tests can hold it to `pipemoe_model::cpu::kernels::top_k`.
pub fn top_k_rows(b: &CudaBackend, scores: &[Vec<f32>], topk: usize) -> MResult<HostSelection> {
    let mut host = HostScores::upload(b, scores, topk)?;
    host.top_k(b)?;
    let counts = scores.iter().map(|s| s.len().min(topk)).collect();
    GpuSelection { keys: host.keys, counts, stride: topk.max(1), _inputs: None }.to_host(b)
}

/// Seconds per launch of the device top-k over `scores` (uploaded once), from device events around `iters`
/// back-to-back launches: the top-k's benchmark (tests/device.rs `bench_topk`).
pub fn time_top_k_rows(b: &CudaBackend, scores: &[Vec<f32>], topk: usize, iters: usize) -> MResult<f64> {
    let mut host = HostScores::upload(b, scores, topk)?;
    let mut failed = None;
    let secs = crate::timing::seconds_per_call(&b.gpu, 3, iters, &mut |_| {
        if failed.is_none() {
            failed = host.top_k(b).err();
        }
        Ok::<(), crate::Error>(())
    })
    .map_err(m)?;
    failed.map_or(Ok(secs), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_rows_of_few_row_steps_take_a_block_a_segment() {
        // Up to one block's keys: one block a row, whatever the rows.
        assert_eq!(long_segments(1, TOPK_SEG, 132), None);
        // One row at 8,193 keys, at 128K and at the model's 160K positions on an H200 (132 SMs) and a 3090 (82).
        assert_eq!(long_segments(1, TOPK_SEG + 1, 132), Some(2));
        assert_eq!(long_segments(1, 131_072, 132), Some(16));
        assert_eq!(long_segments(1, 163_840, 82), Some(20));
        // 32 streams at 128K fit the H200's 528 places (512 blocks), not the 3090's 328.
        assert_eq!(long_segments(32, 131_072, 132), Some(16));
        assert_eq!(long_segments(32, 131_072, 82), None);
        // A prefill chunk's 512 rows keep one block a row.
        assert_eq!(long_segments(512, 16_384, 132), None);
    }

    #[test]
    fn long_rows_share_a_block_between_tiles_of_the_scores() {
        // Decode at 4K: a tile a block, as before (65 tiles of 64 keys).
        assert_eq!(mma_tiles(1, 4_160, 132), 65);
        // One row at 128K: 3 blocks an SM, ~5 tiles each on the H200 and ~9 on a 3090 (which runs one of them an
        // SM at a time).
        assert_eq!(mma_tiles(1, 131_072, 132), 396);
        assert_eq!(mma_tiles(1, 131_072, 82), 246);
        // 32 streams at 16K: 16 blocks a row (512 in all), 16 tiles each.
        assert_eq!(mma_tiles(32, 16_384, 132), 16);
        // A prefill chunk's many rows: at most 16 tiles a block, never more blocks than tiles.
        assert_eq!(mma_tiles(4_096, 4_096, 132), 4);
        assert_eq!(mma_tiles(4_096, 163_840, 132), 160);
        assert_eq!(mma_tiles(4_096, 1, 132), 1);
    }
}
