//! The backend's row-wise ops (kernels/ops.cu): the norms, RoPE and the column split. One block of 512 threads per
//! row (the norms' block sums depend on it: `mla_prep`, src/prep.rs, gives what the ops apart give only at the same
//! width).

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use pipemoe_model::backend::{Backend, RopeSpec, Row};

use crate::backend::{CudaBackend, GpuTensor, MResult, m, md, same_layout, shape};
use crate::launch::{ArgOrNull, grid, rows_cfg};

pub(crate) fn rms_norm(b: &CudaBackend, x: &GpuTensor, w: &CudaSlice<f32>, eps: f32) -> MResult<GpuTensor> {
    let _p = b.gpu.span(|| format!("rms_norm {}", x.cols));
    let mut y = b.output(x.rows, x.cols)?;
    let c = x.cols as i32;
    let mut l = b.gpu.stream.launch_builder(b.op("rms_norm", &x.data)?);
    l.arg(&x.data).arg(w).arg(&mut y.data).arg(&c).arg(&eps);
    // SAFETY: matches rms_norm_*; one block per row of `cols` values.
    unsafe { l.launch(rows_cfg(x.rows)) }.map_err(md("rms_norm"))?;
    Ok(y)
}

pub(crate) fn add_rms_norm(
    b: &CudaBackend,
    x: &mut GpuTensor,
    y: &GpuTensor,
    w: &CudaSlice<f32>,
    eps: f32,
) -> MResult<GpuTensor> {
    let _p = b.gpu.span(|| format!("add+rms_norm {}", x.cols));
    same_layout("add_rms_norm", x, y)?;
    if (x.rows, x.cols) != (y.rows, y.cols) {
        return Err(shape("add_rms_norm", format!("[{}, {}] += [{}, {}]", x.rows, x.cols, y.rows, y.cols)));
    }
    let mut out = b.output(x.rows, x.cols)?;
    let c = x.cols as i32;
    let mut l = b.gpu.stream.launch_builder(b.op("add_rms_norm", &x.data)?);
    l.arg(&mut x.data).arg(&y.data).arg(w).arg(&mut out.data).arg(&c).arg(&eps);
    // SAFETY: matches add_rms_norm_*; x, y and out hold rows·cols values of one dtype, one block per row.
    unsafe { l.launch(rows_cfg(x.rows)) }.map_err(md("add_rms_norm"))?;
    Ok(out)
}

pub(crate) fn layer_norm(
    b: &CudaBackend,
    x: &GpuTensor,
    w: &CudaSlice<f32>,
    bias: &CudaSlice<f32>,
    eps: f32,
) -> MResult<GpuTensor> {
    let _p = b.gpu.span(|| format!("layer_norm {}", x.cols));
    let mut y = b.output(x.rows, x.cols)?;
    let c = x.cols as i32;
    let mut l = b.gpu.stream.launch_builder(b.op("layer_norm", &x.data)?);
    l.arg(&x.data).arg(w).arg(bias).arg(&mut y.data).arg(&c).arg(&eps);
    // SAFETY: matches layer_norm_*; one block per row.
    unsafe { l.launch(rows_cfg(x.rows)) }.map_err(md("layer_norm"))?;
    Ok(y)
}

pub(crate) fn rope(b: &CudaBackend, x: &mut GpuTensor, spec: RopeSpec, inv_freq: &[f32], rows: &[Row]) -> MResult<()> {
    let _p = b.gpu.span(|| format!("rope {}x{}", spec.heads, spec.head_dim));
    let half = inv_freq.len();
    if x.cols != spec.heads * spec.head_dim || spec.offset + 2 * half > spec.head_dim || rows.len() != x.rows {
        return Err(shape("rope", format!("{spec:?} for [{}, {}]", x.rows, x.cols)));
    }
    let positions = crate::graph::positions(b, rows)?;
    let pos = positions.view();
    let freq = b.gpu.uploaded_f32(inv_freq).map_err(m)?;
    let (r, h, d, o, hf, il) = (
        x.rows as i32,
        spec.heads as i32,
        spec.head_dim as i32,
        spec.offset as i32,
        half as i32,
        i32::from(spec.interleaved),
    );
    let mut l = b.gpu.stream.launch_builder(b.op("rope", &x.data)?);
    l.arg(&mut x.data).arg(&pos).arg(freq.as_ref()).arg(&r).arg(&h).arg(&d).arg(&o).arg(&hf).arg(&il);
    // SAFETY: matches rope_*; shapes checked above.
    unsafe { l.launch(crate::launch::grid(x.rows * spec.heads * half, 256)) }.map_err(md("rope"))?;
    Ok(())
}

