//! Timing on the device and the ceilings benchmarks divide by, shared by the benchmark tests and `pipemoe bench`:
//! seconds per call from CUDA events on the GPU's stream, the streaming-read bandwidth over a buffer in DRAM, and
//! cuBLAS on the same stream (the compute ceiling).

use cudarc::cublas::{CudaBlas, GemmConfig, sys::cublasOperation_t};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

use crate::error::{Error, drv};
use crate::gpu::Gpu;

/// Seconds per call of `f`, from device events around `iters` calls after `warm` calls (`f` gets the call's
/// index; if it waits on the host, the events measure the stream's wall time, which is what a step costs).
pub fn seconds_per_call<E: From<Error>>(
    gpu: &Gpu,
    warm: usize,
    iters: usize,
    f: &mut dyn FnMut(usize) -> Result<(), E>,
) -> Result<f64, E> {
    for i in 0..warm {
        f(i)?;
    }
    let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let a = gpu.ctx.new_event(timing).map_err(drv("cuEventCreate"))?;
    let b = gpu.ctx.new_event(timing).map_err(drv("cuEventCreate"))?;
    a.record(&gpu.stream).map_err(drv("cuEventRecord"))?;
    for i in 0..iters {
        f(warm + i)?;
    }
    b.record(&gpu.stream).map_err(drv("cuEventRecord"))?;
    b.synchronize().map_err(drv("cuEventSynchronize"))?;
    let ms = a.elapsed_ms(&b).map_err(drv("cuEventElapsedTime"))?;
    Ok(f64::from(ms) * 1e-3 / iters.max(1) as f64)
}

/// Streaming-read bandwidth (bytes/s) over about `bytes` of device memory (at most what is free, less a margin;
/// at least 1 GiB so it comes from DRAM), and the bytes read.
pub fn read_ceiling(gpu: &Gpu, bytes: usize) -> Result<(f64, usize), Error> {
    let (free, _) = gpu.ctx.mem_get_info().map_err(drv("cuMemGetInfo"))?;
    let bytes = bytes.min(free.saturating_sub(4 << 30)).max(1 << 30) / 64 * 64;
    let buf = varied_words(gpu, bytes / 4)?;
    let grid = Grid { blocks: gpu.sm_count * 8, threads: 512 };
    let secs = read_seconds(gpu, std::slice::from_ref(&buf), grid, Reader::Plain, 10)?;
    let read = buf.len() / 4 * 16;
    Ok((read as f64 / secs, read))
}

/// A launch's shape for [`read_rate`]: blocks of `threads` threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grid {
    pub blocks: u32,
    pub threads: u32,
}

/// Streaming-read bandwidth (bytes/s) of one launch reading `bytes` at `grid`: the ceiling a kernel of that size
/// and occupancy can reach, which [`read_ceiling`] (2 GiB by a full grid) does not say for a launch of a few MB,
/// whose start and tail are a share of its time. Copies of the buffer, `rotate_bytes` in all, are read in turn
/// so that each launch reads DRAM, not L2 (bench_gemv rotates its weights the same way).
pub fn read_rate(gpu: &Gpu, bytes: usize, rotate_bytes: usize, grid: Grid) -> Result<f64, Error> {
    read_rate_by(gpu, bytes, rotate_bytes, grid, Reader::Plain)
}

/// How a read kernel keeps bytes in flight (stream_read.cu): what a small grid needs to reach the ceiling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reader {
    /// One 16-byte load a thread at a time (`stream_read_u32`, the ceiling's kernel).
    Plain,
    /// 2, 4, 8 or 16 loads a thread issued together, into registers (`stream_read_x*`).
    Batched(u32),
    /// A ring of 2, 4, 8 or 16 slots a thread in shared memory, one fewer `cp.async` copies in flight
    /// (`stream_read_ring*`), as the GEMV streams its weights.
    Ring(u32),
}

