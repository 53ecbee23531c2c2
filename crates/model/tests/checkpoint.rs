//! Synthetic checkpoints in a temp dir: a good one validates with the summary we count by hand; each kind of
//! damage gives its own error variant, naming the file or tensor, without a panic.

use std::path::{Path, PathBuf};

use anyhow::Result;
use pipemoe_model::synthetic::{self, SyntheticSpec, TensorSpec};
use pipemoe_model::{Architecture, Checkpoint, Error, LinearFormat, ModelConfig, ModelSummary, validate};
use pipemoe_quant::Dtype;

const SHARD1: &str = "model-00001-of-00002.safetensors";
const SHARD2: &str = "model-00002-of-00002.safetensors";

fn open(dir: &Path) -> pipemoe_model::Result<ModelSummary> {
    let cfg = ModelConfig::from_dir(dir)?;
    let ckpt = Checkpoint::open(dir)?;
    validate(&cfg, &ckpt)
}

/// Writes `spec` with `edit` applied to the tensor list.
fn build(spec: &SyntheticSpec, edit: impl FnOnce(&mut Vec<TensorSpec>)) -> Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    let mut tensors = synthetic::tensors(spec);
    edit(&mut tensors);
    synthetic::write_with(dir.path(), spec, &tensors)?;
    Ok(dir)
}

fn set(tensors: &mut [TensorSpec], name: &str, f: impl FnOnce(&mut TensorSpec)) {
    let t = tensors.iter_mut().find(|t| t.name == name);
    assert!(t.is_some(), "{name} not in the synthetic list");
    if let Some(t) = t {
        f(t);
    }
}

#[test]
fn good_checkpoint_validates() -> Result<()> {
    let dir = build(&SyntheticSpec::default(), |_| {})?;
    let s = open(dir.path())?;
    assert_eq!(s.architecture, Architecture::DeepseekV32);
    assert_eq!((s.num_layers, s.dense_layers, s.moe_layers, s.n_routed_experts), (2, 1, 1, 4));
    assert!(s.indexer);
    // Counted by hand: per layer q_a, q_b, kv_a, kv_b, o + indexer wq_b, wk = 7 (minus kv_b of layer 0,
    // declared 16-bit), layer 0 MLP 3, layer 1 experts 4·3 + shared 3 → 6 + 7 + 3 + 15 = 31 GPTQ linears.
    // BF16: lm_head, layer 0 kv_b_proj, two indexer weights_proj (2 rows cannot be packed) = 4.
    let gptq = s.linears.get(&LinearFormat::Gptq { bits: 3 }).map(|l| l.modules);
    let dense = s.linears.get(&LinearFormat::Dense { dtype: Dtype::BF16 }).map(|l| l.modules);
    assert_eq!((gptq, dense), (Some(31), Some(4)));
    assert_eq!(s.mtp_tensors, 1);
    assert!(s.unused.is_empty(), "{:?}", s.unused);
    let ckpt = Checkpoint::open(dir.path())?;
    assert_eq!(s.weight_bytes + 64 * 129 * 2, ckpt.total_bytes(), "everything but the MTP tensor is used");
    Ok(())
}

#[test]
fn other_layouts_validate() -> Result<()> {
    let specs = [
        SyntheticSpec { shards: 1, ..Default::default() },
        SyntheticSpec { architecture: Architecture::DeepseekV3, bits: Some(4), ..Default::default() },
        SyntheticSpec { bits: Some(2), group_size: -1, g_idx: true, ..Default::default() },
        SyntheticSpec {
            bits: Some(8),
            group_size: 64,
            checkpoint_format: Some("gptq_v2".into()),
            ..Default::default()
        },
        SyntheticSpec { bits: None, dense_modules: vec![], ..Default::default() },
    ];
    for spec in &specs {
        let dir = build(spec, |_| {})?;
        let s = open(dir.path()).map_err(|e| anyhow::anyhow!("{spec:?}: {e}"))?;
        assert_eq!(s.indexer, spec.architecture == Architecture::DeepseekV32);
        match spec.bits {
            Some(b) => assert!(s.linears.contains_key(&LinearFormat::Gptq { bits: b }), "{spec:?}"),
            None => assert_eq!(s.linears.len(), 1),
        }
    }
    Ok(())
}

#[test]
fn truncated_shard_names_the_file() -> Result<()> {
    let dir = build(&SyntheticSpec::default(), |_| {})?;
    let shard = dir.path().join(SHARD2);
    let len = std::fs::metadata(&shard)?.len();
    std::fs::OpenOptions::new().write(true).open(&shard)?.set_len(len - 10)?;
    match Checkpoint::open(dir.path()) {
        Err(Error::SafeTensors { file, .. }) => assert_eq!(file, shard),
        other => panic!("expected SafeTensors error, got {other:?}"),
    }
    // An empty file and garbage bytes are header errors too, not panics.
    for bytes in [&b""[..], b"\xff\xff\xff\xff\xff\xff\xff\xff{}", b"\x02\x00\x00\x00\x00\x00\x00\x00[]"] {
        std::fs::write(&shard, bytes)?;
        assert!(matches!(Checkpoint::open(dir.path()), Err(Error::SafeTensors { ref file, .. }) if *file == shard));
    }
    Ok(())
}

