//! DeepSeek V3 / V3.2 `config.json` (MODEL_SPEC §1.1). Every field the math depends on is read, never assumed:
//! a missing or odd value is an error naming the file and field. Defaults are used only where HF's own code
//! has one (YaRN betas and mscales, `moe_layer_freq`, `tie_word_embeddings`).

use std::path::Path;

use pipemoe_quant::QuantConfig;
use serde_json::{Map, Value};

use crate::{Error, Result};

/// Which DeepSeek family the checkpoint declares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Architecture {
    /// `deepseek_v3`: dense MLA, no indexer.
    DeepseekV3,
    /// `deepseek_v32`: MLA plus the lightning indexer (DeepSeek Sparse Attention).
    DeepseekV32,
}

impl Architecture {
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::DeepseekV3 => "deepseek_v3",
            Architecture::DeepseekV32 => "deepseek_v32",
        }
    }

    /// The HF class name expected in `architectures`.
    pub fn class_name(self) -> &'static str {
        match self {
            Architecture::DeepseekV3 => "DeepseekV3ForCausalLM",
            Architecture::DeepseekV32 => "DeepseekV32ForCausalLM",
        }
    }
}

impl std::fmt::Display for Architecture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.class_name())
    }
}

/// YaRN RoPE scaling (MODEL_SPEC §2.4). Defaults are those of HF's `_compute_yarn_parameters` and
/// `DeepseekV3Attention` (`mscale_all_dim` 0 there means "no softmax rescaling").
#[derive(Clone, Debug, PartialEq)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: f64,
    pub mscale_all_dim: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    pub theta: f64,
    /// `None`: plain RoPE (`rope_type: default` or no scaling given).
    pub yarn: Option<Yarn>,
}

/// The V3.2 lightning indexer (MODEL_SPEC §2.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexerConfig {
    pub n_heads: usize,
    pub head_dim: usize,
    pub topk: usize,
}

/// A checked DeepSeek V3/V3.2 config. Field names follow config.json.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    /// Layers `0..first_k_dense_replace` have a dense MLP, the rest MoE.
    pub first_k_dense_replace: usize,
    pub moe_layer_freq: usize,
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub routed_scaling_factor: f64,
    pub scoring_func: String,
    pub topk_method: String,
    pub norm_topk_prob: bool,
    /// `None` for checkpoints that project q directly (`q_proj`, no q LoRA).
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub rope: Rope,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub bos_token_id: Option<u32>,
    /// `eos_token_id` may be one id or a list in config.json.
    pub eos_token_ids: Vec<u32>,
    pub tie_word_embeddings: bool,
    /// MTP layers stored after the last real layer (ids ≥ num_hidden_layers); never run.
    pub num_nextn_predict_layers: usize,
    /// Present exactly for `deepseek_v32`.
    pub indexer: Option<IndexerConfig>,
    pub quantization: Option<QuantConfig>,
}

/// Typed access to one JSON object, with errors naming the file and field.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    file: &'a Path,
    /// Prepended to field names in errors (`rope_scaling.` for nested objects).
    prefix: String,
}

impl<'a> Fields<'a> {
    fn err(&self, field: &str, reason: impl Into<String>) -> Error {
        Error::ConfigField {
            file: self.file.to_path_buf(),
            field: format!("{}{field}", self.prefix),
            reason: reason.into(),
        }
    }

    fn get(&self, field: &str) -> Option<&'a Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }

