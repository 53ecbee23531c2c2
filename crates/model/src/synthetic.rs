//! Tiny synthetic DeepSeek checkpoints for tests: a config.json and safetensors shards whose names, dtypes
//! and shapes follow MODEL_SPEC §3 (tensor data is zeros). The tensor list is spelled out here independently of
//! `validate::expected_modules`, so a wrong name in either one shows up as a failing test.
//! The real fixtures, with meaningful weights and golden outputs, come from `tools/fixtures/`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use pipemoe_quant::Dtype;
use safetensors::tensor::TensorView;
use serde_json::{Value, json};

use crate::checkpoint::{INDEX_FILE, SINGLE_FILE};
use crate::config::Architecture;
use crate::{Error, Result};

/// What to generate. Dims are fixed and tiny (hidden 64, 2 layers: one dense, one MoE with 4 experts).
#[derive(Clone, Debug)]
pub struct SyntheticSpec {
    pub architecture: Architecture,
    /// GPTQ bit width of the linears; `None` writes every linear as BF16 with no quantization_config.
    pub bits: Option<u32>,
    pub group_size: i64,
    /// 1 writes a single `model.safetensors`; more writes `model-0000k-of-0000n.safetensors` + the index.
    pub shards: usize,
    /// Modules written as BF16 `.weight` and declared `{"bits": 16}` in `extra_config`.
    pub dense_modules: Vec<String>,
    /// Write a `g_idx` for every quantized linear.
    pub g_idx: bool,
    pub checkpoint_format: Option<String>,
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        Self {
            architecture: Architecture::DeepseekV32,
            bits: Some(3),
            group_size: 32,
            shards: 2,
            dense_modules: vec!["model.layers.0.self_attn.kv_b_proj".into()],
            g_idx: false,
            checkpoint_format: None,
        }
    }
}

/// One tensor to write: name, dtype, shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

const HIDDEN: usize = 64;
const LAYERS: usize = 2;
const DENSE_LAYERS: usize = 1;
const INTERMEDIATE: usize = 96;
const MOE_INTERMEDIATE: usize = 32;
const EXPERTS: usize = 4;
const Q_LORA: usize = 32;
const KV_LORA: usize = 64;
const NOPE: usize = 32;
const ROPE: usize = 32;
const V_DIM: usize = 32;
const HEADS: usize = 2;
const VOCAB: usize = 128;
const INDEX_HEADS: usize = 2;
const INDEX_DIM: usize = 64;

/// config.json for `spec`.
pub fn config_json(spec: &SyntheticSpec) -> Value {
    let mut c = json!({
        "architectures": [spec.architecture.class_name()], "model_type": spec.architecture.model_type(),
        "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "first_k_dense_replace": DENSE_LAYERS,
        "intermediate_size": INTERMEDIATE, "moe_intermediate_size": MOE_INTERMEDIATE,
        "n_routed_experts": EXPERTS, "n_shared_experts": 1, "num_experts_per_tok": 2,
        "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": true,
        "q_lora_rank": Q_LORA, "kv_lora_rank": KV_LORA,
        "qk_nope_head_dim": NOPE, "qk_rope_head_dim": ROPE, "v_head_dim": V_DIM,
        "num_attention_heads": HEADS, "num_key_value_heads": HEADS, "rope_theta": 10000.0,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        "vocab_size": VOCAB, "rms_norm_eps": 1e-6, "max_position_embeddings": 8192,
        "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": false, "num_nextn_predict_layers": 1,
    });
    let Some(obj) = c.as_object_mut() else { return c };
    if spec.architecture == Architecture::DeepseekV32 {
        obj.insert("index_n_heads".into(), json!(INDEX_HEADS));
        obj.insert("index_head_dim".into(), json!(INDEX_DIM));
        obj.insert("index_topk".into(), json!(16));
    }
    if let Some(bits) = spec.bits {
        let extra: serde_json::Map<String, Value> =
            spec.dense_modules.iter().map(|m| (m.clone(), json!({"bits": 16, "data_type": "float"}))).collect();
        let mut q = json!({"quant_method": "auto-round", "bits": bits, "group_size": spec.group_size, "sym": true,
                           "data_type": "int", "packing_format": "auto_round:auto_gptq", "extra_config": extra});
        if let (Some(fmt), Some(qo)) = (&spec.checkpoint_format, q.as_object_mut()) {
            qo.insert("checkpoint_format".into(), json!(fmt));
        }
        obj.insert("quantization_config".into(), q);
    }
    c
}

