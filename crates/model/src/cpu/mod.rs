//! The CPU backend: the readable f32 reference every other backend is checked against, and what runs the demo
//! on machines without a GPU.
//!
//! - `kernels`: dot products, matmul, norms, softmax, top-k.
//! - `attention`: the latent cache, the indexer's top-k and absorbed MLA attention.
//! - `moe`: routing and the routed experts.
//!
//! Quantized weights are dequantized to f32 once at load (4 bytes per parameter): this backend is a reference
//! and a demo engine, not the memory-frugal path (that is the GPU's).

mod attention;
pub mod kernels;
mod moe;

use crate::backend::{
    Backend, ExpertWeights, HostLinear, HostSelection, IndexerDims, MlaDims, RopeSpec, RouterDims, Routing, Row, SeqId,
};
use crate::rope::rotate;
use crate::{Error, Result};

pub use attention::{BLOCK as CACHE_BLOCK, CpuLayerCache};

/// A `[rows, cols]` row-major f32 matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuTensor {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl CpuTensor {
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

/// A Linear `[out, in]` in f32.
#[derive(Clone, Debug)]
pub struct CpuWeight {
    pub out_features: usize,
    pub in_features: usize,
    pub data: Vec<f32>,
}

impl CpuWeight {
    pub fn row(&self, o: usize) -> &[f32] {
        &self.data[o * self.in_features..(o + 1) * self.in_features]
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend {
    /// Bytes the layers' caches may hold together, and over how many layers; `None`: no bound (the default).
    cache_budget: Option<(u64, usize)>,
}

impl CpuBackend {
    /// The f32 reference (the only kind, for now; a name for call sites that will choose a precision).
    pub const F32: CpuBackend = CpuBackend { cache_budget: None };

    /// Bounds the caches made after this: `bytes` shared equally by `layers` layers, each holding whole blocks
    /// of [`CACHE_BLOCK`] positions (as a GPU worker's cache does; an operator's cap, and the tests' way to
    /// run admission and preemption without a GPU).
    pub fn with_cache_budget(self, bytes: u64, layers: usize) -> Self {
        Self { cache_budget: Some((bytes, layers.max(1))) }
    }
}

fn shape_err(what: &str, expected: usize, found: usize) -> Error {
    Error::Backend { reason: format!("{what}: expected {expected}, found {found}") }
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Weight = CpuWeight;
    type Vector = Vec<f32>;
    type LayerCache = CpuLayerCache;
    type Selection = HostSelection;
    type Routes = Routing;
    type Experts = Vec<Option<ExpertWeights<Self>>>;

    fn describe(&self) -> String {
        "cpu".to_string()
    }

    fn load_linear(&self, w: HostLinear) -> Result<CpuWeight> {
        Ok(match w {
            HostLinear::Dense { out_features, in_features, data } => CpuWeight { out_features, in_features, data },
            HostLinear::Gptq(g) => {
                let l = g.layout();
                CpuWeight { out_features: l.out_features, in_features: l.in_features, data: g.dequantize() }
            }
        })
    }

    fn load_vector(&self, v: Vec<f32>) -> Result<Vec<f32>> {
        Ok(v)
    }

    fn new_layer_cache(&self, dims: &MlaDims, indexer: Option<&IndexerDims>) -> CpuLayerCache {
        let cache = CpuLayerCache::new(dims, indexer);
        match self.cache_budget {
            Some((bytes, layers)) => cache.with_budget(bytes / layers as u64),
            None => cache,
        }
    }

    fn upload(&self, rows: usize, cols: usize, data: Vec<f32>) -> Result<CpuTensor> {
        if data.len() != rows * cols {
            return Err(shape_err("uploaded tensor length", rows * cols, data.len()));
        }
        Ok(CpuTensor { rows, cols, data })
    }

    fn download(&self, x: &CpuTensor) -> Result<Vec<f32>> {
        Ok(x.data.clone())
    }

    fn shape(&self, x: &CpuTensor) -> (usize, usize) {
        (x.rows, x.cols)
    }

    fn embed(&self, table: &CpuWeight, ids: &[u32]) -> Result<CpuTensor> {
        let h = table.in_features;
        let mut data = Vec::with_capacity(ids.len() * h);
        for &id in ids {
            let id = id as usize;
            if id >= table.out_features {
                return Err(Error::TokenOutOfRange { token: id, vocab: table.out_features });
            }
            data.extend_from_slice(table.row(id));
        }
        Ok(CpuTensor { rows: ids.len(), cols: h, data })
    }

    fn linear(&self, x: &CpuTensor, w: &CpuWeight) -> Result<CpuTensor> {
        if x.cols != w.in_features {
            return Err(shape_err("linear input width", w.in_features, x.cols));
        }
        let data = kernels::matmul_t(&x.data, x.rows, x.cols, &w.data, w.out_features);
        Ok(CpuTensor { rows: x.rows, cols: w.out_features, data })
    }

    fn rms_norm(&self, x: &CpuTensor, w: &Vec<f32>, eps: f32) -> Result<CpuTensor> {
        if x.cols != w.len() {
            return Err(shape_err("rms_norm width", w.len(), x.cols));
        }
        let mut out = vec![0f32; x.data.len()];
        for r in 0..x.rows {
            kernels::rms_norm_row(x.row(r), w, eps, &mut out[r * x.cols..(r + 1) * x.cols]);
        }
        Ok(CpuTensor { rows: x.rows, cols: x.cols, data: out })
    }

    fn layer_norm(&self, x: &CpuTensor, w: &Vec<f32>, b: &Vec<f32>, eps: f32) -> Result<CpuTensor> {
        if x.cols != w.len() || x.cols != b.len() {
            return Err(shape_err("layer_norm width", w.len(), x.cols));
        }
        let mut out = vec![0f32; x.data.len()];
        for r in 0..x.rows {
            kernels::layer_norm_row(x.row(r), w, b, eps, &mut out[r * x.cols..(r + 1) * x.cols]);
        }
        Ok(CpuTensor { rows: x.rows, cols: x.cols, data: out })
    }

    fn add_assign(&self, x: &mut CpuTensor, y: &CpuTensor) -> Result<()> {
        if x.data.len() != y.data.len() {
            return Err(shape_err("add_assign length", x.data.len(), y.data.len()));
        }
        x.data.iter_mut().zip(&y.data).for_each(|(a, b)| *a += b);
        Ok(())
    }

    fn scale(&self, x: &mut CpuTensor, s: f32) -> Result<()> {
        x.data.iter_mut().for_each(|a| *a *= s);
        Ok(())
    }

    fn gather_rows(&self, x: &CpuTensor, idx: &[usize]) -> Result<CpuTensor> {
        let mut data = Vec::with_capacity(idx.len() * x.cols);
        for &r in idx {
            if r >= x.rows {
                return Err(shape_err("gathered row", x.rows, r));
            }
            data.extend_from_slice(x.row(r));
        }
        Ok(CpuTensor { rows: idx.len(), cols: x.cols, data })
    }

    fn columns(&self, x: &CpuTensor, start: usize, len: usize) -> Result<CpuTensor> {
        if start + len > x.cols {
            return Err(shape_err("column range end", x.cols, start + len));
        }
        let mut data = Vec::with_capacity(x.rows * len);
        for r in 0..x.rows {
            data.extend_from_slice(&x.row(r)[start..start + len]);
        }
        Ok(CpuTensor { rows: x.rows, cols: len, data })
    }

    fn silu_mul(&self, gate: &CpuTensor, up: &CpuTensor) -> Result<CpuTensor> {
        if gate.data.len() != up.data.len() {
            return Err(shape_err("silu_mul length", gate.data.len(), up.data.len()));
        }
        let data = gate.data.iter().zip(&up.data).map(|(g, u)| kernels::silu(*g) * u).collect();
        Ok(CpuTensor { rows: gate.rows, cols: gate.cols, data })
    }

    fn rope(&self, x: &mut CpuTensor, spec: RopeSpec, inv_freq: &[f32], rows: &[Row]) -> Result<()> {
        let dim = 2 * inv_freq.len();
        if x.cols != spec.heads * spec.head_dim || spec.offset + dim > spec.head_dim || rows.len() != x.rows {
            return Err(Error::Backend { reason: format!("rope: bad spec {spec:?} for [{}, {}]", x.rows, x.cols) });
        }
        let half = dim / 2;
        for (r, row) in rows.iter().enumerate() {
            for h in 0..spec.heads {
                let base = r * x.cols + h * spec.head_dim + spec.offset;
                let v = &mut x.data[base..base + dim];
                for (i, &f) in inv_freq.iter().enumerate() {
                    let (a, b) = if spec.interleaved { (2 * i, 2 * i + 1) } else { (i, i + half) };
                    let (ya, yb) = rotate(v[a], v[b], row.pos, f);
                    v[a] = ya;
                    v[b] = yb;
                }
            }
        }
        Ok(())
    }

    fn cache_write(
        &self,
        cache: &mut CpuLayerCache,
        rows: &[Row],
        latent: &CpuTensor,
        k_pe: &CpuTensor,
        index_k: Option<&CpuTensor>,
    ) -> Result<()> {
        cache.write(rows, latent, k_pe, index_k)
    }

    fn cache_free(&self, cache: &mut CpuLayerCache, seq: SeqId) {
        cache.free(seq);
    }

    fn cache_len(&self, cache: &CpuLayerCache, seq: SeqId) -> usize {
        cache.len(seq)
    }

    fn indexer_select(
        &self,
        cache: &CpuLayerCache,
        q: &CpuTensor,
        w: &CpuTensor,
        dims: &IndexerDims,
        rows: &[Row],
    ) -> Result<HostSelection> {
        cache.indexer_select(q, w, dims, rows)
    }

    fn selection_to_host(&self, selection: &HostSelection) -> Result<HostSelection> {
        Ok(selection.clone())
    }

    fn mla_attention(
        &self,
        cache: &CpuLayerCache,
        q: &CpuTensor,
        kv_b: &CpuWeight,
        dims: &MlaDims,
        rows: &[Row],
        selection: Option<&HostSelection>,
    ) -> Result<CpuTensor> {
        cache.mla_attention(q, kv_b, dims, rows, selection)
    }

    fn route(&self, x: &CpuTensor, gate: &CpuWeight, bias: &Vec<f32>, dims: &RouterDims) -> Result<Routing> {
        moe::route(x, gate, bias, dims)
    }

    fn routes_to_host(&self, routes: &Routing) -> Result<Routing> {
        Ok(routes.clone())
    }

    fn load_experts(&self, experts: Vec<Option<ExpertWeights<Self>>>) -> Result<Vec<Option<ExpertWeights<Self>>>> {
        Ok(experts)
    }

    fn experts(
        &self,
        x: &CpuTensor,
        experts: &Vec<Option<ExpertWeights<Self>>>,
        routing: &Routing,
    ) -> Result<CpuTensor> {
        moe::experts(self, x, experts, routing)
    }
}
