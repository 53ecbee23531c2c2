//! A damaged or mismatched checkpoint is refused with an error that says what is wrong; nothing panics.

mod common;

use std::path::Path;

use common::*;
use pipemoe_model::cpu::CpuBackend;
use pipemoe_model::{ModelConfig, SliceSpec, Stage};

/// A copy of the demo model in a temp dir, to damage.
fn copy_demo() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(models_dir().join("tiny-dsv32-w3a16")).expect("demo") {
        let p = entry.expect("entry").path();
        std::fs::copy(&p, tmp.path().join(p.file_name().expect("name"))).expect("copy");
    }
    tmp
}

/// The error chain of opening `dir`, as one line.
fn open(dir: &Path) -> String {
    let result = ModelConfig::from_dir(dir).and_then(|cfg| Stage::open(CpuBackend::F32, dir, SliceSpec::full(&cfg)));
    let Err(e) = result else { panic!("{} opened although it is damaged", dir.display()) };
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    msg
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    f(&mut v);
    std::fs::write(&path, serde_json::to_string(&v).expect("json")).expect("write");
}

#[test]
fn truncated_shard() {
    let d = copy_demo();
    let shard = d.path().join("model-00002-of-00002.safetensors");
    let len = std::fs::metadata(&shard).expect("meta").len();
    std::fs::OpenOptions::new().write(true).open(&shard).expect("open").set_len(len / 2).expect("truncate");
    let msg = open(d.path());
    assert!(msg.contains("model-00002-of-00002.safetensors"), "{msg}");
}

#[test]
fn missing_shard() {
    let d = copy_demo();
    std::fs::remove_file(d.path().join("model-00001-of-00002.safetensors")).expect("rm");
    let msg = open(d.path());
    assert!(msg.contains("model-00001-of-00002.safetensors"), "{msg}");
}

#[test]
fn shape_that_disagrees_with_config() {
    let d = copy_demo();
    edit_config(d.path(), |v| v["moe_intermediate_size"] = 256.into());
    let msg = open(d.path());
    assert!(msg.contains("expected shape") && msg.contains("experts.0"), "{msg}");
}

#[test]
fn unsupported_bit_width() {
    let d = copy_demo();
    edit_config(d.path(), |v| v["quantization_config"]["bits"] = 5.into());
    let msg = open(d.path());
    assert!(msg.contains('5') && msg.to_lowercase().contains("bit"), "{msg}");
}

#[test]
fn wrong_bit_width_declared_for_the_tensors() {
    let d = copy_demo();
    edit_config(d.path(), |v| v["quantization_config"]["bits"] = 4.into());
    let msg = open(d.path());
    assert!(msg.contains("qweight") && msg.contains("expected shape"), "{msg}");
}

#[test]
fn unknown_model_type() {
    let d = copy_demo();
    edit_config(d.path(), |v| v["model_type"] = "llama".into());
    let msg = open(d.path());
    assert!(msg.contains("llama"), "{msg}");
}
