//! EXPERIMENT (docs/PERF.md session 37): the one-row GEMV as one 16-warp block per 64 output columns over the whole
//! of K, its warps taking chunks from a shared counter and the block adding the chunks' sums in chunk order
//! (kernels/gemv_wide.cu). Timed against the split-K kernel by `device --ignored bench_gemv_wide`; not on the
//! serving path.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use crate::act::{ActDtype, ActView, ActViewMut};
use crate::error::{Error, Result, drv};
use crate::gemv::{GpuGptq, Packing};
use crate::gpu::Gpu;

const WARPS: usize = 16;

impl GpuGptq {
    /// `y = W·x` for one bf16 row through `gptq_mma_gemv_wide_w3_r1_sym_bf16`, with a ring of `stages` chunks a
    /// warp: a 3-bit symmetric weight in the tensor-core layout without a row order, groups of 128 rows.
    pub fn gemv_wide(&self, gpu: &Gpu, x: &ActView<'_>, y: &mut ActViewMut<'_>, stages: usize) -> Result<()> {
        let (k, n) = (self.in_features, self.out_features);
        let fits = self.packing == Packing::Mma
            && self.bits == 3
            && self.zeros.is_none()
            && self.perm.is_none()
            && self.group_size == 128
            && (2..=8).contains(&stages);
        if !fits || x.dtype() != ActDtype::Bf16 || y.dtype() != ActDtype::Bf16 || x.len() < k || y.len() < n {
            return Err(Error::Shape { what: "gemv_wide", reason: format!("{k}x{n}, stages {stages}") });
        }
        // A warp's ring slot (mma_gemv.cuh slot_bytes, 4 tiles, one row), then the chunks' sums [K / 128][64].
        let slot = 4 * 3 * 32 * 8 + 2 * 4 * 16 * 2 + 136 * 2;
        let smem = WARPS * stages * slot + k / 128 * 64 * 4;
        let f = gpu.function("gptq_mma_gemv_wide_w3_r1_sym_bf16")?;
        gpu.allow_smem(f, smem)?;
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(64) as u32, 1, 1),
            block_dim: (32 * WARPS as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let (ki, ni, gs, st) = (k as i32, n as i32, self.group_size as i32, stages as i32);
        let mut l = gpu.stream.launch_builder(f);
        l.arg(x).arg(&self.qweight).arg(&self.scales).arg(y);
        l.arg(&ki).arg(&ni).arg(&gs).arg(&st);
        // SAFETY: matches gemv_wide.cu's entry: the weight's repacked words, its scales [K / g, N] (checked above:
        // no zeros, no row order), x and y of at least K and N bf16, the shared bytes as the kernel lays them out.
        unsafe { l.launch(cfg) }.map_err(drv("launch gptq_mma_gemv_wide"))?;
        Ok(())
    }
}
