//! Multi-head latent attention (MODEL_SPEC §2.3–2.6; HF `DeepseekV32Attention`). The cache holds the normed
//! latent `c` and the roped `k_pe` per token (576 values per token per layer for the real model), never the
//! expanded per-head keys; attention absorbs `kv_b_proj` into the query and the output.

use crate::backend::{Backend, HostLinear, MlaDims, RopeSpec, Row};
use crate::indexer::Indexer;
use crate::weights::Loader;
use crate::{Error, Result};

pub struct Mla<B: Backend> {
    /// The projections of the normed hidden state: `q_a_proj` (with q LoRA), `kv_a_proj_with_mqa` and the
    /// indexer's `wk`.
    proj: Projections<B>,
    /// `q_a_layernorm` with q LoRA.
    q_a_norm: Option<B::Vector>,
    /// `q_b_proj` `[heads·qk_head_dim, q_lora]`, or `q_proj` `[heads·qk_head_dim, hidden]`.
    q_b: B::Weight,
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
/// step instead of up to three; the outputs are then column ranges of its result), else each its own.
enum Projections<B: Backend> {
    /// `q_a` `[q_lora, hidden]` (with q LoRA), `kv_a` `[kv_lora + qk_rope, hidden]`; wk stays with the indexer.
    Separate { q_a: Option<B::Weight>, kv_a: B::Weight },
    /// `[q_lora | kv_lora + qk_rope | wk's head_dim, hidden]`; `q_a` / `wk` are 0 where absent.
    Fused { w: B::Weight, q_a: usize, wk: usize },
}

/// One step's projections of the hidden state: q_a's output (with q LoRA), the latent before its norm, k_pe
/// before RoPE and `x·wkᵀ` when attention holds it.
struct Projected<T> {
    q_a: Option<T>,
    latent: T,
    k_pe: T,
    wk: Option<T>,
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
                (Some(ld.linear(&format!("{p}.q_a_proj"), h, r)?), Some(norm), lin("q_b_proj", r, nh * qk)?)
            }
            None => (None, None, lin("q_proj", h, nh * qk)?),
        };
        let kv_a = ld.linear(&format!("{p}.kv_a_proj_with_mqa"), h, c.kv_lora_rank + c.qk_rope_head_dim)?;
        let ix = match (&c.indexer, with_indexer) {
            (Some(ic), true) => Some(ic),
            _ => None,
        };
        let ix_prefix = format!("{p}.indexer");
        let wk = ix.map(|ic| Indexer::<B>::wk(ld, &ix_prefix, ic)).transpose()?;
        // Fuse what shares a format — all three, else q_a and kv_a with wk on its own; a lone kv_a stays.
        let fuse = |with_wk: bool| {
            let parts: Vec<&HostLinear> = q_a.iter().chain([&kv_a]).chain(wk.iter().filter(|_| with_wk)).collect();
            if parts.len() > 1 { HostLinear::concat_outputs(&parts).map(|w| (w, with_wk)) } else { None }
        };
        let fused = fuse(true).or_else(|| fuse(false));
        let (proj, wk) = match fused {
            Some((w, with_wk)) => {
                let qa = q_a.as_ref().map_or(0, HostLinear::out_features);
                let wk_out = wk.as_ref().filter(|_| with_wk).map_or(0, HostLinear::out_features);
                let proj = Projections::Fused { w: b.load_linear(w)?, q_a: qa, wk: wk_out };
                (proj, wk.filter(|_| !with_wk))
            }
            None => {
                let q_a = q_a.map(|w| b.load_linear(w)).transpose()?;
                (Projections::Separate { q_a, kv_a: b.load_linear(kv_a)? }, wk)
            }
        };
        let indexer = ix.map(|ic| Indexer::load(b, ld, &ix_prefix, ic, wk)).transpose()?;
        Ok(Self {
            proj,
            q_a_norm,
            q_b,
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
        let d = self.dims;
        let qk = d.qk_nope + d.qk_rope;
        let pr = self.project(b, x)?;
        // [rows, q_lora] then [rows, heads·qk]
        let (mut q, qr) = match (&pr.q_a, &self.q_a_norm) {
            (Some(qa), Some(norm)) => {
                let qr = b.rms_norm(qa, norm, self.eps)?;
                (b.linear(&qr, &self.q_b)?, Some(qr))
            }
            _ => (b.linear(x, &self.q_b)?, None),
        };
        b.rope(
            &mut q,
            RopeSpec { heads: d.heads, head_dim: qk, offset: d.qk_nope, interleaved: true },
            inv_freq,
            rows,
        )?;
        // Normed latent c and roped k_pe.
        let latent = b.rms_norm(&pr.latent, &self.kv_a_norm, self.eps)?;
        let mut k_pe = pr.k_pe;
        b.rope(&mut k_pe, RopeSpec { heads: 1, head_dim: d.qk_rope, offset: 0, interleaved: true }, inv_freq, rows)?;
        let selection = match &self.indexer {
            Some(ix) => {
                let k_raw = match pr.wk {
                    Some(k) => k,
                    None => ix.raw_key(b, x)?,
                };
                if ix.selects(rows) {
                    let qr = qr.as_ref().ok_or_else(|| Error::backend("the indexer needs q_lora_rank"))?;
                    let out = ix.project(b, x, qr, &k_raw, inv_freq, rows)?;
                    b.cache_write(cache, rows, &latent, &k_pe, Some(&out.k))?;
                    Some(b.indexer_select(cache, &out.q, &out.w, &ix.dims, rows)?)
                } else {
                    // No row has more keys than the selection keeps: attention over every key is what it would
                    // pick, so only the indexer key is computed (for the cache, where later positions need it).
                    b.cache_write(cache, rows, &latent, &k_pe, Some(&ix.key(b, &k_raw, inv_freq, rows)?))?;
                    None
                }
            }
            None => {
                b.cache_write(cache, rows, &latent, &k_pe, None)?;
                None
            }
        };
        let attn = b.mla_attention(cache, &q, &self.kv_b, &d, rows, selection.as_ref())?;
        b.linear(&attn, &self.o)
    }

    /// The step's projections of `x`, from the fused matrix's column ranges or each its own.
    fn project(&self, b: &B, x: &B::Tensor) -> Result<Projected<B::Tensor>> {
        let (lora, rope) = (self.dims.kv_lora, self.dims.qk_rope);
        Ok(match &self.proj {
            Projections::Separate { q_a, kv_a } => {
                let mut kv = b.split_columns(&b.linear(x, kv_a)?, &[lora, rope])?.into_iter();
                let (latent, k_pe) = (kv.next(), kv.next());
                Projected {
                    q_a: q_a.as_ref().map(|w| b.linear(x, w)).transpose()?,
                    latent: latent.ok_or_else(|| Error::backend("split_columns"))?,
                    k_pe: k_pe.ok_or_else(|| Error::backend("split_columns"))?,
                    wk: None,
                }
            }
            Projections::Fused { w, q_a, wk } => {
                // [q_a | latent | k_pe | wk] with the absent ones left out.
                let widths: Vec<usize> = [(*q_a > 0).then_some(*q_a), Some(lora), Some(rope), (*wk > 0).then_some(*wk)]
                    .into_iter()
                    .flatten()
                    .collect();
                let mut parts = b.split_columns(&b.linear(x, w)?, &widths)?.into_iter();
                let mut next = || parts.next().ok_or_else(|| Error::backend("split_columns"));
                let q_a_out = if *q_a > 0 { Some(next()?) } else { None };
                let (latent, k_pe) = (next()?, next()?);
                Projected { q_a: q_a_out, latent, k_pe, wk: if *wk > 0 { Some(next()?) } else { None } }
            }
        })
    }
}
