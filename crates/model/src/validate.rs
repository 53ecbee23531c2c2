//! Checks a checkpoint against its config before anything is loaded: every module of every layer
//! (MODEL_SPEC §3.1) must be present with the right dtype and shape, quantized (GPTQ, §3.2) or not.
//! Whether a linear is quantized is decided by its tensors (`.qweight` present), never by a list; the
//! quantization config only says how to read it and which modules it declares 16-bit.

use std::collections::{BTreeMap, HashSet};

use pipemoe_quant::{Dtype, ModuleQuant};

use crate::checkpoint::{Checkpoint, TensorMeta};
use crate::config::{Architecture, ModelConfig};
use crate::{Error, Result};

/// Float dtypes accepted for unquantized tensors (AutoRound saves them in the model's dtype).
const FLOATS: &[Dtype] = &[Dtype::BF16, Dtype::F16, Dtype::F32];

/// One thing the config says the checkpoint holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expected {
    /// A linear `y = x·Wᵀ`, `W: [out, in]`: `<prefix>.weight`, or GPTQ `<prefix>.{qweight,qzeros,scales[,g_idx]}`.
    Linear { prefix: String, out_features: usize, in_features: usize },
    /// A float tensor that is never quantized (embeddings, norms, router weight and bias).
    Tensor { name: String, shape: Vec<usize> },
}

fn linear(prefix: String, out_features: usize, in_features: usize) -> Expected {
    Expected::Linear { prefix, out_features, in_features }
}

fn tensor(name: String, shape: &[usize]) -> Expected {
    Expected::Tensor { name, shape: shape.to_vec() }
}

/// Every module the model needs, in layer order (MODEL_SPEC §3.1). `with_indexer` adds the V3.2 indexer.
pub fn expected_modules(cfg: &ModelConfig, with_indexer: bool) -> Vec<Expected> {
    let h = cfg.hidden_size;
    let heads = cfg.num_attention_heads;
    let mut out = vec![tensor("model.embed_tokens.weight".into(), &[cfg.vocab_size, h])];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        out.push(tensor(format!("{p}.input_layernorm.weight"), &[h]));
        out.push(tensor(format!("{p}.post_attention_layernorm.weight"), &[h]));
        let a = format!("{p}.self_attn");
        match cfg.q_lora_rank {
            Some(r) => {
                out.push(linear(format!("{a}.q_a_proj"), r, h));
                out.push(tensor(format!("{a}.q_a_layernorm.weight"), &[r]));
                out.push(linear(format!("{a}.q_b_proj"), heads * cfg.qk_head_dim(), r));
            }
            None => out.push(linear(format!("{a}.q_proj"), heads * cfg.qk_head_dim(), h)),
        }
        out.push(linear(format!("{a}.kv_a_proj_with_mqa"), cfg.kv_lora_rank + cfg.qk_rope_head_dim, h));
        out.push(tensor(format!("{a}.kv_a_layernorm.weight"), &[cfg.kv_lora_rank]));
        out.push(linear(format!("{a}.kv_b_proj"), heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank));
        out.push(linear(format!("{a}.o_proj"), h, heads * cfg.v_head_dim));
        if let (true, Some(ix), Some(r)) = (with_indexer, cfg.indexer, cfg.q_lora_rank) {
            let i = format!("{a}.indexer");
            out.push(linear(format!("{i}.wq_b"), ix.n_heads * ix.head_dim, r));
            out.push(linear(format!("{i}.wk"), ix.head_dim, h));
            out.push(tensor(format!("{i}.k_norm.weight"), &[ix.head_dim]));
            out.push(tensor(format!("{i}.k_norm.bias"), &[ix.head_dim]));
            out.push(linear(format!("{i}.weights_proj"), ix.n_heads, h));
        }
        let m = format!("{p}.mlp");
        let mlp = |out: &mut Vec<Expected>, base: &str, inter: usize| {
            out.push(linear(format!("{base}.gate_proj"), inter, h));
            out.push(linear(format!("{base}.up_proj"), inter, h));
            out.push(linear(format!("{base}.down_proj"), h, inter));
        };
        if cfg.is_moe_layer(l) {
            out.push(tensor(format!("{m}.gate.weight"), &[cfg.n_routed_experts, h]));
            out.push(tensor(format!("{m}.gate.e_score_correction_bias"), &[cfg.n_routed_experts]));
            for e in 0..cfg.n_routed_experts {
                mlp(&mut out, &format!("{m}.experts.{e}"), cfg.moe_intermediate_size);
            }
            if cfg.n_shared_experts > 0 {
                mlp(&mut out, &format!("{m}.shared_experts"), cfg.moe_intermediate_size * cfg.n_shared_experts);
            }
        } else {
            mlp(&mut out, &m, cfg.intermediate_size);
        }
    }
    out.push(tensor("model.norm.weight".into(), &[h]));
    if !cfg.tie_word_embeddings {
        out.push(linear("lm_head".into(), cfg.vocab_size, h));
    }
    out
}