    fn opt_usize(&self, field: &str) -> Result<Option<usize>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => match v.as_u64().and_then(|n| usize::try_from(n).ok()) {
                Some(n) => Ok(Some(n)),
                None => Err(self.err(field, format!("expected a non-negative integer, found {v}"))),
            },
        }
    }

    fn usize(&self, field: &str) -> Result<usize> {
        self.opt_usize(field)?.ok_or_else(|| self.err(field, "missing"))
    }

    /// A dimension or count the model cannot have zero of.
    fn positive(&self, field: &str) -> Result<usize> {
        match self.usize(field)? {
            0 => Err(self.err(field, "must be positive")),
            n => Ok(n),
        }
    }

    fn opt_f64(&self, field: &str) -> Result<Option<f64>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.err(field, format!("expected a number, found {v}"))),
        }
    }

    fn f64(&self, field: &str) -> Result<f64> {
        self.opt_f64(field)?.ok_or_else(|| self.err(field, "missing"))
    }

    fn opt_bool(&self, field: &str) -> Result<Option<bool>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => {
                v.as_bool().map(Some).ok_or_else(|| self.err(field, format!("expected true or false, found {v}")))
            }
        }
    }

    fn opt_str(&self, field: &str) -> Result<Option<&'a str>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| self.err(field, format!("expected a string, found {v}"))),
        }
    }

    fn str(&self, field: &str) -> Result<&'a str> {
        self.opt_str(field)?.ok_or_else(|| self.err(field, "missing"))
    }

    fn object(&self, field: &str) -> Result<Option<Fields<'a>>> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Object(obj)) => Ok(Some(Fields { obj, file: self.file, prefix: format!("{field}.") })),
            Some(v) => Err(self.err(field, format!("expected an object, found {v}"))),
        }
    }

    /// One id or a list of ids.
    fn token_ids(&self, field: &str) -> Result<Vec<u32>> {
        let one = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
        match self.get(field) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => {
                items.iter().map(|v| one(v).ok_or_else(|| self.err(field, format!("bad token id {v}")))).collect()
            }
            Some(v) => one(v).map(|id| vec![id]).ok_or_else(|| self.err(field, format!("bad token id {v}"))),
        }
    }
}

/// Reads one RoPE description (`rope_scaling` or transformers 5's `rope_parameters`).
/// `Ok(None)` = plain RoPE; errors for scaling types other than YaRN.
fn parse_rope_scaling(f: &Fields<'_>) -> Result<Option<Yarn>> {
    let kind = match f.opt_str("rope_type")? {
        Some(k) => k,
        None => f.opt_str("type")?.unwrap_or("default"),
    };
    match kind {
        "default" => Ok(None),
        "yarn" => Ok(Some(Yarn {
            factor: f.f64("factor")?,
            original_max_position_embeddings: f.positive("original_max_position_embeddings")?,
            beta_fast: f.opt_f64("beta_fast")?.unwrap_or(32.0),
            beta_slow: f.opt_f64("beta_slow")?.unwrap_or(1.0),
            mscale: f.opt_f64("mscale")?.unwrap_or(1.0),
            mscale_all_dim: f.opt_f64("mscale_all_dim")?.unwrap_or(0.0),
        })),
        other => Err(f.err("rope_type", format!("{other:?} is not supported (only yarn or default)"))),
    }
}

/// `rope_theta` and YaRN from `rope_theta`/`rope_scaling` (transformers 4) and/or `rope_parameters`
/// (transformers 5). When both are written they must agree.
fn parse_rope(top: &Fields<'_>) -> Result<Rope> {
    let params = top.object("rope_parameters")?;
    let theta_top = top.opt_f64("rope_theta")?;
    let theta_params = params.as_ref().map(|p| p.opt_f64("rope_theta")).transpose()?.flatten();
    let theta = match (theta_top, theta_params) {
        (Some(a), Some(b)) if a != b => {
            return Err(top.err("rope_theta", format!("{a} disagrees with rope_parameters.rope_theta {b}")));
        }
        (Some(t), _) | (None, Some(t)) => t,
        (None, None) => return Err(top.err("rope_theta", "missing (neither rope_theta nor rope_parameters)")),
    };
    let from_scaling = top.object("rope_scaling")?.map(|f| parse_rope_scaling(&f)).transpose()?;
    let from_params = params.map(|f| parse_rope_scaling(&f)).transpose()?;
    let yarn = match (from_scaling, from_params) {
        (Some(a), Some(b)) if a != b => {
            return Err(top.err("rope_scaling", format!("{a:?} disagrees with rope_parameters {b:?}")));
        }
        (Some(y), _) | (None, Some(y)) => y,
        (None, None) => None,
    };
    Ok(Rope { theta, yarn })
}

