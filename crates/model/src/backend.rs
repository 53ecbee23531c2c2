//! The operations the DeepSeek forward pass is written against (ARCHITECTURE.md "The forward pass, once").
//!
//! Model code (`mla`, `indexer`, `moe`, `layer`, `stage`) holds weights as the backend's own types and calls only
//! these fused operations, so the CPU reference and a GPU backend run the same math. A backend owns the layout
//! of activations (`Tensor`, logically `[rows, cols]` row-major, one row per token of the step), of weights
//! (`Weight`, a Linear `[out, in]` in whatever form it reads fastest) and of the per-layer latent cache.

use crate::Result;
pub use crate::host_linear::HostLinear;
use crate::sampling::{SampleRow, SampledToken};

/// One sequence in the KV cache. Chosen by the caller; unique among live sequences.
pub type SeqId = u64;

/// One row of a step: a token of sequence `seq` at absolute position `pos`.
///
/// Rows of one sequence are contiguous and in position order, and a sequence's first row in a step is at the
/// position right after what its cache holds (a prefill chunk or one decode token).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Row {
    pub seq: SeqId,
    pub pos: usize,
}

/// Where RoPE applies inside each head of a `[rows, heads·head_dim]` tensor.
#[derive(Clone, Copy, Debug)]
pub struct RopeSpec {
    pub heads: usize,
    pub head_dim: usize,
    /// First rotated column inside a head.
    pub offset: usize,
    /// Interleaved pairs `(x[2i], x[2i+1])` (MLA) or half split `(x[i], x[i+d/2])` (indexer), MODEL_SPEC §2.4.
    pub interleaved: bool,
}

impl RopeSpec {
    /// MLA's `k_pe`: one head of `qk_rope` values, interleaved pairs.
    pub fn k_pe(qk_rope: usize) -> RopeSpec {
        RopeSpec { heads: 1, head_dim: qk_rope, offset: 0, interleaved: true }
    }

    /// The indexer's query heads and key: the rope slice comes first in a head, half split (MODEL_SPEC §2.6).
    pub fn indexer(heads: usize, head_dim: usize) -> RopeSpec {
        RopeSpec { heads, head_dim, offset: 0, interleaved: false }
    }
}

/// The indexer key's LayerNorm epsilon (HF `DeepseekV32Indexer`'s `k_norm`).
pub const INDEXER_NORM_EPS: f32 = 1e-6;

/// The row-wise work between attention's fused projection `[rows, q_lora | kv_lora | qk_rope | index_dim |
/// index_heads]` and the cache ([`Backend::mla_prep`]); a part that is absent has no columns.
pub struct MlaPrep<'a, V> {
    /// `q_lora` and `q_a_layernorm`'s weight (with q LoRA).
    pub q_a: Option<(usize, &'a V)>,
    /// `kv_lora` and `kv_a_layernorm`'s weight.
    pub latent: (usize, &'a V),
    /// `qk_rope`: k_pe's columns.
    pub rope: usize,
    /// The indexer key's `head_dim` and `k_norm`'s weight and bias (V3.2, its `wk` fused).
    pub index_key: Option<(usize, &'a V, &'a V)>,
    /// The indexer's head weights: `heads` and the factor they are scaled by (`heads^-0.5`; V3.2, its
    /// `weights_proj` fused).
    pub index_weights: Option<(usize, f32)>,
    /// The RMSNorms' epsilon.
    pub eps: f32,
}

// By hand: the derive would ask V: Copy, and every field is a reference or a number whatever V is.
impl<V> Clone for MlaPrep<'_, V> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<V> Copy for MlaPrep<'_, V> {}

/// What [`Backend::mla_prep`] gives: `q_a` RMS-normed, the latent RMS-normed, `k_pe` roped, the indexer key
/// layer-normed and roped, and the indexer's head weights scaled.
pub struct MlaPrepped<T> {
    pub q_a: Option<T>,
    pub latent: T,
    pub k_pe: T,
    pub index_key: Option<T>,
    pub index_weights: Option<T>,
}

/// Shapes of MLA attention over the latent cache (MODEL_SPEC §2.3, §2.5).
#[derive(Clone, Copy, Debug)]
pub struct MlaDims {
    pub heads: usize,
    pub qk_nope: usize,
    pub qk_rope: usize,
    pub v_head: usize,
    pub kv_lora: usize,
    pub softmax_scale: f32,
}

/// Shapes of the V3.2 lightning indexer (MODEL_SPEC §2.6).
#[derive(Clone, Copy, Debug)]
pub struct IndexerDims {
    pub heads: usize,
    pub head_dim: usize,
    pub topk: usize,
}

/// The indexer's inputs for one step ([`Backend::mla_attention_indexed`]): `q` `[rows, heads·head_dim]` roped,
/// `w` `[rows, heads]` already scaled.
pub struct IndexQuery<'a, B: Backend + ?Sized> {
    pub q: &'a B::Tensor,
    pub w: &'a B::Tensor,
    pub dims: &'a IndexerDims,
}

