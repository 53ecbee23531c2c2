//! The V3.2 lightning indexer (MODEL_SPEC §2.6; HF `DeepseekV32Indexer`), which picks the `index_topk` keys
//! each query may attend to. Hadamard rotation and fp8 of the reference kernels are skipped, as HF does: the
//! rotation is orthogonal and fp8 is a precision trade, so bf16/f32 scores order keys the same up to near-ties.

use crate::backend::{Backend, HostLinear, INDEXER_NORM_EPS, IndexerDims, RopeSpec, Row};
use crate::weights::Loader;
use crate::{IndexerConfig, Result};

pub struct Indexer<B: Backend> {
    /// `[heads·head_dim, q_lora_rank]`, or `None` when attention runs it fused with its own `q_b_proj`.
    wq_b: Option<B::Weight>,
    /// `[head_dim, hidden]`, or `None` when attention runs it fused with its other projections of the hidden state.
    wk: Option<B::Weight>,
    k_norm_w: B::Vector,
    k_norm_b: B::Vector,
    /// `[heads, hidden]`, or `None` when attention runs it fused with its other projections of the hidden state.
    weights_proj: Option<B::Weight>,
    pub dims: IndexerDims,
}

/// What the indexer hands to attention for one step (besides the key, [`Indexer::key`]).
pub struct IndexerOut<B: Backend> {
    /// `[rows, heads·head_dim]`, roped.
    pub q: B::Tensor,
    /// `[rows, heads]`, scaled by [`Indexer::weights_scale`].
    pub w: B::Tensor,
}

/// Whether any row has more keys (positions 0..=pos) than `index_topk`: otherwise every row attends to all of its
/// keys, exactly what the selection would pick, and only the indexer key (for the cache) is needed.
pub fn selects(dims: &IndexerDims, rows: &[Row]) -> bool {
    rows.iter().any(|r| r.pos + 1 > dims.topk)
}

impl<B: Backend> Indexer<B> {
    /// `wq_b`, `wk` and `wp`: the query, key and head weights' projections as read ([`Indexer::wq_b`],
    /// [`Indexer::wk`], [`Indexer::weights_proj`]), or `None` where the caller fused them with others.
    pub fn load(
        b: &B,
        ld: &Loader<'_>,
        prefix: &str,
        cfg: &IndexerConfig,
        wq_b: Option<HostLinear>,
        wk: Option<HostLinear>,
        wp: Option<HostLinear>,
    ) -> Result<Self> {
        Ok(Self {
            wq_b: wq_b.map(|w| b.load_linear(w)).transpose()?,
            wk: wk.map(|w| b.load_linear(w)).transpose()?,
            k_norm_w: b.load_vector(ld.floats(&format!("{prefix}.k_norm.weight"), &[cfg.head_dim])?)?,
            k_norm_b: b.load_vector(ld.floats(&format!("{prefix}.k_norm.bias"), &[cfg.head_dim])?)?,
            weights_proj: wp.map(|w| b.load_linear(w)).transpose()?,
            dims: IndexerDims { heads: cfg.n_heads, head_dim: cfg.head_dim, topk: cfg.topk },
        })
    }

    /// Whether the selection changes anything for this step ([`selects`]).
    pub fn selects(&self, rows: &[Row]) -> bool {
        selects(&self.dims, rows)
    }

    /// The RoPE of the query heads.
    pub fn q_rope(&self) -> RopeSpec {
        RopeSpec::indexer(self.dims.heads, self.dims.head_dim)
    }

    /// The query projection of layer-prefix `prefix`'s indexer as read (`q_lora` inputs), for the caller to fuse
    /// or hand back.
    pub fn wq_b(ld: &Loader<'_>, prefix: &str, cfg: &IndexerConfig, q_lora: usize) -> Result<HostLinear> {
        ld.linear(&format!("{prefix}.wq_b"), q_lora, cfg.n_heads * cfg.head_dim)
    }