impl ModelConfig {
    /// Reads `<dir>/config.json`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        Self::from_file(dir.as_ref().join("config.json"))
    }

    /// Reads config.json; without a `quantization_config` in it, AutoGPTQ's `quantize_config.json` beside it
    /// (when present) says how the weights are quantized. Such files often omit `quant_method`: it is GPTQ.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let read = |p: &Path| std::fs::read_to_string(p).map_err(|source| Error::Io { path: p.to_path_buf(), source });
        let mut cfg = Self::parse(&read(path)?, path)?;
        let qpath = path.with_file_name("quantize_config.json");
        if cfg.quantization.is_none() && qpath.exists() {
            let mut v: Value =
                serde_json::from_str(&read(&qpath)?).map_err(|source| Error::Json { file: qpath.clone(), source })?;
            if let Value::Object(obj) = &mut v {
                obj.entry("quant_method").or_insert_with(|| Value::String("gptq".into()));
            }
            let q = QuantConfig::from_json(&v).map_err(|source| Error::QuantConfig { file: qpath.clone(), source })?;
            cfg.quantization = Some(q);
        }
        Ok(cfg)
    }

    /// Parses config.json text; `origin` only labels errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Self> {
        let value: Value =
            serde_json::from_str(text).map_err(|source| Error::Json { file: origin.to_path_buf(), source })?;
        let Value::Object(obj) = &value else {
            return Err(Error::ConfigField {
                file: origin.to_path_buf(),
                field: String::new(),
                reason: "not an object".into(),
            });
        };
        let f = Fields { obj, file: origin, prefix: String::new() };

        let model_type = f.str("model_type")?;
        let architecture = match model_type {
            "deepseek_v3" => Architecture::DeepseekV3,
            "deepseek_v32" => Architecture::DeepseekV32,
            other => {
                return Err(Error::UnsupportedModelType { file: origin.to_path_buf(), model_type: other.to_string() });
            }
        };
        if let Some(archs) = f.get("architectures") {
            let found: Vec<String> = archs
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
                .unwrap_or_default();
            if !found.iter().any(|a| a == architecture.class_name()) {
                return Err(Error::ArchitectureMismatch {
                    file: origin.to_path_buf(),
                    model_type: model_type.to_string(),
                    expected: architecture.class_name().to_string(),
                    found,
                });
            }
        }

        let indexer = match architecture {
            Architecture::DeepseekV3 => None,
            Architecture::DeepseekV32 => Some(IndexerConfig {
                n_heads: f.positive("index_n_heads")?,
                head_dim: f.positive("index_head_dim")?,
                topk: f.positive("index_topk")?,
            }),
        };
        let quantization = match f.get("quantization_config") {
            None => None,
            Some(q) => Some(
                QuantConfig::from_json(q)
                    .map_err(|source| Error::QuantConfig { file: origin.to_path_buf(), source })?,
            ),
        };

        let cfg = ModelConfig {
            architecture,
            hidden_size: f.positive("hidden_size")?,
            num_hidden_layers: f.positive("num_hidden_layers")?,
            first_k_dense_replace: f.usize("first_k_dense_replace")?,
            moe_layer_freq: f.opt_usize("moe_layer_freq")?.unwrap_or(1),
            intermediate_size: f.positive("intermediate_size")?,
            moe_intermediate_size: f.positive("moe_intermediate_size")?,
            n_routed_experts: f.positive("n_routed_experts")?,
            n_shared_experts: f.usize("n_shared_experts")?,
            num_experts_per_tok: f.positive("num_experts_per_tok")?,
            n_group: f.positive("n_group")?,
            topk_group: f.positive("topk_group")?,
            routed_scaling_factor: f.f64("routed_scaling_factor")?,
            scoring_func: f.str("scoring_func")?.to_string(),
            topk_method: f.str("topk_method")?.to_string(),
            norm_topk_prob: f.opt_bool("norm_topk_prob")?.ok_or_else(|| f.err("norm_topk_prob", "missing"))?,
            q_lora_rank: f.opt_usize("q_lora_rank")?,
            kv_lora_rank: f.positive("kv_lora_rank")?,
            qk_nope_head_dim: f.positive("qk_nope_head_dim")?,
            qk_rope_head_dim: f.positive("qk_rope_head_dim")?,
            v_head_dim: f.positive("v_head_dim")?,
            num_attention_heads: f.positive("num_attention_heads")?,
            num_key_value_heads: f.positive("num_key_value_heads")?,
            rope: parse_rope(&f)?,
            vocab_size: f.positive("vocab_size")?,
            rms_norm_eps: f.f64("rms_norm_eps")?,
            max_position_embeddings: f.positive("max_position_embeddings")?,
            bos_token_id: f.token_ids("bos_token_id")?.first().copied(),
            eos_token_ids: f.token_ids("eos_token_id")?,
            tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            num_nextn_predict_layers: f.opt_usize("num_nextn_predict_layers")?.unwrap_or(0),
            indexer,
            quantization,
        };
        cfg.check(&f)?;
        Ok(cfg)
    }

    /// Cross-field rules; each one is something the forward pass would otherwise trip over later.
    fn check(&self, f: &Fields<'_>) -> Result<()> {
        if self.scoring_func != "sigmoid" {
            return Err(f.err(
                "scoring_func",
                format!("{:?}: only sigmoid (DeepSeek V3 routing) is implemented", self.scoring_func),
            ));
        }
        if self.topk_method != "noaux_tc" {
            return Err(f.err("topk_method", format!("{:?}: only noaux_tc is implemented", self.topk_method)));
        }
        if !self.n_routed_experts.is_multiple_of(self.n_group) {
            return Err(f.err(
                "n_group",
                format!("{} does not divide n_routed_experts {}", self.n_group, self.n_routed_experts),
            ));
        }
        if self.topk_group > self.n_group {
            return Err(f.err("topk_group", format!("{} exceeds n_group {}", self.topk_group, self.n_group)));
        }
        let selectable = self.topk_group * (self.n_routed_experts / self.n_group);
        if self.num_experts_per_tok > selectable {
            return Err(f.err(
                "num_experts_per_tok",
                format!("{} exceeds the {selectable} experts in topk_group groups", self.num_experts_per_tok),
            ));
        }
        if self.first_k_dense_replace > self.num_hidden_layers {
            return Err(f.err("first_k_dense_replace", "exceeds num_hidden_layers"));
        }
        if self.moe_layer_freq == 0 {
            return Err(f.err("moe_layer_freq", "must be positive"));
        }
        if !self.qk_rope_head_dim.is_multiple_of(2) {
            return Err(f.err("qk_rope_head_dim", "must be even (RoPE rotates pairs)"));
        }
        if let Some(ix) = self.indexer
            && ix.head_dim < self.qk_rope_head_dim
        {
            return Err(f.err("index_head_dim", "smaller than qk_rope_head_dim (the indexer ropes its first dims)"));
        }
        if self.indexer.is_some() && self.q_lora_rank.is_none() {
            return Err(f.err("q_lora_rank", "the V3.2 indexer reads the q LoRA latent, so q_lora_rank is required"));
        }
        if let Some(y) = &self.rope.yarn
            && y.factor < 1.0
        {
            return Err(f.err("rope_scaling.factor", "must be at least 1"));
        }
        Ok(())
    }

    /// `qk_nope_head_dim + qk_rope_head_dim` (192 for V3).
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Whether layer `layer` has an MoE block (HF `DeepseekV3DecoderLayer`; remote code's `moe_layer_freq`).
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        layer >= self.first_k_dense_replace && layer.is_multiple_of(self.moe_layer_freq)
    }

    /// MLA softmax scale: `qk_head_dim^-0.5 · mscale²` with `mscale = 0.1·mscale_all_dim·ln(factor) + 1`
    /// (MODEL_SPEC §2.3; HF `DeepseekV3Attention.__init__`, which applies it whenever YaRN is configured).
    pub fn softmax_scale(&self) -> f64 {
        let base = (self.qk_head_dim() as f64).powf(-0.5);
        match &self.rope.yarn {
            Some(y) if y.mscale_all_dim != 0.0 && y.factor > 1.0 => {
                let m = 0.1 * y.mscale_all_dim * y.factor.ln() + 1.0;
                base * m * m
            }
            _ => base,
        }
    }
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
