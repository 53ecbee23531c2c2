//! MLA's absorbed `kv_b_proj` as attention reads it: the activation-dtype copy the dense absorption kernels need
//! (made on first use, kept), or — for decode steps of bf16 activations over a tensor-core-packed kv_b — the
//! quantized weight itself (kernels/mla_q.cu): a fifth of the bytes a step reads for the two absorptions. The copy
//! is then made by the first larger step (a prefill chunk), not by the first decode step.

use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};
use pipemoe_model::backend::MlaDims;

use crate::act::{Act, ActDtype};
use crate::attention::{MAX_LORA, smem_cfg};
use crate::backend::{CudaBackend, GpuTensor, GpuWeight, GpuWeightKind, MResult, md, shape};
use crate::gemv::{GpuGptq, Packing};
use crate::gpu::Apart;
use crate::launch::ArgOrNull;

/// Rows a block of the quantized kernels (`MQ_ROWS`): each row's value and remainder fill the mma's 8 columns.
const QUANT_ROWS: usize = 4;
/// Warps a block of the query absorption (`MQ_WARPS`) and of the output one (`MQ_OUT_WARPS`), rows of K a chunk
/// (`MQ_CHUNK`), chunks of lora at most (`MQ_MAX_CHUNKS`).
const WARPS: u32 = 4;
const OUT_WARPS: u32 = 8;
const CHUNK: usize = 128;
const MAX_CHUNKS: usize = MAX_LORA / CHUNK;

/// Rows of a step up to which attention reads the quantized kv_b (`Gpu::kvb_quant_rows`), from
/// `PIPEMOE_KVB_QUANT_ROWS` (0..=256, default 4: one block of rows; 0 never). Measured on the H200 (docs/PERF.md,
/// session 15): one row saves ~4.5 µs a layer; at 32 rows the dense copy's tensor-core kernels, which read it once
/// a 64 rows, were ~20 µs a layer faster than 8 blocks of rows each reading the weights again and merging their own
/// key shares (before `mla_out_w` requested its shares ahead of their weights).
pub(crate) fn default_quant_rows() -> usize {
    crate::mma::knob("PIPEMOE_KVB_QUANT_ROWS", QUANT_ROWS, 0..=256)
}

