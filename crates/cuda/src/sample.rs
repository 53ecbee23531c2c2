//! Sampling's reduction on the device (kernels/sample.cu): per row of logits the argmax, the `m` largest logits
//! and the f64 sums the host needs, so that `Sampler::sample_reduced` / `logprobs_reduced` finish from a few
//! hundred values instead of the vocabulary (and fall back to the whole row where they must). The kernel's CPU
//! reference is `pipemoe_model::sampling::ReducedRow`. `sample_rows` is `CudaBackend`'s `Backend::sample`.

use cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use pipemoe_model::Backend;
use pipemoe_model::sampling::{self, Reduced, SampleRow, SampledToken};

use crate::act::Act;
use crate::backend::{CudaBackend, GpuTensor, MResult, m as model_err, md, shape};
use crate::error::{Error, Result, drv};
use crate::gpu::Gpu;
use crate::launch::grid;

/// The most candidates a row keeps (one shared-memory sort per row).
pub const MAX_CANDIDATES: usize = 1024;
const THREADS: u32 = 1024;
const WANT_T: u32 = 1;
const WANT_1: u32 = 2;

/// What one row needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowSpec {
    /// The row's sampling temperature (0: greedy).
    pub temperature: f32,
    /// A sampled row: the candidates and the sum at `temperature`. Greedy rows need only the argmax.
    pub sample: bool,
    /// logprobs or top_logprobs asked: the candidates and the sum at temperature 1.
    pub logprobs: bool,
}

/// A step's rows reduced, on the device.
pub struct DeviceReduced {
    pub specs: Vec<RowSpec>,
    pub vocab: usize,
    /// Candidates per row: min(asked, vocab).
    pub m: usize,
    /// `[rows]`.
    pub argmax: CudaSlice<u32>,
    /// `[rows, 2]`: (sum at the row's temperature, sum at 1), 0 where not asked.
    pub sums: CudaSlice<f64>,
    /// `[rows, m]`: candidate ids, largest logit first, ties by lower id (rows that asked for them).
    pub ids: CudaSlice<u32>,
    /// `[rows, m]`: their logits.
    pub logits: CudaSlice<f32>,
}

/// `DeviceReduced` read back.
#[derive(Debug, Clone, PartialEq)]
pub struct HostReduced {
    pub specs: Vec<RowSpec>,
    pub vocab: usize,
    pub m: usize,
    pub argmax: Vec<u32>,
    pub sums: Vec<f64>,
    pub ids: Vec<u32>,
    pub logits: Vec<f32>,
}

/// Reduces `specs.len()` rows of `logits` (`[rows, vocab]` f32) to `m` candidates each (1..=1024): one block
/// per row on the GPU's stream.
pub fn reduce_logits(
    gpu: &Gpu,
    logits: &CudaView<f32>,
    vocab: usize,
    specs: &[RowSpec],
    m: usize,
) -> Result<DeviceReduced> {
    let rows = specs.len();
    if vocab == 0 || vocab > i32::MAX as usize || !(1..=MAX_CANDIDATES).contains(&m) || logits.len() < rows * vocab {
        let reason = format!("{} logits for [{rows}, {vocab}], {m} candidates (1..={MAX_CANDIDATES})", logits.len());
        return Err(Error::Shape { what: "sample_reduce", reason });
    }
    let m = m.min(vocab);
    let s = &gpu.stream;
    let mut r = DeviceReduced {
        specs: specs.to_vec(),
        vocab,
        m,
        argmax: s.alloc_zeros::<u32>(rows.max(1)).map_err(drv("alloc reduce"))?,
        sums: s.alloc_zeros::<f64>((2 * rows).max(1)).map_err(drv("alloc reduce"))?,
        ids: s.alloc_zeros::<u32>((rows * m).max(1)).map_err(drv("alloc reduce"))?,
        logits: s.alloc_zeros::<f32>((rows * m).max(1)).map_err(drv("alloc reduce"))?,
    };
    if rows == 0 {
        return Ok(r);
    }
    let packed: Vec<u32> = specs
        .iter()
        .flat_map(|p| {
            let flags = if p.sample { WANT_T } else { 0 } | if p.logprobs { WANT_1 } else { 0 };
            [p.temperature.to_bits(), flags]
        })
        .collect();
    let spec = s.clone_htod(&packed).map_err(drv("upload row specs"))?;
    let (v, mi) = (vocab as i32, m as i32);
    let mut l = s.launch_builder(gpu.function("sample_reduce_f32")?);
    l.arg(logits).arg(&spec).arg(&v).arg(&mi);
    l.arg(&mut r.argmax).arg(&mut r.sums).arg(&mut r.ids).arg(&mut r.logits);
    let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: logits holds [rows, vocab] (checked), spec [rows, 2], the outputs [rows], [rows, 2], [rows, m]
    // (allocated above); m ≤ 1024 fits the kernel's shared sort.
    unsafe { l.launch(cfg) }.map_err(drv("launch sample_reduce"))?;
    Ok(r)
}

