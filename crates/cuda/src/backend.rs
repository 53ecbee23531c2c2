//! `CudaBackend`: the model's backend trait on one GPU. Activations are `[rows, cols]` on the device in bf16
//! (serving) or f32 (the exact path, which agrees with the f32 CPU reference to f32 precision), every kernel
//! summing in f32; GPTQ linears run the split-K GEMV 16 rows at a time; the routed experts of a decode step run
//! grouped (`experts.rs`); the router's choice and the indexer's top-k are read back to the host.

use std::sync::{Arc, OnceLock};

use cudarc::driver::{CudaSlice, CudaView, PushKernelArg};
use pipemoe_model::backend::{
    Backend, ExpertWeights, FusedQuery, HostLinear, HostSelection, IndexQuery, IndexerDims, Landed, LayersBody,
    MlaDims, MlaPrep, MlaPrepped, PrepQuery, RopeSpec, RouterDims, Routing, Row, SeqId, SharedActivations,
};
use pipemoe_model::sampling::{SampleRow, SampledToken};

use crate::act::{Act, ActDtype};
use crate::cache::{CacheBudget, GpuLayerCache, KvDtype};
use crate::error::{Error, drv};
use crate::experts::{GpuExperts, GpuRoutes};
use crate::gemv::GpuGptq;
use crate::gpu::Gpu;
use crate::indexer::GpuSelection;
use crate::launch::{ArgOrNull, grid};

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
    pub data: Act,
}

pub enum GpuWeightKind {
    /// `[out, in]` in the activation dtype.
    Dense(Act),
    Gptq(GpuGptq),
}

pub struct GpuWeight {
    pub out_features: usize,
    pub in_features: usize,
    pub kind: GpuWeightKind,
    /// The dequantized matrix in the activation dtype, made on first use by attention (kv_b_proj).
    dense: OnceLock<Act>,
}

#[derive(Clone)]
pub struct CudaBackend {
    pub gpu: Arc<Gpu>,
    /// How the latent cache stores values (the recipe's `kv_cache_dtype`).
    pub kv_dtype: KvDtype,
    /// The activations' element type between kernels.
    pub act: ActDtype,
    /// Device memory for the latent cache; `None` grows each layer's pool on demand.
    pub cache_budget: Option<CacheBudget>,
}

impl CudaBackend {
    /// A backend on `cuda:ordinal` with bf16 activations and an exact (f32) cache.
    pub fn new(ordinal: usize) -> crate::Result<Self> {
        Ok(Self { gpu: Arc::new(Gpu::open(ordinal)?), kv_dtype: KvDtype::F32, act: ActDtype::Bf16, cache_budget: None })
    }

    /// Records decode steps as CUDA graphs (`true`, the default unless `PIPEMOE_CUDA_GRAPHS=0`) or runs every step
    /// as launches: the GPU's setting, so every backend on it follows.
    pub fn with_graphs(self, graphs: bool) -> Self {
        self.gpu.steps.set_enabled(graphs);
        self
    }

    pub fn with_kv_dtype(self, kv_dtype: KvDtype) -> Self {
        Self { kv_dtype, ..self }
    }

    /// Sizes the latent cache: `bytes` of device memory shared equally by the `layers` layers this backend
    /// holds, each layer's pool allocated in full on its first write.
    pub fn with_cache_budget(self, bytes: usize, layers: usize) -> Self {
        Self { cache_budget: Some(CacheBudget { bytes, layers }), ..self }
    }

    pub fn with_act_dtype(self, act: ActDtype) -> Self {
        Self { act, ..self }
    }

    /// A tensor of zeros in the activation dtype.
    pub(crate) fn tensor(&self, rows: usize, cols: usize) -> MResult<GpuTensor> {
        Ok(GpuTensor { rows, cols, data: Act::zeros(&self.gpu, self.act, rows * cols).map_err(m)? })
    }

