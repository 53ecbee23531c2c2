//! The prefill GEMM over GPTQ weights (kernels/gptq_gemm.cu): `y[M, N] = x[M, K] · Wᵀ` on tensor cores
//! (mma.sync m16n8k16, bf16 in, f32 accumulate; sm_80+) for steps with more rows than the GEMV's 16.
//!
//! Two kernels, by the weight's [`Packing`]: over the checkpoint packing a block dequantizes each 32-row slice of
//! its 128 columns of W to bf16 in shared memory once and multiplies it with a 64- or 128-row tile of x; over the
//! tensor-core (Mma) layout each warp turns its lanes' words straight into mma B fragments in registers, exact
//! (q − z as bf16, the scale applied per 128-row chunk in f32). Act-order checkpoints (a `perm`) gather x's
//! columns into scratch first, since both kernels copy x in 16-byte runs of a row.

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
use half::bf16;

use crate::act::{ActView, ActViewMut};
use crate::error::{Error, Result, drv};
use crate::gemv::{GpuGptq, Packing};
use crate::gpu::Gpu;
use crate::launch::ArgOrNull;

/// Columns per block, rows of K per pipeline step, steps in flight, bf16 per shared row, threads per block:
/// the kernel's `GEMM_*` constants.
const BN: usize = 128;
const BK: usize = 32;
const STAGES: usize = 4;
const LD: usize = BK + 8;
const THREADS: u32 = 256;

/// Rows of x (and y) per block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmTile {
    /// 32 rows, the tensor-core layout only: decode batches of 17..32 rows (32 streams), whose 64-row tile spends
    /// half its tensor-core work and x fragment loads on padding.
    M32,
    /// 64 rows: twice the blocks, for shapes whose 128-row grid would leave SMs idle.
    M64,
    /// 128 rows: each dequantized slice of W serves twice the rows.
    M128,
}

impl GemmTile {
    pub fn rows(self) -> usize {
        match self {
            GemmTile::M32 => 32,
            GemmTile::M64 => 64,
            GemmTile::M128 => 128,
        }
    }
}

/// Splits of K for a tensor-core GEMM of `blocks` blocks over `chunks` 128-row chunks, `resident` of its blocks
/// fitting on the device at once: (splits, rows per split). A grid smaller than the device — a prefill expert's ~32
/// rows give gate/up 16 blocks on the H200's 132 SMs, each streaming all 7,168 rows of K — is split along K. Each
/// split keeps at least two chunks (its ring's prologue and a full step). The count is the fewest whose waves
/// (blocks·splits over `resident`, rounded up) times a block's run (its chunks and `BLOCK_FIXED`) come within a
/// tenth of the least: a last wave of a few blocks costs a whole block's run (o_proj at 32 rows: 5 splits made 280
/// blocks for the H200's 264 places, 1.06 waves and 82 µs; 4 fit one wave), and each split adds partial sums to
/// write and add.
fn k_splits(chunks: usize, blocks: usize, resident: usize) -> (usize, usize) {
    /// A block's ring fill and store, in chunks of its run (about two: the fill waits a memory round trip).
    const BLOCK_FIXED: usize = 2;
    let (blocks, resident) = (blocks.max(1), resident.max(1));
    let cost = |s: usize| {
        let per = chunks.div_ceil(s);
        let s = chunks.div_ceil(per);
        ((blocks * s).div_ceil(resident) * (per + BLOCK_FIXED), s)
    };
    let counts = || (1..=(chunks / 2).max(1)).map(cost);
    let least = counts().map(|c| c.0).min().unwrap_or(1);
    let splits = counts().find(|c| c.0 * 10 <= least * 11).map_or(1, |c| c.1);
    let per = chunks.div_ceil(splits);
    (chunks.div_ceil(per), per * crate::mma::CHUNK)
}

