//! Multi-head latent attention (MODEL_SPEC §2.3–2.6; HF `DeepseekV32Attention`). The cache holds the normed
//! latent `c` and the roped `k_pe` per token (576 values per token per layer for the real model), never the
//! expanded per-head keys; attention absorbs `kv_b_proj` into the query and the output.

use crate::backend::{
    Backend, FusedQuery, HostLinear, IndexQuery, MlaDims, MlaPrep, MlaPrepped, PrepQuery, RopeSpec, Row,
};
use crate::indexer::Indexer;
use crate::weights::Loader;
use crate::{Error, Result};

/// What attention reads: the hidden state normed already, or the residual stream `h` with its input norm (`norm`,
/// `eps`) still to apply.
pub enum MlaInput<'a, B: Backend> {
    Normed(&'a B::Tensor),
    Raw { h: &'a B::Tensor, norm: &'a B::Vector, eps: f32 },
}

pub struct Mla<B: Backend> {
    /// The projections of the normed hidden state: `q_a_proj` (with q LoRA), `kv_a_proj_with_mqa` and the
    /// indexer's `wk` and `weights_proj`.
    proj: Projections<B>,
    /// `q_a_layernorm` with q LoRA.
    q_a_norm: Option<B::Vector>,
    /// `q_b_proj` `[heads·qk_head_dim, q_lora]`, or `q_proj` `[heads·qk_head_dim, hidden]`; with the indexer's
    /// `wq_b` `[index heads·head_dim, q_lora]` below it when both read q_a's normed output in one format
    /// (`q_b_index` its width, else 0): one GEMV for a decode step's two query projections.
    q_b: B::Weight,
    q_b_index: usize,
    kv_a_norm: B::Vector,
    /// `[heads·(qk_nope + v_head), kv_lora]`
    kv_b: B::Weight,
    /// `[hidden, heads·v_head]`
    o: B::Weight,
    pub indexer: Option<Indexer<B>>,
    pub dims: MlaDims,
    eps: f32,
}

/// The projections of the normed hidden state, as one matrix when they share a format (one GEMV for a decode
/// step instead of up to four; the outputs are then column ranges of its result), else each its own.
enum Projections<B: Backend> {
    /// `q_a` `[q_lora, hidden]` (with q LoRA), `kv_a` `[kv_lora + qk_rope, hidden]`; wk and weights_proj stay
    /// with the indexer.
    Separate { q_a: Option<B::Weight>, kv_a: B::Weight },
    /// `[q_lora | kv_lora + qk_rope | wk's head_dim | weights_proj's heads, hidden]`; `q_a` / `wk` / `wp` are 0
    /// where absent (or left with the indexer).
    Fused { w: B::Weight, q_a: usize, wk: usize, wp: usize },
}