fn push(out: &mut Vec<TensorSpec>, name: String, dtype: Dtype, shape: &[usize]) {
    out.push(TensorSpec { name, dtype, shape: shape.to_vec() });
}

/// A linear as the spec says it is stored: GPTQ parts when quantized and packable, else a BF16 weight.
fn linear(out: &mut Vec<TensorSpec>, spec: &SyntheticSpec, prefix: String, n_out: usize, n_in: usize) {
    let packable = n_in.is_multiple_of(32) && n_out.is_multiple_of(32);
    match spec.bits {
        Some(bits) if packable && !spec.dense_modules.contains(&prefix) => {
            let b = bits as usize;
            let groups = if spec.group_size < 0 { 1 } else { n_in.div_ceil(spec.group_size as usize) };
            push(out, format!("{prefix}.qweight"), Dtype::I32, &[n_in * b / 32, n_out]);
            push(out, format!("{prefix}.qzeros"), Dtype::I32, &[groups, n_out * b / 32]);
            push(out, format!("{prefix}.scales"), Dtype::F16, &[groups, n_out]);
            if spec.g_idx {
                push(out, format!("{prefix}.g_idx"), Dtype::I32, &[n_in]);
            }
        }
        _ => push(out, format!("{prefix}.weight"), Dtype::BF16, &[n_out, n_in]),
    }
}

/// Every tensor of the checkpoint, plus one MTP tensor (layer id = num_hidden_layers) that must be ignored.
pub fn tensors(spec: &SyntheticSpec) -> Vec<TensorSpec> {
    let mut t = Vec::new();
    let bf = Dtype::BF16;
    push(&mut t, "model.embed_tokens.weight".into(), bf, &[VOCAB, HIDDEN]);
    push(&mut t, "model.norm.weight".into(), bf, &[HIDDEN]);
    // AutoRound never quantizes lm_head (MODEL_SPEC §3.2).
    push(&mut t, "lm_head.weight".into(), bf, &[VOCAB, HIDDEN]);
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        push(&mut t, format!("{p}.input_layernorm.weight"), bf, &[HIDDEN]);
        push(&mut t, format!("{p}.post_attention_layernorm.weight"), bf, &[HIDDEN]);
        linear(&mut t, spec, format!("{p}.self_attn.q_a_proj"), Q_LORA, HIDDEN);
        push(&mut t, format!("{p}.self_attn.q_a_layernorm.weight"), bf, &[Q_LORA]);
        linear(&mut t, spec, format!("{p}.self_attn.q_b_proj"), HEADS * (NOPE + ROPE), Q_LORA);
        linear(&mut t, spec, format!("{p}.self_attn.kv_a_proj_with_mqa"), KV_LORA + ROPE, HIDDEN);
        push(&mut t, format!("{p}.self_attn.kv_a_layernorm.weight"), bf, &[KV_LORA]);
        linear(&mut t, spec, format!("{p}.self_attn.kv_b_proj"), HEADS * (NOPE + V_DIM), KV_LORA);
        linear(&mut t, spec, format!("{p}.self_attn.o_proj"), HIDDEN, HEADS * V_DIM);
        if spec.architecture == Architecture::DeepseekV32 {
            linear(&mut t, spec, format!("{p}.self_attn.indexer.wq_b"), INDEX_HEADS * INDEX_DIM, Q_LORA);
            linear(&mut t, spec, format!("{p}.self_attn.indexer.wk"), INDEX_DIM, HIDDEN);
            push(&mut t, format!("{p}.self_attn.indexer.k_norm.weight"), Dtype::F32, &[INDEX_DIM]);
            push(&mut t, format!("{p}.self_attn.indexer.k_norm.bias"), Dtype::F32, &[INDEX_DIM]);
            // 2 output rows cannot be GPTQ-packed, so this one stays BF16 (as AutoRound would leave it).
            linear(&mut t, spec, format!("{p}.self_attn.indexer.weights_proj"), INDEX_HEADS, HIDDEN);
        }
        let mut mlp = |base: String, inter: usize| {
            linear(&mut t, spec, format!("{base}.gate_proj"), inter, HIDDEN);
            linear(&mut t, spec, format!("{base}.up_proj"), inter, HIDDEN);
            linear(&mut t, spec, format!("{base}.down_proj"), HIDDEN, inter);
        };
        if l < DENSE_LAYERS {
            mlp(format!("{p}.mlp"), INTERMEDIATE);
        } else {
            for e in 0..EXPERTS {
                mlp(format!("{p}.mlp.experts.{e}"), MOE_INTERMEDIATE);
            }
            mlp(format!("{p}.mlp.shared_experts"), MOE_INTERMEDIATE);
            push(&mut t, format!("{p}.mlp.gate.weight"), bf, &[EXPERTS, HIDDEN]);
            push(&mut t, format!("{p}.mlp.gate.e_score_correction_bias"), Dtype::F32, &[EXPERTS]);
        }
    }
    // An MTP projection with a shape no real layer has: validation must skip it, not check it.
    push(&mut t, format!("model.layers.{LAYERS}.eh_proj.weight"), bf, &[HIDDEN, 2 * HIDDEN + 1]);
    t
}