    /// An output tensor in the activation dtype that the launch after this call writes in full.
    pub(crate) fn output(&self, rows: usize, cols: usize) -> MResult<GpuTensor> {
        // SAFETY: every caller launches a kernel that writes each of the rows·cols values (one thread or warp
        // per value, or per row over all its columns) before the tensor is returned or read.
        Ok(GpuTensor { rows, cols, data: unsafe { Act::uninit(&self.gpu, self.act, rows * cols) }.map_err(m)? })
    }

    /// The kernel `<op>_<activation dtype>`.
    pub(crate) fn op(&self, name: &str, x: &Act) -> MResult<&cudarc::driver::CudaFunction> {
        self.f(&format!("{name}_{}", x.dtype().suffix()))
    }

    /// An f32 sum as a tensor in `dtype`.
    pub(crate) fn tensor_from_f32_sum(
        &self,
        sum: CudaSlice<f32>,
        rows: usize,
        cols: usize,
        dtype: ActDtype,
    ) -> MResult<GpuTensor> {
        let data = match dtype {
            ActDtype::F32 => Act::F32(sum),
            ActDtype::Bf16 => {
                let mut y = Act::zeros(&self.gpu, dtype, rows * cols).map_err(m)?;
                let n = (rows * cols) as u64;
                let mut l = self.gpu.stream.launch_builder(self.f("cast_f32_bf16")?);
                l.arg(&sum).arg(&mut y).arg(&n);
                // SAFETY: matches cast_f32_bf16; both hold rows·cols values.
                unsafe { l.launch(grid(rows * cols, 256)) }.map_err(md("cast"))?;
                y
            }
        };
        Ok(GpuTensor { rows, cols, data })
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

    /// The weight as a dense matrix in the activation dtype (attention's absorbed kv_b_proj), made once.
    pub(crate) fn dense_of<'a>(&self, w: &'a GpuWeight) -> MResult<&'a Act> {
        match &w.kind {
            GpuWeightKind::Dense(d) if d.dtype() == self.act => return Ok(d),
            _ if w.dense.get().is_some() => {}
            kind => {
                let n = w.out_features * w.in_features;
                let f32s = match kind {
                    GpuWeightKind::Gptq(g) => g.dequantize(&self.gpu).map_err(m)?,
                    GpuWeightKind::Dense(a) => {
                        self.gpu.stream.clone_htod(&a.to_f32(&self.gpu, n).map_err(m)?).map_err(md("upload weight"))?
                    }
                };
                let _ = w.dense.set(self.tensor_from_f32_sum(f32s, 1, n, self.act)?.data);
            }
        }
        w.dense.get().ok_or_else(|| m(Error::Shape { what: "weight", reason: "dequantize".into() }))
    }
}

/// An element-wise op's check: as many values, of one dtype.
pub(crate) fn same_layout(what: &'static str, x: &GpuTensor, y: &GpuTensor) -> MResult<()> {
    if x.rows * x.cols != y.rows * y.cols {
        return Err(shape(what, format!("{} vs {} values", x.rows * x.cols, y.rows * y.cols)));
    }
    if x.data.dtype() != y.data.dtype() {
        return Err(shape(what, "tensors of different dtypes".into()));
    }
    Ok(())
}

pub(crate) fn shape(what: &'static str, reason: String) -> pipemoe_model::Error {
    m(Error::Shape { what, reason })
}

impl Backend for CudaBackend {
    type Tensor = GpuTensor;
    type Weight = GpuWeight;
    type Vector = CudaSlice<f32>;
    type LayerCache = GpuLayerCache;
    type Selection = GpuSelection;
    type Routes = GpuRoutes;
    type Experts = GpuExperts;

    fn describe(&self) -> String {
        format!("cuda:{} ({})", self.gpu.ctx.ordinal(), self.gpu.describe())
    }