/// Dynamic shared memory of one block (the kernel's `GemmSmem<BITS, BM>::TOTAL`; it traps if given less).
fn smem_bytes(bits: usize, rows: usize) -> usize {
    let stage = rows * LD * 2 + bits * BN * 4 + 2 * BN * 2;
    STAGES * stage + 2 * BN * LD * 2
}

/// The Mma-layout kernel's `MG_*` constants: rows of K per pipeline step (half a 128-row chunk: one block of
/// `bits` words per lane), steps in flight, bf16 per shared row of x. Columns and threads as above.
const MG_BK: usize = 64;
const MG_STAGES: usize = 4;
const MG_LD: usize = MG_BK + 8;

/// Its dynamic shared memory (`MgSmem<BITS, BM>::TOTAL`): per stage x, the half chunk's words of 8 tiles
/// (`bits` words per lane in one uint2 row for 2 bits, two otherwise) and the chunk's scales and zeros.
pub(crate) fn mma_smem_bytes(bits: usize, rows: usize) -> usize {
    let uint2_rows = if bits == 2 { 1 } else { 2 };
    MG_STAGES * (rows * MG_LD * 2 + (BN / 16) * uint2_rows * 256 + 2 * BN * 2)
}

fn shape(reason: String) -> Error {
    Error::Shape { what: "gemm", reason }
}

impl GpuGptq {
    /// `y[r, :] = W · x[r, :]` for `m` rows: `x` bf16 `[m, in]` → `y` `[m, out]` in bf16 or f32, on tensor
    /// cores with the tile height [`GpuGptq::gemm_tile`] picks, by the kernel for the weight's packing.
    pub fn gemm(&self, gpu: &Gpu, x: &ActView<'_>, m: usize, y: &mut ActViewMut<'_>) -> Result<()> {
        self.gemm_tiled(gpu, x, m, y, self.gemm_tile(gpu, m))
    }

    /// The tile height for `m` rows: 32 for at most 32 rows of the Mma layout (the decode batches past the
    /// GEMV's 16); otherwise 64 where the device holds twice as many 64-row blocks of the Mma-layout
    /// kernel as 128-row ones (the same rows resident, with two blocks' latency hidden by each other: the H200's
    /// m64 at 128 registers beat m128 at every prefill shape, docs/PERF.md session 7; the 3090's 100 KiB of
    /// shared memory per SM holds one m64 block); otherwise 128 unless that grid has fewer blocks than SMs.
    pub fn gemm_tile(&self, gpu: &Gpu, m: usize) -> GemmTile {
        if self.packing == Packing::Mma && m <= GemmTile::M32.rows() {
            return GemmTile::M32;
        }
        let blocks = self.out_features.div_ceil(BN) * m.div_ceil(GemmTile::M128.rows());
        if blocks < gpu.sm_count as usize || (self.packing == Packing::Mma && self.m64_holds_twice(gpu)) {
            GemmTile::M64
        } else {
            GemmTile::M128
        }
    }

    /// Whether the device keeps at least twice as many m64 blocks of this weight's Mma kernel resident as m128.
    fn m64_holds_twice(&self, gpu: &Gpu) -> bool {
        let bits = self.bits as usize;
        let resident = |rows: usize| {
            let symbol = || format!("gptq_mma_gemm_w{bits}_m{rows}_bf16");
            // Key (bits, rows, 1): the GEMV's keys end in 0.
            gpu.resident_blocks((bits as u32, rows as u32, 1), symbol, THREADS, mma_smem_bytes(bits, rows) as u32)
        };
        matches!((resident(64), resident(128)), (Some(a), Some(b)) if b > 0 && a >= 2 * b)
    }

