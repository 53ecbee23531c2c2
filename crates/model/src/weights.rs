//! Reading the tensors of one slice of the model from the checkpoint (MODEL_SPEC §3): only the layers (and
//! optionally the experts) a worker holds are touched, so their pages are the only ones read from disk.

use std::ops::Range;

use pipemoe_quant::{Dtype, GptqParts, GptqWeight, ModuleQuant};

use crate::backend::HostLinear;
use crate::{Checkpoint, Error, ModelConfig, Result};

/// The part of the model one stage holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceSpec {
    /// Decoder layers `[start, end)`.
    pub layers: Range<usize>,
    /// Routed experts held in every MoE layer of the slice; `None` = all. The router and, with the first
    /// expert range, the shared expert are always loaded so partial outputs sum to the full MoE output.
    pub experts: Option<Range<usize>>,
    /// Holds `embed_tokens` (the first stage).
    pub embed: bool,
    /// Holds the final norm and `lm_head` (the last stage).
    pub head: bool,
}

impl SliceSpec {
    /// The whole model in one stage.
    pub fn full(cfg: &ModelConfig) -> Self {
        Self { layers: 0..cfg.num_hidden_layers, experts: None, embed: true, head: true }
    }

    pub fn check(&self, cfg: &ModelConfig) -> Result<()> {
        if self.layers.start > self.layers.end || self.layers.end > cfg.num_hidden_layers {
            return Err(Error::Slice {
                reason: format!("layers {:?} outside the model's 0..{}", self.layers, cfg.num_hidden_layers),
            });
        }
        if let Some(e) = &self.experts
            && (e.start >= e.end || e.end > cfg.n_routed_experts)
        {
            return Err(Error::Slice {
                reason: format!("experts {e:?} outside the model's 0..{}", cfg.n_routed_experts),
            });
        }
        Ok(())
    }

    pub fn holds_expert(&self, e: usize) -> bool {
        self.experts.as_ref().is_none_or(|r| r.contains(&e))
    }

    /// The shared expert goes with the slice that holds expert 0 (or all of them).
    pub fn holds_shared_expert(&self) -> bool {
        self.experts.as_ref().is_none_or(|r| r.start == 0)
    }
}

/// Reads named tensors of one checkpoint as host data.
pub struct Loader<'a> {
    pub cfg: &'a ModelConfig,
    pub ckpt: &'a Checkpoint,
}

const FLOATS: [Dtype; 3] = [Dtype::BF16, Dtype::F16, Dtype::F32];

impl Loader<'_> {
    /// A float tensor of exactly `shape`, widened to f32.
    pub fn floats(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self.ckpt.tensor(name)?;
        if !FLOATS.contains(&t.dtype) {
            return Err(Error::DtypeMismatch {
                tensor: name.to_string(),
                expected: "BF16, F16 or F32".to_string(),
                found: format!("{:?}", t.dtype),
            });
        }
        if t.shape != shape {
            return Err(Error::ShapeMismatch {
                tensor: name.to_string(),
                expected: shape.to_vec(),
                found: t.shape.to_vec(),
            });
        }
        t.to_f32().map_err(|source| Error::Quant { module: name.to_string(), source })
    }

    /// The Linear `prefix` (`[out, in]`): GPTQ when `<prefix>.qweight` exists, else `<prefix>.weight`.
    pub fn linear(&self, prefix: &str, in_features: usize, out_features: usize) -> Result<HostLinear> {
        let qweight = format!("{prefix}.qweight");
        if !self.ckpt.contains(&qweight) {
            let data = self.floats(&format!("{prefix}.weight"), &[out_features, in_features])?;
            return Ok(HostLinear::Dense { out_features, in_features, data });
        }
        let mismatch = |reason: &str| Error::QuantMismatch { module: prefix.to_string(), reason: reason.to_string() };
        let params = match self.cfg.quantization.as_ref().map(|q| q.module(prefix)) {
            None => return Err(mismatch("has .qweight but config.json has no quantization_config")),
            Some(ModuleQuant::Dense) => {
                return Err(mismatch("has .qweight but quantization_config declares it 16-bit"));
            }
            Some(ModuleQuant::Gptq(p)) => p,
        };
        let quant = |source| Error::Quant { module: prefix.to_string(), source };
        let layout = params.layout(in_features, out_features).map_err(quant)?;
        let g_idx_name = format!("{prefix}.g_idx");
        let parts = GptqParts {
            qweight: self.ckpt.tensor(&qweight)?,
            qzeros: self.ckpt.tensor(&format!("{prefix}.qzeros"))?,
            scales: self.ckpt.tensor(&format!("{prefix}.scales"))?,
            g_idx: if self.ckpt.contains(&g_idx_name) { Some(self.ckpt.tensor(&g_idx_name)?) } else { None },
        };
        Ok(HostLinear::Gptq(GptqWeight::from_parts(layout, params.zero, &parts).map_err(quant)?))
    }
}
