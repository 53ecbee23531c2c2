//! A layer's input norm in its first projection (kernels/gptq_mma.cu `gptq_mma_gemv_addnorm_*`): the plain
//! tensor-core GEMV of ≤ 8 bf16 rows, its blocks RMS-norming the rows themselves — each sums the whole rows'
//! squares as `rms_norm`'s 512 threads do, then stages its split's chunks of the normed rows in shared memory — bit
//! for bit `rms_norm` (or `add_rms_norm`) then `linear`, with one launch and its gap fewer.
//!
//! The serving path (`Backend::rms_norm_linear` at one row, unless `Apart::InputNorm`:
//! [`crate::gpu::Gpu::input_norm`]) norms the residual alone: the MoE block's down launch added its output into the residual in its combine already
//! (`FUSE_COMBINE_ADD`, src/experts.rs), each column by its one owner. The add here (`h_out` a buffer of its own,
//! since every block reads all of `h`) is for tests and callers outside a recorded step. Design: docs/PERF.md
//! session 38's Next; measured in session 40.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use crate::act::ActDtype;
use crate::backend::{CudaBackend, GpuTensor, GpuWeight, GpuWeightKind, MResult, m, md};
use crate::gemv::Packing;
use crate::launch::ArgOrNull;
use crate::mma::{CHUNK, XS};

/// The widest row the kernel's sums take: `rms_norm_row`'s 512 threads, 2 pieces of 8 each.
const MAX_K: usize = 8192;

/// `linear(rms_norm(h), w)` — with `add`, `linear(add_rms_norm(h, add), w)` and h + add — as one launch, where it
/// applies: a tensor-core packed weight without a row order, 1 to 8 bf16 rows, K a multiple of
/// 128 up to [`MAX_K`], no wide launch for the weight (its sums run in another order), and the rows' share of x
/// within the block's shared budget beside a ring of 2 ([`crate::mma::staged_x_shape`]). `None`: not taken,
/// nothing written.
pub(crate) fn norm_linear(
    b: &CudaBackend,
    h: &GpuTensor,
    add: Option<&GpuTensor>,
    (norm, eps): (&CudaSlice<f32>, f32),
    w: &GpuWeight,
) -> MResult<Option<(GpuTensor, Option<GpuTensor>)>> {
    let GpuWeightKind::Gptq(g) = &w.kind else { return Ok(None) };
    let (rows, k, n) = (h.rows, g.in_features, g.out_features);
    let bf16 = ActDtype::Bf16;
    let fits = g.packing == Packing::Mma
        && g.perm.is_none()
        && b.act == bf16
        && h.data.dtype() == bf16
        && (1..=8).contains(&rows)
        && h.cols == k
        && add.is_none_or(|a| (a.rows, a.cols) == (rows, k) && a.data.dtype() == bf16)
        && k.is_multiple_of(CHUNK)
        && k <= MAX_K
        && norm.len() >= k
        && crate::wide::plan(g, &b.gpu, rows, bf16, bf16).is_none();
    if !fits {
        return Ok(None);
    }
    let (bx, plain) = crate::mma::plain_shape(g, &b.gpu, rows);
    // The x after the ring: the block's split's chunks of every row ([chunks][rows][XS] bf16).
    let x_bytes = plain.chunk.min(k) / CHUNK * rows * XS * 2;
    let Some(s) = crate::mma::staged_x_shape(g, plain, rows, x_bytes) else { return Ok(None) };
    if s.splits > 1 && bx > b.gpu.counters.len() {
        return Ok(None);
    }
    let what = if add.is_some() { "add+rms_norm" } else { "rms_norm" };
    let _p = b.gpu.span(|| format!("linear gemv+{what} {k}->{n} x{rows}"));
    let mut y = b.output(rows, n)?;
    let mut h_out = add.map(|_| b.output(rows, k)).transpose()?;
    // SAFETY: each split writes its [rows, n] partial sums in full before the last block adds them.
    let mut partial = unsafe { b.gpu.stream.alloc::<f32>(if s.splits > 1 { s.splits * rows * n } else { 1 }) }
        .map_err(md("alloc"))?;
    let f = b.gpu.function(&format!("gptq_mma_gemv_addnorm_w{}_b8{}_bf16", g.bits, crate::mma::variant(g)));
    let f = f.map_err(m)?;
    b.gpu.allow_smem(f, s.smem as usize).map_err(m)?;
    let dims = [rows, k, n, g.group_size, s.chunk, s.stages].map(|v| v as i32);
    let null = 0u64;
    let mut l = b.gpu.stream.launch_builder(f);
    l.arg(&h.data);
    match add {
        Some(a) => l.arg(&a.data),
        None => l.arg(&null),
    };
    l.arg(norm).arg(&eps);
    match &mut h_out {
        Some(o) => l.arg(&mut o.data),
        None => l.arg(&null),
    };
    l.arg(&g.qweight);
    l.arg_or_null(g.zeros.as_ref());
    l.arg(&g.scales).arg(&mut partial).arg(&mut y.data).arg(&b.gpu.counters);
    for d in &dims {
        l.arg(d);
    }
    let cfg = LaunchConfig {
        grid_dim: (bx as u32, s.splits as u32, 1),
        block_dim: (crate::mma::THREADS, 1, 1),
        shared_mem_bytes: s.smem,
    };
    // SAFETY: matches gptq_mma_gemv_addnorm_w*_b8[_sym]_bf16: h (and add, h_out when given) [rows, k] bf16 with
    // 16-byte aligned rows (k a multiple of 128), norm ≥ k floats, y [rows, n]; zeros null only for a symmetric
    // weight (the `_sym` kernels, which read none); partial holds splits·rows·n floats and the counters cover the
    // column ranges of a split launch (checked above); null add and h_out: the norm of h alone, nothing stored.
    unsafe { l.launch(cfg) }.map_err(md("launch gptq_mma_gemv_addnorm"))?;
    Ok(Some((y, h_out)))
}

impl CudaBackend {
    /// `linear(rms_norm(x), w)` in one launch where [`norm_linear`] applies (`None` elsewhere): what the serving
    /// path's `rms_norm_linear` takes at one row; for tests.
    pub fn rms_norm_linear_fused(
        &self,
        x: &GpuTensor,
        norm: (&CudaSlice<f32>, f32),
        w: &GpuWeight,
    ) -> MResult<Option<GpuTensor>> {
        Ok(norm_linear(self, x, None, norm, w)?.map(|(y, _)| y))
    }

    /// `linear(add_rms_norm(h, add), w)` in one launch where [`norm_linear`] applies (`None` elsewhere, `h` as it
    /// was); for tests.
    pub fn add_rms_norm_linear_fused(
        &self,
        h: &mut GpuTensor,
        add: &GpuTensor,
        norm: (&CudaSlice<f32>, f32),
        w: &GpuWeight,
    ) -> MResult<Option<GpuTensor>> {
        let Some((y, Some(h_out))) = norm_linear(self, h, Some(add), norm, w)? else { return Ok(None) };
        *h = h_out;
        Ok(Some(y))
    }
}
