//! GPTQ weights on the device and the decode-path GEMV over them (kernels/gptq_gemv.cu).
//!
//! At upload, a checkpoint's `g_idx` (act-order) is folded away: input rows are reordered so that groups are
//! contiguous (row r in group r / group_size), and the kernel gathers x through the same permutation.

use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};
use half::f16;
use pipemoe_quant::{GptqWeight, GroupSize, pack};

use crate::act::{ActDtype, ActView, ActViewMut};
use crate::backend::{CudaBackend, GpuTensor, GpuWeight, GpuWeightKind, MResult, m, md, shape};
use crate::error::{Error, Result, drv};
use crate::gpu::Gpu;
use crate::launch::ArgOrNull;

/// Rows of a batch the GEMV kernel handles at once (its register accumulators).
pub const MAX_BATCH: usize = 16;
pub(crate) const THREADS: u32 = 128;

/// The kernel instance for `batch` rows: the next power of two.
pub(crate) fn bucket(batch: usize) -> usize {
    batch.next_power_of_two().min(MAX_BATCH)
}

/// Whether every zero (after the checkpoint's convention) is 2^(bits−1): a symmetric quantization's one zero
/// point (AutoRound `sym: true` stores 2^(bits−1) − 1 under the v1 convention, MODEL_SPEC §4.3).
fn all_symmetric(zeros: &[i32], bits: u32) -> bool {
    !zeros.is_empty() && zeros.iter().all(|&z| z == 1 << (bits - 1))
}

/// How `qweight` is laid out on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Packing {
    /// As in the checkpoint (MODEL_SPEC §4), rows reordered by group: read by the scalar GEMV (any input dtype).
    Gptq,
    /// Repacked for tensor cores (`kernels/gptq_mma.cu`): bf16 inputs only.
    Mma,
}

pub struct GpuGptq {
    pub in_features: usize,
    pub out_features: usize,
    pub bits: u32,
    /// Rows per group after reordering (the whole input for `group_size: -1`).
    pub group_size: usize,
    /// `[in·bits/32, out]` in the checkpoint's packing, or the tensor-core layout of `mma.rs` (see `packing`).
    pub(crate) qweight: CudaSlice<u32>,
    pub packing: Packing,
    /// `[groups, out]`, after the checkpoint's zero convention; none when every zero is 2^(bits−1), as a symmetric
    /// checkpoint stores them (AutoRound's `sym: true`, MODEL_SPEC §4.3): every kernel then takes that constant
    /// (a null pointer says so) — 2 bytes of every 52 a column's group of 128 rows streams at 3 bits, and ~0.7 GB
    /// of a 3090's share of the 345B model left for the cache.
    pub(crate) zeros: Option<CudaSlice<f16>>,
    /// `[groups, out]`
    pub(crate) scales: CudaSlice<f16>,
    /// Source row of each reordered row, when the checkpoint had a non-trivial g_idx.
    pub(crate) perm: Option<CudaSlice<i32>>,
}

