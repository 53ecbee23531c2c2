//! `noaux_tc` routing and the routed experts (MODEL_SPEC §2.7, §2.8; HF `DeepseekV32TopkRouter`).

use super::{CpuBackend, CpuTensor, CpuWeight};
use crate::backend::{Backend, ExpertWeights, RouterDims, Routing};
use crate::{Error, Result};

pub fn route(x: &CpuTensor, gate: &CpuWeight, bias: &[f32], d: &RouterDims) -> Result<Routing> {
    if gate.out_features != d.n_experts || gate.in_features != x.cols {
        return Err(Error::Backend { reason: "route: gate shape".into() });
    }
    let logits = super::kernels::matmul_t(&x.data, x.rows, x.cols, &gate.data, gate.out_features);
    crate::routing::route_logits(&logits, x.rows, bias, d)
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
        let (rows, ws) = routing.rows_of(e);
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
