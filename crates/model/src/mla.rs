//! Multi-head latent attention (MODEL_SPEC §2.3–2.6; HF `DeepseekV32Attention`). The cache holds the normed
//! latent `c` and the roped `k_pe` per token (576 values per token per layer for the real model), never the
//! expanded per-head keys; attention absorbs `kv_b_proj` into the query and the output.

use crate::backend::{Backend, MlaDims, RopeSpec, Row};
use crate::indexer::Indexer;
use crate::weights::Loader;
use crate::{Error, Result};

pub struct Mla<B: Backend> {
    /// `q_a_proj` + `q_a_layernorm`, or `None` with a direct `q_proj` (no q LoRA).
    q_a: Option<(B::Weight, B::Vector)>,
    /// `q_b_proj` `[heads·qk_head_dim, q_lora]`, or `q_proj` `[heads·qk_head_dim, hidden]`.
    q_b: B::Weight,
    /// `[kv_lora + qk_rope, hidden]`
    kv_a: B::Weight,
    kv_a_norm: B::Vector,
    /// `[heads·(qk_nope + v_head), kv_lora]`
    kv_b: B::Weight,
    /// `[hidden, heads·v_head]`
    o: B::Weight,
    pub indexer: Option<Indexer<B>>,
    pub dims: MlaDims,
    eps: f32,
}

impl<B: Backend> Mla<B> {
    /// `with_indexer`: the checkpoint has this layer's indexer tensors (V3.2); otherwise attention is dense.
    pub fn load(b: &B, ld: &Loader<'_>, layer: usize, with_indexer: bool) -> Result<Self> {
        let c = ld.cfg;
        let p = format!("model.layers.{layer}.self_attn");
        let (h, nh, qk) = (c.hidden_size, c.num_attention_heads, c.qk_head_dim());
        let lin = |name: &str, i, o| -> Result<B::Weight> { b.load_linear(ld.linear(&format!("{p}.{name}"), i, o)?) };
        let (q_a, q_b) = match c.q_lora_rank {
            Some(r) => {
                let norm = b.load_vector(ld.floats(&format!("{p}.q_a_layernorm.weight"), &[r])?)?;
                (Some((lin("q_a_proj", h, r)?, norm)), lin("q_b_proj", r, nh * qk)?)
            }
            None => (None, lin("q_proj", h, nh * qk)?),
        };
        let indexer = match (&c.indexer, with_indexer) {
            (Some(ic), true) => Some(Indexer::load(b, ld, &format!("{p}.indexer"), ic)?),
            _ => None,
        };
        Ok(Self {
            q_a,
            q_b,
            kv_a: lin("kv_a_proj_with_mqa", h, c.kv_lora_rank + c.qk_rope_head_dim)?,
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
        // [rows, q_lora] then [rows, heads·qk]
        let (mut q, qr) = match &self.q_a {
            Some((w, norm)) => {
                let qr = b.rms_norm(&b.linear(x, w)?, norm, self.eps)?;
                (b.linear(&qr, &self.q_b)?, Some(qr))
            }
            None => (b.linear(x, &self.q_b)?, None),
        };
        b.rope(
            &mut q,
            RopeSpec { heads: d.heads, head_dim: qk, offset: d.qk_nope, interleaved: true },
            inv_freq,
            rows,
        )?;
        // [rows, kv_lora + qk_rope] → normed latent c and roped k_pe
        let kv = b.linear(x, &self.kv_a)?;
        let latent = b.rms_norm(&b.columns(&kv, 0, d.kv_lora)?, &self.kv_a_norm, self.eps)?;
        let mut k_pe = b.columns(&kv, d.kv_lora, d.qk_rope)?;
        b.rope(&mut k_pe, RopeSpec { heads: 1, head_dim: d.qk_rope, offset: 0, interleaved: true }, inv_freq, rows)?;
        let selection = match &self.indexer {
            Some(ix) if ix.selects(rows) => {
                let qr = qr.as_ref().ok_or_else(|| Error::backend("the indexer needs q_lora_rank"))?;
                let out = ix.project(b, x, qr, inv_freq, rows)?;
                b.cache_write(cache, rows, &latent, &k_pe, Some(&out.k))?;
                Some(b.indexer_select(cache, &out.q, &out.w, &ix.dims, rows)?)
            }
            // No row has more keys than the selection keeps: attention over every key is what it would pick,
            // so only the indexer key is computed (for the cache, where later positions will need it).
            Some(ix) => {
                b.cache_write(cache, rows, &latent, &k_pe, Some(&ix.key(b, x, inv_freq, rows)?))?;
                None
            }
            None => {
                b.cache_write(cache, rows, &latent, &k_pe, None)?;
                None
            }
        };
        let attn = b.mla_attention(cache, &q, &self.kv_b, &d, rows, selection.as_ref())?;
        b.linear(&attn, &self.o)
    }
}