/// `Backend::rope_columns` in one launch (`rope_cols_*`): columns `start..` of `x` roped into a new tensor.
/// Columns `start..` of `x` hold `spec`'s heads, each with room for `half` rotated pairs, one row per `rows`.
fn rope_part(
    what: &'static str,
    x: &GpuTensor,
    start: usize,
    spec: RopeSpec,
    half: usize,
    rows: &[Row],
) -> MResult<()> {
    if start + spec.heads * spec.head_dim > x.cols || spec.offset + 2 * half > spec.head_dim || rows.len() != x.rows {
        return Err(shape(what, format!("{spec:?} from column {start} of [{}, {}]", x.rows, x.cols)));
    }
    Ok(())
}

pub(crate) fn rope_columns(
    b: &CudaBackend,
    x: &GpuTensor,
    start: usize,
    spec: RopeSpec,
    inv_freq: &[f32],
    rows: &[Row],
) -> MResult<GpuTensor> {
    let _p = b.gpu.span(|| format!("rope columns {}x{}", spec.heads, spec.head_dim));
    let (half, width) = (inv_freq.len(), spec.heads * spec.head_dim);
    rope_part("rope_columns", x, start, spec, half, rows)?;
    let mut y = b.output(x.rows, width)?;
    let positions = crate::graph::positions(b, rows)?;
    let pos = positions.view();
    let freq = b.gpu.uploaded_f32(inv_freq).map_err(m)?;
    let (cols, st, r, h, d) = (x.cols as i32, start as i32, x.rows as i32, spec.heads as i32, spec.head_dim as i32);
    let (o, hf, il) = (spec.offset as i32, half as i32, i32::from(spec.interleaved));
    // By 8-value pieces when every piece lines up (the checkpoints' shapes: 192- and 128-wide heads, 64 roped
    // columns, parts starting on a multiple of 8) and the step has 8 rows or more; value by value otherwise. (H200,
    // session 12: at one decode row a thread a value took 4.5 + 4.3 us for q and the index query, the pieces 5.4
    // + 5.2 — the row's angles wait for a barrier before any load — at 32 rows 8.9 + 5.8 against 6.3 + 5.5, and
    // a 512-row prefill chunk 72 + 26 against 21 + 15.)
    let rotated_pieces = if spec.interleaved { half % 4 == 0 } else { half % 8 == 0 };
    let aligned = [start, x.cols, spec.head_dim, spec.offset].iter().all(|v| v % 8 == 0);
    let by8 = aligned && rotated_pieces && half <= 128 && x.rows >= 8;
    if by8 {
        let mut l = b.gpu.stream.launch_builder(b.op("rope_cols8", &x.data)?);
        l.arg(&x.data).arg(&cols).arg(&st).arg(&mut y.data).arg(&pos).arg(freq.as_ref()).arg(&h).arg(&d);
        // Heads a block: up to 16 (a prefill chunk: thousands of blocks, the row's angles shared by 16 heads), as
        // few as one at a decode step's rows (a single row's 128 heads were 8 blocks: slower than a thread a value).
        let hpb = (x.rows * spec.heads / 512).clamp(1, 16);
        let hpb_arg = hpb as i32;
        l.arg(&o).arg(&hf).arg(&il).arg(&hpb_arg);
        let blocks = (x.rows as u32, spec.heads.div_ceil(hpb) as u32, 1);
        let cfg = LaunchConfig { grid_dim: blocks, block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: matches rope_cols8_*: as below, plus every piece 16-byte aligned (checked above; activations
        // are allocated whole) and half ≤ 128, the kernel's table.
        unsafe { l.launch(cfg) }.map_err(md("rope_cols8"))?;
        return Ok(y);
    }
    let mut l = b.gpu.stream.launch_builder(b.op("rope_cols", &x.data)?);
    l.arg(&x.data).arg(&cols).arg(&st).arg(&mut y.data).arg(&pos).arg(freq.as_ref()).arg(&r).arg(&h).arg(&d);
    l.arg(&o).arg(&hf).arg(&il);
    // SAFETY: matches rope_cols_*: x holds rows·cols values and start + width ≤ cols, y rows·width; shapes checked.
    unsafe { l.launch(crate::launch::grid(x.rows * spec.heads * (spec.head_dim - half), 256)) }
        .map_err(md("rope_cols"))?;
    Ok(y)
}

/// `Backend::rope_columns2`: at a decode step's few rows one `rope_cols2` launch (each part's own launch took about
/// as long as its work: H200, session 12, 4.5 and 4.3 us for q and the index query at one row); from 8 rows each
/// part its own, by pieces (`rope_columns`).
pub(crate) fn rope_columns2(
    b: &CudaBackend,
    x: &GpuTensor,
    (s1, p1): (usize, RopeSpec),
    (s2, p2): (usize, RopeSpec),
    inv_freq: &[f32],
    rows: &[Row],
) -> MResult<(GpuTensor, GpuTensor)> {
    if x.rows >= 8 {
        return Ok((rope_columns(b, x, s1, p1, inv_freq, rows)?, rope_columns(b, x, s2, p2, inv_freq, rows)?));
    }
    let _p = b.gpu.span(|| format!("rope columns {}x{} + {}x{}", p1.heads, p1.head_dim, p2.heads, p2.head_dim));
    let half = inv_freq.len();
    rope_part("rope_columns2", x, s1, p1, half, rows)?;
    rope_part("rope_columns2", x, s2, p2, half, rows)?;
    let mut y1 = b.output(x.rows, p1.heads * p1.head_dim)?;
    let mut y2 = b.output(x.rows, p2.heads * p2.head_dim)?;
    let positions = crate::graph::positions(b, rows)?;
    let pos = positions.view();
    let freq = b.gpu.uploaded_f32(inv_freq).map_err(m)?;
    let (cols, r, hf) = (x.cols as i32, x.rows as i32, half as i32);
    let part = |s: usize, p: RopeSpec| [s, p.heads, p.head_dim, p.offset, usize::from(p.interleaved)].map(|v| v as i32);
    let (a, c) = (part(s1, p1), part(s2, p2));
    let mut l = b.gpu.stream.launch_builder(b.op("rope_cols2", &x.data)?);
    l.arg(&x.data).arg(&cols).arg(&pos).arg(freq.as_ref()).arg(&r).arg(&hf);
    l.arg(&a[0]).arg(&mut y1.data).arg(&a[1]).arg(&a[2]).arg(&a[3]).arg(&a[4]);
    l.arg(&c[0]).arg(&mut y2.data).arg(&c[1]).arg(&c[2]).arg(&c[3]).arg(&c[4]);
    let units = x.rows * (p1.heads * (p1.head_dim - half) + p2.heads * (p2.head_dim - half));
    // SAFETY: matches rope_cols2_*: x holds rows·cols values and each part's start + width ≤ cols (checked), y1 and
    // y2 rows·width each; one thread per unit of the two parts.
    unsafe { l.launch(crate::launch::grid(units, 256)) }.map_err(md("rope_cols2"))?;
    Ok((y1, y2))
}

/// `Backend::split_columns`: up to four outputs a launch (`split_cols_*`), more in runs of four.
pub(crate) fn split_columns(b: &CudaBackend, x: &GpuTensor, widths: &[usize]) -> MResult<Vec<GpuTensor>> {
    let _p = b.gpu.span(|| format!("split {widths:?}"));
    if widths.iter().sum::<usize>() != x.cols || widths.contains(&0) {
        return Err(shape("split_columns", format!("{widths:?} of {}", x.cols)));
    }
    if widths.len() > 4 {
        let (head, tail) = widths.split_at(4);
        let first: usize = head.iter().sum();
        let mut out = split_columns(b, &b.columns(x, 0, first)?, head)?;
        out.extend(split_columns(b, &b.columns(x, first, x.cols - first)?, tail)?);
        return Ok(out);
    }
    let mut outs = widths.iter().map(|&w| b.output(x.rows, w)).collect::<MResult<Vec<_>>>()?;
    let ws: Vec<i32> = (0..4).map(|i| widths.get(i).map_or(0, |&w| w as i32)).collect();
    let (c, r) = (x.cols as i32, x.rows as i32);
    let mut l = b.gpu.stream.launch_builder(b.op("split_cols", &x.data)?);
    l.arg(&x.data).arg(&c).arg(&r);
    let mut it = outs.iter_mut();
    for w in &ws {
        l.arg_or_null(it.next().map(|o| &mut o.data));
        l.arg(w);
    }
    // SAFETY: matches split_cols_*; output i holds rows·widths[i] values, the widths sum to x's columns, and
    // the kernel never selects an absent output (width 0).
    unsafe { l.launch(grid(x.rows * x.cols, 256)) }.map_err(md("split_cols"))?;
    Ok(outs)
}