impl<B: Backend> Mla<B> {
    /// `with_indexer`: the checkpoint has this layer's indexer tensors (V3.2); otherwise attention is dense.
    pub fn load(b: &B, ld: &Loader<'_>, layer: usize, with_indexer: bool) -> Result<Self> {
        let c = ld.cfg;
        let p = format!("model.layers.{layer}.self_attn");
        let (h, nh, qk) = (c.hidden_size, c.num_attention_heads, c.qk_head_dim());
        let lin = |name: &str, i, o| -> Result<B::Weight> { b.load_linear(ld.linear(&format!("{p}.{name}"), i, o)?) };
        let (q_a, q_a_norm, q_b) = match c.q_lora_rank {
            Some(r) => {
                let norm = b.load_vector(ld.floats(&format!("{p}.q_a_layernorm.weight"), &[r])?)?;
                (
                    Some(ld.linear(&format!("{p}.q_a_proj"), h, r)?),
                    Some(norm),
                    ld.linear(&format!("{p}.q_b_proj"), r, nh * qk)?,
                )
            }
            None => (None, None, ld.linear(&format!("{p}.q_proj"), h, nh * qk)?),
        };
        let kv_a = ld.linear(&format!("{p}.kv_a_proj_with_mqa"), h, c.kv_lora_rank + c.qk_rope_head_dim)?;
        let ix = match (&c.indexer, with_indexer) {
            (Some(ic), true) => Some(ic),
            _ => None,
        };
        let ix_prefix = format!("{p}.indexer");
        let wk = ix.map(|ic| Indexer::<B>::wk(ld, &ix_prefix, ic)).transpose()?;
        // The indexer's query projection reads what q_b_proj reads (q_a's normed output): one matrix when their
        // formats allow.
        let wq_b = match (ix, c.q_lora_rank) {
            (Some(ic), Some(r)) => Some(Indexer::<B>::wq_b(ld, &ix_prefix, ic, r)?),
            _ => None,
        };
        let (q_b, q_b_index, wq_b) = match wq_b.as_ref().and_then(|w| HostLinear::concat_outputs(&[&q_b, w])) {
            Some(fused) => (b.load_linear(fused)?, wq_b.as_ref().map_or(0, HostLinear::out_features), None),
            None => (b.load_linear(q_b)?, 0, wq_b),
        };
        let wp = ix.map(|ic| Indexer::<B>::weights_proj(ld, &ix_prefix, ic)).transpose()?;
        // Fuse what shares a format — all four, else without weights_proj, else without wk, else q_a and kv_a; a
        // lone kv_a stays.
        let fuse = |with_wk: bool, with_wp: bool| {
            let parts: Vec<&HostLinear> = q_a
                .iter()
                .chain([&kv_a])
                .chain(wk.iter().filter(|_| with_wk))
                .chain(wp.iter().filter(|_| with_wp))
                .collect();
            if parts.len() > 1 { HostLinear::concat_outputs(&parts).map(|w| (w, with_wk, with_wp)) } else { None }
        };
        let fused =
            [(true, true), (true, false), (false, true), (false, false)].into_iter().find_map(|(k, p)| fuse(k, p));
        let (proj, wk, wp) = match fused {
            Some((w, with_wk, with_wp)) => {
                let width =
                    |part: &Option<HostLinear>, on: bool| part.as_ref().filter(|_| on).map_or(0, |l| l.out_features());
                let qa = q_a.as_ref().map_or(0, HostLinear::out_features);
                let proj = Projections::Fused {
                    w: b.load_linear(w)?,
                    q_a: qa,
                    wk: width(&wk, with_wk),
                    wp: width(&wp, with_wp),
                };
                (proj, wk.filter(|_| !with_wk), wp.filter(|_| !with_wp))
            }
            None => {
                let q_a = q_a.map(|w| b.load_linear(w)).transpose()?;
                (Projections::Separate { q_a, kv_a: b.load_linear(kv_a)? }, wk, wp)
            }
        };
        let indexer = ix.map(|ic| Indexer::load(b, ld, &ix_prefix, ic, wq_b, wk, wp)).transpose()?;
        Ok(Self {
            proj,
            q_a_norm,
            q_b,
            q_b_index,
            kv_a_norm: b.load_vector(ld.floats(&format!("{p}.kv_a_layernorm.weight"), &[c.kv_lora_rank])?)?,
            kv_b: lin("kv_b_proj", c.kv_lora_rank, nh * (c.qk_nope_head_dim + c.v_head_dim))?,
            o: lin("o_proj", nh * c.v_head_dim, h)?,
            indexer,
            dims: MlaDims {
                heads: nh,
                qk_nope: c.qk_nope_head_dim,
                qk_rope: c.qk_rope_head_dim,
                v_head: c.v_head_dim,
                kv_lora: c.kv_lora_rank,
                softmax_scale: c.softmax_scale() as f32,
            },
            eps: c.rms_norm_eps as f32,
        })
    }

    /// `x`: the normed hidden state `[rows, hidden]` → attention output `[rows, hidden]`. Writes the rows'
    /// latent (and indexer key) into `cache` first, so each row attends to itself and everything before it.
    pub fn forward(
        &self,
        b: &B,
        x: &B::Tensor,
        cache: &mut B::LayerCache,
        inv_freq: &[f32],
        rows: &[Row],
    ) -> Result<B::Tensor> {
        self.forward_input(b, MlaInput::Normed(x), cache, inv_freq, rows)
    }

