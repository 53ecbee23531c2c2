//! A Linear as the checkpoint holds it, before a backend lays it out ([`crate::backend::Backend::load_linear`]).

use pipemoe_quant::GptqWeight;

/// A Linear as read from the checkpoint, before the backend lays it out.
#[derive(Clone, Debug)]
pub enum HostLinear {
    /// Unquantized (BF16/F16/F32 in the file), widened to f32, `[out, in]` row-major.
    Dense { out_features: usize, in_features: usize, data: Vec<f32> },
    /// GPTQ-packed (MODEL_SPEC §4).
    Gptq(GptqWeight),
}

impl HostLinear {
    pub fn out_features(&self) -> usize {
        match self {
            HostLinear::Dense { out_features, .. } => *out_features,
            HostLinear::Gptq(w) => w.layout().out_features,
        }
    }

    pub fn in_features(&self) -> usize {
        match self {
            HostLinear::Dense { in_features, .. } => *in_features,
            HostLinear::Gptq(w) => w.layout().in_features,
        }
    }

    /// The linears side by side along the outputs (`[Σ out, in]`): projections of one input as one matrix. `None`
    /// unless all are dense with one in_features, or all GPTQ in one format (`GptqWeight::concat_outputs`).
    pub fn concat_outputs(parts: &[&HostLinear]) -> Option<HostLinear> {
        match parts.first()? {
            HostLinear::Dense { in_features, .. } => {
                let mut data = Vec::new();
                for p in parts {
                    match p {
                        HostLinear::Dense { in_features: k, data: d, .. } if k == in_features => data.extend(d),
                        _ => return None,
                    }
                }
                Some(HostLinear::Dense { out_features: data.len() / in_features, in_features: *in_features, data })
            }
            HostLinear::Gptq(_) => {
                let ws: Option<Vec<&GptqWeight>> =
                    parts.iter().map(|p| if let HostLinear::Gptq(w) = p { Some(w) } else { None }).collect();
                GptqWeight::concat_outputs(&ws?).map(HostLinear::Gptq)
            }
        }
    }
}
