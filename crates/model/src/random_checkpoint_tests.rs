use super::*;
use crate::backend::{Backend, Row};
use crate::cpu::CpuBackend;
use crate::footprint::{head_bytes, layer_bytes};
use crate::weights::{Loader, SliceSpec};
use crate::{Checkpoint, ModelConfig, Stage, StageInput, validate};

fn spec(layers: Range<usize>, with_ends: bool) -> RandomSpec {
    RandomSpec { dims: Dims::tiny(), layers, embed: with_ends, head: with_ends, seed: 7 }
}

/// Bytes of a linear as the generator stores it, from the dims alone (GPTQ: packed weights, packed zeros, f16
/// scales; BF16 otherwise).
fn linear_bytes(d: &Dims, out: usize, inp: usize) -> u64 {
    if out.is_multiple_of(32) && inp.is_multiple_of(32) {
        let groups = inp.div_ceil(d.group_size);
        (inp * out * 3 / 8 + groups * out * 3 / 32 * 4 + groups * out * 2) as u64
    } else {
        (out * inp * 2) as u64
    }
}

#[test]
fn a_whole_tiny_model_validates_and_its_bytes_add_up() {
    let dir = tempfile::tempdir().unwrap();
    let d = Dims::tiny();
    let s = spec(0..d.layers, true);
    write(dir.path(), &s).unwrap();
    let cfg = ModelConfig::from_dir(dir.path()).unwrap();
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let summary = validate(&cfg, &ckpt).unwrap();
    assert!(summary.indexer);
    assert_eq!((summary.dense_layers, summary.moe_layers), (1, 3));
    assert_eq!(ckpt.len(), tensors(&s).len());

    // The grouped bytes cover every tensor, and every tensor's bytes are in the files (beyond their headers).
    let layers: Vec<_> = (0..d.layers).map(|l| layer_bytes(&cfg, &ckpt, l)).collect();
    let head = head_bytes(&ckpt);
    let grouped: u64 = layers.iter().map(|l| l.total()).sum::<u64>() + head.embed + head.norm + head.lm_head;
    let mut in_files = 0u64;
    for path in ckpt.shard_paths() {
        let bytes = std::fs::read(path).unwrap();
        let header = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        in_files += bytes.len() as u64 - 8 - header;
    }
    assert_eq!(grouped, in_files);
    assert_eq!(grouped, ckpt.total_bytes());

    // …and match what the dims say, part by part.
    let attention = linear_bytes(&d, d.q_lora, d.hidden)
        + linear_bytes(&d, d.heads * (d.nope + d.rope), d.q_lora)
        + linear_bytes(&d, d.kv_lora + d.rope, d.hidden)
        + linear_bytes(&d, d.heads * (d.nope + d.v_head), d.kv_lora)
        + linear_bytes(&d, d.hidden, d.heads * d.v_head)
        + 2 * (d.q_lora + d.kv_lora) as u64;
    let indexer = linear_bytes(&d, d.index_heads * d.index_dim, d.q_lora)
        + linear_bytes(&d, d.index_dim, d.hidden)
        + linear_bytes(&d, d.index_heads, d.hidden)
        + 8 * d.index_dim as u64;
    let mlp = |inter: usize| 2 * linear_bytes(&d, inter, d.hidden) + linear_bytes(&d, d.hidden, inter);
    for l in &layers {
        assert_eq!((l.attention, l.indexer, l.norms), (attention, indexer, 4 * d.hidden as u64), "layer {}", l.layer);
        if d.is_moe_layer(l.layer) {
            assert_eq!(l.routed, vec![mlp(d.moe_intermediate); d.experts]);
            assert_eq!((l.shared, l.dense_mlp), (mlp(d.moe_intermediate), 0));
            assert_eq!(l.router, (d.experts * d.hidden * 2 + d.experts * 4) as u64);
        } else {
            assert_eq!((l.dense_mlp, l.routed.len(), l.router), (mlp(d.intermediate), 0, 0));
        }
    }
    assert_eq!(head.lm_head, (d.vocab * d.hidden * 2) as u64);
}