    /// The key projection of layer-prefix `prefix`'s indexer as read, for the caller to fuse or hand back.
    pub fn wk(ld: &Loader<'_>, prefix: &str, cfg: &IndexerConfig) -> Result<HostLinear> {
        ld.linear(&format!("{prefix}.wk"), ld.cfg.hidden_size, cfg.head_dim)
    }

    /// The head weights' projection of layer-prefix `prefix`'s indexer as read, for the caller to fuse or hand back.
    pub fn weights_proj(ld: &Loader<'_>, prefix: &str, cfg: &IndexerConfig) -> Result<HostLinear> {
        ld.linear(&format!("{prefix}.weights_proj"), ld.cfg.hidden_size, cfg.n_heads)
    }

    /// What the head weights are scaled by: `heads^-0.5` (MODEL_SPEC §2.6).
    pub fn weights_scale(&self) -> f32 {
        (self.dims.heads as f32).powf(-0.5)
    }

    /// `x·wkᵀ` `[rows, head_dim]`, when the indexer holds wk (else the caller's fused projection has it).
    pub fn raw_key(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let wk = self.wk.as_ref().ok_or_else(|| crate::Error::backend("the indexer's wk is fused into attention"))?;
        b.linear(x, wk)
    }

    /// `k_raw = x·wkᵀ` → the indexer key `[rows, head_dim]`, normed and roped (what `Backend::mla_prep` does
    /// when wk is fused).
    pub fn key(&self, b: &B, k_raw: &B::Tensor, inv_freq: &[f32], rows: &[Row]) -> Result<B::Tensor> {
        let mut k = b.layer_norm(k_raw, &self.k_norm_w, &self.k_norm_b, INDEXER_NORM_EPS)?;
        b.rope(&mut k, RopeSpec::indexer(1, self.dims.head_dim), inv_freq, rows)?;
        Ok(k)
    }

    /// `k_norm`'s weight and bias.
    pub fn key_norm(&self) -> (&B::Vector, &B::Vector) {
        (&self.k_norm_w, &self.k_norm_b)
    }

    /// `x`: the normed hidden state `[rows, hidden]`; `qr`: `q_a_layernorm(q_a_proj(x))` `[rows, q_lora]`;
    /// `q`: `qr·wq_bᵀ` already made and roped by attention's fused query projection, if it was; `w`: the head
    /// weights already made by attention's fused projection (`Backend::mla_prep`), if they were.
    #[allow(clippy::too_many_arguments)]
    pub fn project(
        &self,
        b: &B,
        x: &B::Tensor,
        qr: &B::Tensor,
        q: Option<B::Tensor>,
        w: Option<B::Tensor>,
        inv_freq: &[f32],
        rows: &[Row],
    ) -> Result<IndexerOut<B>> {
        let q = match (q, &self.wq_b) {
            (Some(q), _) => q,
            (None, Some(wq)) => {
                let mut q = b.linear(qr, wq)?;
                b.rope(&mut q, self.q_rope(), inv_freq, rows)?;
                q
            }
            (None, None) => return Err(crate::Error::backend("the indexer's wq_b is fused into attention")),
        };
        let w = match (w, &self.weights_proj) {
            (Some(w), _) => w,
            (None, Some(wp)) => {
                let mut w = b.linear(x, wp)?;
                b.scale(&mut w, self.weights_scale())?;
                w
            }
            (None, None) => return Err(crate::Error::backend("the indexer's weights_proj is fused into attention")),
        };
        Ok(IndexerOut { q, w })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_selection_runs_once_a_row_has_more_keys_than_it_keeps() {
        let dims = IndexerDims { heads: 4, head_dim: 8, topk: 16 };
        let rows = |ps: &[usize]| ps.iter().map(|&pos| Row { seq: 1, pos }).collect::<Vec<_>>();
        assert!(!selects(&dims, &rows(&[0, 7, 15])), "16 keys at position 15: all of them are the selection");
        assert!(selects(&dims, &rows(&[3, 16])), "position 16 has 17 keys, one more than the selection keeps");
        assert!(!selects(&dims, &[]));
    }
}
