//! Shared by the integration tests: the fixture models and their golden outputs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use pipemoe_model::cpu::CpuBackend;
use pipemoe_model::{Row, SliceSpec, Stage, StageInput};

pub fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/models")
}

/// Every fixture folder that has golden outputs.
pub fn golden_fixtures() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(models_dir())
        .expect("data/models exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("golden.safetensors").exists())
        .collect();
    out.sort();
    out
}

pub struct GoldenPrompt {
    pub name: String,
    pub ids: Vec<u32>,
    /// `[T, vocab]`
    pub logits: Vec<f32>,
    pub greedy: Vec<u32>,
}

fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn ints(bytes: &[u8]) -> Vec<u32> {
    bytes.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as u32).collect()
}

pub fn golden(dir: &Path) -> Vec<GoldenPrompt> {
    let bytes = std::fs::read(dir.join("golden.safetensors")).expect("golden.safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("golden.safetensors parses");
    let mut out = Vec::new();
    for i in 0.. {
        let name = format!("prompt{i}");
        let Ok(ids) = st.tensor(&format!("{name}.input_ids")) else { break };
        out.push(GoldenPrompt {
            ids: ints(ids.data()),
            logits: floats(st.tensor(&format!("{name}.logits")).expect("logits").data()),
            greedy: ints(st.tensor(&format!("{name}.greedy")).expect("greedy").data()),
            name,
        });
    }
    out
}

pub fn full_model(dir: &Path) -> Stage<CpuBackend> {
    let cfg = pipemoe_model::ModelConfig::from_dir(dir).expect("config");
    Stage::open(CpuBackend::F32, dir, SliceSpec::full(&cfg)).expect("model loads")
}

pub fn rows(seq: u64, start: usize, n: usize) -> Vec<Row> {
    (start..start + n).map(|pos| Row { seq, pos }).collect()
}

/// Prefill `ids` as sequence `seq` and return the logits of every position `[T, vocab]`.
pub fn prefill_all(m: &mut Stage<CpuBackend>, seq: u64, ids: &[u32]) -> Vec<f32> {
    let rows = rows(seq, 0, ids.len());
    let h = m.forward(&rows, StageInput::Tokens(ids)).expect("forward");
    let which: Vec<usize> = (0..ids.len()).collect();
    m.logits(&h, &which).expect("logits")
}

pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// `‖a − b‖ / ‖b‖`.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}
