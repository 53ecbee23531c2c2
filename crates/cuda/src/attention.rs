//! The cache writes and MLA attention of `CudaBackend` (MODEL_SPEC §2.5), over the block-paged pool of
//! `cache.rs`, kernels in kernels/attention.cu. A step is three launches per chunk of rows: the query absorption
//! (`q_lat = q_nope · W_UK` per head), the flash kernel (online softmax over key tiles read through the block
//! tables, every row and head group in one grid, long rows split over several blocks), and the merge of those
//! splits with the output absorption (`W_UV` per head). Rows are chunked only to bound the f32 scratch.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use pipemoe_model::backend::{Backend, FusedQuery, IndexQuery, MlaDims, Row};

use crate::act::{Act, ActDtype};
use crate::backend::{CudaBackend, GpuTensor, GpuWeight, MResult, m, md, shape};
use crate::cache::{GpuLayerCache, Pool, StepTables};
use crate::gpu::{Apart, Branch};
use crate::graph::{Ints, StepInputs};
use crate::indexer::GpuSelection;
use crate::kvb::{self, Kvb};
use crate::launch::ArgOrNull;
use crate::qrope::RopeLaunch;

/// Heads per attention block of the f32 kernel (`MLA_HEADS`) and of the bf16 tensor-core one (`FM_HEADS`), rows
/// per absorption block (`MLA_ROWS`).
const HEADS_PER_BLOCK: usize = 8;
const MMA_HEADS_PER_BLOCK: usize = 16;
/// The most query dims (kv_lora + rope, rounded up to 16) the tensor-core flash kernel's warps hold in registers
/// (8 warps × `FM_QK` steps of 8).
const MMA_MAX_DIMS: usize = 576;
/// Shared memory the tensor-core absorption takes at most (a 3090 allows 99 KiB a block).
const MMA_MAX_SMEM: usize = 96 << 10;
const ROWS_PER_BLOCK: usize = 8;
/// The largest kv_lora the flash kernel's per-lane accumulators hold (`MLA_MAX_LORA`).
pub const MAX_LORA: usize = 512;
/// Key shares of one row the kernels hold at most (`MLA_MAX_SPLITS`), the default cap on them, and the fewest keys
/// worth a share of their own.
pub const MAX_SPLITS: usize = 32;
const DEFAULT_MAX_SPLITS: usize = 16;
const MIN_SPLIT_KEYS: usize = 64;

/// The most key shares of one row, `PIPEMOE_FLASH_MAX_SPLITS` (1..=32, default 16) for a sweep without a rebuild:
/// a single decode row's 8 head groups × 16 shares are 128 blocks, one wave on an H200 with 8 tiles each; 32
/// shares halve each block's chain of tiles and double the partials `mla_out` merges.
pub(crate) fn max_splits() -> usize {
    static K: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *K.get_or_init(|| crate::mma::knob("PIPEMOE_FLASH_MAX_SPLITS", DEFAULT_MAX_SPLITS, 1..=MAX_SPLITS))
}

/// The fewest keys per share, `PIPEMOE_FLASH_MIN_SPLIT_KEYS` (32..=4096, default 64) for a sweep on a new GPU
/// without a rebuild: fewer shares mean longer blocks and fewer partial sums for `mla_out` to merge (at 1,024 keys
/// and 64, a row's 16 shares write and read 4 MiB of f32 partials per layer).
pub(crate) fn min_split_keys() -> usize {
    static K: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *K.get_or_init(|| crate::mma::knob("PIPEMOE_FLASH_MIN_SPLIT_KEYS", MIN_SPLIT_KEYS, 32..=4096))
}
/// Whether bf16 flash attention takes q and P as value + remainder (`PIPEMOE_FLASH_EXACT=1`): f32-exact products
/// at twice the tensor-core work. By default they enter as bf16, as in HF's own bf16 attention: on a 3090, whose
/// bf16 tensor cores with f32 accumulation run at 71 TFLOP/s, the exact mix of 32 rows at 4K context is ~0.5 ms a
/// layer of tensor-core time on its own (docs/PERF.md, session 15).
fn flash_exact() -> bool {
    static K: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *K.get_or_init(|| crate::mma::knob("PIPEMOE_FLASH_EXACT", 0, 0..=1) == 1)
}