impl DeviceReduced {
    /// Waits for the stream and reads everything back.
    pub fn to_host(&self) -> Result<HostReduced> {
        let rows = self.specs.len();
        let mut argmax = self.argmax.stream().clone_dtoh(&self.argmax).map_err(drv("download reduce"))?;
        let mut sums = self.sums.stream().clone_dtoh(&self.sums).map_err(drv("download reduce"))?;
        let mut ids = self.ids.stream().clone_dtoh(&self.ids).map_err(drv("download reduce"))?;
        let mut logits = self.logits.stream().clone_dtoh(&self.logits).map_err(drv("download reduce"))?;
        argmax.truncate(rows);
        sums.truncate(2 * rows);
        ids.truncate(rows * self.m);
        logits.truncate(rows * self.m);
        Ok(HostReduced { specs: self.specs.clone(), vocab: self.vocab, m: self.m, argmax, sums, ids, logits })
    }
}

impl HostReduced {
    /// Row `r` for the host's sampler: candidates and sums only where the row asked for them.
    pub fn row(&self, r: usize) -> Reduced<'_> {
        let spec = self.specs[r];
        let cands = if spec.sample || spec.logprobs { r * self.m..(r + 1) * self.m } else { 0..0 };
        Reduced {
            argmax: self.argmax[r],
            ids: &self.ids[cands.clone()],
            logits: &self.logits[cands],
            vocab: self.vocab,
            temperature: spec.temperature,
            sum_t: (spec.sample && spec.temperature > 0.0).then_some(self.sums[2 * r]),
            sum_1: spec.logprobs.then_some(self.sums[2 * r + 1]),
        }
    }
}

/// `Backend::sample` on the GPU. The logits `[rows, vocab]` (bf16 ones widened to f32 on the device, exactly as
/// `download` widens them) are reduced where they are, the reduced view read back (`[rows, m]` candidates instead
/// of `[rows, vocab]`), and the host finishes from it (`sampling::sample_from_reduced`), downloading whole rows
/// only for the rows the view cannot decide: the tokens of the host path, from the same PRNG states.
pub(crate) fn sample_rows(
    b: &CudaBackend,
    logits: &GpuTensor,
    rows: &mut [SampleRow<'_>],
) -> MResult<Vec<SampledToken>> {
    if logits.rows != rows.len() {
        return Err(shape("sample", format!("{} rows of logits for {} samplers", logits.rows, rows.len())));
    }
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let (vocab, n) = (logits.cols, logits.rows * logits.cols);
    let specs: Vec<RowSpec> = rows
        .iter()
        .map(|r| RowSpec { temperature: r.temperature(), sample: r.draws(), logprobs: r.logprobs.is_some() })
        .collect();
    let m = sampling::candidates(rows).min(MAX_CANDIDATES);
    let widened: CudaSlice<f32>;
    let view = match &logits.data {
        Act::F32(d) => d.slice(0..n),
        Act::Bf16(d) => {
            // SAFETY: cast_bf16_f32 below writes all n values before anything reads them (no zero fill: a memset
            // launch fewer on the last stage's step).
            let mut y = unsafe { b.gpu.stream.alloc::<f32>(n.max(1)) }.map_err(md("alloc"))?;
            let nn = n as u64;
            let mut l = b.gpu.stream.launch_builder(b.f("cast_bf16_f32")?);
            l.arg(d).arg(&mut y).arg(&nn);
            // SAFETY: matches cast_bf16_f32; d holds the tensor's n values, y was allocated for n.
            unsafe { l.launch(grid(n, 256)) }.map_err(md("widen logits"))?;
            widened = y;
            widened.slice(0..n)
        }
    };
    // [rows] argmax, [rows, 2] sums, [rows, m] candidates: the only copies back unless a row falls back.
    let host = reduce_logits(&b.gpu, &view, vocab, &specs, m).and_then(|r| r.to_host()).map_err(model_err)?;
    sampling::sample_from_reduced(rows, |i| host.row(i), |which| b.download(&b.gather_rows(logits, which)?))
}
