//! The engine's own consistency: cached decode, batching and slicing must not change a single logit.
//! These paths compute each row from the same cached values in the same order, so results are compared for
//! exact equality (a tolerance would hide a cache or ordering bug).

mod common;

use common::*;
use pipemoe_model::cpu::CpuBackend;
use pipemoe_model::moe::Ffn;
use pipemoe_model::weights::Loader;
use pipemoe_model::{Backend, Checkpoint, ModelConfig, Row, SliceSpec, Stage, StageInput};

fn demo() -> std::path::PathBuf {
    models_dir().join("tiny-dsv32-w3a16")
}

/// A prompt longer than the demo's index_topk (32), so the sparse path is exercised.
fn long_prompt() -> Vec<u32> {
    golden(&demo()).into_iter().max_by_key(|p| p.ids.len()).expect("golden prompts").ids
}

#[test]
fn prefill_then_decode_equals_recomputing_the_whole_sequence() {
    let ids = long_prompt();
    let mut m = full_model(&demo());
    let vocab = m.config().vocab_size;
    let whole = prefill_all(&mut m, 1, &ids);
    let split = ids.len() - 6;
    let mut got = prefill_all(&mut m, 2, &ids[..split]);
    for (pos, &id) in ids.iter().enumerate().skip(split) {
        let h = m.forward(&[Row { seq: 2, pos }], StageInput::Tokens(&[id])).expect("decode");
        got.extend(m.logits(&h, &[0]).expect("logits"));
    }
    assert_eq!(got.len(), whole.len());
    assert!(got == whole, "cached decode differs: rel L2 {:e}", rel_l2(&got, &whole));
    // A prefill in two chunks is the same too.
    let mut chunked = prefill_all(&mut m, 3, &ids[..20]);
    let rows = rows(3, 20, ids.len() - 20);
    let h = m.forward(&rows, StageInput::Tokens(&ids[20..])).expect("second chunk");
    chunked.extend(m.logits(&h, &(0..rows.len()).collect::<Vec<_>>()).expect("logits"));
    assert!(chunked == whole);
    assert_eq!(m.cache_len(3), ids.len());
    assert_eq!(whole.len(), ids.len() * vocab);
}

#[test]
fn a_batch_of_sequences_equals_each_alone() {
    let prompts: Vec<Vec<u32>> = golden(&demo()).into_iter().map(|p| p.ids).collect();
    let mut alone = full_model(&demo());
    let singles: Vec<Vec<f32>> =
        prompts.iter().enumerate().map(|(i, p)| prefill_all(&mut alone, i as u64, p)).collect();

    let mut m = full_model(&demo());
    let mut all_rows = Vec::new();
    let mut all_ids = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        all_rows.extend(rows(10 + i as u64, 0, p.len()));
        all_ids.extend_from_slice(p);
    }
    let h = m.forward(&all_rows, StageInput::Tokens(&all_ids)).expect("batched prefill");
    let batched = m.logits(&h, &(0..all_rows.len()).collect::<Vec<_>>()).expect("logits");
    assert!(batched == singles.concat());

    // A mixed step: one sequence decodes while another prefills.
    let next = argmax(&singles[0][singles[0].len() - m.config().vocab_size..]);
    let mut step_rows = vec![Row { seq: 10, pos: prompts[0].len() }];
    step_rows.extend(rows(20, 0, prompts[1].len()));
    let mut step_ids = vec![next];
    step_ids.extend_from_slice(&prompts[1]);
    let h = m.forward(&step_rows, StageInput::Tokens(&step_ids)).expect("mixed step");
    let mixed = m.logits(&h, &[0]).expect("logits");
    let h = alone.forward(&[Row { seq: 0, pos: prompts[0].len() }], StageInput::Tokens(&[next])).expect("decode");
    assert!(mixed == alone.logits(&h, &[0]).expect("logits"));
}

#[test]
fn layer_slices_run_one_after_another_equal_the_whole_model() {
    let dir = demo();
    let cfg = ModelConfig::from_dir(&dir).expect("config");
    let ckpt = Checkpoint::open(&dir).expect("checkpoint");
    let n = cfg.num_hidden_layers;
    let bounds = [0, 1, 3, n];
    let mut stages: Vec<Stage<CpuBackend>> = bounds
        .windows(2)
        .map(|w| {
            let spec = SliceSpec { layers: w[0]..w[1], experts: None, embed: w[0] == 0, head: w[1] == n };
            Stage::load(CpuBackend::F32, &cfg, &ckpt, spec).expect("slice loads")
        })
        .collect();
    let ids = long_prompt();
    let rows = rows(7, 0, ids.len());
    let mut h = stages[0].forward(&rows, StageInput::Tokens(&ids)).expect("stage 0");
    for s in stages.iter_mut().skip(1) {
        h = s.forward(&rows, StageInput::Hidden(h)).expect("next stage");
    }
    let which: Vec<usize> = (0..ids.len()).collect();
    let sliced = stages.last().expect("stages").logits(&h, &which).expect("logits");
    let whole = prefill_all(&mut full_model(&dir), 7, &ids);
    assert!(sliced == whole);
    // A middle stage refuses token ids and cannot produce logits.
    assert!(stages[1].forward(&[Row { seq: 8, pos: 0 }], StageInput::Tokens(&[5])).is_err());
    assert!(stages[1].logits(&h, &[0]).is_err());
}

