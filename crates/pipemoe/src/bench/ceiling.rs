//! The ceilings each figure is divided by, measured in the same run on the same GPU: the streaming-read
//! bandwidth (`stream_read_u32` over a buffer as large as the slice's weights, so it comes from DRAM), and
//! cuBLAS's bf16 GEMM on the prefill step's own shapes (dense bf16 weights rotated through copies larger than L2).

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, sys::cublasOperation_t};
use cudarc::driver::{LaunchConfig, PushKernelArg};
use half::bf16;
use pipemoe_cuda::Gpu;

/// Seconds per call of `f`, from device events around `iters` calls after `warm` calls (the work may also wait
/// on the host inside `f`; the events then measure wall time on the stream, which is what a step costs).
pub fn seconds_per_call(gpu: &Gpu, warm: usize, iters: usize, f: &mut dyn FnMut(usize) -> Result<()>) -> Result<f64> {
    for i in 0..warm {
        f(i)?;
    }
    let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let a = gpu.ctx.new_event(timing).context("cuEventCreate")?;
    let b = gpu.ctx.new_event(timing).context("cuEventCreate")?;
    a.record(&gpu.stream).context("cuEventRecord")?;
    for i in 0..iters {
        f(warm + i)?;
    }
    b.record(&gpu.stream).context("cuEventRecord")?;
    b.synchronize().context("cuEventSynchronize")?;
    Ok(a.elapsed_ms(&b).context("cuEventElapsedTime")? as f64 * 1e-3 / iters.max(1) as f64)
}

/// Streaming-read bandwidth in bytes/s over `bytes` of device memory (at most what is free, less a margin).
pub fn stream_read(gpu: &Gpu, bytes: usize) -> Result<(f64, usize)> {
    let (free, _) = gpu.ctx.mem_get_info().context("cuMemGetInfo")?;
    let bytes = bytes.min(free.saturating_sub(4 << 30)).max(1 << 30) / 64 * 64;
    let words = bytes / 4;
    let s = &gpu.stream;
    // Random-ish contents (never time on zeros, METHOD.md): one pass of a cheap fill kernel is not available
    // here, so copy a 64 MiB random block across the buffer.
    let block: Vec<u32> = (0..(16usize << 20)).map(|i| (i as u32).wrapping_mul(2_654_435_761)).collect();
    let src = s.clone_htod(&block).context("upload")?;
    let mut buf = s.alloc_zeros::<u32>(words).context("allocating the read-ceiling buffer")?;
    for start in (0..words).step_by(block.len()) {
        let n = block.len().min(words - start);
        s.memcpy_dtod(&src.slice(0..n), &mut buf.slice_mut(start..start + n)).context("fill")?;
    }
    let mut out = s.alloc_zeros::<f32>(1).context("alloc")?;
    let f = gpu.function("stream_read_u32")?;
    let n16 = (words / 4) as u64;
    let cfg = LaunchConfig { grid_dim: (gpu.sm_count * 8, 1, 1), block_dim: (512, 1, 1), shared_mem_bytes: 0 };
    let secs = seconds_per_call(gpu, 2, 10, &mut |_| {
        let mut l = s.launch_builder(f);
        l.arg(&buf).arg(&n16).arg(&mut out);
        // SAFETY: matches stream_read_u32: buf holds n16 16-byte vectors, out one float.
        unsafe { l.launch(cfg) }.context("stream_read_u32")?;
        Ok(())
    })?;
    Ok(((n16 * 16) as f64 / secs, (n16 * 16) as usize))
}

/// One GEMM shape of a prefill chunk: `y [m, n] = x [m, k] · Wᵀ`, `count` times per layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Shape {
    pub m: usize,
    pub k: usize,
    pub n: usize,
}

impl Shape {
    pub fn flop(&self) -> f64 {
        2.0 * (self.m * self.k * self.n) as f64
    }
}

/// cuBLAS on the GPU's stream, or why not.
pub fn cublas(gpu: &Gpu) -> std::result::Result<CudaBlas, String> {
    // SAFETY: only dlopens the library and checks a symbol.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err("libcublas.so was not found (put the CUDA toolkit's lib64 on LD_LIBRARY_PATH)".into());
    }
    CudaBlas::new(gpu.stream.clone()).map_err(|e| format!("cublasCreate: {e:?}"))
}

/// cuBLAS bf16 GEMM (f32 accumulation) seconds per call for each shape.
pub fn cublas_times(gpu: &Gpu, blas: &CudaBlas, shapes: &[Shape]) -> Result<BTreeMap<Shape, f64>> {
    let s = &gpu.stream;
    let mut rng = 0x1234_5678_9abc_def0u64;
    let mut random = |len: usize| -> Vec<bf16> {
        (0..len)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                bf16::from_f32((rng >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0)
            })
            .collect()
    };
    let mut out = BTreeMap::new();
    for &shape in shapes {
        let Shape { m, k, n } = shape;
        // Enough weight copies that each call reads its weight from DRAM (H200 L2: 60 MB).
        let copies = (256usize << 20).div_ceil(n * k * 2).clamp(1, 8);
        let w: Vec<_> = (0..copies).map(|_| s.clone_htod(&random(n * k))).collect::<Result<_, _>>()?;
        let x = s.clone_htod(&random(m * k))?;
        let mut y = s.alloc_zeros::<bf16>(m * n)?;
        // Row-major y [m, n] = x [m, k] · Wᵀ is column-major yᵀ = (W [k×n col-major])ᵀ · (x [k×m]).
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: n as i32,
            n: m as i32,
            k: k as i32,
            alpha: bf16::ONE,
            lda: k as i32,
            ldb: k as i32,
            beta: bf16::ZERO,
            ldc: n as i32,
        };
        let iters = (2e12 / shape.flop()).clamp(8.0, 64.0) as usize;
        let secs = seconds_per_call(gpu, 3, iters, &mut |i| {
            // SAFETY: w[i] is [n, k], x holds m·k and y m·n elements, as the leading dimensions say.
            unsafe { blas.gemm(cfg, &w[i % copies], &x, &mut y) }.map_err(|e| anyhow::anyhow!("cublas gemm: {e:?}"))
        })?;
        out.insert(shape, secs);
    }
    Ok(out)
}