/// A decode step's query projections from one fused weight ([`Backend::mla_attention_fused_query`]): `w` is
/// `[q_b; wq_b]` over q_a's normed output `x`, its columns attention's q (`q`, from column 0) then the indexer's
/// query (`index`), each roped ([`Backend::linear_rope_columns2`]); `index_w` `[rows, heads]` the indexer's head
/// weights, already scaled.
pub struct FusedQuery<'a, B: Backend + ?Sized> {
    pub x: &'a B::Tensor,
    pub w: &'a B::Weight,
    pub q: RopeSpec,
    pub index: RopeSpec,
    pub inv_freq: &'a [f32],
    pub index_w: &'a B::Tensor,
    pub index_dims: &'a IndexerDims,
}

/// A [`FusedQuery`] straight from attention's fused projection `proj` ([`Backend::mla_prep_attention_fused`]):
/// its `x` is q_a's part of `prep` normed, its `index_w` the indexer's weights part scaled.
pub struct PrepQuery<'a, B: Backend + ?Sized> {
    pub proj: &'a B::Tensor,
    pub prep: MlaPrep<'a, B::Vector>,
    pub w: &'a B::Weight,
    pub q: RopeSpec,
    pub index: RopeSpec,
    pub inv_freq: &'a [f32],
    pub index_dims: &'a IndexerDims,
}

/// Group-limited `noaux_tc` routing settings (MODEL_SPEC §2.7).
#[derive(Clone, Copy, Debug)]
pub struct RouterDims {
    pub n_experts: usize,
    pub top_k: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub norm_topk_prob: bool,
    pub scaling: f32,
}

/// The experts chosen for every row and their weights (already normalised and scaled).
#[derive(Clone, Debug, PartialEq)]
pub struct Routing {
    pub top_k: usize,
    /// `[rows, top_k]`.
    pub experts: Vec<u32>,
    /// `[rows, top_k]`.
    pub weights: Vec<f32>,
}

impl Routing {
    /// The rows routed to expert `e` and their weights, in row order.
    pub fn rows_of(&self, e: usize) -> (Vec<usize>, Vec<f32>) {
        let (mut rows, mut weights) = (Vec::new(), Vec::new());
        for (i, (&x, &w)) in self.experts.iter().zip(&self.weights).enumerate() {
            if x as usize == e {
                rows.push(i / self.top_k);
                weights.push(w);
            }
        }
        (rows, weights)
    }
}

/// Per row of a step, the key positions attention may use, in ascending order, as host lists (the CPU backend's
/// own selection; what `Backend::selection_to_host` returns for tests and diagnostics).
pub type HostSelection = Vec<Vec<u32>>;

/// Activations shared with another process on the same machine (CUDA IPC): a memory handle, an event handle the
/// receiver waits on before reading, and whatever keeps the exported buffer alive until this value is dropped.
pub struct SharedActivations {
    pub mem_handle: Vec<u8>,
    pub event_handle: Vec<u8>,
    pub keep: Box<dyn std::any::Any + Send>,
}

