//! Config parsing against the V3.2 numbers of MODEL_SPEC §1.1, and each way a config can be refused.

use serde_json::{Value, json};

use super::*;

/// The 671B V3.2 config as MODEL_SPEC §1.1 lists it, with REAP's 128 experts and the W3A16 quantization.
const V32: &str = r#"{
        "architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32",
        "hidden_size": 7168, "num_hidden_layers": 61, "first_k_dense_replace": 3,
        "intermediate_size": 18432, "moe_intermediate_size": 2048,
        "n_routed_experts": 128, "n_shared_experts": 1, "num_experts_per_tok": 8,
        "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": true,
        "q_lora_rank": 1536, "kv_lora_rank": 512,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "num_attention_heads": 128, "num_key_value_heads": 128,
        "rope_theta": 10000,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        "vocab_size": 129280, "rms_norm_eps": 1e-6, "max_position_embeddings": 163840,
        "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": false,
        "num_nextn_predict_layers": 1,
        "index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048,
        "quantization_config": {"autoround_version": "0.9.4", "bits": 3, "data_type": "int", "group_size": 128,
                                "packing_format": "auto_round:auto_gptq", "quant_method": "auto-round", "sym": true}
    }"#;

fn v32() -> Value {
    serde_json::from_str(V32).expect("V32 is valid JSON")
}

fn parse(v: &Value) -> Result<ModelConfig> {
    ModelConfig::parse(&v.to_string(), Path::new("config.json"))
}