#[test]
fn deleted_shard_names_the_file() -> Result<()> {
    let dir = build(&SyntheticSpec::default(), |_| {})?;
    let shard = dir.path().join(SHARD1);
    std::fs::remove_file(&shard)?;
    let err = Checkpoint::open(dir.path()).err();
    assert!(matches!(&err, Some(Error::Io { path, .. }) if *path == shard), "{err:?}");
    assert!(err.map(|e| e.to_string()).unwrap_or_default().contains(SHARD1));
    Ok(())
}

#[test]
fn missing_checkpoint_and_bad_index() -> Result<()> {
    let dir = tempfile::tempdir()?;
    assert!(matches!(Checkpoint::open(dir.path()), Err(Error::NoCheckpoint { .. })));
    let dir = build(&SyntheticSpec::default(), |_| {})?;
    let index = dir.path().join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index)?;
    // Point one tensor at the wrong shard.
    let moved = text.replacen(
        &format!("\"model.norm.weight\":\"{SHARD1}\""),
        &format!("\"model.norm.weight\":\"{SHARD2}\""),
        1,
    );
    assert_ne!(moved, text, "index layout changed; update the test");
    std::fs::write(&index, moved)?;
    assert!(matches!(Checkpoint::open(dir.path()), Err(Error::Index { .. })));
    std::fs::write(&index, text.replacen(SHARD1, "../escape.safetensors", 1))?;
    assert!(matches!(Checkpoint::open(dir.path()), Err(Error::Index { .. })));
    std::fs::write(&index, "{not json")?;
    assert!(matches!(Checkpoint::open(dir.path()), Err(Error::Json { ref file, .. }) if *file == index));
    Ok(())
}

#[test]
fn tensor_in_two_shards_is_refused() -> Result<()> {
    // The list is split in order, so a copy at each end lands in both shards.
    let dir = build(&SyntheticSpec::default(), |t| {
        let first = t[0].clone();
        t.push(first);
    })?;
    match Checkpoint::open(dir.path()) {
        Err(Error::DuplicateTensor { tensor, first, second }) => {
            assert_eq!(tensor, "model.embed_tokens.weight");
            assert_eq!((first, second), (dir.path().join(SHARD1), dir.path().join(SHARD2)));
        }
        other => panic!("expected DuplicateTensor, got {other:?}"),
    }
    Ok(())
}

fn expect_err(dir: &Path) -> Error {
    match open(dir) {
        Ok(s) => panic!("validation passed unexpectedly: {s:?}"),
        Err(e) => e,
    }
}