/// Key tiles in the ring of the two-group flash kernel (its `ST`); the one-group kernels keep `FM_ST`, 2.
const G2_STAGES: usize = 3;

/// The fewest rows of a launch for which the bf16 flash kernel takes two head groups a block
/// (`mla_flash_mma_fast_bf16_d576_g2`: each key tile crosses L2 once per 32 heads, not per 16), where an SM's
/// shared memory holds the block: `PIPEMOE_FLASH_G2_MIN_ROWS` (1..=65535, default 2; 65535: never). A single row
/// keeps 16 heads a block: its 128 blocks reach 128 SMs, 32 heads' 64 would idle half of them.
fn flash_g2_min_rows() -> usize {
    static K: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *K.get_or_init(|| crate::mma::knob("PIPEMOE_FLASH_G2_MIN_ROWS", 2, 1..=MAX_GRID_Y))
}

/// Output columns per block of `mla_out` (`OUT_COLS`), warps per block of it and `mla_absorb_q` (`ABS_WARPS`).
const OUT_COLS: usize = 32;
const ABSORB_WARPS: usize = 8;
/// Bound on each f32 scratch buffer (query latents, split partials) of one launch.
const SCRATCH_BYTES: usize = 64 << 20;
/// Rows of one launch at most (CUDA's limit on gridDim.y).
pub(crate) const MAX_GRID_Y: usize = 65_535;

/// A launch configuration with `smem` bytes of dynamic shared memory. Above the default the function is opted
/// in to everything the device allows (always the same value, so concurrent callers cannot undercut each other).
pub(crate) fn smem_cfg(
    b: &CudaBackend,
    f: &CudaFunction,
    grid: (u32, u32, u32),
    threads: u32,
    smem: usize,
) -> MResult<LaunchConfig> {
    b.gpu.allow_smem(f, smem).map_err(m)?;
    Ok(LaunchConfig { grid_dim: grid, block_dim: (threads, 1, 1), shared_mem_bytes: smem as u32 })
}

/// Heads per block of the flash kernel for activations of `dt` (both kernels run 256 threads).
fn flash_heads(dt: ActDtype) -> usize {
    match dt {
        ActDtype::Bf16 => MMA_HEADS_PER_BLOCK,
        ActDtype::F32 => HEADS_PER_BLOCK,
    }
}

/// Rows per block of the absorption kernels and their names' tag: one for a single row (the kernels for
/// `ROWS_PER_BLOCK` would spend 7 of every 8 multiply-adds on rows that are not there), else `ROWS_PER_BLOCK`.
fn rows_per_block(rows: usize) -> (usize, &'static str) {
    if rows == 1 { (1, "_r1") } else { (ROWS_PER_BLOCK, "") }
}

/// Latent columns per block of `mla_absorb_q` for `r` rows per block (the kernels' C): a warp's loads cover 256
/// columns of one row of W_UK for one row of q, 64 columns of four rows for eight.
fn absorb_cols(r: usize) -> usize {
    if r == 1 { 256 } else { 64 }
}

/// `[meta | tables]` on the device, and where the tables start. Uploads of the same content are shared while
/// recent (outside a stage's step, every layer of a step builds the same ones).
pub(crate) fn upload_tables(b: &CudaBackend, t: &StepTables) -> MResult<(Arc<CudaSlice<i32>>, usize)> {
    let (packed, at) = t.packed();
    Ok((b.gpu.uploaded_i32(&packed).map_err(m)?, at))
}

/// A step's row descriptors (`meta`) and block tables on the device: the stage step's inputs (made once for every
/// layer, `graph.rs`) or this call's own upload.
pub(crate) enum Tables {
    Step(Arc<StepInputs>),
    Own(Arc<CudaSlice<i32>>, usize),
}