/// How a group of linears is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LinearFormat {
    Gptq { bits: u32 },
    Dense { dtype: Dtype },
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinearStats {
    pub modules: usize,
    /// Logical parameters (`out · in`).
    pub params: u64,
    /// Bytes on disk, all parts (qweight, qzeros, scales, g_idx) included.
    pub bytes: u64,
}

/// What a checkpoint holds, as far as the model is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelSummary {
    pub architecture: Architecture,
    pub num_layers: usize,
    pub dense_layers: usize,
    pub moe_layers: usize,
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
    /// The V3.2 indexer tensors are present (DSA); false means dense MLA.
    pub indexer: bool,
    pub linears: BTreeMap<LinearFormat, LinearStats>,
    /// Embeddings, norms, router weights and biases.
    pub other_tensors: usize,
    pub other_bytes: u64,
    /// Every byte the model uses.
    pub weight_bytes: u64,
    /// Tensors of layers ≥ num_hidden_layers (MTP), ignored.
    pub mtp_tensors: usize,
    /// Tensors nothing expects (neither a needed module nor MTP).
    pub unused: Vec<String>,
}

/// Everything found wrong, in layer order, plus the summary of what is there.
#[derive(Debug)]
pub struct Report {
    pub summary: ModelSummary,
    pub problems: Vec<Error>,
}

/// Validates and returns the summary, or the first problem found.
pub fn validate(cfg: &ModelConfig, ckpt: &Checkpoint) -> Result<ModelSummary> {
    let report = check(cfg, ckpt);
    match report.problems.into_iter().next() {
        Some(first) => Err(first),
        None => Ok(report.summary),
    }
}

/// The layer index of a `model.layers.N.…` name.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?.split('.').next()?.parse().ok()
}

/// Validates and reports every problem, for tools that want the whole list.
pub fn check(cfg: &ModelConfig, ckpt: &Checkpoint) -> Report {
    // MODEL_SPEC §1.2: a V3.2 checkpoint quantized through a V3 class may lack the indexer, and then runs as
    // dense MLA. So the indexer is expected when any layer has one; a partial indexer is reported as missing.
    let indexer = cfg.architecture == Architecture::DeepseekV32
        && ckpt.tensors().any(|t| {
            t.name.contains(".self_attn.indexer.") && layer_of(&t.name).is_some_and(|l| l < cfg.num_hidden_layers)
        });
    let moe_layers = (0..cfg.num_hidden_layers).filter(|&l| cfg.is_moe_layer(l)).count();
    let mut c = Checker {
        cfg,
        ckpt,
        used: HashSet::new(),
        problems: Vec::new(),
        summary: ModelSummary {
            architecture: cfg.architecture,
            num_layers: cfg.num_hidden_layers,
            dense_layers: cfg.num_hidden_layers - moe_layers,
            moe_layers,
            n_routed_experts: cfg.n_routed_experts,
            n_shared_experts: cfg.n_shared_experts,
            num_experts_per_tok: cfg.num_experts_per_tok,
            indexer,
            linears: BTreeMap::new(),
            other_tensors: 0,
            other_bytes: 0,
            weight_bytes: 0,
            mtp_tensors: 0,
            unused: Vec::new(),
        },
    };
    for e in expected_modules(cfg, indexer) {
        match e {
            Expected::Linear { prefix, out_features, in_features } => c.linear(&prefix, out_features, in_features),
            Expected::Tensor { name, shape } => {
                if let Some(t) = c.expect(&name, FLOATS, &shape) {
                    c.summary.other_tensors += 1;
                    c.summary.other_bytes += t.byte_len() as u64;
                }
            }
        }
    }
    for t in ckpt.tensors() {
        if c.used.contains(t.name.as_str()) {
            c.summary.weight_bytes += t.byte_len() as u64;
        } else if layer_of(&t.name).is_some_and(|l| l >= cfg.num_hidden_layers) {
            c.summary.mtp_tensors += 1;
        } else {
            c.summary.unused.push(t.name.clone());
        }
    }
    Report { summary: c.summary, problems: c.problems }
}

struct Checker<'a> {
    cfg: &'a ModelConfig,
    ckpt: &'a Checkpoint,
    used: HashSet<&'a str>,
    problems: Vec<Error>,
    summary: ModelSummary,
}

fn dtype_list(dtypes: &[Dtype]) -> String {
    dtypes.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("|")
}

