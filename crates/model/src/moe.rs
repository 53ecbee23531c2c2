//! The feed-forward blocks: the dense SwiGLU MLP of the first layers, and the MoE block — `noaux_tc` router,
//! routed experts and the shared expert (MODEL_SPEC §2.7, §2.8; HF `DeepseekV32MoE`).

use crate::Result;
use crate::backend::{Backend, ExpertWeights, RouterDims};
use crate::weights::{Loader, SliceSpec};

fn load_mlp<B: Backend>(b: &B, ld: &Loader<'_>, prefix: &str, inter: usize) -> Result<ExpertWeights<B>> {
    let h = ld.cfg.hidden_size;
    Ok(ExpertWeights {
        gate: b.load_linear(ld.linear(&format!("{prefix}.gate_proj"), h, inter)?)?,
        up: b.load_linear(ld.linear(&format!("{prefix}.up_proj"), h, inter)?)?,
        down: b.load_linear(ld.linear(&format!("{prefix}.down_proj"), inter, h)?)?,
    })
}

fn mlp_forward<B: Backend>(b: &B, w: &ExpertWeights<B>, x: &B::Tensor) -> Result<B::Tensor> {
    b.linear(&b.silu_mul(&b.linear(x, &w.gate)?, &b.linear(x, &w.up)?)?, &w.down)
}

pub struct Moe<B: Backend> {
    /// Router `[n_experts, hidden]`, applied in f32.
    gate: B::Weight,
    bias: B::Vector,
    /// The routed experts, indexed by expert id (those another stage holds are absent).
    experts: B::Experts,
    shared: Option<ExpertWeights<B>>,
    dims: RouterDims,
}

impl<B: Backend> Moe<B> {
    /// The routed experts (and the shared one) of the normed rows `x` as `routing` chose them.
    fn experts_of(&self, b: &B, x: &B::Tensor, routing: &B::Routes) -> Result<B::Tensor> {
        match &self.shared {
            Some(s) => b.experts_with_shared(x, &self.experts, s, routing),
            None => b.experts(x, &self.experts, routing),
        }
    }
}

pub enum Ffn<B: Backend> {
    Dense(ExpertWeights<B>),
    Moe(Moe<B>),
}

impl<B: Backend> Ffn<B> {
    pub fn load(b: &B, ld: &Loader<'_>, layer: usize, slice: &SliceSpec) -> Result<Self> {
        let c = ld.cfg;
        let p = format!("model.layers.{layer}.mlp");
        if !c.is_moe_layer(layer) {
            return Ok(Ffn::Dense(load_mlp(b, ld, &p, c.intermediate_size)?));
        }
        let e = c.n_routed_experts;
        let gate = ld.floats(&format!("{p}.gate.weight"), &[e, c.hidden_size])?;
        let experts = (0..e)
            .map(|i| {
                slice
                    .holds_expert(i)
                    .then(|| load_mlp(b, ld, &format!("{p}.experts.{i}"), c.moe_intermediate_size))
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        let experts = b.load_experts(experts)?;
        let shared = (c.n_shared_experts > 0 && slice.holds_shared_expert())
            .then(|| load_mlp(b, ld, &format!("{p}.shared_experts"), c.moe_intermediate_size * c.n_shared_experts))
            .transpose()?;
        Ok(Ffn::Moe(Moe {
            gate: b.load_linear(crate::backend::HostLinear::Dense {
                out_features: e,
                in_features: c.hidden_size,
                data: gate,
            })?,
            bias: b.load_vector(ld.floats(&format!("{p}.gate.e_score_correction_bias"), &[e])?)?,
            experts,
            shared,
            dims: RouterDims {
                n_experts: e,
                top_k: c.num_experts_per_tok,
                n_group: c.n_group,
                topk_group: c.topk_group,
                norm_topk_prob: c.norm_topk_prob,
                scaling: c.routed_scaling_factor as f32,
            },
        }))
    }

    /// `x`: the post-attention normed hidden state `[rows, hidden]`.
    pub fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        match self {
            Ffn::Dense(w) => mlp_forward(b, w, x),
            Ffn::Moe(m) => {
                let routing = b.route(x, &m.gate, &m.bias, &m.dims)?;
                m.experts_of(b, x, &routing)
            }
        }
    }

    /// `h += a`, its RMSNorm by `norm`, then the block: a layer's residual add and post-attention norm with the
    /// FFN after them (an MoE block's router with the norm: [`Backend::add_rms_norm_route`]). Returns the block's
    /// output for the caller to add to `h`, or `None` where the backend added it already
    /// ([`Backend::experts_with_shared_into`]).
    pub fn forward_after(
        &self,
        b: &B,
        h: &mut B::Tensor,
        a: &B::Tensor,
        norm: &B::Vector,
        eps: f32,
    ) -> Result<Option<B::Tensor>> {
        match self {
            Ffn::Dense(w) => mlp_forward(b, w, &b.add_rms_norm(h, a, norm, eps)?).map(Some),
            Ffn::Moe(m) => {
                let (x, routing) = b.add_rms_norm_route(h, a, norm, eps, &m.gate, &m.bias, &m.dims)?;
                match &m.shared {
                    Some(s) => b.experts_with_shared_into(h, &x, &m.experts, s, &routing),
                    None => b.experts(&x, &m.experts, &routing).map(Some),
                }
            }
        }
    }
}
