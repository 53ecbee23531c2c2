//! One decoder layer (MODEL_SPEC §2.1; HF `DeepseekV32DecoderLayer`):
//! `h += MLA(RMSNorm_in(h)); h += FFN(RMSNorm_post(h))`.

use crate::Result;
use crate::backend::{Backend, Row};
use crate::mla::Mla;
use crate::moe::{Carry, Ffn};
use crate::weights::{Loader, SliceSpec};

pub struct Layer<B: Backend> {
    input_norm: B::Vector,
    post_norm: B::Vector,
    pub attn: Mla<B>,
    ffn: Ffn<B>,
    eps: f32,
}

impl<B: Backend> Layer<B> {
    pub fn load(b: &B, ld: &Loader<'_>, layer: usize, slice: &SliceSpec, with_indexer: bool) -> Result<Self> {
        let h = ld.cfg.hidden_size;
        let p = format!("model.layers.{layer}");
        Ok(Self {
            input_norm: b.load_vector(ld.floats(&format!("{p}.input_layernorm.weight"), &[h])?)?,
            post_norm: b.load_vector(ld.floats(&format!("{p}.post_attention_layernorm.weight"), &[h])?)?,
            attn: Mla::load(b, ld, layer, with_indexer)?,
            ffn: Ffn::load(b, ld, layer, slice)?,
            eps: ld.cfg.rms_norm_eps as f32,
        })
    }

    /// `h`: the residual stream `[rows, hidden]`, updated in place; `carry`: what the previous layer handed on (its
    /// output not yet added to `h`, which is added here with the input norm, or this layer's normed input). `next`:
    /// the layer after this one, whose input norm this layer's FFN may apply itself (an MoE block's last launch);
    /// the returned carry says which it did. After the last layer the caller adds a pending output.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        b: &B,
        h: &mut B::Tensor,
        carry: Option<Carry<B::Tensor>>,
        cache: &mut B::LayerCache,
        inv_freq: &[f32],
        rows: &[Row],
        next: Option<&Layer<B>>,
    ) -> Result<Carry<B::Tensor>> {
        let x = match carry {
            Some(Carry::Pending(p)) => b.add_rms_norm(h, &p, &self.input_norm, self.eps)?,
            Some(Carry::Normed(x)) => x,
            None => b.rms_norm(h, &self.input_norm, self.eps)?,
        };
        let a = self.attn.forward(b, &x, cache, inv_freq, rows)?;
        let next = next.map(|l| (&l.input_norm, l.eps));
        self.ffn.forward_after(b, h, &a, (&self.post_norm, self.eps), next)
    }
}