impl Reader {
    fn kernel(self) -> Result<(String, u32), Error> {
        let ok = |n: u32| matches!(n, 2 | 4 | 8 | 16);
        match self {
            Reader::Plain => Ok(("stream_read_u32".into(), 0)),
            Reader::Batched(n) if ok(n) => Ok((format!("stream_read_x{n}"), 0)),
            Reader::Ring(n) if ok(n) => Ok((format!("stream_read_ring{n}"), n * 16)),
            other => Err(Error::Shape { what: "read kernel", reason: format!("{other:?}: 2, 4, 8 or 16") }),
        }
    }
}

/// [`read_rate`] by a chosen [`Reader`].
pub fn read_rate_by(gpu: &Gpu, bytes: usize, rotate_bytes: usize, grid: Grid, reader: Reader) -> Result<f64, Error> {
    let bufs = rotating_copies(gpu, bytes, rotate_bytes)?;
    let secs = read_seconds(gpu, &bufs, grid, reader, 40)?;
    Ok((bufs[0].len() * 4) as f64 / secs)
}

/// [`read_rate`] with every launch inside one CUDA graph (one launch a buffer copy, `rotate_bytes` in all, replayed
/// whole), as decode steps run: a launch's start and end without the host's launch between kernels. Against
/// [`read_rate`] at small sizes, what a kernel's fixed cost is in a step's graph.
pub fn read_rate_in_graph(gpu: &Gpu, bytes: usize, rotate_bytes: usize, grid: Grid) -> Result<f64, Error> {
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    let bufs = rotating_copies(gpu, bytes, rotate_bytes)?;
    let mut read = ReadLaunch::new(gpu, Reader::Plain, grid)?;
    let s = &gpu.stream;
    s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).map_err(drv("begin capture"))?;
    let launched = bufs.iter().try_for_each(|buf| read.launch(gpu, buf));
    // The capture ends whatever happened in it (the stream leaves capture mode either way).
    let graph = s.end_capture(CUgraphInstantiate_flags(0)).map_err(drv("end capture"));
    launched?;
    let graph = graph?.ok_or(Error::Shape { what: "read graph", reason: "the capture is empty".into() })?;
    let secs = seconds_per_call(gpu, 1, 4, &mut |_| graph.launch().map_err(drv("launch read graph")))?;
    Ok((bufs[0].len() * 4 * bufs.len()) as f64 / secs)
}

/// Copies of a buffer of about `bytes` (whole 64-byte lines, at least 64), `rotate_bytes` in all and at least two:
/// read in turn, each launch reads DRAM, not L2.
fn rotating_copies(gpu: &Gpu, bytes: usize, rotate_bytes: usize) -> Result<Vec<CudaSlice<u32>>, Error> {
    let words = (bytes / 64 * 64 / 4).max(16);
    let copies = rotate_bytes.div_ceil(words * 4).max(2);
    (0..copies).map(|_| varied_words(gpu, words)).collect()
}

/// `words` u32 of device memory holding varied values (never time on zeros: METHOD.md).
fn varied_words(gpu: &Gpu, words: usize) -> Result<CudaSlice<u32>, Error> {
    let s = &gpu.stream;
    let block: Vec<u32> = (0..words.min(16usize << 20)).map(|i| (i as u32).wrapping_mul(2_654_435_761)).collect();
    let src = s.clone_htod(&block).map_err(drv("upload"))?;
    let mut buf = s.alloc_zeros::<u32>(words).map_err(drv("allocating a read buffer"))?;
    for start in (0..words).step_by(block.len()) {
        let n = block.len().min(words - start);
        s.memcpy_dtod(&src.slice(0..n), &mut buf.slice_mut(start..start + n)).map_err(drv("fill"))?;
    }
    Ok(buf)
}