#[test]
fn wrong_shape_is_a_shape_mismatch() -> Result<()> {
    let q = "model.layers.1.mlp.experts.2.down_proj.qweight";
    let dir = build(&SyntheticSpec::default(), |t| set(t, q, |t| t.shape = vec![6, 64]))?;
    match expect_err(dir.path()) {
        Error::ShapeMismatch { tensor, expected, found } => {
            assert_eq!(tensor, q);
            assert_eq!(expected, [3, 64]); // in 32 · 3 bits / 32 = 3 words, out 64
            assert_eq!(found, [6, 64]);
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
    let n = "model.layers.0.self_attn.kv_a_layernorm.weight";
    let dir = build(&SyntheticSpec::default(), |t| set(t, n, |t| t.shape = vec![63]))?;
    assert!(matches!(expect_err(dir.path()), Error::ShapeMismatch { ref tensor, .. } if tensor == n));
    // The dense kv_b_proj of layer 0 with in/out swapped.
    let w = "model.layers.0.self_attn.kv_b_proj.weight";
    let dir = build(&SyntheticSpec::default(), |t| set(t, w, |t| t.shape.reverse()))?;
    assert!(matches!(expect_err(dir.path()), Error::ShapeMismatch { ref tensor, .. } if tensor == w));
    Ok(())
}

#[test]
fn wrong_dtype_is_a_dtype_mismatch() -> Result<()> {
    let s = "model.layers.1.self_attn.o_proj.scales";
    let dir = build(&SyntheticSpec::default(), |t| set(t, s, |t| t.dtype = Dtype::BF16))?;
    match expect_err(dir.path()) {
        Error::DtypeMismatch { tensor, expected, found } => {
            assert_eq!((tensor.as_str(), expected.as_str(), found.as_str()), (s, "F16", "BF16"));
        }
        other => panic!("expected DtypeMismatch, got {other:?}"),
    }
    let n = "model.norm.weight";
    let dir = build(&SyntheticSpec::default(), |t| set(t, n, |t| t.dtype = Dtype::I32))?;
    assert!(matches!(expect_err(dir.path()), Error::DtypeMismatch { ref tensor, .. } if tensor == n));
    Ok(())
}

#[test]
fn missing_tensors_are_named() -> Result<()> {
    let z = "model.layers.1.mlp.experts.3.up_proj.qzeros";
    let dir = build(&SyntheticSpec::default(), |t| t.retain(|t| t.name != z))?;
    assert!(matches!(expect_err(dir.path()), Error::MissingTensor { ref tensor } if tensor == z));
    // A whole quantized module gone: the message names the .qweight the config leads one to expect.
    let m = "model.layers.1.mlp.shared_experts.gate_proj";
    let dir = build(&SyntheticSpec::default(), |t| t.retain(|t| !t.name.starts_with(m)))?;
    assert!(matches!(expect_err(dir.path()), Error::MissingTensor { ref tensor } if *tensor == format!("{m}.qweight")));
    let b = "model.layers.1.mlp.gate.e_score_correction_bias";
    let dir = build(&SyntheticSpec::default(), |t| t.retain(|t| t.name != b))?;
    assert!(matches!(expect_err(dir.path()), Error::MissingTensor { ref tensor } if tensor == b));
    Ok(())
}

#[test]
fn indexer_is_all_or_nothing() -> Result<()> {
    // No indexer anywhere: a V3.2 checkpoint quantized through a V3 class; it runs as dense MLA.
    let dir = build(&SyntheticSpec::default(), |t| t.retain(|t| !t.name.contains(".indexer.")))?;
    assert!(!open(dir.path())?.indexer);
    // One indexer tensor gone: that is damage, not a choice.
    let k = "model.layers.1.self_attn.indexer.k_norm.bias";
    let dir = build(&SyntheticSpec::default(), |t| t.retain(|t| t.name != k))?;
    assert!(matches!(expect_err(dir.path()), Error::MissingTensor { ref tensor } if tensor == k));
    // A V3 config ignores indexer tensors but reports them as unused.
    let spec = SyntheticSpec { architecture: Architecture::DeepseekV3, ..Default::default() };
    let extra = synthetic::tensors(&SyntheticSpec::default()).into_iter().filter(|t| t.name.contains(".indexer."));
    let dir = build(&spec, |t| t.extend(extra))?;
    let s = open(dir.path())?;
    assert!(!s.indexer);
    // Per layer: wq_b and wk (3 GPTQ parts each), k_norm weight and bias, weights_proj.weight = 9.
    assert_eq!(s.unused.len(), 2 * 9, "{:?}", s.unused);
    Ok(())
}

#[test]
fn extra_config_decides_what_must_be_dense() -> Result<()> {
    // Layer 0 kv_b_proj is declared 16-bit; writing it quantized contradicts the config.
    let spec = SyntheticSpec::default();
    let quantized = synthetic::tensors(&SyntheticSpec { dense_modules: vec![], ..Default::default() });
    let kv_b = "model.layers.0.self_attn.kv_b_proj";
    let dir = build(&spec, |t| {
        t.retain(|t| !t.name.starts_with(kv_b));
        t.extend(quantized.into_iter().filter(|t| t.name.starts_with(kv_b)));
    })?;
    assert!(matches!(expect_err(dir.path()), Error::QuantMismatch { ref module, .. } if module == kv_b));
    // The config's bit width is what shapes are checked against: 3-bit tensors under a 4-bit config fail.
    let dir = build(&SyntheticSpec { bits: Some(3), ..Default::default() }, |_| {})?;
    let cfg = dir.path().join("config.json");
    std::fs::write(&cfg, std::fs::read_to_string(&cfg)?.replace("\"bits\": 3", "\"bits\": 4"))?;
    assert!(matches!(expect_err(dir.path()), Error::ShapeMismatch { ref tensor, .. } if tensor.ends_with(".qweight")));
    Ok(())
}

#[test]
fn g_idx_is_checked_when_present() -> Result<()> {
    let spec = SyntheticSpec { g_idx: true, ..Default::default() };
    let g = "model.layers.0.mlp.up_proj.g_idx";
    let dir = build(&spec, |t| set(t, g, |t| t.shape = vec![32]))?;
    assert!(matches!(expect_err(dir.path()), Error::ShapeMismatch { ref tensor, .. } if tensor == g));
    Ok(())
}

#[test]
fn bytes_come_from_the_right_shard() -> Result<()> {
    let dir = build(&SyntheticSpec::default(), |_| {})?;
    let ckpt = Checkpoint::open(dir.path())?;
    let name = "model.layers.1.mlp.experts.0.up_proj.scales";
    let t = ckpt.tensor(name)?;
    assert_eq!((t.dtype, t.shape, t.data.len()), (Dtype::F16, &[2usize, 32][..], 128)); // in 64 / group 32
    assert!(ckpt.shard_of(name).is_some_and(|p| p.ends_with(SHARD2)));
    assert!(matches!(ckpt.bytes("nope"), Err(Error::MissingTensor { .. })));
    let paths: Vec<PathBuf> = ckpt.shard_paths().map(Path::to_path_buf).collect();
    assert_eq!(paths, [dir.path().join(SHARD1), dir.path().join(SHARD2)]);
    Ok(())
}
