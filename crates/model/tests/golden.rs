//! Every fixture against HF transformers' own outputs (tools/fixtures, float32 on the dequantized weights).
//!
//! Tolerance: relative L2 over all logits of a prompt ≤ 1e-4. Both sides compute in f32 from identical weights
//! (the checkpoint's bf16/f32 tensors widened, packed ones dequantized); they differ only in summation order
//! (BLAS vs. our dot products) and in absorbed vs. expanded MLA, which is ~1e-6 relative per layer. A wrong
//! rope pair, norm, routing choice or bit of a packed weight moves logits by 1e-2 or more.

mod common;

use common::*;
use pipemoe_model::{Row, StageInput};

const TOL: f64 = 1e-4;

#[test]
fn logits_match_transformers_at_every_position() {
    let fixtures = golden_fixtures();
    assert!(fixtures.len() >= 6, "expected the six fixture models, found {fixtures:?}");
    for dir in fixtures {
        let mut m = full_model(&dir);
        let vocab = m.config().vocab_size;
        for (i, p) in golden(&dir).iter().enumerate() {
            let got = prefill_all(&mut m, i as u64, &p.ids);
            assert_eq!(got.len(), p.ids.len() * vocab);
            let err = rel_l2(&got, &p.logits);
            eprintln!("{} {}: {} tokens, rel L2 {err:.2e}", dir.display(), p.name, p.ids.len());
            assert!(err <= TOL, "{} {}: rel L2 {err:.3e} > {TOL}", dir.display(), p.name);
            // Every position's argmax agrees too (the golden margins are far above the error above).
            for t in 0..p.ids.len() {
                let row = |v: &[f32]| argmax(&v[t * vocab..(t + 1) * vocab]);
                assert_eq!(row(&got), row(&p.logits), "{} {} position {t}", dir.display(), p.name);
            }
        }
    }
}

/// The golden continuation is 20 argmax steps that ignore EOS; here each step decodes one token from the cache.
#[test]
fn greedy_decode_from_the_cache_matches_token_for_token() {
    for dir in golden_fixtures() {
        let mut m = full_model(&dir);
        for (i, p) in golden(&dir).iter().enumerate() {
            let seq = i as u64;
            let vocab = m.config().vocab_size;
            let logits = prefill_all(&mut m, seq, &p.ids);
            let mut next = argmax(&logits[(p.ids.len() - 1) * vocab..]);
            let mut got = vec![next];
            while got.len() < p.greedy.len() {
                let pos = p.ids.len() + got.len() - 1;
                let h = m.forward(&[Row { seq, pos }], StageInput::Tokens(&[next])).expect("decode");
                next = argmax(&m.logits(&h, &[0]).expect("logits"));
                got.push(next);
            }
            assert_eq!(got, p.greedy, "{} {}", dir.display(), p.name);
            m.free(seq);
            assert_eq!(m.cache_len(seq), 0);
        }
    }
}

/// AutoGPTQ checkpoints keep their quantization settings in `quantize_config.json` instead of config.json.
#[test]
fn quantize_config_json_beside_config_is_read() {
    let src = models_dir().join("rand-dsv32-w4a16-gidx");
    let tmp = tempfile::tempdir().expect("tempdir");
    for e in std::fs::read_dir(&src).expect("fixture") {
        let p = e.expect("entry").path();
        std::fs::copy(&p, tmp.path().join(p.file_name().expect("name"))).expect("copy");
    }
    let path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    let mut q = cfg.as_object_mut().expect("object").remove("quantization_config").expect("quantization_config");
    q.as_object_mut().expect("object").remove("quant_method");
    std::fs::write(&path, cfg.to_string()).expect("write");
    std::fs::write(tmp.path().join("quantize_config.json"), q.to_string()).expect("write");
    let p = &golden(&src)[0];
    let got = prefill_all(&mut full_model(tmp.path()), 0, &p.ids);
    assert!(rel_l2(&got, &p.logits) <= TOL);
}
