//! `noaux_tc` routing and the routed experts (MODEL_SPEC §2.7, §2.8; HF `DeepseekV32TopkRouter`).

use super::kernels::{dot, top_k};
use super::{CpuBackend, CpuTensor, CpuWeight};
use crate::backend::{Backend, ExpertWeights, RouterDims, Routing};
use crate::{Error, Result};

pub fn route(x: &CpuTensor, gate: &CpuWeight, bias: &[f32], d: &RouterDims) -> Result<Routing> {
    let e = d.n_experts;
    if gate.out_features != e || gate.in_features != x.cols || bias.len() != e || !e.is_multiple_of(d.n_group) {
        return Err(Error::Backend { reason: "route: gate/bias shape".into() });
    }
    let per_group = e / d.n_group;
    let mut experts = Vec::with_capacity(x.rows * d.top_k);
    let mut weights = Vec::with_capacity(x.rows * d.top_k);
    for r in 0..x.rows {
        let xr = x.row(r);
        let scores: Vec<f32> = (0..e).map(|i| 1.0 / (1.0 + (-dot(xr, gate.row(i))).exp())).collect();
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

/// Each held expert runs once on the rows routed to it; contributions are added in ascending expert order,
/// as HF's `index_add_` loop does.
pub fn experts(
    b: &CpuBackend,
    x: &CpuTensor,
    experts: &[Option<ExpertWeights<CpuBackend>>],
    routing: &Routing,
) -> Result<CpuTensor> {
    let mut out = CpuTensor { rows: x.rows, cols: x.cols, data: vec![0f32; x.data.len()] };
    for (e, ew) in experts.iter().enumerate() {
        let Some(ew) = ew else { continue };
        let mut rows = Vec::new();
        let mut ws = Vec::new();
        for r in 0..x.rows {
            for k in 0..routing.top_k {
                if routing.experts[r * routing.top_k + k] as usize == e {
                    rows.push(r);
                    ws.push(routing.weights[r * routing.top_k + k]);
                }
            }
        }
        if rows.is_empty() {
            continue;
        }
        let mut xin = Vec::with_capacity(rows.len() * x.cols);
        for &r in &rows {
            xin.extend_from_slice(x.row(r));
        }
        let xin = CpuTensor { rows: rows.len(), cols: x.cols, data: xin };
        let h = b.silu_mul(&b.linear(&xin, &ew.gate)?, &b.linear(&xin, &ew.up)?)?;
        let y = b.linear(&h, &ew.down)?;
        for (i, (&r, &w)) in rows.iter().zip(&ws).enumerate() {
            super::kernels::axpy(&mut out.data[r * x.cols..(r + 1) * x.cols], w, y.row(i));
        }
    }
    Ok(out)
}