impl Tables {
    /// `step` when given, else `cache.step_tables(rows, counts)` uploaded.
    pub(crate) fn of(
        b: &CudaBackend,
        cache: &GpuLayerCache,
        rows: &[Row],
        counts: Option<&[usize]>,
        step: Option<Arc<StepInputs>>,
    ) -> MResult<Tables> {
        Ok(match step {
            Some(s) => Tables::Step(s),
            None => {
                let (dev, at) = upload_tables(b, &cache.step_tables(rows, counts)?)?;
                Tables::Own(dev, at)
            }
        })
    }

    /// `meta` and the tables it points into.
    pub(crate) fn views(&self) -> (CudaView<'_, i32>, CudaView<'_, i32>) {
        match self {
            Tables::Step(s) => s.tables(),
            Tables::Own(dev, at) => (dev.slice(..), dev.slice(*at..)),
        }
    }
}

/// Scratch of `n` f32 that the next kernel writes in full before anything reads it.
pub(crate) fn scratch(b: &CudaBackend, n: usize) -> MResult<CudaSlice<f32>> {
    // SAFETY: every caller's kernel writes all n values before any is read.
    unsafe { b.gpu.stream.alloc::<f32>(n.max(1)) }.map_err(md("alloc scratch"))
}

pub fn cache_write(
    b: &CudaBackend,
    cache: &mut GpuLayerCache,
    rows: &[Row],
    latent: &GpuTensor,
    k_pe: &GpuTensor,
    index_k: Option<&GpuTensor>,
) -> MResult<()> {
    let (lora, rope, idim) = (cache.lora, cache.rope, cache.index_dim);
    let dt = latent.data.dtype();
    if latent.cols != lora
        || k_pe.cols != rope
        || latent.rows != rows.len()
        || k_pe.rows != rows.len()
        || k_pe.data.dtype() != dt
        || (idim > 0) != index_k.is_some()
        || index_k.is_some_and(|k| k.cols != idim || k.rows != rows.len() || k.data.dtype() != dt)
    {
        return Err(shape("cache_write", "latent, k_pe or indexer key mis-shaped".into()));
    }
    if rows.is_empty() {
        return Ok(());
    }
    let (li, ri, ii, code) = (lora as i32, rope as i32, idim as i32, cache.dtype.code());
    let (slots, pool) = cache_target(b, cache, rows)?;
    let slots = slots.view();
    let f = b.f(&format!("cache_store_{}", dt.suffix()))?;
    let mut l = b.gpu.stream.launch_builder(f);
    l.arg(&latent.data).arg(&k_pe.data);
    l.arg_or_null(index_k.map(|k| &k.data));
    let Pool { latent: cl, k_pe: cp, index_k: ci, scales, .. } = pool;
    l.arg(&slots).arg(&li).arg(&ri).arg(&ii).arg(cl).arg(cp).arg(ci).arg(scales).arg(&code);
    let cfg = LaunchConfig { grid_dim: (rows.len() as u32, 3, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: matches cache_store_*: the sources hold rows·dim values, every slot was reserved in the pool.
    unsafe { l.launch(cfg) }.map_err(md("cache_store"))?;
    Ok(())
}

/// The indexer's selection and attention over it (V3.2): the scores and top-k run on a branch of the step
/// beside the query's absorption, which does not need them; the main stream joins the branch before the flash
/// kernel reads the selection. The selection (and `index`'s tensors, the caller's) outlive the join.
pub fn mla_indexed(
    b: &CudaBackend,
    cache: &GpuLayerCache,
    q: &GpuTensor,
    kv_b: &GpuWeight,
    d: &MlaDims,
    rows: &[Row],
    index: IndexQuery<'_, CudaBackend>,
) -> MResult<GpuTensor> {
    let branch = b.gpu.branch();
    let selection = crate::indexer::indexer_select(b, cache, index.q, index.w, index.dims, rows, branch.as_ref())?;
    let keys = Keys { selection: Some(&selection), branch: branch.as_ref() };
    let out = attend(b, cache, q, kv_b, d, rows, keys);
    // The branch joins (if the attention did not get that far) before the selection's buffers go back to the pool.
    drop(branch);
    drop(selection);
    out
}

/// `Backend::mla_attention_fused_query`: with the fused q_b + wq_b launch (`qrope.rs`) in two launches of its
/// parts' blocks, the indexer's query is projected on a branch forked before q's — the scores and top-k follow it
/// there — while the main stream projects q and absorbs it; the main stream joins the branch before the flash
/// kernel reads the selection. The indexer's chain (its query's GEMV, scores, top-k) then runs beside q's GEMV and
/// absorption instead of after q's part of one launch. Where the fused launch does not apply, or with
/// `Apart::EarlyIndex`, the two calls in turn.
pub fn mla_fused_query(
    b: &CudaBackend,
    cache: &GpuLayerCache,
    query: FusedQuery<'_, CudaBackend>,
    kv_b: &GpuWeight,
    d: &MlaDims,
    rows: &[Row],
) -> MResult<GpuTensor> {
    let FusedQuery { x, w, q, index, inv_freq, index_w, index_dims } = query;
    let parts = ((0, q), (q.heads * q.head_dim, index));
    let launch = match b.gpu.is_apart(Apart::EarlyIndex) {
        true => None,
        false => RopeLaunch::new(b, x, w, parts.0, parts.1, inv_freq, rows)?,
    };
    let Some(launch) = launch else {
        let (q, index_q) = b.linear_rope_columns2(x, w, parts.0, parts.1, inv_freq, rows)?;
        let index = IndexQuery { q: &index_q, w: index_w, dims: index_dims };
        return mla_indexed(b, cache, &q, kv_b, d, rows, index);
    };
    // Every buffer of both streams' launches is allocated (and the step's tables made) before the fork.
    let (split, blocks) = launch.blocks();
    let prepared = crate::indexer::prepare(b, cache, &launch.y2, index_w, index_dims, rows)?;
    let branch = b.gpu.branch();
    let s = match &branch {
        Some(br) => br.fork().map_err(m)?,
        None => &b.gpu.stream,
    };
    launch.launch(b, s, split..blocks)?;
    let selection = prepared.launch(b, s);
    attend_selected(b, cache, &launch, split, selection, branch, (kv_b, d, rows))
}

/// q's part of `launch` (its blocks before `split`) on the main stream, then attention over `selection`, which the
/// branch is making. The branch joins on every path, errors too, before the selection's buffers can go back to the
/// pool.
pub(crate) fn attend_selected(
    b: &CudaBackend,
    cache: &GpuLayerCache,
    launch: &RopeLaunch<'_>,
    split: usize,
    selection: MResult<GpuSelection>,
    branch: Option<Branch<'_>>,
    (kv_b, d, rows): (&GpuWeight, &MlaDims, &[Row]),
) -> MResult<GpuTensor> {
    let selection = match selection {
        Ok(s) => s,
        Err(e) => {
            drop(branch);
            return Err(e);
        }
    };
    let attended = launch.launch(b, &b.gpu.stream, 0..split).and_then(|()| {
        let keys = Keys { selection: Some(&selection), branch: branch.as_ref() };
        attend(b, cache, &launch.y1, kv_b, d, rows, keys)
    });
    drop(branch);
    drop(selection);
    attended
}

/// Where a step's rows go in `cache`: their slots (reserved ahead for the step, or now) on the device — the same
/// at every layer of the step: the step's inputs, or uploaded once while recent — and the pool.
pub(crate) fn cache_target<'c>(
    b: &CudaBackend,
    cache: &'c mut GpuLayerCache,
    rows: &[Row],
) -> MResult<(Ints, &'c Pool)> {
    let slots = match cache.take_reserved(rows) {
        Some(s) => s,
        None => cache.reserve(&b.gpu, rows)?,
    };
    let slots = crate::graph::slots(b, rows, &slots)?;
    let pool = cache.pool().ok_or_else(|| shape("cache_write", "no pool after reserving".into()))?;
    Ok((slots, pool))
}

/// Absorbed MLA over the cache for every row of a step; `selection` restricts each row to its keys (V3.2).
pub fn mla(
    b: &CudaBackend,
    cache: &GpuLayerCache,
    q: &GpuTensor,
    kv_b: &GpuWeight,
    d: &MlaDims,
    rows: &[Row],
    selection: Option<&GpuSelection>,
) -> MResult<GpuTensor> {
    attend(b, cache, q, kv_b, d, rows, Keys { selection, branch: None })
}

/// The keys each row attends to: every causal one, or the indexer's selection — which, with `branch`, is still
/// being made there (the main stream joins the branch before the first flash launch).
#[derive(Clone, Copy)]
struct Keys<'a, 'b> {
    selection: Option<&'a GpuSelection>,
    branch: Option<&'a Branch<'b>>,
}

fn attend(
    b: &CudaBackend,
    cache: &GpuLayerCache,
    q: &GpuTensor,
    kv_b: &GpuWeight,
    d: &MlaDims,
    rows: &[Row],
    keys: Keys<'_, '_>,
) -> MResult<GpuTensor> {
    let Keys { selection, branch } = keys;
    let qk = d.qk_nope + d.qk_rope;
    if q.cols != d.heads * qk || q.rows != rows.len() {
        return Err(shape("mla_attention", format!("q [{}, {}]", q.rows, q.cols)));
    }
    if d.kv_lora != cache.lora || d.qk_rope != cache.rope || d.kv_lora > MAX_LORA {
        return Err(shape("mla_attention", format!("kv_lora {} (at most {MAX_LORA}) for this cache", d.kv_lora)));
    }
    if kv_b.in_features != d.kv_lora || kv_b.out_features != d.heads * (d.qk_nope + d.v_head) {
        return Err(shape("mla_attention", format!("kv_b_proj [{}, {}]", kv_b.out_features, kv_b.in_features)));
    }
    let kv_b = Kvb::of(b, kv_b, d, rows.len())?;
    if let Kvb::Dense(w) = kv_b
        && w.dtype() != q.data.dtype()
    {
        return Err(shape("mla_attention", "kv_b_proj and q in different dtypes".into()));
    }
    if let Some(s) = selection
        && s.rows() != rows.len()
    {
        return Err(shape("mla_attention", format!("a selection of {} rows for {}", s.rows(), rows.len())));
    }
    let dt = q.data.dtype();
    // Not cleared (a memset is one more node of a decode step's graph): mla_out writes every (row, head, value) of
    // every chunk, and the chunks cover the rows.
    // SAFETY: as just said; no value is read before the last chunk's mla_out.
    let data = unsafe { Act::uninit(&b.gpu, dt, rows.len() * d.heads * d.v_head) }.map_err(m)?;
    let mut out = GpuTensor { rows: rows.len(), cols: d.heads * d.v_head, data };
    if rows.is_empty() {
        return Ok(out);
    }
    // The step's tables (made once for every layer) serve dense attention and the indexer's selection, whose
    // kernels take at most its stride of keys a row: its counts when it chose for every row of the step.
    let p = b.gpu.span(|| "mla tables".into());
    let counts: Vec<usize> = match selection {
        Some(s) => s.counts().to_vec(),
        None => rows.iter().map(|r| r.pos + 1).collect(),
    };
    let stride = selection.map_or(usize::MAX, |s| s.stride());
    let counted = rows.iter().zip(&counts).all(|(r, &c)| c == (r.pos + 1).min(stride));
    let step = b.gpu.steps.inputs_for(rows).filter(|_| counted);
    let tables = Tables::of(b, cache, rows, selection.map(|s| s.counts()), step)?;
    let (meta, table_view) = tables.views();
    drop(p);
    let pool = cache.pool().ok_or_else(|| shape("mla_attention", "nothing cached".into()))?;
    let st = Step { b, d, q, kv_b, pool, code: cache.dtype.code(), meta, tables: table_view, selection };
    let per_row = d.heads * d.kv_lora;
    let chunk = (SCRATCH_BYTES / (per_row * 4)).clamp(1, rows.len().min(MAX_GRID_Y));
    for r0 in (0..rows.len()).step_by(chunk) {
        let n = chunk.min(rows.len() - r0);
        let max_keys = counts[r0..r0 + n].iter().copied().max().unwrap_or(1);
        let blocks = n * d.heads.div_ceil(flash_heads(q.data.dtype()));
        let splits = (2 * b.gpu.sm_count as usize)
            .div_ceil(blocks)
            .min(max_splits())
            .min(max_keys.div_ceil(min_split_keys()))
            .min(SCRATCH_BYTES / (n * per_row * 4))
            .max(1);
        let c = Chunk { row0: r0, rows: n, splits };
        let p = b.gpu.span(|| "mla absorb_q".into());
        let q_lat = st.absorb_q(c)?;
        drop(p);
        if let Some(br) = branch {
            br.join().map_err(m)?;
        }
        let p = b.gpu.span(|| format!("mla flash x{splits}"));
        let (o_part, ml_part) = st.flash(c, &q_lat)?;
        drop(p);
        let _p = b.gpu.span(|| "mla out".into());
        st.absorb_out(c, &o_part, &ml_part, &mut out)?;
    }
    Ok(out)
}

/// Rows `row0..row0 + rows` of the step, each split over `splits` key shares.
#[derive(Clone, Copy)]
struct Chunk {
    row0: usize,
    rows: usize,
    splits: usize,
}

/// What every launch of one attention step reads.
struct Step<'a> {
    b: &'a CudaBackend,
    d: &'a MlaDims,
    /// `[rows, heads·(nope + rope)]`.
    q: &'a GpuTensor,
    /// `[heads·(nope + v), kv_lora]`: dense in the activation dtype, or quantized (decode).
    kv_b: Kvb<'a>,
    pool: &'a Pool,
    /// The cache dtype's kernel code.
    code: i32,
    /// The step's rows' `meta` and the block tables it points into.
    meta: CudaView<'a, i32>,
    tables: CudaView<'a, i32>,
    selection: Option<&'a GpuSelection>,
}