/// Seconds a call of `reader`'s kernel over each of `bufs` in turn (whole 16-byte vectors of each) at `grid`.
fn read_seconds(gpu: &Gpu, bufs: &[CudaSlice<u32>], grid: Grid, reader: Reader, iters: usize) -> Result<f64, Error> {
    let mut read = ReadLaunch::new(gpu, reader, grid)?;
    seconds_per_call(gpu, 2, iters, &mut |i| read.launch(gpu, &bufs[i % bufs.len()]))
}

/// A read kernel's launch at a grid, and the word it may write.
struct ReadLaunch<'a> {
    f: &'a cudarc::driver::CudaFunction,
    cfg: LaunchConfig,
    out: CudaSlice<f32>,
}

impl<'a> ReadLaunch<'a> {
    fn new(gpu: &'a Gpu, reader: Reader, grid: Grid) -> Result<Self, Error> {
        let (name, smem_a_thread) = reader.kernel()?;
        let shared_mem_bytes = smem_a_thread * grid.threads;
        let cfg = LaunchConfig { grid_dim: (grid.blocks, 1, 1), block_dim: (grid.threads, 1, 1), shared_mem_bytes };
        let out = gpu.stream.alloc_zeros::<f32>(1).map_err(drv("alloc"))?;
        Ok(ReadLaunch { f: gpu.function(&name)?, cfg, out })
    }

    /// One read of `buf`'s whole 16-byte vectors, on the GPU's stream.
    fn launch(&mut self, gpu: &Gpu, buf: &CudaSlice<u32>) -> Result<(), Error> {
        let n16 = (buf.len() / 4) as u64;
        let mut l = gpu.stream.launch_builder(self.f);
        l.arg(buf).arg(&n16).arg(&mut self.out);
        // SAFETY: matches every stream_read kernel: buf holds n16 16-byte vectors, out one float; a ring kernel's
        // shared memory is its slots for every thread of the block.
        unsafe { l.launch(self.cfg) }.map(|_| ()).map_err(drv("stream_read"))
    }
}

/// cuBLAS on the GPU's stream, or why not.
pub fn cublas(gpu: &Gpu) -> Result<CudaBlas, String> {
    // SAFETY: only dlopens the library and checks a symbol.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err("libcublas.so was not found (put the CUDA toolkit's lib64 on LD_LIBRARY_PATH)".into());
    }
    CudaBlas::new(gpu.stream.clone()).map_err(|e| format!("cublasCreate: {e:?}"))
}

/// cuBLAS's bf16 GEMM for the row-major `y [m, n] = x [m, k] · Wᵀ` of a linear layer (`W` `[n, k]`): in cuBLAS's
/// column-major terms `yᵀ = (W as k×n)ᵀ · (x as k×m)`.
pub fn linear_gemm(m: usize, k: usize, n: usize) -> GemmConfig<bf16> {
    GemmConfig {
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
    }
}

#[cfg(test)]
mod tests {
    use super::Reader;

    #[test]
    fn every_reader_names_a_kernel_of_stream_read_cu() {
        let (_, src) = crate::nvrtc::KERNELS.iter().find(|(f, _)| *f == "stream_read.cu").expect("stream_read.cu");
        for n in [2, 4, 8, 16] {
            for reader in [Reader::Batched(n), Reader::Ring(n)] {
                let (name, _) = reader.kernel().expect("a kernel");
                let short = name.trim_start_matches("stream_read_");
                // The kernels come from READ_KERNELS(n): `stream_read_x##K` and `stream_read_ring##K`.
                assert!(src.contains(&format!("READ_KERNELS({n})")), "{short}: no READ_KERNELS({n})");
            }
        }
        assert!(src.contains("void stream_read_u32("));
        assert_eq!(Reader::Ring(8).kernel().unwrap(), ("stream_read_ring8".to_string(), 128));
        assert_eq!(Reader::Batched(4).kernel().unwrap(), ("stream_read_x4".to_string(), 0));
        for bad in [Reader::Batched(3), Reader::Ring(1), Reader::Ring(32)] {
            assert!(bad.kernel().is_err(), "{bad:?}");
        }
    }
}