    fn load_linear(&self, w: HostLinear) -> MResult<GpuWeight> {
        let (out_features, in_features) = (w.out_features(), w.in_features());
        let kind = match w {
            HostLinear::Dense { data, .. } => {
                GpuWeightKind::Dense(Act::from_f32(&self.gpu, self.act, &data).map_err(m)?)
            }
            // bf16 activations read the tensor-core layout where the shape allows; f32 keeps the exact scalar path.
            HostLinear::Gptq(g) => GpuWeightKind::Gptq(
                match self.act {
                    ActDtype::Bf16 => GpuGptq::upload_for_tensor_cores(&self.gpu, &g),
                    ActDtype::F32 => GpuGptq::upload(&self.gpu, &g),
                }
                .map_err(m)?,
            ),
        };
        Ok(GpuWeight { out_features, in_features, kind, dense: OnceLock::new() })
    }

    fn load_vector(&self, v: Vec<f32>) -> MResult<CudaSlice<f32>> {
        self.gpu.stream.clone_htod(&v).map_err(md("upload vector"))
    }

    fn new_layer_cache(&self, dims: &MlaDims, indexer: Option<&IndexerDims>) -> GpuLayerCache {
        GpuLayerCache::new(dims, indexer, self.kv_dtype, self.cache_budget)
    }

    fn upload(&self, rows: usize, cols: usize, data: Vec<f32>) -> MResult<GpuTensor> {
        let _p = self.gpu.span(|| "upload".into());
        if data.len() != rows * cols {
            return Err(shape("upload", format!("{} values for [{rows}, {cols}]", data.len())));
        }
        Ok(GpuTensor { rows, cols, data: Act::from_f32(&self.gpu, self.act, &data).map_err(m)? })
    }

    fn download(&self, x: &GpuTensor) -> MResult<Vec<f32>> {
        x.data.to_f32(&self.gpu, x.rows * x.cols).map_err(m)
    }

    fn shape(&self, x: &GpuTensor) -> (usize, usize) {
        (x.rows, x.cols)
    }