impl<'a> Checker<'a> {
    /// Checks presence, dtype and shape of one tensor; records it as used when present.
    fn expect(&mut self, name: &str, dtypes: &[Dtype], shape: &[usize]) -> Option<&'a TensorMeta> {
        let Some(t) = self.ckpt.meta(name) else {
            self.problems.push(Error::MissingTensor { tensor: name.to_string() });
            return None;
        };
        self.used.insert(&t.name);
        if !dtypes.contains(&t.dtype) {
            self.problems.push(Error::DtypeMismatch {
                tensor: name.to_string(),
                expected: dtype_list(dtypes),
                found: t.dtype.to_string(),
            });
        } else if t.shape != shape {
            self.problems.push(Error::ShapeMismatch {
                tensor: name.to_string(),
                expected: shape.to_vec(),
                found: t.shape.clone(),
            });
        }
        Some(t)
    }

    fn record(&mut self, format: LinearFormat, params: usize, bytes: u64) {
        let s = self.summary.linears.entry(format).or_default();
        s.modules += 1;
        s.params += params as u64;
        s.bytes += bytes;
    }

    fn linear(&mut self, prefix: &str, out: usize, inp: usize) {
        let declared = self.cfg.quantization.as_ref().map(|q| q.module(prefix));
        let qweight = format!("{prefix}.qweight");
        if !self.ckpt.contains(&qweight) {
            let weight = format!("{prefix}.weight");
            if !self.ckpt.contains(&weight) {
                // Name the tensor the config leads one to expect: a module that GPTQ can pack and the
                // config does not declare 16-bit should have been quantized.
                let quantizable = matches!(declared, Some(ModuleQuant::Gptq(p)) if p.layout(inp, out).is_ok());
                let tensor = if quantizable { qweight } else { weight };
                self.problems.push(Error::MissingTensor { tensor });
                return;
            }
            if let Some(t) = self.expect(&weight, FLOATS, &[out, inp]) {
                self.record(LinearFormat::Dense { dtype: t.dtype }, out * inp, t.byte_len() as u64);
            }
            return;
        }
        let params = match declared {
            Some(ModuleQuant::Gptq(p)) => p,
            Some(ModuleQuant::Dense) => {
                let reason = "quantization_config declares it 16-bit (extra_config/dynamic), but .qweight exists";
                self.problems.push(Error::QuantMismatch { module: prefix.to_string(), reason: reason.into() });
                return;
            }
            None => {
                let reason = "has .qweight, but config.json has no quantization_config";
                self.problems.push(Error::QuantMismatch { module: prefix.to_string(), reason: reason.into() });
                return;
            }
        };
        let layout = match params.layout(inp, out) {
            Ok(l) => l,
            Err(source) => {
                self.problems.push(Error::Quant { module: prefix.to_string(), source });
                return;
            }
        };
        let mut bytes = 0u64;
        let parts: [(&str, Dtype, &[usize]); 3] = [
            ("qweight", Dtype::I32, &layout.qweight_shape()),
            ("qzeros", Dtype::I32, &layout.qzeros_shape()),
            ("scales", Dtype::F16, &layout.scales_shape()),
        ];
        for (suffix, dtype, shape) in parts {
            if let Some(t) = self.expect(&format!("{prefix}.{suffix}"), &[dtype], shape) {
                bytes += t.byte_len() as u64;
            }
        }
        let g_idx = format!("{prefix}.g_idx");
        if self.ckpt.contains(&g_idx)
            && let Some(t) = self.expect(&g_idx, &[Dtype::I32], &layout.g_idx_shape())
        {
            bytes += t.byte_len() as u64;
        }
        self.record(LinearFormat::Gptq { bits: layout.bits.get() }, out * inp, bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::{self, SyntheticSpec};

    #[test]
    fn expected_names_follow_the_checkpoint() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        synthetic::write(dir.path(), &SyntheticSpec::default())?;
        let cfg = ModelConfig::from_dir(dir.path())?;
        let names: Vec<String> = expected_modules(&cfg, true)
            .into_iter()
            .map(|e| match e {
                Expected::Linear { prefix, .. } => prefix,
                Expected::Tensor { name, .. } => name,
            })
            .collect();
        // Spelled out from MODEL_SPEC §3.1, not from the code under test.
        for want in [
            "model.embed_tokens.weight",
            "model.layers.0.mlp.gate_proj",
            "model.layers.0.self_attn.kv_a_proj_with_mqa",
            "model.layers.0.self_attn.indexer.k_norm.bias",
            "model.layers.1.mlp.gate.e_score_correction_bias",
            "model.layers.1.mlp.experts.3.down_proj",
            "model.layers.1.mlp.shared_experts.up_proj",
            "model.norm.weight",
            "lm_head",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} not expected");
        }
        assert!(!names.iter().any(|n| n == "model.layers.0.mlp.experts.0.up_proj"), "dense layer has no experts");
        assert!(!names.iter().any(|n| n == "model.layers.1.mlp.gate_proj"), "MoE layer has no dense MLP");
        assert!(
            !expected_modules(&cfg, false)
                .iter()
                .any(|e| matches!(e, Expected::Linear { prefix, .. } if prefix.contains("indexer")))
        );
        Ok(())
    }

    #[test]
    fn layer_numbers() {
        assert_eq!(layer_of("model.layers.61.eh_proj.weight"), Some(61));
        assert_eq!(layer_of("model.norm.weight"), None);
        assert_eq!(layer_of("model.layers.x.y"), None);
    }
}
