//! `CudaBackend`: the model's backend trait on one GPU (first version). Activations are f32 `[rows, cols]` on
//! the device; GPTQ linears run the GEMV kernel 16 rows at a time on those f32 inputs (so results agree with the
//! f32 CPU reference to f32 precision); routing and the indexer's top-k are chosen on the host from device scores.
//! The speed work (fused experts, tensor-core prefill, bf16 activations end to end, CUDA graphs) is issue 6's.

use std::sync::{Arc, OnceLock};

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use pipemoe_model::backend::{
    Backend, ExpertWeights, HostLinear, IndexerDims, MlaDims, RopeSpec, RouterDims, Routing, Row, Selection, SeqId,
    SharedActivations,
};
use pipemoe_model::cpu::kernels::top_k;

use crate::cache::{GpuLayerCache, KvDtype};
use crate::error::{Error, drv};
use crate::gemv::{GpuGptq, MAX_BATCH};
use crate::gpu::Gpu;

pub(crate) type MResult<T> = pipemoe_model::Result<T>;

pub(crate) fn m(e: Error) -> pipemoe_model::Error {
    pipemoe_model::Error::Backend { reason: e.to_string() }
}

pub(crate) fn md(op: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> pipemoe_model::Error {
    move |e| m(drv(op)(e))
}

pub struct GpuTensor {
    pub rows: usize,
    pub cols: usize,
    pub data: CudaSlice<f32>,
}

pub enum GpuWeightKind {
    Dense(CudaSlice<f32>),
    Gptq(GpuGptq),
}

pub struct GpuWeight {
    pub out_features: usize,
    pub in_features: usize,
    pub kind: GpuWeightKind,
    /// The dequantized f32 matrix, made on first use by attention (kv_b_proj).
    dense: OnceLock<CudaSlice<f32>>,
}

#[derive(Clone)]
pub struct CudaBackend {
    pub gpu: Arc<Gpu>,
    /// How the latent cache stores values (the recipe's `kv_cache_dtype`).
    pub kv_dtype: KvDtype,
}

impl CudaBackend {
    /// A backend on `cuda:ordinal` with an exact (f32) cache.
    pub fn new(ordinal: usize) -> crate::Result<Self> {
        Ok(Self { gpu: Arc::new(Gpu::open(ordinal)?), kv_dtype: KvDtype::F32 })
    }

    pub fn with_kv_dtype(self, kv_dtype: KvDtype) -> Self {
        Self { kv_dtype, ..self }
    }

    pub(crate) fn f(&self, name: &str) -> MResult<&cudarc::driver::CudaFunction> {
        self.gpu.function(name).map_err(m)
    }

    pub(crate) fn zeros(&self, n: usize) -> MResult<CudaSlice<f32>> {
        self.gpu.stream.alloc_zeros::<f32>(n.max(1)).map_err(md("alloc"))
    }

    pub(crate) fn upload_i32(&self, v: &[i32]) -> MResult<CudaSlice<i32>> {
        self.gpu.stream.clone_htod(v).map_err(md("upload indices"))
    }

    fn dense_of<'a>(&self, w: &'a GpuWeight) -> MResult<&'a CudaSlice<f32>> {
        match &w.kind {
            GpuWeightKind::Dense(d) => Ok(d),
            GpuWeightKind::Gptq(g) => {
                if w.dense.get().is_none() {
                    let d = g.dequantize(&self.gpu).map_err(m)?;
                    let _ = w.dense.set(d);
                }
                w.dense.get().ok_or_else(|| m(Error::Shape { what: "weight", reason: "dequantize".into() }))
            }
        }
    }
}

pub(crate) fn grid(n: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u32).div_ceil(threads).max(1), 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(crate) fn shape(what: &'static str, reason: String) -> pipemoe_model::Error {
    m(Error::Shape { what, reason })
}

impl Backend for CudaBackend {
    type Tensor = GpuTensor;
    type Weight = GpuWeight;
    type Vector = CudaSlice<f32>;
    type LayerCache = GpuLayerCache;

    fn describe(&self) -> String {
        format!("cuda:{} ({})", self.gpu.ctx.ordinal(), self.gpu.describe())
    }

    fn load_linear(&self, w: HostLinear) -> MResult<GpuWeight> {
        let (out_features, in_features) = (w.out_features(), w.in_features());
        let kind = match w {
            HostLinear::Dense { data, .. } => {
                GpuWeightKind::Dense(self.gpu.stream.clone_htod(&data).map_err(md("upload weight"))?)
            }
            HostLinear::Gptq(g) => GpuWeightKind::Gptq(GpuGptq::upload(&self.gpu, &g).map_err(m)?),
        };
        Ok(GpuWeight { out_features, in_features, kind, dense: OnceLock::new() })
    }