/// `y[r, c] = Σ_s partial[s, r, c]` for `rows × n` outputs, the splits added in order (`gptq_reduce_*`): the
/// split-K GEMV's and GEMM's last step.
pub(crate) fn reduce_splits(
    gpu: &Gpu,
    partial: &CudaSlice<f32>,
    splits: usize,
    rows: usize,
    n: usize,
    y: &mut ActViewMut<'_>,
) -> Result<()> {
    if partial.len() < splits * rows * n || y.len() < rows * n {
        return Err(Error::Shape { what: "gptq_reduce", reason: format!("{splits} splits of {rows}×{n}") });
    }
    let reduce = gpu.function(&format!("gptq_reduce_{}", y.dtype().suffix()))?;
    let total = (rows * n) as u32;
    let cfg = LaunchConfig { grid_dim: (total.div_ceil(256), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let (s, r, ni) = (splits as i32, rows as i32, n as i32);
    let mut launch = gpu.stream.launch_builder(reduce);
    launch.arg(partial).arg(y).arg(&s).arg(&r).arg(&ni);
    // SAFETY: matches gptq_reduce_*: partial holds splits·rows·n sums, y rows·n elements (checked above).
    unsafe { launch.launch(cfg) }.map_err(drv("launch gptq_reduce"))?;
    Ok(())
}

impl GpuGptq {
    /// Bytes the GEMV streams per call (packed weights, zeros unless symmetric, scales).
    pub fn bytes(&self) -> usize {
        let zeros = self.zeros.as_ref().map_or(0, CudaSlice::len);
        self.qweight.len() * 4 + (zeros + self.scales.len()) * 2
    }

    /// The weight in the checkpoint's packing (rows reordered by group).
    pub fn upload(gpu: &Gpu, w: &GptqWeight) -> Result<GpuGptq> {
        Self::upload_as(gpu, w, false)
    }

    /// The weight in the tensor-core layout where its shape allows (`mma::eligible`), else as `upload`.
    pub fn upload_for_tensor_cores(gpu: &Gpu, w: &GptqWeight) -> Result<GpuGptq> {
        Self::upload_as(gpu, w, true)
    }

    fn upload_as(gpu: &Gpu, w: &GptqWeight, tensor_cores: bool) -> Result<GpuGptq> {
        let l = *w.layout();
        let (k, n) = (l.in_features, l.out_features);
        let gs = match l.group_size {
            GroupSize::Rows(g) => g,
            GroupSize::All => k,
        };
        if gs % 32 != 0 {
            return Err(Error::Shape { what: "group size", reason: format!("{gs} is not a multiple of 32") });
        }
        let groups = l.n_groups();
        // Rows sorted by group (stable), when the checkpoint's g_idx is not already i / group_size.
        let mut order: Vec<usize> = (0..k).collect();
        order.sort_by_key(|&r| (w.group(r), r));
        let trivial = order.iter().enumerate().all(|(i, &r)| i == r);
        if order.iter().enumerate().any(|(i, &r)| w.group(r) != i / gs) {
            return Err(Error::Shape {
                what: "g_idx",
                reason: "groups of unequal size; the GPU kernel needs group_size rows per group".into(),
            });
        }
        let qweight = if trivial {
            w.qweight().to_vec()
        } else {
            let q = pack::unpack_qweight(w.qweight(), &l)?;
            let mut r = vec![0u8; q.len()];
            for (i, &src) in order.iter().enumerate() {
                r[i * n..(i + 1) * n].copy_from_slice(&q[src * n..(src + 1) * n]);
            }
            pack::pack_qweight(&r, &l)?
        };
        let mut stored = Vec::with_capacity(groups * n);
        for g in 0..groups {
            for c in 0..n {
                stored.push(w.zero(g, c));
            }
        }
        let zeros: Option<Vec<f16>> =
            (!all_symmetric(&stored, l.bits.get())).then(|| stored.iter().map(|&z| f16::from_f32(z as f32)).collect());
        let s = &gpu.stream;
        let perm = if trivial {
            None
        } else {
            let p: Vec<i32> = order.iter().map(|&r| r as i32).collect();
            Some(s.clone_htod(&p).map_err(drv("upload g_idx order"))?)
        };
        let packing =
            if tensor_cores && crate::mma::eligible(l.bits.get(), k, n, gs) { Packing::Mma } else { Packing::Gptq };
        let qweight = match packing {
            Packing::Mma => crate::mma::repack(&qweight, l.bits.get(), k, n),
            Packing::Gptq => qweight,
        };
        Ok(GpuGptq {
            in_features: k,
            out_features: n,
            bits: l.bits.get(),
            group_size: gs,
            packing,
            qweight: s.clone_htod(&qweight).map_err(drv("upload qweight"))?,
            zeros: zeros.map(|z| s.clone_htod(&z)).transpose().map_err(drv("upload zeros"))?,
            scales: s.clone_htod(w.scales()).map_err(drv("upload scales"))?,
            perm,
        })
    }

    /// Rows of K per split: a multiple of 32 that keeps groups whole inside a split (or splits whole inside a
    /// group), small enough for x to fit shared memory, with enough splits to give every SM two blocks.
    fn k_chunk(&self, gpu: &Gpu, batch: usize) -> usize {
        self.k_chunk_for(gpu, batch, self.out_features.div_ceil(THREADS as usize))
    }

    /// The same for a launch with `blocks_x` blocks besides the splits (the grouped experts' tiles count too).
    pub(crate) fn k_chunk_for(&self, gpu: &Gpu, batch: usize, blocks_x: usize) -> usize {
        let k = self.in_features;
        // x and the group sums of the padded batch share 48 KiB of shared memory.
        let limit = (40 * 1024 / 4 / bucket(batch)) / 32 * 32;
        // Enough blocks to keep every SM busy with loads in flight (the kernel is latency-bound otherwise).
        let splits = (16 * gpu.sm_count as usize).div_ceil(blocks_x).clamp(1, k / 32);
        let want = k.div_ceil(splits).div_ceil(32) * 32;
        let gs = self.group_size;
        if gs <= limit {
            (want.div_ceil(gs) * gs).clamp(gs, limit / gs * gs)
        } else {
            let mut c = 32;
            while c * 2 <= limit.min(want) && gs.is_multiple_of(c * 2) {
                c *= 2;
            }
            c
        }
    }

    /// `y[b, :] = W · x[b, :]` for `batch` ≤ 16 rows: `x` `[batch, in]` and `y` `[batch, out]` in f32 or bf16
    /// (each its own), sums in f32. `partial` is scratch of at least [`GpuGptq::scratch_len`] floats.
    pub fn gemv(
        &self,
        gpu: &Gpu,
        x: &ActView<'_>,
        batch: usize,
        partial: &mut CudaSlice<f32>,
        y: &mut ActViewMut<'_>,
    ) -> Result<()> {
        let (k, n) = (self.in_features, self.out_features);
        if batch == 0 || batch > MAX_BATCH || x.len() < batch * k || y.len() < batch * n {
            return Err(Error::Shape { what: "gemv", reason: format!("batch {batch}, x {} y {}", x.len(), y.len()) });
        }
        if self.packing == Packing::Mma {
            return crate::mma::gemv(self, gpu, x, batch, partial, y);
        }
        let (f, cfg, chunk) = self.scalar_launch(gpu, x.dtype(), batch)?;
        let splits = cfg.grid_dim.1 as usize;
        if partial.len() < splits * batch * n {
            return Err(Error::Shape {
                what: "gemv scratch",
                reason: format!("{} < {}", partial.len(), splits * batch * n),
            });
        }
        let (b, ki, ni, gs, ci) = (batch as i32, k as i32, n as i32, self.group_size as i32, chunk as i32);
        let mut launch = gpu.stream.launch_builder(f);
        launch.arg(x);
        launch.arg_or_null(self.perm.as_ref());
        launch.arg(&self.qweight);
        launch.arg_or_null(self.zeros.as_ref());
        launch.arg(&self.scales).arg(&mut *partial);
        launch.arg(&b).arg(&ki).arg(&ni).arg(&gs).arg(&ci);
        // SAFETY: argument order and types match gptq_gemv_w*_b*_* (null zeros: symmetric, which the kernel takes
        // as the constant); sizes were checked above.
        unsafe { launch.launch(cfg) }.map_err(drv("launch gptq_gemv"))?;
        reduce_splits(gpu, partial, splits, batch, n, y)
    }

    /// The scalar kernel's launch for `batch` rows of `xd` inputs: (kernel, configuration, rows of K per split).
    fn scalar_launch<'g>(
        &self,
        gpu: &'g Gpu,
        xd: ActDtype,
        batch: usize,
    ) -> Result<(&'g CudaFunction, LaunchConfig, usize)> {
        let (k, n) = (self.in_features, self.out_features);
        let chunk = self.k_chunk(gpu, batch);
        let mb = bucket(batch);
        let f = gpu.function(&format!("gptq_gemv_w{}_b{mb}_{}", self.bits, xd.suffix()))?;
        let groups_in_chunk = chunk.div_ceil(self.group_size.min(chunk));
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(THREADS as usize) as u32, k.div_ceil(chunk) as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: (mb * (chunk + groups_in_chunk) * 4) as u32,
        };
        Ok((f, cfg, chunk))
    }

    /// The whole matrix as f32 `[out, in]` in the checkpoint's row order (for attention's absorbed kv_b_proj).
    pub fn dequantize(&self, gpu: &Gpu) -> Result<CudaSlice<f32>> {
        let (k, n) = (self.in_features, self.out_features);
        let mut w = gpu.stream.alloc_zeros::<f32>(k * n).map_err(drv("alloc dequantized weight"))?;
        let f = match self.packing {
            Packing::Gptq => gpu.function(&format!("gptq_dequant_w{}_f32", self.bits))?,
            Packing::Mma => gpu.function(&format!("gptq_mma_dequant_w{}_f32", self.bits))?,
        };
        let total = (k * n) as u32;
        let cfg = LaunchConfig { grid_dim: (total.div_ceil(256), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let (ki, ni, gs) = (k as i32, n as i32, self.group_size as i32);
        let mut launch = gpu.stream.launch_builder(f);
        launch.arg(&self.qweight);
        launch.arg_or_null(self.zeros.as_ref());
        launch.arg(&self.scales);
        launch.arg_or_null(self.perm.as_ref());
        launch.arg(&mut w).arg(&ki).arg(&ni).arg(&gs);
        // SAFETY: argument order and types match gptq_dequant_w*_f32; `w` holds k·n floats.
        unsafe { launch.launch(cfg) }.map_err(drv("launch gptq_dequant"))?;
        Ok(w)
    }

    /// Device addresses of qweight, zeros, scales and the row order (0 when none — zeros too, for a symmetric
    /// weight): the grouped experts' tables.
    pub(crate) fn addresses(&self, gpu: &Gpu) -> [u64; 4] {
        use cudarc::driver::DevicePtr;
        let s = &gpu.stream;
        let perm = self.perm.as_ref().map_or(0, |p| p.device_ptr(s).0);
        let zeros = self.zeros.as_ref().map_or(0, |z| z.device_ptr(s).0);
        [self.qweight.device_ptr(s).0, zeros, self.scales.device_ptr(s).0, perm]
    }

    /// Whether every zero is 2^(bits−1) (none uploaded; the kernels take the constant).
    pub fn symmetric(&self) -> bool {
        self.zeros.is_none()
    }

    /// Shared memory bytes of a launch with `chunk` rows of K for `batch` rows.
    pub(crate) fn smem_bytes(&self, batch: usize, chunk: usize) -> u32 {
        let groups_in_chunk = chunk.div_ceil(self.group_size.min(chunk));
        (bucket(batch) * (chunk + groups_in_chunk) * 4) as u32
    }

    /// Scratch floats `gemv` needs for `batch` rows.
    pub fn scratch_len(&self, gpu: &Gpu, batch: usize) -> usize {
        if self.packing == Packing::Mma {
            return crate::mma::scratch_len(self, gpu, batch);
        }
        self.in_features.div_ceil(self.k_chunk(gpu, batch)) * batch * self.out_features
    }
}

/// `Backend::linear` on the device: a dense weight's GEMV; a quantized one's tensor-core GEMM for a bf16 prefill
/// (more than [`MAX_BATCH`] rows), else its GEMV in batches of [`MAX_BATCH`] rows.
pub(crate) fn linear(b: &CudaBackend, x: &GpuTensor, w: &GpuWeight) -> MResult<GpuTensor> {
    if x.cols != w.in_features {
        return Err(shape("linear", format!("input width {} for a weight of {} in-features", x.cols, w.in_features)));
    }
    let (rows, k, n) = (x.rows, w.in_features, w.out_features);
    let _p = b.gpu.span(|| {
        let kind = match &w.kind {
            GpuWeightKind::Dense(_) => "dense",
            GpuWeightKind::Gptq(_) if rows > MAX_BATCH && x.data.dtype() == ActDtype::Bf16 => "gemm",
            GpuWeightKind::Gptq(_) => "gemv",
        };
        format!("linear {kind} {k}->{n} x{rows}")
    });
    let mut y = b.output(rows, n)?;
    match &w.kind {
        GpuWeightKind::Dense(d) => {
            let (ri, ki, ni) = (rows as i32, k as i32, n as i32);
            let mut l = b.gpu.stream.launch_builder(b.op(dense_kernel(rows, k), &x.data)?);
            l.arg(&x.data).arg(d).arg(&mut y.data).arg(&ri).arg(&ki).arg(&ni);
            // SAFETY: matches dense_gemv_*; x [rows, k], d [n, k], y [rows, n] in the activation dtype.
            unsafe { l.launch(dense_grid(n, rows)) }.map_err(md("dense_gemv"))?;
        }
        // Prefill: the tensor-core GEMM for the weight's packing (checkpoint or Mma layout).
        GpuWeightKind::Gptq(g) if rows > MAX_BATCH && x.data.dtype() == ActDtype::Bf16 => {
            g.gemm(&b.gpu, &x.data.view(0, rows * k), rows, &mut y.data.view_mut(0, rows * n)).map_err(m)?;
        }
        GpuWeightKind::Gptq(g) => {
            // Scratch for the batch sizes this call runs (whole batches of 16, then the rest): the split
            // count depends on the batch (the tensor-core kernel's shared memory grows with it), so 16 and 1
            // do not bound, e.g., 12 rows.
            let sizes = [MAX_BATCH.min(rows), rows % MAX_BATCH];
            let need = sizes.iter().filter(|&&nb| nb > 0).map(|&nb| g.scratch_len(&b.gpu, nb)).max().unwrap_or(1);
            // SAFETY: each split of the GEMV writes its [batch, n] partial sums in full before the reduction.
            let mut partial = unsafe { b.gpu.stream.alloc::<f32>(need.max(1)) }.map_err(md("alloc"))?;
            for r0 in (0..rows).step_by(MAX_BATCH) {
                let nb = MAX_BATCH.min(rows - r0);
                let xv = x.data.view(r0 * k, nb * k);
                let mut yv = y.data.view_mut(r0 * n, nb * n);
                g.gemv(&b.gpu, &xv, nb, &mut partial, &mut yv).map_err(m)?;
            }
        }
    }
    Ok(y)
}

/// Input rows per block of `dense_gemv_*` (`DENSE_ROWS` in kernels/rows.cuh).
const DENSE_ROWS: usize = 16;
/// Rounds of 8 values a thread the dense kernels load together (`DENSE_BATCH` in kernels/rows.cuh).
const DENSE_BATCH: usize = 4;

/// The dense GEMV kernel for `rows` rows of `k` inputs, without its dtype suffix: `dense_rows` (kernels/rows.cuh
/// `dense_gemv_rows`: the weights loaded once, several rows' loads together) where a row is one batch of 16-byte
/// loads at 256 threads and there is more than one, else `dense_gemv`. Both launch on [`dense_grid`].
pub(crate) fn dense_kernel(rows: usize, k: usize) -> &'static str {
    if rows > 1 && k.is_multiple_of(8) && k <= DENSE_BATCH * 256 * 8 { "dense_rows" } else { "dense_gemv" }
}

/// `dense_gemv_*`: a block of 256 threads per output and [`DENSE_ROWS`] input rows.
pub(crate) fn dense_grid(out: usize, rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (out.max(1) as u32, rows.div_ceil(DENSE_ROWS).max(1) as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::all_symmetric;

    /// The launch's rows per block are the kernel's: more would leave rows of y unwritten.
    #[test]
    fn dense_rows_match_the_kernel() {
        let src = include_str!("../kernels/rows.cuh");
        assert!(src.contains(&format!("#define DENSE_ROWS {}\n", super::DENSE_ROWS)), "DENSE_ROWS differs");
        assert!(src.contains(&format!("#define DENSE_BATCH {}\n", super::DENSE_BATCH)), "DENSE_BATCH differs");
    }

    #[test]
    fn symmetric_means_every_zero_is_the_midpoint() {
        assert!(all_symmetric(&[4; 12], 3));
        assert!(all_symmetric(&[8, 8], 4));
        assert!(all_symmetric(&[2], 2));
        // One group's zero off the midpoint, another width's midpoint, nothing at all: the kernels read zeros.
        assert!(!all_symmetric(&[4, 4, 3, 4], 3));
        assert!(!all_symmetric(&[4; 3], 4));
        assert!(!all_symmetric(&[], 3));
    }
}