/// Waits until what a backend imported has been copied into its own memory ([`Backend::import_landed`]).
pub struct Landed(Box<dyn FnOnce() -> Result<()> + Send>);

impl Landed {
    pub fn new(wait: impl FnOnce() -> Result<()> + Send + 'static) -> Self {
        Self(Box::new(wait))
    }

    /// Blocks until the copies are done.
    pub fn wait(self) -> Result<()> {
        (self.0)()
    }
}

/// A step's layers over the residual stream with their caches ([`Backend::run_layers`]).
pub type LayersBody<'a, B> =
    dyn FnMut(&mut <B as Backend>::Tensor, &mut [<B as Backend>::LayerCache]) -> Result<()> + 'a;

/// The fused operations of the forward pass.
pub trait Backend: Send + Sync {
    type Tensor: Send;
    type Weight: Send + Sync;
    type Vector: Send + Sync;
    /// One layer's cache for every live sequence: the normed latent `c` (kv_lora), the roped `k_pe` (qk_rope)
    /// and, for V3.2, the indexer key (index_head_dim).
    type LayerCache: Send;
    /// The indexer's chosen keys for a step as the backend keeps them (host lists on the CPU; a device buffer on
    /// a GPU, so the choice never leaves the device).
    type Selection: Send;

    /// A short description ("cpu", "cuda:0 (NVIDIA H200)").
    fn describe(&self) -> String;

    fn load_linear(&self, w: HostLinear) -> Result<Self::Weight>;
    fn load_vector(&self, v: Vec<f32>) -> Result<Self::Vector>;
    fn new_layer_cache(&self, dims: &MlaDims, indexer: Option<&IndexerDims>) -> Self::LayerCache;

    fn upload(&self, rows: usize, cols: usize, data: Vec<f32>) -> Result<Self::Tensor>;
    fn download(&self, x: &Self::Tensor) -> Result<Vec<f32>>;
    fn shape(&self, x: &Self::Tensor) -> (usize, usize);

