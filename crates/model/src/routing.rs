//! `noaux_tc` group-limited routing from router logits (MODEL_SPEC §2.7; HF `DeepseekV32TopkRouter`), shared by
//! every backend: the logits come from the device, the choice of a handful of experts per token is made here.

use crate::backend::{RouterDims, Routing};
use crate::cpu::kernels::top_k;
use crate::{Error, Result};

/// `logits`: `[rows, n_experts]` of `x · gateᵀ` in f32.
pub fn route_logits(logits: &[f32], rows: usize, bias: &[f32], d: &RouterDims) -> Result<Routing> {
    let e = d.n_experts;
    if logits.len() != rows * e || bias.len() != e || !e.is_multiple_of(d.n_group) {
        return Err(Error::Backend { reason: "route: logits/bias shape".into() });
    }
    let per_group = e / d.n_group;
    let mut experts = Vec::with_capacity(rows * d.top_k);
    let mut weights = Vec::with_capacity(rows * d.top_k);
    for r in 0..rows {
        let scores: Vec<f32> = logits[r * e..(r + 1) * e].iter().map(|l| 1.0 / (1.0 + (-l).exp())).collect();
        let mut choice: Vec<f32> = scores.iter().zip(bias).map(|(s, b)| s + b).collect();
        if d.n_group > 1 {
            // A group's score is the sum of its two best biased scores (HF: topk(2).sum()).
            let group_scores: Vec<f32> = choice
                .chunks(per_group)
                .map(|g| top_k(g, 2.min(per_group)).iter().map(|&i| g[i as usize]).sum())
                .collect();
            let keep = top_k(&group_scores, d.topk_group);
            for (g, chunk) in choice.chunks_mut(per_group).enumerate() {
                if !keep.contains(&(g as u32)) {
                    chunk.iter_mut().for_each(|v| *v = f32::NEG_INFINITY);
                }
            }
        }
        let idx = top_k(&choice, d.top_k);
        let mut w: Vec<f32> = idx.iter().map(|&i| scores[i as usize]).collect();
        if d.norm_topk_prob {
            let sum: f32 = w.iter().sum::<f32>() + 1e-20;
            w.iter_mut().for_each(|v| *v /= sum);
        }
        w.iter_mut().for_each(|v| *v *= d.scaling);
        experts.extend(idx);
        weights.extend(w);
    }
    Ok(Routing { top_k: d.top_k, experts, weights })
}