    fn load_vector(&self, v: Vec<f32>) -> MResult<CudaSlice<f32>> {
        self.gpu.stream.clone_htod(&v).map_err(md("upload vector"))
    }

    fn new_layer_cache(&self, dims: &MlaDims, indexer: Option<&IndexerDims>) -> GpuLayerCache {
        GpuLayerCache::new(dims, indexer, self.kv_dtype)
    }

    fn upload(&self, rows: usize, cols: usize, data: Vec<f32>) -> MResult<GpuTensor> {
        if data.len() != rows * cols {
            return Err(shape("upload", format!("{} values for [{rows}, {cols}]", data.len())));
        }
        Ok(GpuTensor { rows, cols, data: self.gpu.stream.clone_htod(&data).map_err(md("upload"))? })
    }

    fn download(&self, x: &GpuTensor) -> MResult<Vec<f32>> {
        let mut v = self.gpu.stream.clone_dtoh(&x.data).map_err(md("download"))?;
        v.truncate(x.rows * x.cols);
        Ok(v)
    }

    fn shape(&self, x: &GpuTensor) -> (usize, usize) {
        (x.rows, x.cols)
    }

    fn embed(&self, table: &GpuWeight, ids: &[u32]) -> MResult<GpuTensor> {
        let cols = table.in_features;
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= table.out_features) {
            return Err(pipemoe_model::Error::TokenOutOfRange { token: bad as usize, vocab: table.out_features });
        }
        let t = self.dense_of(table)?;
        let idx = self.upload_i32(&ids.iter().map(|&i| i as i32).collect::<Vec<_>>())?;
        let mut y = self.zeros(ids.len() * cols)?;
        let (r, c) = (ids.len() as i32, cols as i32);
        let mut l = self.gpu.stream.launch_builder(self.f("embed_f32")?);
        l.arg(t).arg(&idx).arg(&mut y).arg(&r).arg(&c);
        unsafe { l.launch(grid(ids.len() * cols, 256)) }.map_err(md("embed"))?;
        Ok(GpuTensor { rows: ids.len(), cols, data: y })
    }

    fn linear(&self, x: &GpuTensor, w: &GpuWeight) -> MResult<GpuTensor> {
        if x.cols != w.in_features {
            return Err(shape(
                "linear",
                format!("input width {} for a weight of {} in-features", x.cols, w.in_features),
            ));
        }
        let (rows, k, n) = (x.rows, w.in_features, w.out_features);
        let mut y = self.zeros(rows * n)?;
        let s = &self.gpu.stream;
        match &w.kind {
            GpuWeightKind::Dense(d) => {
                let (ri, ki, ni) = (rows as i32, k as i32, n as i32);
                let mut l = s.launch_builder(self.f("dense_gemv_f32")?);
                l.arg(&x.data).arg(d).arg(&mut y).arg(&ri).arg(&ki).arg(&ni);
                unsafe { l.launch(grid(rows * n * 32, 256)) }.map_err(md("dense_gemv"))?;
            }
            GpuWeightKind::Gptq(g) => {
                let mut partial = self.zeros(g.scratch_len(&self.gpu, MAX_BATCH).max(g.scratch_len(&self.gpu, 1)))?;
                for r0 in (0..rows).step_by(MAX_BATCH) {
                    let nb = MAX_BATCH.min(rows - r0);
                    let xv = x.data.slice(r0 * k..(r0 + nb) * k);
                    let mut yv = y.slice_mut(r0 * n..(r0 + nb) * n);
                    g.gemv_f32(&self.gpu, &xv, nb, &mut partial, &mut yv).map_err(m)?;
                }
            }
        }
        Ok(GpuTensor { rows, cols: n, data: y })
    }

    fn rms_norm(&self, x: &GpuTensor, w: &CudaSlice<f32>, eps: f32) -> MResult<GpuTensor> {
        let mut y = self.zeros(x.rows * x.cols)?;
        let c = x.cols as i32;
        let mut l = self.gpu.stream.launch_builder(self.f("rms_norm_f32")?);
        l.arg(&x.data).arg(w).arg(&mut y).arg(&c).arg(&eps);
        let cfg = LaunchConfig { grid_dim: (x.rows.max(1) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        unsafe { l.launch(cfg) }.map_err(md("rms_norm"))?;
        Ok(GpuTensor { rows: x.rows, cols: x.cols, data: y })
    }

    fn layer_norm(&self, x: &GpuTensor, w: &CudaSlice<f32>, b: &CudaSlice<f32>, eps: f32) -> MResult<GpuTensor> {
        let mut y = self.zeros(x.rows * x.cols)?;
        let c = x.cols as i32;
        let mut l = self.gpu.stream.launch_builder(self.f("layer_norm_f32")?);
        l.arg(&x.data).arg(w).arg(b).arg(&mut y).arg(&c).arg(&eps);
        let cfg = LaunchConfig { grid_dim: (x.rows.max(1) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        unsafe { l.launch(cfg) }.map_err(md("layer_norm"))?;
        Ok(GpuTensor { rows: x.rows, cols: x.cols, data: y })
    }

    fn add_assign(&self, x: &mut GpuTensor, y: &GpuTensor) -> MResult<()> {
        let n = x.rows * x.cols;
        if n != y.rows * y.cols {
            return Err(shape("add", format!("{n} vs {}", y.rows * y.cols)));
        }
        let nn = n as u64;
        let mut l = self.gpu.stream.launch_builder(self.f("add_f32")?);
        l.arg(&mut x.data).arg(&y.data).arg(&nn);
        unsafe { l.launch(grid(n, 256)) }.map_err(md("add"))?;
        Ok(())
    }

    fn scale(&self, x: &mut GpuTensor, s: f32) -> MResult<()> {
        let nn = (x.rows * x.cols) as u64;
        let mut l = self.gpu.stream.launch_builder(self.f("scale_f32")?);
        l.arg(&mut x.data).arg(&s).arg(&nn);
        unsafe { l.launch(grid(x.rows * x.cols, 256)) }.map_err(md("scale"))?;
        Ok(())
    }

    fn gather_rows(&self, x: &GpuTensor, idx: &[usize]) -> MResult<GpuTensor> {
        if let Some(&bad) = idx.iter().find(|&&r| r >= x.rows) {
            return Err(shape("gather_rows", format!("row {bad} of {}", x.rows)));
        }
        let rows = self.upload_i32(&idx.iter().map(|&r| r as i32).collect::<Vec<_>>())?;
        self.copy(x, Some(&rows), idx.len(), 0, x.cols)
    }

    fn columns(&self, x: &GpuTensor, start: usize, len: usize) -> MResult<GpuTensor> {
        if start + len > x.cols {
            return Err(shape("columns", format!("{start}+{len} of {}", x.cols)));
        }
        self.copy(x, None, x.rows, start, len)
    }

    fn silu_mul(&self, gate: &GpuTensor, up: &GpuTensor) -> MResult<GpuTensor> {
        let n = gate.rows * gate.cols;
        let mut y = self.zeros(n)?;
        let nn = n as u64;
        let mut l = self.gpu.stream.launch_builder(self.f("silu_mul_f32")?);
        l.arg(&gate.data).arg(&up.data).arg(&mut y).arg(&nn);
        unsafe { l.launch(grid(n, 256)) }.map_err(md("silu_mul"))?;
        Ok(GpuTensor { rows: gate.rows, cols: gate.cols, data: y })
    }

    fn rope(&self, x: &mut GpuTensor, spec: RopeSpec, inv_freq: &[f32], rows: &[Row]) -> MResult<()> {
        let half = inv_freq.len();
        if x.cols != spec.heads * spec.head_dim || spec.offset + 2 * half > spec.head_dim || rows.len() != x.rows {
            return Err(shape("rope", format!("{spec:?} for [{}, {}]", x.rows, x.cols)));
        }
        let pos = self.upload_i32(&rows.iter().map(|r| r.pos as i32).collect::<Vec<_>>())?;
        let freq = self.gpu.stream.clone_htod(inv_freq).map_err(md("upload"))?;
        let (r, h, d, o, hf, il) = (
            x.rows as i32,
            spec.heads as i32,
            spec.head_dim as i32,
            spec.offset as i32,
            half as i32,
            i32::from(spec.interleaved),
        );
        let mut l = self.gpu.stream.launch_builder(self.f("rope_f32")?);
        l.arg(&mut x.data).arg(&pos).arg(&freq).arg(&r).arg(&h).arg(&d).arg(&o).arg(&hf).arg(&il);
        unsafe { l.launch(grid(x.rows * spec.heads * half, 256)) }.map_err(md("rope"))?;
        Ok(())
    }

    fn cache_write(
        &self,
        cache: &mut GpuLayerCache,
        rows: &[Row],
        latent: &GpuTensor,
        k_pe: &GpuTensor,
        index_k: Option<&GpuTensor>,
    ) -> MResult<()> {
        crate::attention::cache_write(self, cache, rows, latent, k_pe, index_k)
    }

    fn cache_free(&self, cache: &mut GpuLayerCache, seq: SeqId) {
        cache.seqs.remove(&seq);
    }

    fn cache_len(&self, cache: &GpuLayerCache, seq: SeqId) -> usize {
        cache.len(seq)
    }

    fn indexer_select(
        &self,
        cache: &GpuLayerCache,
        q: &GpuTensor,
        w: &GpuTensor,
        dims: &IndexerDims,
        rows: &[Row],
    ) -> MResult<Vec<Vec<u32>>> {
        crate::attention::indexer_select(self, cache, q, w, dims, rows)
    }

    fn mla_attention(
        &self,
        cache: &GpuLayerCache,
        q: &GpuTensor,
        kv_b: &GpuWeight,
        dims: &MlaDims,
        rows: &[Row],
        selection: &Selection,
    ) -> MResult<GpuTensor> {
        let w = self.dense_of(kv_b)?;
        crate::attention::mla(self, cache, q, w, dims, rows, selection)
    }

    fn route(&self, x: &GpuTensor, gate: &GpuWeight, bias: &CudaSlice<f32>, dims: &RouterDims) -> MResult<Routing> {
        let logits = self.download(&self.linear(x, gate)?)?;
        let bias = self.gpu.stream.clone_dtoh(bias).map_err(md("download bias"))?;
        pipemoe_model::routing::route_logits(&logits, x.rows, &bias, dims)
    }

    fn export(&self, x: &GpuTensor) -> MResult<Option<SharedActivations>> {
        crate::ipc::export(self, x).map(Some)
    }

    fn import(&self, rows: usize, cols: usize, mem_handle: &[u8], event_handle: &[u8]) -> MResult<GpuTensor> {
        crate::ipc::import(self, rows, cols, mem_handle, event_handle)
    }

    fn experts(&self, x: &GpuTensor, experts: &[Option<ExpertWeights<Self>>], routing: &Routing) -> MResult<GpuTensor> {
        let mut out = GpuTensor { rows: x.rows, cols: x.cols, data: self.zeros(x.rows * x.cols)? };
        for (e, ew) in experts.iter().enumerate() {
            let Some(ew) = ew else { continue };
            let (rows, ws) = routing.rows_of(e);
            if rows.is_empty() {
                continue;
            }
            let xin = self.gather_rows(x, &rows)?;
            let h = self.silu_mul(&self.linear(&xin, &ew.gate)?, &self.linear(&xin, &ew.up)?)?;
            let y = self.linear(&h, &ew.down)?;
            let idx = self.upload_i32(&rows.iter().map(|&r| r as i32).collect::<Vec<_>>())?;
            let wd = self.gpu.stream.clone_htod(&ws).map_err(md("upload"))?;
            let (n, c) = (rows.len() as i32, x.cols as i32);
            let mut l = self.gpu.stream.launch_builder(self.f("scatter_add_scaled_f32")?);
            l.arg(&mut out.data).arg(&y.data).arg(&idx).arg(&wd).arg(&n).arg(&c);
            unsafe { l.launch(grid(rows.len() * x.cols, 256)) }.map_err(md("scatter_add"))?;
        }
        Ok(out)
    }
}

impl CudaBackend {
    /// `y[r, c] = x[rows[r] or r, start + c]`.
    fn copy(
        &self,
        x: &GpuTensor,
        rows: Option<&CudaSlice<i32>>,
        n_rows: usize,
        start: usize,
        cols: usize,
    ) -> MResult<GpuTensor> {
        let mut y = self.zeros(n_rows * cols)?;
        let (xc, st, nr, c) = (x.cols as i32, start as i32, n_rows as i32, cols as i32);
        let null: u64 = 0;
        let mut l = self.gpu.stream.launch_builder(self.f("copy_rows_cols_f32")?);
        l.arg(&x.data).arg(&xc);
        match rows {
            Some(r) => l.arg(r),
            None => l.arg(&null),
        };
        l.arg(&st).arg(&mut y).arg(&nr).arg(&c);
        unsafe { l.launch(grid(n_rows * cols, 256)) }.map_err(md("copy"))?;
        Ok(GpuTensor { rows: n_rows, cols, data: y })
    }
}

pub(crate) fn top(scores: &[f32], k: usize) -> Vec<u32> {
    let mut sel = top_k(scores, k);
    sel.sort_unstable();
    sel
}
