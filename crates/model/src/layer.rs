//! One decoder layer (MODEL_SPEC §2.1; HF `DeepseekV32DecoderLayer`):
//! `h += MLA(RMSNorm_in(h)); h += FFN(RMSNorm_post(h))`.

use crate::Result;
use crate::backend::{Backend, Row};
use crate::mla::{Mla, MlaInput};
use crate::moe::Ffn;
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

    /// `h`: the residual stream `[rows, hidden]`, updated in place; `pending`: the previous layer's output not yet
    /// added to it (added here, with the input norm). Returns this layer's FFN output, likewise not yet added: the
    /// next layer (or the caller, after the last) adds it, so each residual add rides on the norm after it — or
    /// `None` where the backend added it into `h` already (the next layer's input norm may then go into its first
    /// projection: `MlaInput::Raw`).
    pub fn forward(
        &self,
        b: &B,
        h: &mut B::Tensor,
        pending: Option<B::Tensor>,
        cache: &mut B::LayerCache,
        inv_freq: &[f32],
        rows: &[Row],
    ) -> Result<Option<B::Tensor>> {
        let a = match pending {
            Some(p) => {
                let x = b.add_rms_norm(h, &p, &self.input_norm, self.eps)?;
                self.attn.forward(b, &x, cache, inv_freq, rows)?
            }
            None => {
                let input = MlaInput::Raw { h, norm: &self.input_norm, eps: self.eps };
                self.attn.forward_input(b, input, cache, inv_freq, rows)?
            }
        };
        self.ffn.forward_after(b, h, &a, &self.post_norm, self.eps)
    }
}