    /// [`Mla::forward`] of the hidden state normed (`MlaInput::Normed`) or of the residual stream and its input
    /// norm (`MlaInput::Raw`): then the fused projection takes the norm ([`Backend::rms_norm_linear`]), and the
    /// other paths norm it first.
    pub fn forward_input(
        &self,
        b: &B,
        input: MlaInput<'_, B>,
        cache: &mut B::LayerCache,
        inv_freq: &[f32],
        rows: &[Row],
    ) -> Result<B::Tensor> {
        let d = self.dims;
        let qk = d.qk_nope + d.qk_rope;
        // [rows, heads·qk] from q_a's normed output (q LoRA) or the hidden state, roped; with the indexer's query
        // projection fused, its columns follow: cut off and roped in the same way only when the indexer selects.
        let q_spec = RopeSpec { heads: d.heads, head_dim: qk, offset: d.qk_nope, interleaved: true };
        // Everything from the fused projection in one call: the cache written, q_b and wq_b one matrix over q_a's
        // output, and the indexer's weights made: the preparation, the query projections, the selection and the
        // attention (a GPU norms q_a in the query's launches and projects the indexer's query on a branch).
        if let (Some(ix), Projections::Fused { w, q_a, wk, wp }) = (&self.indexer, &self.proj)
            && self.q_b_index > 0
            && *q_a > 0
            && *wk > 0
            && *wp > 0
            && ix.selects(rows)
        {
            let prep = self.fused_prep(*q_a, *wk, *wp)?;
            let proj = match input {
                MlaInput::Normed(x) => b.linear(x, w)?,
                MlaInput::Raw { h, norm, eps } => b.rms_norm_linear(h, norm, eps, w)?,
            };
            let (w, index, index_dims) = (&self.q_b, ix.q_rope(), &ix.dims);
            let query = PrepQuery { proj: &proj, prep, w, q: q_spec, index, inv_freq, index_dims };
            let attn = b.mla_prep_attention_fused(cache, query, &self.kv_b, &d, rows)?;
            return b.linear(&attn, &self.o);
        }
        let normed;
        let x = match input {
            MlaInput::Normed(x) => x,
            MlaInput::Raw { h, norm, eps } => {
                normed = b.rms_norm(h, norm, eps)?;
                &normed
            }
        };
        let (MlaPrepped { q_a: qr, latent, k_pe, index_key, index_weights }, written) =
            self.prep(b, x, inv_freq, rows, cache)?;
        let (q, index_q) = match self.q_b_index {
            0 => {
                let mut q = b.linear(qr.as_ref().unwrap_or(x), &self.q_b)?;
                b.rope(&mut q, q_spec, inv_freq, rows)?;
                (q, None)
            }
            _ => {
                let input = qr.as_ref().unwrap_or(x);
                match &self.indexer {
                    Some(ix) if ix.selects(rows) => {
                        let index = (d.heads * qk, ix.q_rope());
                        let (q, index_q) =
                            b.linear_rope_columns2(input, &self.q_b, (0, q_spec), index, inv_freq, rows)?;
                        (q, Some(index_q))
                    }
                    _ => (b.rope_columns(&b.linear(input, &self.q_b)?, 0, q_spec, inv_freq, rows)?, None),
                }
            }
        };
        let index = match &self.indexer {
            Some(ix) => {
                if !written {
                    let key = match index_key {
                        Some(k) => k,
                        None => ix.key(b, &ix.raw_key(b, x)?, inv_freq, rows)?,
                    };
                    b.cache_write(cache, rows, &latent, &k_pe, Some(&key))?;
                }
                if ix.selects(rows) {
                    let qr = qr.as_ref().ok_or_else(|| Error::backend("the indexer needs q_lora_rank"))?;
                    Some((ix.project(b, x, qr, index_q, index_weights, inv_freq, rows)?, &ix.dims))
                } else {
                    // No row has more keys than the selection keeps: attention over every key is what it would
                    // pick, so only the indexer key (for the cache, where later positions need it) is computed.
                    None
                }
            }
            None => {
                if !written {
                    b.cache_write(cache, rows, &latent, &k_pe, None)?;
                }
                None
            }
        };
        let attn = match &index {
            Some((out, dims)) => {
                let index = IndexQuery { q: &out.q, w: &out.w, dims };
                b.mla_attention_indexed(cache, &q, &self.kv_b, &d, rows, index)?
            }
            None => b.mla_attention(cache, &q, &self.kv_b, &d, rows, None)?,
        };
        b.linear(&attn, &self.o)
    }