    /// [`GpuGptq::gemm`] with a chosen tile height (tests and the benchmark cover both).
    pub fn gemm_tiled(
        &self,
        gpu: &Gpu,
        x: &ActView<'_>,
        m: usize,
        y: &mut ActViewMut<'_>,
        tile: GemmTile,
    ) -> Result<()> {
        let (k, n) = (self.in_features, self.out_features);
        let ActView::Bf16(xv) = x else {
            return Err(shape("x must be bf16 (the tensor cores' input); got f32 activations".into()));
        };
        if m == 0 || xv.len() < m * k || y.len() < m * n {
            return Err(shape(format!("{m} rows of {k} → {n}: x holds {}, y holds {}", xv.len(), y.len())));
        }
        // GPTQ layouts always meet the first (32-row pack blocks and groups, 32-column zero blocks), weights in the
        // Mma layout the second (`mma::eligible`); the kernels rely on them.
        let gs = self.group_size;
        let fits = match self.packing {
            Packing::Gptq => k.is_multiple_of(BK) && n.is_multiple_of(8) && gs.is_multiple_of(BK),
            Packing::Mma => crate::mma::eligible(self.bits, k, n, gs),
        };
        if !fits {
            return Err(shape(format!("in {k}, out {n}, group {gs}, {} bits, {:?} packing", self.bits, self.packing)));
        }
        if m * k > i32::MAX as usize || m * n > i32::MAX as usize {
            return Err(shape(format!("{m} rows of {k} → {n} is too large for one launch")));
        }
        let s = &gpu.stream;
        let y_align = 2 * y.dtype().bytes();
        let y_ptr = match y {
            ActViewMut::F32(v) => v.device_ptr(s).0,
            ActViewMut::Bf16(v) => v.device_ptr(s).0,
        };
        if !(y_ptr as usize).is_multiple_of(y_align) {
            return Err(shape(format!("y must start at a multiple of {y_align} bytes (pairs are stored together)")));
        }
        // The kernel copies x in 16-byte runs: a permuted or misaligned x goes through scratch.
        let x_ptr = xv.device_ptr(s).0;
        let staged = if self.perm.is_some() || !(x_ptr as usize).is_multiple_of(16) {
            Some(self.gather(gpu, xv, m)?)
        } else {
            None
        };
        let bits = self.bits as usize;
        let rows = tile.rows();
        if tile == GemmTile::M32 && self.packing == Packing::Gptq {
            return Err(shape("the 32-row tile is the tensor-core layout's (checkpoint packing: 64 or 128)".into()));
        }
        let (kernel, smem) = match self.packing {
            Packing::Gptq => ("gptq_gemm", smem_bytes(bits, rows)),
            Packing::Mma => ("gptq_mma_gemm", mma_smem_bytes(bits, rows)),
        };
        let blocks = n.div_ceil(BN) * m.div_ceil(rows);
        let (splits, k_split) = match self.packing {
            Packing::Mma => {
                // The split kernel's blocks the device holds at once (two an SM when the driver cannot say).
                let symbol = || format!("gptq_mma_gemm_w{bits}_m{rows}_f32");
                let resident = gpu.resident_blocks((bits as u32, rows as u32, 2), symbol, THREADS, smem as u32);
                k_splits(k / crate::mma::CHUNK, blocks, resident.unwrap_or(2 * gpu.sm_count as usize))
            }
            Packing::Gptq => (1, k),
        };
        // More than one split: f32 partial sums [splits, m, n], added in split order into y by gptq_reduce.
        let mut partial = if splits > 1 {
            // SAFETY: every split's launch writes all m·n of its partial sums before the reduction reads them.
            Some(unsafe { s.alloc::<f32>(splits * m * n) }.map_err(drv("alloc gemm partial sums"))?)
        } else {
            None
        };
        let out = if partial.is_some() { "f32" } else { y.dtype().suffix() };
        let f = gpu.function(&format!("{kernel}_w{bits}_m{rows}_{out}"))?;
        // Above 48 KiB a kernel must opt in (3090: up to 99 KiB per block; the largest plan here is 90 KiB).
        gpu.ctx.bind_to_thread().map_err(drv("cuCtxSetCurrent"))?;
        f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
            .map_err(drv("cuFuncSetAttribute"))?;
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(BN) as u32, m.div_ceil(rows) as u32, splits as u32),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let (mi, ni, ki, gi, si) = (m as i32, n as i32, k as i32, gs as i32, k_split as i32);
        let mut launch = s.launch_builder(f);
        match &staged {
            Some(buf) => launch.arg(buf),
            None => launch.arg(xv),
        };
        launch.arg(&self.qweight);
        launch.arg_or_null(self.zeros.as_ref());
        launch.arg(&self.scales);
        match partial.as_mut() {
            Some(p) => launch.arg(p),
            None => launch.arg(&mut *y),
        };
        launch.arg(&mi).arg(&ni).arg(&ki).arg(&gi);
        if self.packing == Packing::Mma {
            launch.arg(&si);
        }
        // SAFETY: argument order and types match gptq_gemm_w*_m*_* and gptq_mma_gemm_w*_m*_* (the words as uint2,
        // then k_split); x holds m·k bf16 (16-byte aligned), the output m·n elements (pair-aligned) per split, the
        // weights k×n in the packing that kernel reads (null zeros: symmetric); the shared memory matches the
        // kernel's plan.
        unsafe { launch.launch(cfg) }.map_err(drv("launch gptq_gemm"))?;
        match &partial {
            Some(p) => crate::gemv::reduce_splits(gpu, p, splits, m, n, y),
            None => Ok(()),
        }
    }

    /// x `[m, in]` with its columns in the reordered row order of W (or just copied, when only misaligned).
    fn gather(&self, gpu: &Gpu, x: &cudarc::driver::CudaView<'_, bf16>, m: usize) -> Result<CudaSlice<bf16>> {
        let k = self.in_features;
        let s = &gpu.stream;
        // SAFETY: the gather below writes all m·k elements before anything reads them.
        let mut out = unsafe { s.alloc::<bf16>(m * k) }.map_err(drv("alloc gemm scratch"))?;
        let f = gpu.function("gptq_gemm_gather_bf16")?;
        let blocks = (m * k).div_ceil(256).min(gpu.sm_count as usize * 16) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let (mi, ki) = (m as i32, k as i32);
        let mut launch = s.launch_builder(f);
        launch.arg(x);
        launch.arg_or_null(self.perm.as_ref());
        launch.arg(&mut out).arg(&mi).arg(&ki);
        // SAFETY: argument order and types match gptq_gemm_gather_bf16; x and out hold m·k, perm k entries.
        unsafe { launch.launch(cfg) }.map_err(drv("launch gptq_gemm_gather"))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_memory_fits_an_rtx_3090_block() {
        // sm_86 allows 99 KiB of dynamic shared memory per block (opt-in above 48 KiB).
        for bits in [2, 3, 4, 8] {
            for tile in [GemmTile::M64, GemmTile::M128] {
                let b = smem_bytes(bits, tile.rows());
                assert!(b <= 99 * 1024 && b.is_multiple_of(16), "w{bits} {tile:?}: {b} bytes");
            }
        }
        assert_eq!(smem_bytes(3, 128), 4 * (128 * 40 * 2 + 3 * 128 * 4 + 512) + 2 * 128 * 40 * 2);
        for bits in [2, 3, 4] {
            for tile in [GemmTile::M32, GemmTile::M64, GemmTile::M128] {
                let b = mma_smem_bytes(bits, tile.rows());
                assert!(b <= 99 * 1024 && b.is_multiple_of(16), "mma w{bits} {tile:?}: {b} bytes");
            }
        }
        assert_eq!(mma_smem_bytes(4, 128), 4 * (128 * 72 * 2 + 8 * 2 * 256 + 512));
    }

    #[test]
    fn small_grids_split_k_to_fill_the_device() {
        // On the H200 (264 blocks resident: two an SM): a prefill expert's gate (7,168 → 2,048, one 64-row tile:
        // 16 blocks): 14 splits of 4 chunks.
        assert_eq!(k_splits(56, 16, 264), (14, 512));
        // Its down (2,048 → 7,168: 56 blocks, 16 chunks): 4 splits of 4.
        assert_eq!(k_splits(16, 56, 264), (4, 512));
        // o_proj at 32 rows (16,384 → 7,168: 56 blocks, 128 chunks): 4 splits, one wave (5 made 1.06 waves).
        assert_eq!(k_splits(128, 56, 264), (4, 32 * 128));
        // q_b at 32 rows (1,536 → 32,768: 256 blocks, 12 chunks) already fills the device. A 3090 (82 resident)
        // splits that o_proj 4 ways too: 2.7 waves of 32 chunks beat 56 of its 82 SMs streaming all 128.
        assert_eq!(k_splits(12, 256, 264), (1, 12 * 128));
        assert_eq!(k_splits(128, 56, 82).0, 4);
        // A grid that already fills the device, and a K of two chunks, stay whole.
        assert_eq!(k_splits(56, 448, 264), (1, 56 * 128));
        assert_eq!(k_splits(2, 1, 264), (1, 256));
        // Never a split of fewer than two chunks, and the splits cover K exactly once.
        for (chunks, blocks) in [(3, 1), (7, 2), (57, 5), (128, 9)] {
            let (n, rows) = k_splits(chunks, blocks, 82);
            assert!(rows >= 2 * 128 && (n - 1) * rows < chunks * 128 && n * rows >= chunks * 128, "{chunks} {blocks}");
        }
    }

    #[test]
    fn the_mma_kernel_instantiates_what_the_launcher_names() {
        let src = include_str!("../kernels/gptq_gemm.cu");
        assert!(src.contains("gptq_mma_gemm_w##BITS##_m##BM##_##NAME("));
        for bits in [2, 3, 4] {
            assert!(src.contains(&format!("\nMMA_GEMM({bits})\n")), "bits {bits} not instantiated");
        }
        for rows in [GemmTile::M32.rows(), GemmTile::M64.rows(), GemmTile::M128.rows()] {
            assert!(src.contains(&format!("MMA_GEMM_T(BITS, {rows}, __nv_bfloat16, bf16)")), "m{rows} bf16");
            assert!(src.contains(&format!("MMA_GEMM_T(BITS, {rows}, float, f32)")), "m{rows} f32");
        }
        for (name, value) in [("BN", BN), ("BK", MG_BK), ("STAGES", MG_STAGES), ("THREADS", THREADS as usize)] {
            assert!(src.contains(&format!("#define MG_{name} {value}\n")), "MG_{name} differs from gemm.rs");
        }
        // The kernel reads the words in 128-row chunks, two steps each.
        assert_eq!(crate::mma::CHUNK, 2 * MG_BK);
    }

    #[test]
    fn the_kernel_instantiates_what_the_launcher_names() {
        // Symbols are `gptq_gemm_w{bits}_m{rows}_{dtype}`: every width, both heights, both output dtypes.
        let src = include_str!("../kernels/gptq_gemm.cu");
        assert!(src.contains("void gptq_gemm_gather_bf16("));
        assert!(src.contains("gptq_gemm_w##BITS##_m##BM##_##NAME("));
        for bits in [2, 3, 4, 8] {
            assert!(src.contains(&format!("\nGEMM({bits})\n")), "bits {bits} not instantiated");
        }
        for rows in [GemmTile::M64.rows(), GemmTile::M128.rows()] {
            assert!(src.contains(&format!("GEMM_T(BITS, {rows}, __nv_bfloat16, bf16)")), "m{rows} bf16");
            assert!(src.contains(&format!("GEMM_T(BITS, {rows}, float, f32)")), "m{rows} f32");
        }
        for (name, value) in [("BN", BN), ("BK", BK), ("STAGES", STAGES), ("THREADS", THREADS as usize)] {
            assert!(src.contains(&format!("#define GEMM_{name} {value}\n")), "GEMM_{name} differs from gemm.rs");
        }
    }
}
