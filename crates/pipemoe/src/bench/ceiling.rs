//! The ceilings each figure is divided by, measured in the same run on the same GPU: the streaming-read
//! bandwidth (`stream_read_u32` over a buffer as large as the slice's weights, so it comes from DRAM), and
//! cuBLAS's bf16 GEMM on the prefill step's own shapes (dense bf16 weights rotated through copies larger than L2).

use std::collections::BTreeMap;

use anyhow::Result;
use cudarc::cublas::{CudaBlas, Gemm};
use half::bf16;
use pipemoe_cuda::Gpu;

pub use pipemoe_cuda::timing::cublas;

/// Seconds per call of `f` after `warm` calls, over `iters` calls ([`pipemoe_cuda::timing::seconds_per_call`]).
pub fn seconds_per_call(gpu: &Gpu, warm: usize, iters: usize, f: &mut dyn FnMut(usize) -> Result<()>) -> Result<f64> {
    pipemoe_cuda::timing::seconds_per_call(gpu, warm, iters, f)
}

/// Streaming-read bandwidth in bytes/s over `bytes` of device memory, and the bytes read.
pub fn stream_read(gpu: &Gpu, bytes: usize) -> Result<(f64, usize)> {
    Ok(pipemoe_cuda::timing::read_ceiling(gpu, bytes)?)
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
        let cfg = pipemoe_cuda::timing::linear_gemm(m, k, n);
        let iters = (2e12 / shape.flop()).clamp(8.0, 64.0) as usize;
        let secs = seconds_per_call(gpu, 3, iters, &mut |i| {
            // SAFETY: w[i] is [n, k], x holds m·k and y m·n elements, as the leading dimensions say.
            unsafe { blas.gemm(cfg, &w[i % copies], &x, &mut y) }.map_err(|e| anyhow::anyhow!("cublas gemm: {e:?}"))
        })?;
        out.insert(shape, secs);
    }
    Ok(out)
}
