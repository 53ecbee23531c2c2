//! The one-row GEMV as one wide block per 64 output columns over the whole of K (kernels/gemv_wide.cu): where a
//! launch is about one block an SM, its warps take chunks from a counter in shared memory and the block adds the
//! chunks' sums in chunk order — no split of K across blocks, so no partial sums in global memory and no last block
//! adding them, and no co-resident blocks of one launch ending one after another. [`plan`] says when it applies;
//! [`crate::mma::gemv`] then takes it. H200 (docs/PERF.md session 37): o_proj 16384×7168 at one row 22.1 → 20.1 µs,
//! an expert's down 2048×7168 7.5 → 6.4 µs (`device --ignored bench_gemv_wide`).
//! `PIPEMOE_GEMV_WIDE=0` keeps the split-K kernels everywhere (the A/B's knob).

use cudarc::driver::{LaunchConfig, PushKernelArg};

use crate::act::{ActDtype, ActView, ActViewMut};
use crate::error::{Error, Result, drv};
use crate::gemv::{GpuGptq, Packing};
use crate::gpu::Gpu;

/// Chunks a warp's ring holds: 2 was faster than 3 on the H200 (o_proj 20.1 against 21.6 µs).
const STAGES: usize = 2;
/// The kernel's own shared memory beside the dynamic part (its slot table and counter), with room to spare.
const STATIC_SMEM: usize = 1024;

/// A wide launch: warps a block and dynamic shared bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    pub warps: usize,
    pub smem: usize,
}

/// The wide kernel's launch for `w` at `batch` rows into `y`, when it applies ([`applies`]) and the knob leaves it
/// on: 16 warps a block where their rings and the chunks' sums fit an SM's shared memory, else 8 (a 3090's 100
/// KiB), else none.
pub(crate) fn plan(w: &GpuGptq, gpu: &Gpu, batch: usize, x: ActDtype, y: ActDtype) -> Option<Plan> {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let on = *ON.get_or_init(|| crate::mma::knob("PIPEMOE_GEMV_WIDE", 1, 0..=1) == 1);
    if !on || !applies(w, gpu, batch, x, y) {
        return None;
    }
    let room = gpu.smem_per_sm.saturating_sub(2 * STATIC_SMEM);
    [16, 8].into_iter().map(|warps| Plan { warps, smem: smem(w, warps) }).find(|p| p.smem <= room)
}

/// Whether the wide kernel computes this launch: one bf16 row into bf16, a symmetric 2-, 3- or 4-bit weight in
/// the tensor-core layout without a row order, groups of 128 rows; and between ¾ of the SMs and all of them in
/// blocks (one block an SM: more would run in waves, fewer leave SMs idle).
fn applies(w: &GpuGptq, gpu: &Gpu, batch: usize, x: ActDtype, y: ActDtype) -> bool {
    let (blocks, sms) = (w.out_features.div_ceil(64), gpu.sm_count as usize);
    batch == 1
        && x == ActDtype::Bf16
        && y == ActDtype::Bf16
        && w.packing == Packing::Mma
        && (2..=4).contains(&w.bits)
        && w.zeros.is_none()
        && w.perm.is_none()
        && w.group_size == 128
        && w.in_features.is_multiple_of(128)
        && w.out_features.is_multiple_of(16)
        && blocks <= sms
        && 4 * blocks >= 3 * sms
}

/// Dynamic shared bytes of a block of `warps`: each warp's ring of [`STAGES`] one-row slots (the split-K kernel's:
/// 4 tiles of weight words, their scales and zeros, one x row), then the chunks' sums, 64 floats a chunk of K.
fn smem(w: &GpuGptq, warps: usize) -> usize {
    warps * STAGES * crate::mma::slot_bytes(w.bits, 1, false) + w.in_features / 128 * 64 * 4
}

/// `y = W·x` for one row by the wide kernel, as [`plan`] laid it out.
pub(crate) fn launch(w: &GpuGptq, gpu: &Gpu, x: &ActView<'_>, y: &mut ActViewMut<'_>, p: Plan) -> Result<()> {
    let (k, n) = (w.in_features, w.out_features);
    if x.len() < k || y.len() < n {
        return Err(Error::Shape { what: "gemv_wide", reason: format!("{k}x{n}: x {} y {}", x.len(), y.len()) });
    }
    let f = gpu.function(&format!("gptq_mma_gemv_wide{}_w{}_sym_bf16", p.warps, w.bits))?;
    gpu.allow_smem(f, p.smem)?;
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(64) as u32, 1, 1),
        block_dim: (32 * p.warps as u32, 1, 1),
        shared_mem_bytes: p.smem as u32,
    };
    let (ki, ni, st) = (k as i32, n as i32, STAGES as i32);
    let mut l = gpu.stream.launch_builder(f);
    l.arg(x).arg(&w.qweight).arg(&w.scales).arg(y);
    l.arg(&ki).arg(&ni).arg(&st);
    // SAFETY: matches gemv_wide.cu's entries: the weight's repacked words and its scales [K / 128, N] (plan checked:
    // no zeros, no row order, groups of 128 rows), x and y of at least K and N bf16 (checked above), the shared
    // bytes as the kernel lays them out for this many warps and stages.
    unsafe { l.launch(cfg) }.map_err(drv("launch gptq_mma_gemv_wide"))?;
    Ok(())
}

impl GpuGptq {
    /// The wide kernel's `y = W·x` for one row with `warps` (8 or 16) a block, whatever the knob (a benchmark's
    /// comparison); an error where it does not apply to the weight.
    pub fn gemv_wide(&self, gpu: &Gpu, x: &ActView<'_>, y: &mut ActViewMut<'_>, warps: usize) -> Result<()> {
        if !(warps == 8 || warps == 16) || !applies(self, gpu, 1, x.dtype(), y.dtype()) {
            return Err(Error::Shape { what: "gemv_wide", reason: "the wide kernel does not apply".into() });
        }
        launch(self, gpu, x, y, Plan { warps, smem: smem(self, warps) })
    }
}