/// Writes config.json and the shards for `spec` into `dir`.
pub fn write(dir: &Path, spec: &SyntheticSpec) -> Result<()> {
    write_with(dir, spec, &tensors(spec))
}

/// Writes config.json for `spec` and the given tensors (a test may have edited the list) as zeros,
/// split across `spec.shards` files in list order.
pub fn write_with(dir: &Path, spec: &SyntheticSpec, tensors: &[TensorSpec]) -> Result<()> {
    let cfg_path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&config_json(spec))
        .map_err(|source| Error::Json { file: cfg_path.clone(), source })?;
    std::fs::write(&cfg_path, text).map_err(|source| Error::Io { path: cfg_path.clone(), source })?;

    let size = |t: &TensorSpec| t.shape.iter().product::<usize>() * t.dtype.bitsize() / 8;
    let zeros = vec![0u8; tensors.iter().map(size).max().unwrap_or(0)];
    let n = spec.shards.max(1);
    let file_name =
        |k: usize| if n == 1 { SINGLE_FILE.to_string() } else { format!("model-{:05}-of-{n:05}.safetensors", k + 1) };
    let mut weight_map = BTreeMap::new();
    for k in 0..n {
        let path = dir.join(file_name(k));
        let st_err = |source| Error::SafeTensors { file: path.clone(), source };
        let chunk = &tensors[k * tensors.len() / n..(k + 1) * tensors.len() / n];
        let mut views = Vec::with_capacity(chunk.len());
        for t in chunk {
            views.push((t.name.clone(), TensorView::new(t.dtype, t.shape.clone(), &zeros[..size(t)]).map_err(st_err)?));
            weight_map.insert(t.name.clone(), file_name(k));
        }
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(views, Some(meta), &path).map_err(st_err)?;
    }
    if n > 1 {
        let total: usize = tensors.iter().map(size).sum();
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let path = dir.join(INDEX_FILE);
        std::fs::write(&path, index.to_string()).map_err(|source| Error::Io { path, source })?;
    }
    Ok(())
}