fn edit(mut v: Value, f: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Value {
    if let Some(o) = v.as_object_mut() {
        f(o);
    }
    v
}

fn field_error(r: Result<ModelConfig>) -> Option<String> {
    match r {
        Err(Error::ConfigField { field, .. }) => Some(field),
        _ => None,
    }
}

#[test]
fn reads_every_field_of_v32() -> Result<()> {
    let c = parse(&v32())?;
    assert_eq!(c.architecture, Architecture::DeepseekV32);
    assert_eq!((c.hidden_size, c.num_hidden_layers, c.first_k_dense_replace), (7168, 61, 3));
    assert_eq!((c.n_routed_experts, c.n_group, c.topk_group, c.num_experts_per_tok), (128, 8, 4, 8));
    assert_eq!(c.q_lora_rank, Some(1536));
    assert_eq!(c.qk_head_dim(), 192);
    assert_eq!(c.indexer, Some(IndexerConfig { n_heads: 64, head_dim: 128, topk: 2048 }));
    let y = c.rope.yarn.as_ref().map(|y| (y.factor, y.original_max_position_embeddings, y.mscale_all_dim));
    assert_eq!(y, Some((40.0, 4096, 1.0)));
    assert_eq!(c.rope.theta, 10000.0);
    assert_eq!((c.bos_token_id, c.eos_token_ids.as_slice()), (Some(0), &[1][..]));
    assert_eq!(c.num_nextn_predict_layers, 1);
    assert!(!c.is_moe_layer(2) && c.is_moe_layer(3));
    // MODEL_SPEC §2.3: 192^-0.5 · (0.1·ln 40 + 1)² = 0.1352338.
    assert!((c.softmax_scale() - 0.135_233_8).abs() < 1e-6, "{}", c.softmax_scale());
    let q = c.quantization.as_ref().map(|q| q.default.bits.get());
    assert_eq!(q, Some(3));
    Ok(())
}

#[test]
fn accepts_transformers5_rope_parameters() -> Result<()> {
    let v = edit(v32(), |o| {
        o.remove("rope_theta");
        let rp = o.remove("rope_scaling").map(|mut s| {
            if let Some(m) = s.as_object_mut() {
                m.remove("type");
                m.insert("rope_type".into(), json!("yarn"));
                m.insert("rope_theta".into(), json!(10000.0));
            }
            s
        });
        o.insert("rope_parameters".into(), rp.unwrap_or(Value::Null));
    });
    let c = parse(&v)?;
    assert_eq!(c.rope, parse(&v32())?.rope);
    // Both spellings at once must agree.
    let both = edit(v32(), |o| {
        o.insert("rope_parameters".into(), json!({"rope_type": "yarn", "rope_theta": 10000, "factor": 40,
            "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}));
    });
    assert!(parse(&both).is_ok());
    let clash = edit(both, |o| {
        o.insert("rope_theta".into(), json!(50000));
    });
    assert_eq!(field_error(parse(&clash)).as_deref(), Some("rope_theta"));
    let linear = edit(v32(), |o| {
        o.insert("rope_scaling".into(), json!({"type": "linear", "factor": 2}));
    });
    assert_eq!(field_error(parse(&linear)).as_deref(), Some("rope_scaling.rope_type"));
    Ok(())
}

#[test]
fn group_routing_fields_are_never_assumed() {
    for field in ["n_group", "topk_group", "n_routed_experts", "first_k_dense_replace", "kv_lora_rank"] {
        let v = edit(v32(), |o| {
            o.remove(field);
        });
        assert_eq!(field_error(parse(&v)).as_deref(), Some(field), "{field}");
    }
    let v = edit(v32(), |o| {
        o.insert("n_group".into(), json!(3));
    });
    assert_eq!(field_error(parse(&v)).as_deref(), Some("n_group"));
    let v = edit(v32(), |o| {
        o.insert("topk_group".into(), json!(9));
    });
    assert_eq!(field_error(parse(&v)).as_deref(), Some("topk_group"));
    let v = edit(v32(), |o| {
        o.insert("hidden_size".into(), json!("7168"));
    });
    assert_eq!(field_error(parse(&v)).as_deref(), Some("hidden_size"));
}

#[test]
fn model_type_and_architectures_are_checked() {
    let v = edit(v32(), |o| {
        o.insert("model_type".into(), json!("llama"));
    });
    assert!(matches!(parse(&v), Err(Error::UnsupportedModelType { ref model_type, .. }) if model_type == "llama"));
    let v = edit(v32(), |o| {
        o.insert("architectures".into(), json!(["DeepseekV3ForCausalLM"]));
    });
    assert!(matches!(parse(&v), Err(Error::ArchitectureMismatch { .. })));
    let v = edit(v32(), |o| {
        o.remove("model_type");
    });
    assert_eq!(field_error(parse(&v)).as_deref(), Some("model_type"));
    assert!(matches!(ModelConfig::parse("{", Path::new("x.json")), Err(Error::Json { .. })));
}

#[test]
fn indexer_fields_only_for_v32() -> Result<()> {
    let v3 = edit(v32(), |o| {
        o.insert("model_type".into(), json!("deepseek_v3"));
        o.insert("architectures".into(), json!(["DeepseekV3ForCausalLM"]));
        o.remove("index_topk");
        o.insert("eos_token_id".into(), json!([1, 2]));
    });
    let c = parse(&v3)?;
    assert_eq!(c.indexer, None);
    assert_eq!(c.eos_token_ids, [1, 2]);
    let v = edit(v32(), |o| {
        o.remove("index_topk");
    });
    assert_eq!(field_error(parse(&v)).as_deref(), Some("index_topk"));
    Ok(())
}

#[test]
fn routing_other_than_noaux_tc_is_refused() {
    let v = edit(v32(), |o| {
        o.insert("scoring_func".into(), json!("softmax"));
    });
    assert_eq!(field_error(parse(&v)).as_deref(), Some("scoring_func"));
    let v = edit(v32(), |o| {
        o.insert("topk_method".into(), json!("greedy"));
    });
    assert_eq!(field_error(parse(&v)).as_deref(), Some("topk_method"));
}

#[test]
fn bad_quantization_config_names_the_file() {
    let v = edit(v32(), |o| {
        o.insert("quantization_config".into(), json!({"quant_method": "gptq", "bits": 5, "group_size": 128}));
    });
    let err = parse(&v).err();
    assert!(matches!(err, Some(Error::QuantConfig { source: pipemoe_quant::Error::UnsupportedBits { bits: 5 }, .. })));
    let msg = err.as_ref().map(|e| e.to_string()).unwrap_or_default();
    assert_eq!(msg, "config.json: quantization_config");
    let cause = err.as_ref().and_then(|e| std::error::Error::source(e)).map(|c| c.to_string()).unwrap_or_default();
    assert!(cause.contains("unsupported bit width 5"), "{cause}");
}