    /// Rows of an embedding table `[vocab, hidden]` (a Dense weight).
    fn embed(&self, table: &Self::Weight, ids: &[u32]) -> Result<Self::Tensor>;
    /// `y = x·Wᵀ`.
    fn linear(&self, x: &Self::Tensor, w: &Self::Weight) -> Result<Self::Tensor>;
    /// RMSNorm over each row, in f32 (MODEL_SPEC §2.2).
    fn rms_norm(&self, x: &Self::Tensor, w: &Self::Vector, eps: f32) -> Result<Self::Tensor>;
    /// LayerNorm with bias over each row (the indexer's `k_norm`).
    fn layer_norm(&self, x: &Self::Tensor, w: &Self::Vector, b: &Self::Vector, eps: f32) -> Result<Self::Tensor>;
    /// `x += y`.
    fn add_assign(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<()>;
    /// `x += y`, then the RMSNorm of the new `x`: a residual add and the norm after it, which a backend may do in
    /// one pass. The result must be what the two give apart (`x` as stored, then normed).
    fn add_rms_norm(&self, x: &mut Self::Tensor, y: &Self::Tensor, w: &Self::Vector, eps: f32) -> Result<Self::Tensor> {
        self.add_assign(x, y)?;
        self.rms_norm(x, w, eps)
    }
    /// `linear(rms_norm(x, w, eps), lin)`: a layer's input norm and its first projection, which a backend may do
    /// in the projection's launch. The result must be what the two give apart.
    fn rms_norm_linear(
        &self,
        x: &Self::Tensor,
        w: &Self::Vector,
        eps: f32,
        lin: &Self::Weight,
    ) -> Result<Self::Tensor> {
        self.linear(&self.rms_norm(x, w, eps)?, lin)
    }
    /// `x *= s`.
    fn scale(&self, x: &mut Self::Tensor, s: f32) -> Result<()>;
    /// The rows `idx` of `x`, in that order.
    fn gather_rows(&self, x: &Self::Tensor, idx: &[usize]) -> Result<Self::Tensor>;
    /// Columns `[start, start+len)` of every row.
    fn columns(&self, x: &Self::Tensor, start: usize, len: usize) -> Result<Self::Tensor>;
    /// The columns cut into consecutive runs of `widths` (summing to the row width), each its own tensor.
    fn split_columns(&self, x: &Self::Tensor, widths: &[usize]) -> Result<Vec<Self::Tensor>> {
        let mut start = 0;
        widths
            .iter()
            .map(|&w| {
                start += w;
                self.columns(x, start - w, w)
            })
            .collect()
    }
    /// `silu(gate) * up`, elementwise (SwiGLU).
    fn silu_mul(&self, gate: &Self::Tensor, up: &Self::Tensor) -> Result<Self::Tensor>;
    /// RoPE in place with the YaRN table `inv_freq` (one frequency per rotated pair).
    fn rope(&self, x: &mut Self::Tensor, spec: RopeSpec, inv_freq: &[f32], rows: &[Row]) -> Result<()>;
    /// Columns `[start, start + spec.heads · spec.head_dim)` of `x` as their own tensor, roped: what `columns`
    /// then `rope` give, which a backend may do in one pass (a fused projection's parts without a copy).
    fn rope_columns(
        &self,
        x: &Self::Tensor,
        start: usize,
        spec: RopeSpec,
        inv_freq: &[f32],
        rows: &[Row],
    ) -> Result<Self::Tensor> {
        let mut y = self.columns(x, start, spec.heads * spec.head_dim)?;
        self.rope(&mut y, spec, inv_freq, rows)?;
        Ok(y)
    }
    /// Two parts `(start, spec)` of `x` as [`Backend::rope_columns`] gives each, which a backend may do in one
    /// pass: attention's q and the indexer's query, both from the fused q_b + wq_b output.
    fn rope_columns2(
        &self,
        x: &Self::Tensor,
        a: (usize, RopeSpec),
        b: (usize, RopeSpec),
        inv_freq: &[f32],
        rows: &[Row],
    ) -> Result<(Self::Tensor, Self::Tensor)> {
        Ok((self.rope_columns(x, a.0, a.1, inv_freq, rows)?, self.rope_columns(x, b.0, b.1, inv_freq, rows)?))
    }
    /// `linear(x, w)` cut into two parts and roped as [`Backend::rope_columns2`] gives them, which a backend may do
    /// in the projection's own pass (a decode step's fused q_b + wq_b). The result must be what the two give.
    fn linear_rope_columns2(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        a: (usize, RopeSpec),
        b: (usize, RopeSpec),
        inv_freq: &[f32],
        rows: &[Row],
    ) -> Result<(Self::Tensor, Self::Tensor)> {
        self.rope_columns2(&self.linear(x, w)?, a, b, inv_freq, rows)
    }
    /// Attention's fused projection `proj` cut into its parts and each made ready for the cache ([`MlaPrep`]):
    /// the ops below, which a backend may run in one pass. The result must be what they give apart.
    fn mla_prep(
        &self,
        proj: &Self::Tensor,
        p: &MlaPrep<'_, Self::Vector>,
        inv_freq: &[f32],
        rows: &[Row],
    ) -> Result<MlaPrepped<Self::Tensor>> {
        let widths: Vec<usize> = [
            p.q_a.map(|q| q.0),
            Some(p.latent.0),
            Some(p.rope),
            p.index_key.map(|k| k.0),
            p.index_weights.map(|w| w.0),
        ]
        .into_iter()
        .flatten()
        .collect();
        let mut parts = self.split_columns(proj, &widths)?.into_iter();
        let mut next = || parts.next().ok_or_else(|| crate::Error::backend("split_columns"));
        let q_a = match p.q_a {
            Some((_, w)) => Some(self.rms_norm(&next()?, w, p.eps)?),
            None => None,
        };
        let latent = self.rms_norm(&next()?, p.latent.1, p.eps)?;
        let mut k_pe = next()?;
        self.rope(&mut k_pe, RopeSpec::k_pe(p.rope), inv_freq, rows)?;
        let index_key = match p.index_key {
            Some((dim, w, b)) => {
                let mut k = self.layer_norm(&next()?, w, b, INDEXER_NORM_EPS)?;
                self.rope(&mut k, RopeSpec::indexer(1, dim), inv_freq, rows)?;
                Some(k)
            }
            None => None,
        };
        let index_weights = match p.index_weights {
            Some((_, s)) => {
                let mut w = next()?;
                self.scale(&mut w, s)?;
                Some(w)
            }
            None => None,
        };
        Ok(MlaPrepped { q_a, latent, k_pe, index_key, index_weights })
    }
    /// [`Backend::mla_prep`], then the rows' latent, roped k_pe and indexer key (when `p` makes one) written into
    /// `cache` as [`Backend::cache_write`] writes them: one pass on a backend that can. A cache with an indexer
    /// needs `p.index_key`.
    fn mla_prep_write(
        &self,
        proj: &Self::Tensor,
        p: &MlaPrep<'_, Self::Vector>,
        inv_freq: &[f32],
        rows: &[Row],
        cache: &mut Self::LayerCache,
    ) -> Result<MlaPrepped<Self::Tensor>> {
        let out = self.mla_prep(proj, p, inv_freq, rows)?;
        self.cache_write(cache, rows, &out.latent, &out.k_pe, out.index_key.as_ref())?;
        Ok(out)
    }

    /// Writes each row's latent, roped k_pe and optional indexer key into the cache at its position.
    fn cache_write(
        &self,
        cache: &mut Self::LayerCache,
        rows: &[Row],
        latent: &Self::Tensor,
        k_pe: &Self::Tensor,
        index_k: Option<&Self::Tensor>,
    ) -> Result<()>;
    /// Drops a sequence's entries.
    fn cache_free(&self, cache: &mut Self::LayerCache, seq: SeqId);
    /// How many positions the cache holds for `seq`.
    fn cache_len(&self, cache: &Self::LayerCache, seq: SeqId) -> usize;

    /// Top-`topk` key positions per row from the indexer: `I(t) = Σ_h w_h · relu(q_h·k_t)` over causal keys.
    /// `q`: `[rows, heads·head_dim]` roped; `w`: `[rows, heads]` already scaled.
    fn indexer_select(
        &self,
        cache: &Self::LayerCache,
        q: &Self::Tensor,
        w: &Self::Tensor,
        dims: &IndexerDims,
        rows: &[Row],
    ) -> Result<Self::Selection>;
    /// A selection as host lists, each row's positions ascending (tests, diagnostics).
    fn selection_to_host(&self, selection: &Self::Selection) -> Result<HostSelection>;
    /// MLA attention with absorbed `kv_b_proj` over the latent cache (MODEL_SPEC §2.5).
    /// `q`: `[rows, heads·(qk_nope+qk_rope)]`, rope part already applied. Returns `[rows, heads·v_head]`.
    /// `selection`: the indexer's keys per row (V3.2 DSA), or `None` for every causal position (dense MLA).
    fn mla_attention(
        &self,
        cache: &Self::LayerCache,
        q: &Self::Tensor,
        kv_b: &Self::Weight,
        dims: &MlaDims,
        rows: &[Row],
        selection: Option<&Self::Selection>,
    ) -> Result<Self::Tensor>;
    /// The indexer's selection and MLA attention over it: what [`Backend::indexer_select`] then
    /// [`Backend::mla_attention`] give, in one call so that a backend may run the two where they are
    /// independent side by side (the GPU makes the selection beside the query's absorption).
    fn mla_attention_indexed(
        &self,
        cache: &Self::LayerCache,
        q: &Self::Tensor,
        kv_b: &Self::Weight,
        dims: &MlaDims,
        rows: &[Row],
        index: IndexQuery<'_, Self>,
    ) -> Result<Self::Tensor> {
        let selection = self.indexer_select(cache, index.q, index.w, index.dims, rows)?;
        self.mla_attention(cache, q, kv_b, dims, rows, Some(&selection))
    }
    /// Attention's q and the indexer's query from one fused weight, the indexer's selection and MLA over it: what
    /// [`Backend::linear_rope_columns2`] then [`Backend::mla_attention_indexed`] give, in one call so that a
    /// backend may start the indexer's part first (the GPU projects the indexer's query and selects on a branch
    /// beside q's projection and absorption).
    fn mla_attention_fused_query(
        &self,
        cache: &Self::LayerCache,
        query: FusedQuery<'_, Self>,
        kv_b: &Self::Weight,
        dims: &MlaDims,
        rows: &[Row],
    ) -> Result<Self::Tensor> {
        let FusedQuery { x, w, q, index, inv_freq, index_w, index_dims } = query;
        let (q, index_q) = self.linear_rope_columns2(x, w, (0, q), (q.heads * q.head_dim, index), inv_freq, rows)?;
        let index = IndexQuery { q: &index_q, w: index_w, dims: index_dims };
        self.mla_attention_indexed(cache, &q, kv_b, dims, rows, index)
    }
    /// [`Backend::mla_prep_write`] of the fused projection, then [`Backend::mla_attention_fused_query`] over its
    /// q_a and indexer weights, in one call so that a backend may take mla_prep off the step's critical path (the
    /// GPU norms q_a in the query's launches and runs the rest of mla_prep beside the indexer's branch).
    fn mla_prep_attention_fused(
        &self,
        cache: &mut Self::LayerCache,
        query: PrepQuery<'_, Self>,
        kv_b: &Self::Weight,
        dims: &MlaDims,
        rows: &[Row],
    ) -> Result<Self::Tensor> {
        crate::mla::prep_then_fused_query(self, cache, query, kv_b, dims, rows)
    }
    /// The routing of a step as the backend keeps it (host vectors on the CPU, device buffers on a GPU).
    type Routes: Send;
    /// The routed experts of one MoE layer as the backend lays them out (a GPU keeps a device table of them so
    /// one launch serves every selected expert).
    type Experts: Send + Sync;

    /// Router scores in f32 with the correction bias for selection only (MODEL_SPEC §2.7).
    fn route(
        &self,
        x: &Self::Tensor,
        gate: &Self::Weight,
        bias: &Self::Vector,
        dims: &RouterDims,
    ) -> Result<Self::Routes>;
    /// `add_rms_norm(x, y, w, eps)`, then `route` of the normed rows: the residual add and norm before an MoE block
    /// with its router, which a backend may run as one launch. Returns the normed rows and their routing, as the
    /// two give apart.
    #[allow(clippy::too_many_arguments)]
    fn add_rms_norm_route(
        &self,
        x: &mut Self::Tensor,
        y: &Self::Tensor,
        w: &Self::Vector,
        eps: f32,
        gate: &Self::Weight,
        bias: &Self::Vector,
        dims: &RouterDims,
    ) -> Result<(Self::Tensor, Self::Routes)> {
        let normed = self.add_rms_norm(x, y, w, eps)?;
        let routes = self.route(&normed, gate, bias, dims)?;
        Ok((normed, routes))
    }
    /// The routing as host vectors (tests, diagnostics).
    fn routes_to_host(&self, routes: &Self::Routes) -> Result<Routing>;
    /// Takes one layer's routed experts, indexed by expert id (`None` for those another slice holds).
    fn load_experts(&self, experts: Vec<Option<ExpertWeights<Self>>>) -> Result<Self::Experts>;
    /// `Σ_k w_k · expert_k(x)` over the routed experts this slice holds.
    fn experts(&self, x: &Self::Tensor, experts: &Self::Experts, routes: &Self::Routes) -> Result<Self::Tensor>;
    /// The MoE block's experts with its shared expert added: `experts(x) + down(silu(gate·x) ⊙ up·x)`. A backend
    /// may run the shared expert as one more expert of the routed launches.
    fn experts_with_shared(
        &self,
        x: &Self::Tensor,
        experts: &Self::Experts,
        shared: &ExpertWeights<Self>,
        routes: &Self::Routes,
    ) -> Result<Self::Tensor> {
        let mut y = self.experts(x, experts, routes)?;
        let h = self.silu_mul(&self.linear(x, &shared.gate)?, &self.linear(x, &shared.up)?)?;
        self.add_assign(&mut y, &self.linear(&h, &shared.down)?)?;
        Ok(y)
    }
    /// [`Backend::experts_with_shared`] for a residual stream `h`: `Some(y)` for the caller to add (what the
    /// default returns), or `None` where the backend added it into `h` itself, as `add_assign` would (its last
    /// launch's blocks, each on its own columns).
    fn experts_with_shared_into(
        &self,
        h: &mut Self::Tensor,
        x: &Self::Tensor,
        experts: &Self::Experts,
        shared: &ExpertWeights<Self>,
        routes: &Self::Routes,
    ) -> Result<Option<Self::Tensor>> {
        let _ = h;
        self.experts_with_shared(x, experts, shared, routes).map(Some)
    }

    /// One step of a stage's layers: `body` runs them over the residual stream `h` with their caches. A backend
    /// may reserve the rows' cache slots in every layer first, put the step's inputs on the device once for all
    /// layers, and replay the launches of an earlier step of the same shape instead of running `body` (CUDA
    /// graphs), so `body` must change nothing on the host that a later step relies on. `variant` tells apart the
    /// paths the layers may take for rows of one shape (the stage passes how many layers' indexers select keys):
    /// a step replays only a recording of its own variant.
    fn run_layers(
        &self,
        caches: &mut [Self::LayerCache],
        rows: &[Row],
        variant: u64,
        h: Self::Tensor,
        body: &mut LayersBody<'_, Self>,
    ) -> Result<Self::Tensor> {
        let _ = (rows, variant);
        let mut h = h;
        body(&mut h, caches)?;
        Ok(h)
    }

    /// Shares `x` with another process without a copy through the host; `None` when this backend cannot.
    fn export(&self, _x: &Self::Tensor) -> Result<Option<SharedActivations>> {
        Ok(None)
    }

    /// Reads `[rows, cols]` activations another process exported.
    fn import(&self, _rows: usize, _cols: usize, _mem_handle: &[u8], _event_handle: &[u8]) -> Result<Self::Tensor> {
        Err(crate::Error::Backend { reason: format!("{} cannot read CUDA IPC handles", self.describe()) })
    }

    /// Something to wait on until every `import` so far has been copied into this backend's memory, so the
    /// sender may reuse its buffer; `None` when imports copy before they return (the default). A CUDA import
    /// only queues its copy, and the receiver answers before its device has run it unless it waits.
    fn import_landed(&self) -> Result<Option<Landed>> {
        Ok(None)
    }

    /// One token per row of `logits` `[rows.len(), vocab]`, each from its row's sampler, with the logprobs it
    /// asks for. The default downloads every row and samples on the host; a GPU reduces the rows where they are
    /// and downloads what the host needs to finish (the same tokens, `sampling::batch`).
    fn sample(&self, logits: &Self::Tensor, rows: &mut [SampleRow<'_>]) -> Result<Vec<SampledToken>> {
        crate::sampling::sample_host(&self.download(logits)?, rows)
    }
}

/// A SwiGLU expert (or dense MLP, or shared expert): `down(silu(gate(x)) · up(x))`, MODEL_SPEC §2.8.
pub struct ExpertWeights<B: Backend + ?Sized> {
    pub gate: B::Weight,
    pub up: B::Weight,
    pub down: B::Weight,
}