    fn embed(&self, table: &GpuWeight, ids: &[u32]) -> MResult<GpuTensor> {
        let _p = self.gpu.span(|| "embed".into());
        let cols = table.in_features;
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= table.out_features) {
            return Err(pipemoe_model::Error::TokenOutOfRange { token: bad as usize, vocab: table.out_features });
        }
        let GpuWeightKind::Dense(t) = &table.kind else {
            return Err(shape("embed", "the embedding table is quantized".into()));
        };
        let idx = self.upload_i32(&ids.iter().map(|&i| i as i32).collect::<Vec<_>>())?;
        let mut y = self.output(ids.len(), cols)?;
        let (r, c) = (ids.len() as i32, cols as i32);
        let mut l = self.gpu.stream.launch_builder(self.op("embed", t)?);
        l.arg(t).arg(&idx).arg(&mut y.data).arg(&r).arg(&c);
        // SAFETY: matches embed_*; ids were checked against the table's rows.
        unsafe { l.launch(grid(ids.len() * cols, 256)) }.map_err(md("embed"))?;
        Ok(y)
    }

    fn linear(&self, x: &GpuTensor, w: &GpuWeight) -> MResult<GpuTensor> {
        crate::gemv::linear(self, x, w)
    }

    fn rms_norm(&self, x: &GpuTensor, w: &CudaSlice<f32>, eps: f32) -> MResult<GpuTensor> {
        crate::rowops::rms_norm(self, x, w, eps)
    }

    fn add_rms_norm(&self, x: &mut GpuTensor, y: &GpuTensor, w: &CudaSlice<f32>, eps: f32) -> MResult<GpuTensor> {
        crate::rowops::add_rms_norm(self, x, y, w, eps)
    }

    fn rms_norm_linear(&self, x: &GpuTensor, w: &CudaSlice<f32>, eps: f32, lin: &GpuWeight) -> MResult<GpuTensor> {
        if self.gpu.input_norm()
            && x.rows == 1
            && let Some((y, _)) = crate::addnorm::norm_linear(self, x, None, (w, eps), lin)?
        {
            return Ok(y);
        }
        self.linear(&self.rms_norm(x, w, eps)?, lin)
    }

    fn layer_norm(&self, x: &GpuTensor, w: &CudaSlice<f32>, b: &CudaSlice<f32>, eps: f32) -> MResult<GpuTensor> {
        crate::rowops::layer_norm(self, x, w, b, eps)
    }

    fn add_assign(&self, x: &mut GpuTensor, y: &GpuTensor) -> MResult<()> {
        let _p = self.gpu.span(|| "add".into());
        let n = x.rows * x.cols;
        same_layout("add", x, y)?;
        let nn = n as u64;
        let mut l = self.gpu.stream.launch_builder(self.op("add", &x.data)?);
        l.arg(&mut x.data).arg(&y.data).arg(&nn);
        // SAFETY: matches add_*; both hold n values of one dtype.
        unsafe { l.launch(grid(n, 256)) }.map_err(md("add"))?;
        Ok(())
    }

    fn scale(&self, x: &mut GpuTensor, s: f32) -> MResult<()> {
        let _p = self.gpu.span(|| "scale".into());
        let nn = (x.rows * x.cols) as u64;
        let mut l = self.gpu.stream.launch_builder(self.op("scale", &x.data)?);
        l.arg(&mut x.data).arg(&s).arg(&nn);
        // SAFETY: matches scale_*.
        unsafe { l.launch(grid(x.rows * x.cols, 256)) }.map_err(md("scale"))?;
        Ok(())
    }

    fn gather_rows(&self, x: &GpuTensor, idx: &[usize]) -> MResult<GpuTensor> {
        let _p = self.gpu.span(|| "gather_rows".into());
        if let Some(&bad) = idx.iter().find(|&&r| r >= x.rows) {
            return Err(shape("gather_rows", format!("row {bad} of {}", x.rows)));
        }
        let rows = self.upload_i32(&idx.iter().map(|&r| r as i32).collect::<Vec<_>>())?;
        self.copy(x, Some(&rows.as_view()), idx.len(), 0, x.cols)
    }

    fn columns(&self, x: &GpuTensor, start: usize, len: usize) -> MResult<GpuTensor> {
        let _p = self.gpu.span(|| format!("columns {len} of {}", x.cols));
        if start + len > x.cols {
            return Err(shape("columns", format!("{start}+{len} of {}", x.cols)));
        }
        self.copy(x, None, x.rows, start, len)
    }

    fn split_columns(&self, x: &GpuTensor, widths: &[usize]) -> MResult<Vec<GpuTensor>> {
        crate::rowops::split_columns(self, x, widths)
    }

    fn silu_mul(&self, gate: &GpuTensor, up: &GpuTensor) -> MResult<GpuTensor> {
        let _p = self.gpu.span(|| "silu_mul".into());
        let n = gate.rows * gate.cols;
        if n != up.rows * up.cols || gate.data.dtype() != up.data.dtype() {
            return Err(shape("silu_mul", format!("[{}, {}] and [{}, {}]", gate.rows, gate.cols, up.rows, up.cols)));
        }
        let mut y = self.output(gate.rows, gate.cols)?;
        let nn = n as u64;
        let mut l = self.gpu.stream.launch_builder(self.op("silu_mul", &gate.data)?);
        l.arg(&gate.data).arg(&up.data).arg(&mut y.data).arg(&nn);
        // SAFETY: matches silu_mul_*; all three hold n values.
        unsafe { l.launch(grid(n, 256)) }.map_err(md("silu_mul"))?;
        Ok(y)
    }

    fn rope(&self, x: &mut GpuTensor, spec: RopeSpec, inv_freq: &[f32], rows: &[Row]) -> MResult<()> {
        crate::rowops::rope(self, x, spec, inv_freq, rows)
    }

    fn rope_columns(
        &self,
        x: &GpuTensor,
        start: usize,
        spec: RopeSpec,
        inv_freq: &[f32],
        rows: &[Row],
    ) -> MResult<GpuTensor> {
        crate::rowops::rope_columns(self, x, start, spec, inv_freq, rows)
    }

    fn rope_columns2(
        &self,
        x: &GpuTensor,
        a: (usize, RopeSpec),
        b: (usize, RopeSpec),
        inv_freq: &[f32],
        rows: &[Row],
    ) -> MResult<(GpuTensor, GpuTensor)> {
        crate::rowops::rope_columns2(self, x, a, b, inv_freq, rows)
    }

    fn linear_rope_columns2(
        &self,
        x: &GpuTensor,
        w: &GpuWeight,
        a: (usize, RopeSpec),
        b: (usize, RopeSpec),
        inv_freq: &[f32],
        rows: &[Row],
    ) -> MResult<(GpuTensor, GpuTensor)> {
        match crate::qrope::linear_rope2(self, x, w, a, b, inv_freq, rows)? {
            Some(parts) => Ok(parts),
            None => self.rope_columns2(&self.linear(x, w)?, a, b, inv_freq, rows),
        }
    }

    fn mla_prep(
        &self,
        proj: &GpuTensor,
        p: &MlaPrep<'_, CudaSlice<f32>>,
        inv_freq: &[f32],
        rows: &[Row],
    ) -> MResult<MlaPrepped<GpuTensor>> {
        crate::prep::mla_prep(self, proj, p, inv_freq, rows, None)
    }

    fn mla_prep_write(
        &self,
        proj: &GpuTensor,
        p: &MlaPrep<'_, CudaSlice<f32>>,
        inv_freq: &[f32],
        rows: &[Row],
        cache: &mut GpuLayerCache,
    ) -> MResult<MlaPrepped<GpuTensor>> {
        crate::prep::mla_prep_write(self, proj, p, inv_freq, rows, cache)
    }

    fn cache_write(
        &self,
        cache: &mut GpuLayerCache,
        rows: &[Row],
        latent: &GpuTensor,
        k_pe: &GpuTensor,
        index_k: Option<&GpuTensor>,
    ) -> MResult<()> {
        let _p = self.gpu.span(|| "cache_write".into());
        crate::attention::cache_write(self, cache, rows, latent, k_pe, index_k)
    }

    fn run_layers(
        &self,
        caches: &mut [GpuLayerCache],
        rows: &[Row],
        variant: u64,
        h: GpuTensor,
        body: &mut LayersBody<'_, Self>,
    ) -> MResult<GpuTensor> {
        crate::graph::run_layers(self, caches, rows, variant, h, body)
    }

    fn cache_free(&self, cache: &mut GpuLayerCache, seq: SeqId) {
        cache.free(seq);
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
    ) -> MResult<GpuSelection> {
        // Profiled in parts (indexer.rs): the tables, the scores, the top-k.
        crate::indexer::indexer_select(self, cache, q, w, dims, rows, None)
    }

    fn selection_to_host(&self, selection: &GpuSelection) -> MResult<HostSelection> {
        selection.to_host(self)
    }

    fn mla_attention(
        &self,
        cache: &GpuLayerCache,
        q: &GpuTensor,
        kv_b: &GpuWeight,
        dims: &MlaDims,
        rows: &[Row],
        selection: Option<&GpuSelection>,
    ) -> MResult<GpuTensor> {
        crate::attention::mla(self, cache, q, kv_b, dims, rows, selection)
    }

    fn mla_attention_indexed(
        &self,
        cache: &GpuLayerCache,
        q: &GpuTensor,
        kv_b: &GpuWeight,
        dims: &MlaDims,
        rows: &[Row],
        index: IndexQuery<'_, Self>,
    ) -> MResult<GpuTensor> {
        crate::attention::mla_indexed(self, cache, q, kv_b, dims, rows, index)
    }

    fn mla_attention_fused_query(
        &self,
        cache: &GpuLayerCache,
        query: FusedQuery<'_, Self>,
        kv_b: &GpuWeight,
        dims: &MlaDims,
        rows: &[Row],
    ) -> MResult<GpuTensor> {
        crate::attention::mla_fused_query(self, cache, query, kv_b, dims, rows)
    }

    fn mla_prep_attention_fused(
        &self,
        cache: &mut GpuLayerCache,
        query: PrepQuery<'_, Self>,
        kv_b: &GpuWeight,
        dims: &MlaDims,
        rows: &[Row],
    ) -> MResult<GpuTensor> {
        crate::prep::mla_prep_fused_query(self, cache, query, kv_b, dims, rows)
    }

    fn route(&self, x: &GpuTensor, gate: &GpuWeight, bias: &CudaSlice<f32>, dims: &RouterDims) -> MResult<GpuRoutes> {
        crate::route::route(self, x, gate, bias, dims).map(GpuRoutes::new)
    }

    fn add_rms_norm_route(
        &self,
        x: &mut GpuTensor,
        y: &GpuTensor,
        w: &CudaSlice<f32>,
        eps: f32,
        gate: &GpuWeight,
        bias: &CudaSlice<f32>,
        dims: &RouterDims,
    ) -> MResult<(GpuTensor, GpuRoutes)> {
        if let Some((normed, routes)) = crate::route::add_norm_route(self, x, y, (w, eps), gate, bias, dims)? {
            return Ok((normed, GpuRoutes::new(routes)));
        }
        let normed = self.add_rms_norm(x, y, w, eps)?;
        let routes = self.route(&normed, gate, bias, dims)?;
        Ok((normed, routes))
    }

    fn routes_to_host(&self, routes: &GpuRoutes) -> MResult<Routing> {
        routes.host().cloned()
    }

    fn load_experts(&self, experts: Vec<Option<ExpertWeights<Self>>>) -> MResult<GpuExperts> {
        GpuExperts::new(self, experts)
    }

    fn experts(&self, x: &GpuTensor, experts: &GpuExperts, routes: &GpuRoutes) -> MResult<GpuTensor> {
        self.run_experts(x, experts, routes, None)
    }

    fn experts_with_shared(
        &self,
        x: &GpuTensor,
        experts: &GpuExperts,
        shared: &ExpertWeights<Self>,
        routes: &GpuRoutes,
    ) -> MResult<GpuTensor> {
        self.run_experts(x, experts, routes, Some(shared))
    }

    fn experts_with_shared_into(
        &self,
        h: &mut GpuTensor,
        x: &GpuTensor,
        experts: &GpuExperts,
        shared: &ExpertWeights<Self>,
        routes: &GpuRoutes,
    ) -> MResult<Option<GpuTensor>> {
        // One row: the down launch's combine adds into the residual (addnorm.rs says why).
        let into = (self.gpu.input_norm() && x.rows == 1).then_some(h);
        self.run_experts_into(into, x, experts, routes, Some(shared))
    }

    fn export(&self, x: &GpuTensor) -> MResult<Option<SharedActivations>> {
        crate::ipc::export(self, x).map(Some)
    }

    fn import(&self, rows: usize, cols: usize, mem_handle: &[u8], event_handle: &[u8]) -> MResult<GpuTensor> {
        crate::ipc::import(self, rows, cols, mem_handle, event_handle)
    }

    fn import_landed(&self) -> MResult<Option<Landed>> {
        crate::ipc::landed(self).map(Some)
    }

    fn sample(&self, logits: &GpuTensor, rows: &mut [SampleRow<'_>]) -> MResult<Vec<SampledToken>> {
        let _p = self.gpu.span(|| "sample".into());
        crate::sample::sample_rows(self, logits, rows)
    }
}

impl CudaBackend {
    /// `y[r, c] = x[rows[r] or r, start + c]`.
    pub(crate) fn copy(
        &self,
        x: &GpuTensor,
        rows: Option<&CudaView<'_, i32>>,
        n_rows: usize,
        start: usize,
        cols: usize,
    ) -> MResult<GpuTensor> {
        let mut y = self.output(n_rows, cols)?;
        let (xc, st, nr, c) = (x.cols as i32, start as i32, n_rows as i32, cols as i32);
        let mut l = self.gpu.stream.launch_builder(self.op("copy_rows_cols", &x.data)?);
        l.arg(&x.data).arg(&xc);
        l.arg_or_null(rows);
        l.arg(&st).arg(&mut y.data).arg(&nr).arg(&c);
        // SAFETY: matches copy_rows_cols_*; rows and columns checked by the callers.
        unsafe { l.launch(grid(n_rows * cols, 256)) }.map_err(md("copy"))?;
        Ok(y)
    }
}