#[test]
fn expert_ranges_are_partial_sums_of_the_moe_block() {
    let dir = demo();
    let cfg = ModelConfig::from_dir(&dir).expect("config");
    let ckpt = Checkpoint::open(&dir).expect("checkpoint");
    let ld = Loader { cfg: &cfg, ckpt: &ckpt };
    let b = CpuBackend::F32;
    let e = cfg.n_routed_experts;
    let spec = |experts| SliceSpec { layers: 1..2, experts, embed: false, head: false };
    let full = Ffn::load(&b, &ld, 1, &spec(None)).expect("full");
    let lo = Ffn::load(&b, &ld, 1, &spec(Some(0..e / 2))).expect("low half");
    let hi = Ffn::load(&b, &ld, 1, &spec(Some(e / 2..e))).expect("high half");
    let rows = 5;
    let x: Vec<f32> = (0..rows * cfg.hidden_size).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
    let x = b.upload(rows, cfg.hidden_size, x).expect("upload");
    let want = full.forward(&b, &x).expect("full").data;
    let a = lo.forward(&b, &x).expect("low").data;
    let c = hi.forward(&b, &x).expect("high").data;
    let sum: Vec<f32> = a.iter().zip(&c).map(|(p, q)| p + q).collect();
    assert!(rel_l2(&sum, &want) < 1e-6, "rel L2 {:e}", rel_l2(&sum, &want));
    assert!(rel_l2(&a, &want) > 1e-3, "the low half alone must not already be the whole output");
}

#[test]
fn rows_that_do_not_continue_the_cache_are_refused() {
    let mut m = full_model(&demo());
    let err = m.forward(&[Row { seq: 1, pos: 3 }], StageInput::Tokens(&[5])).expect_err("gap");
    assert!(err.to_string().contains("holds 0 positions"), "{err}");
    let err = m.forward(&rows(1, 0, 2), StageInput::Tokens(&[5])).expect_err("ids/rows");
    assert!(err.to_string().contains("token ids"), "{err}");
    let err = m.forward(&[Row { seq: 1, pos: 0 }], StageInput::Tokens(&[100_000])).expect_err("vocab");
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    // Nothing was cached by the refused steps.
    assert_eq!(m.cache_len(1), 0);
}

#[test]
fn stage_sampling_on_the_cpu_is_host_sampling_of_the_logits() {
    use pipemoe_model::sampling::{SampleRow, Sampler, SamplingParams, logprobs};
    let ids = long_prompt();
    let mut m = full_model(&demo());
    let vocab = m.config().vocab_size;
    let rows = rows(1, 0, ids.len());
    let h = m.forward(&rows, StageInput::Tokens(&ids)).expect("forward");
    let which = [ids.len() - 1, 3, 0];
    let logits = m.logits(&h, &which).expect("logits");
    let params = [
        (SamplingParams { seed: Some(5), ..SamplingParams::greedy() }, Some(4)),
        (SamplingParams { temperature: 0.8, top_p: 0.9, top_k: 30, seed: Some(6) }, None),
        (SamplingParams { temperature: 1.3, top_p: 1.0, top_k: 0, seed: Some(7) }, Some(0)),
    ];
    let fresh = || params.iter().map(|p| Sampler::new(p.0).expect("sampler")).collect::<Vec<_>>();
    let (mut staged, mut host) = (fresh(), fresh());
    for step in 0..20 {
        let mut samplers: Vec<SampleRow<'_>> =
            staged.iter_mut().zip(&params).map(|(sampler, p)| SampleRow { sampler, logprobs: p.1 }).collect();
        let got = m.sample(&h, &which, &mut samplers).expect("sample");
        for (k, (s, p)) in host.iter_mut().zip(&params).enumerate() {
            let row = &logits[k * vocab..(k + 1) * vocab];
            let token = s.sample(row);
            assert_eq!(got[k].token, token, "step {step} row {k}");
            assert_eq!(got[k].logprobs, p.1.map(|n| logprobs(row, token, n)), "step {step} row {k}");
        }
    }
    // One sampler per row.
    let mut one = fresh();
    let mut short: Vec<SampleRow<'_>> =
        one.iter_mut().take(2).map(|sampler| SampleRow { sampler, logprobs: None }).collect();
    assert!(m.sample(&h, &which, &mut short).is_err());
}