#[test]
fn a_middle_slice_loads_and_runs_with_finite_values() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(1..3, false);
    write(dir.path(), &s).unwrap();
    let cfg = ModelConfig::from_dir(dir.path()).unwrap();
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    assert!(!ckpt.contains("model.embed_tokens.weight") && !ckpt.contains("model.layers.0.input_layernorm.weight"));

    // AutoRound's sym 3-bit: zero point 4 everywhere (stored 3, v1), scales of both signs and the planned size.
    let ld = Loader { cfg: &cfg, ckpt: &ckpt };
    let crate::backend::HostLinear::Gptq(w) = ld.linear("model.layers.1.mlp.experts.3.down_proj", 64, 128).unwrap()
    else {
        panic!("the expert is not quantized");
    };
    let l = w.layout();
    assert!((0..l.n_groups()).all(|g| (0..l.out_features).all(|c| w.zero(g, c) == 4)));
    let s0 = 1.0 / (5.5f32 * 64.0).sqrt();
    let scales: Vec<f32> = w.scales().iter().map(|v| v.to_f32()).collect();
    assert!(scales.iter().all(|v| v.abs() >= 0.74 * s0 && v.abs() <= 1.26 * s0));
    assert!(scales.iter().any(|&v| v < 0.0) && scales.iter().any(|&v| v > 0.0));
    let q: Vec<u32> = (0..64).map(|r| w.q(r, 5)).collect();
    assert!(q.iter().any(|&v| v != q[0]), "fields are random");

    // The slice runs: a 40-row prefill (past the indexer's top-k of 16) and a decode row, outputs finite and of
    // the input's order of magnitude.
    let slice = SliceSpec { layers: 1..3, experts: None, embed: false, head: false };
    let mut stage = Stage::load(CpuBackend::F32, &cfg, &ckpt, slice).unwrap();
    let h = cfg.hidden_size;
    let input = |rows: usize, salt: u64| -> Vec<f32> {
        (0..rows * h).map(|i| 2.0 * unit(mix(salt ^ i as u64)) - 1.0).collect()
    };
    let rows: Vec<Row> = (0..40).map(|pos| Row { seq: 9, pos }).collect();
    let x = CpuBackend::F32.upload(40, h, input(40, 1)).unwrap();
    let y = CpuBackend::F32.download(&stage.forward(&rows, StageInput::Hidden(x)).unwrap()).unwrap();
    let x = CpuBackend::F32.upload(1, h, input(1, 2)).unwrap();
    let z = CpuBackend::F32.download(&stage.forward(&[Row { seq: 9, pos: 40 }], StageInput::Hidden(x)).unwrap());
    for v in [&y, &z.unwrap()] {
        let rms = (v.iter().map(|a| a * a).sum::<f32>() / v.len() as f32).sqrt();
        assert!(v.iter().all(|a| a.is_finite()) && rms > 0.1 && rms < 100.0, "rms {rms}");
    }
}

#[test]
fn the_cache_is_reused_and_generation_is_deterministic() {
    let root = tempfile::tempdir().unwrap();
    let s = spec(2..3, false);
    let (dir, fresh) = cached(root.path(), &s).unwrap();
    assert!(fresh);
    let (again, fresh) = cached(root.path(), &s).unwrap();
    assert!(!fresh && again == dir);
    let other = tempfile::tempdir().unwrap();
    write(other.path(), &s).unwrap();
    let name = "layer-002.safetensors";
    assert_eq!(std::fs::read(dir.join(name)).unwrap(), std::fs::read(other.path().join(name)).unwrap());
    // A different seed is a different directory with different bytes.
    let s2 = RandomSpec { seed: 8, ..s };
    let (dir2, fresh) = cached(root.path(), &s2).unwrap();
    assert!(fresh && dir2 != dir);
    assert_ne!(std::fs::read(dir.join(name)).unwrap(), std::fs::read(dir2.join(name)).unwrap());
}

#[test]
fn the_real_dims_plan_matches_model_spec() {
    // MODEL_SPEC §6: one MoE layer is 2.158 GiB at 3.148 bits per parameter plus the 16-bit router.
    let d = Dims::deepseek_v32_reap();
    let s = RandomSpec { dims: d.clone(), layers: 3..4, embed: false, head: false, seed: 1 };
    let bytes: usize = tensors(&s).iter().map(byte_len).sum();
    let gib = bytes as f64 / (1u64 << 30) as f64;
    assert!((gib - 2.158).abs() < 0.005, "{gib} GiB");
    assert!(
        tensors(&s).iter().all(|t| t.dtype != Dtype::BF16 || t.shape.len() == 1 || t.name.ends_with("gate.weight"))
    );
}