impl Step<'_> {
    fn suffix(&self) -> &'static str {
        self.q.data.dtype().suffix()
    }

    /// `q_lat [rows, heads, kv_lora]` (f32) of a chunk.
    fn absorb_q(&self, c: Chunk) -> MResult<CudaSlice<f32>> {
        let (b, d) = (self.b, self.d);
        let mut q_lat = scratch(b, c.rows * d.heads * d.kv_lora)?;
        let kv_b = match self.kv_b {
            Kvb::Quant(g) => {
                kvb::absorb_q(b, g, self.q, d, c.row0, c.rows, &mut q_lat)?;
                return Ok(q_lat);
            }
            Kvb::Dense(w) => w,
        };
        // mla_absorb_mma.cu's tensor-core kernel: q [64][nope + 8] and W_UK [nope][136] bf16, 16-byte staging copies.
        let mma_smem = (64 * (d.qk_nope + 8) + d.qk_nope * 136) * 2;
        let mma = self.q.data.dtype() == ActDtype::Bf16
            && c.rows > 1
            && d.qk_nope.is_multiple_of(16)
            && (d.qk_nope + d.qk_rope).is_multiple_of(8)
            && d.kv_lora.is_multiple_of(8)
            && mma_smem <= MMA_MAX_SMEM;
        let (f, cfg) = if mma {
            let f = b.f("mla_absorb_q_mma_bf16")?;
            let grid = (d.heads as u32, c.rows.div_ceil(64) as u32, d.kv_lora.div_ceil(128) as u32);
            (f, smem_cfg(b, f, grid, 256, mma_smem)?)
        } else {
            let (r, tag) = rows_per_block(c.rows);
            let f = b.f(&format!("mla_absorb_q{tag}_{}", self.suffix()))?;
            let cols = absorb_cols(r);
            let grid = (d.heads as u32, c.rows.div_ceil(r) as u32, d.kv_lora.div_ceil(cols) as u32);
            let smem = r * (d.qk_nope + ABSORB_WARPS * cols) * 4;
            (f, smem_cfg(b, f, grid, 32 * ABSORB_WARPS as u32, smem)?)
        };
        let (row0, n, heads) = (c.row0 as i32, c.rows as i32, d.heads as i32);
        let (nope, rope, v, lora) = (d.qk_nope as i32, d.qk_rope as i32, d.v_head as i32, d.kv_lora as i32);
        let mut l = b.gpu.stream.launch_builder(f);
        l.arg(&self.q.data).arg(kv_b).arg(&row0).arg(&n).arg(&heads).arg(&nope).arg(&rope).arg(&v).arg(&lora);
        l.arg(&mut q_lat);
        // SAFETY: matches mla_absorb_q_* and mla_absorb_q_mma_bf16 (its alignment conditions checked above); q
        // holds the step's rows, kv_b heads·(nope+v)·lora values (checked).
        unsafe { l.launch(cfg) }.map_err(md("mla_absorb_q"))?;
        Ok(q_lat)
    }

    /// The flash kernel over a chunk: split partials `o_part [rows, heads, splits, kv_lora]` and
    /// `ml_part [rows, heads, splits, 2]`.
    fn flash(&self, c: Chunk, q_lat: &CudaSlice<f32>) -> MResult<(CudaSlice<f32>, CudaSlice<f32>)> {
        let (b, d, pool) = (self.b, self.d, self.pool);
        let mut o_part = scratch(b, c.rows * d.heads * c.splits * d.kv_lora)?;
        let mut ml_part = scratch(b, c.rows * d.heads * c.splits * 2)?;
        let (lora, rope) = (d.kv_lora, d.qk_rope);
        let dims = lora + rope;
        let dt = self.q.data.dtype();
        let (f, smem, groups) = match dt {
            // flash_mma.cu: a ring of tiles [32][CS] in bf16 (CS = dims rounded up to 16, + 8), per head group
            // partial scores [8][16][40] f32, P [2][16][40] bf16, corrections [16] f32; slots [2][256].
            ActDtype::Bf16 => {
                if !lora.is_multiple_of(8) {
                    return Err(shape("mla_attention", format!("bf16 attention needs kv_lora % 8 == 0, not {lora}")));
                }
                if dims.next_multiple_of(16) > MMA_MAX_DIMS {
                    return Err(shape(
                        "mla_attention",
                        format!("bf16 attention holds at most {MMA_MAX_DIMS} query dims, not {lora} + {rope}"),
                    ));
                }
                let (h, kt, scs, ps) = (MMA_HEADS_PER_BLOCK, 32, 40, 40);
                let cs = dims.next_multiple_of(16) + 8;
                // Each head group has its own partial scores, P and corrections; the tiles and slots are shared.
                let smem = |groups: usize, stages: usize| {
                    stages * kt * cs * 2 + groups * (8 * h * scs * 4 + 2 * h * ps * 2 + h * 4) + 2 * 256 * 4
                };
                let exact = flash_exact() || b.gpu.is_apart(crate::gpu::Apart::ExactFlash);
                let d576 = (lora, rope) == (512, 64);
                // The driver keeps 1 KiB of an SM's shared memory for each block.
                let g2 =
                    !exact && d576 && c.rows >= flash_g2_min_rows() && smem(2, G2_STAGES) + 1024 <= b.gpu.smem_per_sm;
                // DeepSeek's dims have their own instances, every shared-memory offset a constant.
                let name = match (exact, d576, g2) {
                    (true, false, _) => "mla_flash_mma_bf16",
                    (false, false, _) => "mla_flash_mma_fast_bf16",
                    (true, true, _) => "mla_flash_mma_bf16_d576",
                    (false, true, false) => "mla_flash_mma_fast_bf16_d576",
                    (false, true, true) => "mla_flash_mma_fast_bf16_d576_g2",
                };
                let (groups, stages) = if g2 { (2, G2_STAGES) } else { (1, 2) };
                (b.f(name)?, smem(groups, stages), groups)
            }
            // attention.cu's f32 kernel: q [dims][8], partial scores [8][8][16], probabilities [16][8],
            // corrections [8] (f32), slots [16], the tile [16][dims + 1] f32.
            ActDtype::F32 => {
                let (kt, h) = (16, HEADS_PER_BLOCK);
                let floats = dims * h + 8 * h * kt + kt * h + h;
                (b.f("mla_flash_f32")?, floats * 4 + kt * 4 + kt * (dims + 1) * 4, 1)
            }
        };
        // A block of `groups` head groups has 256 threads each; the chunk's splits counted groups against two
        // blocks of one an SM, which is one block of two (the same shares).
        let grid = (d.heads.div_ceil(groups * flash_heads(dt)) as u32, c.rows as u32, c.splits as u32);
        let cfg = smem_cfg(b, f, grid, 256 * groups as u32, smem)?;
        let stride = self.selection.map_or(0, |s| s.stride() as i32);
        let (row0, heads, nope) = (c.row0 as i32, d.heads as i32, d.qk_nope as i32);
        let (ri, li) = (rope as i32, lora as i32);
        let mut l = b.gpu.stream.launch_builder(f);
        l.arg(q_lat).arg(&self.q.data).arg(&pool.latent).arg(&pool.k_pe).arg(&pool.scales).arg(&self.code);
        l.arg(&self.meta).arg(&self.tables);
        l.arg_or_null(self.selection.map(|s| s.keys()));
        l.arg(&stride).arg(&row0).arg(&heads).arg(&nope).arg(&ri).arg(&li).arg(&d.softmax_scale);
        l.arg(&mut o_part).arg(&mut ml_part);
        // SAFETY: matches mla_flash_*: meta and tables describe cached positions of this pool (step_tables
        // checked each row), selections hold `stride` keys per row, the scratch rows·heads·splits entries.
        unsafe { l.launch(cfg) }.map_err(md("mla_flash"))?;
        Ok((o_part, ml_part))
    }

    /// Merges a chunk's splits and projects each head through `W_UV` into `out`.
    fn absorb_out(
        &self,
        c: Chunk,
        o_part: &CudaSlice<f32>,
        ml_part: &CudaSlice<f32>,
        out: &mut GpuTensor,
    ) -> MResult<()> {
        let (b, d) = (self.b, self.d);
        let kv_b = match self.kv_b {
            Kvb::Quant(g) => return kvb::out(b, g, d, (c.row0, c.rows, c.splits), o_part, ml_part, &mut out.data),
            Kvb::Dense(w) => w,
        };
        let cfg = if out.data.dtype() == ActDtype::Bf16 && c.rows > 1 {
            // mla_absorb_mma.cu's tensor-core kernel: 64 rows and 128 outputs of a head a block, static shared memory.
            let f = b.f("mla_out_mma_bf16")?;
            let grid = (d.heads as u32, c.rows.div_ceil(64) as u32, d.v_head.div_ceil(128) as u32);
            (f, smem_cfg(b, f, grid, 256, 0)?)
        } else {
            let (r, tag) = rows_per_block(c.rows);
            let f = b.f(&format!("mla_out{tag}_{}", out.data.dtype().suffix()))?;
            let grid = (d.heads as u32, c.rows.div_ceil(r) as u32, d.v_head.div_ceil(OUT_COLS) as u32);
            (f, smem_cfg(b, f, grid, 32 * ABSORB_WARPS as u32, r * d.kv_lora * 4)?)
        };
        let (f, cfg) = cfg;
        let (splits, row0, n, heads) = (c.splits as i32, c.row0 as i32, c.rows as i32, d.heads as i32);
        let (nope, v, lora) = (d.qk_nope as i32, d.v_head as i32, d.kv_lora as i32);
        let mut l = b.gpu.stream.launch_builder(f);
        l.arg(o_part).arg(ml_part).arg(&splits).arg(kv_b).arg(&row0).arg(&n).arg(&heads).arg(&nope).arg(&v);
        l.arg(&lora).arg(&mut out.data);
        // SAFETY: matches mla_out_* and mla_out_mma_bf16 (bf16 attention checked kv_lora % 8 == 0 in `flash`);
        // the partials come from `flash` with the same chunk, out holds every row.
        unsafe { l.launch(cfg) }.map_err(md("mla_out"))?;
        Ok(())
    }
}