    /// The step's projections of `x`, normed and roped for the cache ([`Backend::mla_prep`]): from the fused
    /// matrix's column ranges in one pass, or from each projection its own. `true` with them when that pass has
    /// also written the rows into `cache` (the fused matrix holds everything the cache takes).
    fn prep(
        &self,
        b: &B,
        x: &B::Tensor,
        inv_freq: &[f32],
        rows: &[Row],
        cache: &mut B::LayerCache,
    ) -> Result<(MlaPrepped<B::Tensor>, bool)> {
        let (lora, rope) = (self.dims.kv_lora, self.dims.qk_rope);
        let latent = (lora, &self.kv_a_norm);
        match &self.proj {
            Projections::Separate { q_a, kv_a } => {
                let p = MlaPrep { q_a: None, latent, rope, index_key: None, index_weights: None, eps: self.eps };
                let mut out = b.mla_prep(&b.linear(x, kv_a)?, &p, inv_freq, rows)?;
                if let (Some(w), Some(norm)) = (q_a, &self.q_a_norm) {
                    out.q_a = Some(b.rms_norm(&b.linear(x, w)?, norm, self.eps)?);
                }
                Ok((out, false))
            }
            Projections::Fused { w, q_a, wk, wp } => {
                let p = self.fused_prep(*q_a, *wk, *wp)?;
                let y = b.linear(x, w)?;
                // Without the indexer's key in the fused matrix (and an indexer), the key comes later.
                if p.index_key.is_some() || self.indexer.is_none() {
                    Ok((b.mla_prep_write(&y, &p, inv_freq, rows, cache)?, true))
                } else {
                    Ok((b.mla_prep(&y, &p, inv_freq, rows)?, false))
                }
            }
        }
    }

    /// The fused projection's parts as [`Backend::mla_prep`] takes them (`q_a`, `wk`, `wp`: their widths, 0 where
    /// absent).
    fn fused_prep(&self, q_a: usize, wk: usize, wp: usize) -> Result<MlaPrep<'_, B::Vector>> {
        let latent = (self.dims.kv_lora, &self.kv_a_norm);
        let index_key = match (wk, &self.indexer) {
            (0, _) => None,
            (dim, Some(ix)) => {
                let (kw, kb) = ix.key_norm();
                Some((dim, kw, kb))
            }
            (_, None) => return Err(Error::backend("wk fused into attention without an indexer")),
        };
        let q_a = match (q_a, &self.q_a_norm) {
            (0, _) => None,
            (width, Some(norm)) => Some((width, norm)),
            (_, None) => return Err(Error::backend("q_a_proj without q_a_layernorm")),
        };
        let index_weights = match (wp, &self.indexer) {
            (0, _) => None,
            (heads, Some(ix)) => Some((heads, ix.weights_scale())),
            (_, None) => return Err(Error::backend("weights_proj fused into attention without an indexer")),
        };
        Ok(MlaPrep { q_a, latent, rope: self.dims.qk_rope, index_key, index_weights, eps: self.eps })
    }
}

/// [`Backend::mla_prep_attention_fused`]'s default: [`Backend::mla_prep_write`], then
/// [`Backend::mla_attention_fused_query`] over its q_a and indexer weights.
pub fn prep_then_fused_query<B: Backend + ?Sized>(
    b: &B,
    cache: &mut B::LayerCache,
    query: PrepQuery<'_, B>,
    kv_b: &B::Weight,
    dims: &MlaDims,
    rows: &[Row],
) -> Result<B::Tensor> {
    let PrepQuery { proj, prep, w, q, index, inv_freq, index_dims } = query;
    let out = b.mla_prep_write(proj, &prep, inv_freq, rows, cache)?;
    let (Some(x), Some(index_w)) = (&out.q_a, &out.index_weights) else {
        return Err(crate::Error::backend("the fused query needs q_a and the indexer's weights in the projection"));
    };
    let query = FusedQuery { x, w, q, index, inv_freq, index_w, index_dims };
    b.mla_attention_fused_query(cache, query, kv_b, dims, rows)
}