/// kv_b_proj for one attention call.
#[derive(Clone, Copy)]
pub(crate) enum Kvb<'a> {
    /// `[heads·(nope + v), kv_lora]` in the activation dtype.
    Dense(&'a Act),
    /// The tensor-core layout of `mma.rs`: `[heads·(nope + v)]` columns over K = kv_lora.
    Quant(&'a GpuGptq),
}

impl<'a> Kvb<'a> {
    /// The quantized weight when this call can read it (bf16, tensor-core packing, whole tiles per head part, a
    /// step of at most `quant_rows()` rows, not switched apart), else the dense copy (made now if need be).
    pub(crate) fn of(b: &CudaBackend, w: &'a GpuWeight, d: &MlaDims, rows: usize) -> MResult<Kvb<'a>> {
        if let GpuWeightKind::Gptq(g) = &w.kind
            && b.act == ActDtype::Bf16
            && g.packing == Packing::Mma
            && matches!(g.bits, 2..=4)
            && rows <= b.gpu.kvb_quant_rows()
            && !b.gpu.is_apart(Apart::DenseKvb)
            && d.qk_nope.is_multiple_of(32)
            && d.v_head.is_multiple_of(16)
            && d.kv_lora.is_multiple_of(CHUNK)
            && d.kv_lora <= MAX_LORA
            && g.group_size.is_multiple_of(CHUNK)
            && g.in_features == d.kv_lora
            && g.out_features == d.heads * (d.qk_nope + d.v_head)
        {
            return Ok(Kvb::Quant(g));
        }
        Ok(Kvb::Dense(b.dense_of(w)?))
    }
}

/// A quantized kernel for the weight's width, over (heads, blocks of `QUANT_ROWS` rows, `z`).
fn quant_cfg<'b>(
    b: &'b CudaBackend,
    name: &str,
    g: &GpuGptq,
    (heads, rows, z): (usize, usize, usize),
    warps: u32,
    smem: usize,
) -> MResult<(&'b CudaFunction, LaunchConfig)> {
    let f = b.f(&format!("{name}_w{}", g.bits))?;
    let grid = (heads as u32, rows.div_ceil(QUANT_ROWS) as u32, z as u32);
    Ok((f, smem_cfg(b, f, grid, 32 * warps, smem)?))
}

/// `q_lat [rows, heads, kv_lora]` (f32) of rows `row0..row0 + rows` of `q`, from the quantized W_UK.
pub(crate) fn absorb_q(
    b: &CudaBackend,
    g: &GpuGptq,
    q: &GpuTensor,
    d: &MlaDims,
    row0: usize,
    rows: usize,
    q_lat: &mut CudaSlice<f32>,
) -> MResult<()> {
    let Act::Bf16(qd) = &q.data else { return Err(shape("mla_absorb_q_w", "bf16 q".into())) };
    // A block a chunk of lora; static shared memory only.
    let (f, cfg) = quant_cfg(b, "mla_absorb_q", g, (d.heads, rows, d.kv_lora / CHUNK), WARPS, 0)?;
    let (n_out, gs) = (g.out_features as i32, g.group_size as i32);
    let (r0, n, heads) = (row0 as i32, rows as i32, d.heads as i32);
    let (nope, rope, v, lora) = (d.qk_nope as i32, d.qk_rope as i32, d.v_head as i32, d.kv_lora as i32);
    let mut l = b.gpu.stream.launch_builder(f);
    l.arg(qd).arg(&g.qweight);
    l.arg_or_null(g.zeros.as_ref());
    l.arg(&g.scales);
    l.arg_or_null(g.perm.as_ref());
    l.arg(&n_out).arg(&gs).arg(&r0).arg(&n).arg(&heads).arg(&nope).arg(&rope).arg(&v).arg(&lora).arg(q_lat);
    // SAFETY: matches mla_absorb_q_w*: `Kvb::of` checked the weight's shape against d (tensor-core words of
    // heads·(nope + v) columns over kv_lora rows, whole chunks and tiles), q holds row0 + rows rows (attention
    // checked), q_lat rows·heads·kv_lora floats (the caller's scratch).
    unsafe { l.launch(cfg) }.map_err(md("mla_absorb_q_w"))?;
    Ok(())
}

/// `out[row0 + r, h, i] = Σ_c W_UV[h, i, c] · o_lat[r, h, c]` with o_lat merged from the flash kernel's key
/// shares (`o_part`, `ml_part`), from the quantized W_UV.
#[allow(clippy::too_many_arguments)]
pub(crate) fn out(
    b: &CudaBackend,
    g: &GpuGptq,
    d: &MlaDims,
    (row0, rows, splits): (usize, usize, usize),
    o_part: &CudaSlice<f32>,
    ml_part: &CudaSlice<f32>,
    out: &mut Act,
) -> MResult<()> {
    let Act::Bf16(od) = out else { return Err(shape("mla_out_w", "bf16 output".into())) };
    // o_lat's parts [8][lora + 8] bf16, their sums [8][MAX_CHUNKS][2] f32, scales and zeros [chunks][v] (half2).
    let chunks = d.kv_lora / CHUNK;
    let smem = 2 * QUANT_ROWS * (d.kv_lora + 8) * 2 + 2 * QUANT_ROWS * MAX_CHUNKS * 2 * 4 + chunks * d.v_head * 4;
    let (f, cfg) = quant_cfg(b, "mla_out", g, (d.heads, rows, 1), OUT_WARPS, smem)?;
    let (n_out, gs, s) = (g.out_features as i32, g.group_size as i32, splits as i32);
    let (r0, n, heads) = (row0 as i32, rows as i32, d.heads as i32);
    let (nope, v, lora) = (d.qk_nope as i32, d.v_head as i32, d.kv_lora as i32);
    let mut l = b.gpu.stream.launch_builder(f);
    l.arg(o_part).arg(ml_part).arg(&s).arg(&g.qweight);
    l.arg_or_null(g.zeros.as_ref());
    l.arg(&g.scales);
    l.arg_or_null(g.perm.as_ref());
    l.arg(&n_out).arg(&gs).arg(&r0).arg(&n).arg(&heads).arg(&nope).arg(&v).arg(&lora).arg(od);
    // SAFETY: matches mla_out_w*: the weight's shape checked by `Kvb::of`; the partials come from the flash
    // kernel over the same chunk (rows·heads·splits entries, splits ≤ MLA_MAX_SPLITS), out holds every row.
    unsafe { l.launch(cfg) }.map_err(md("mla_out_w"))?;
    Ok(())
}
