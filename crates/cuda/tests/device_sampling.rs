//! Sampling on the device through the seam the worker and `Generator` use (`Stage::sample` →
//! `Backend::sample`, which `CudaBackend` runs as a device reduction finished on the host) against the host
//! path on the same GPU logits (`Stage::logits` downloaded, then `sampling::sample_host`: `Sampler::sample` and
//! `logprobs` on whole rows). Skipped, with the reason printed, where there is no GPU.
//!
//! Tokens: equal, step after step from the same seeds (so the PRNGs advance alike). Logprobs: the same ids in
//! the same order; values within one f32 ulp or 1e-9 (the device's log-sum-exp is summed in another order,
//! `sampling::reduced`'s stated rounding). Both the reduced decision and the whole-row fallback must occur.

mod common;

use std::cell::Cell;
use std::path::PathBuf;

use common::*;
use pipemoe_cuda::sample::{MAX_CANDIDATES, RowSpec, reduce_logits};
use pipemoe_cuda::{Act, ActDtype, CudaBackend};
use pipemoe_model::sampling::{
    SampleRow, SampledToken, Sampler, SamplingParams, candidates, sample_from_reduced, sample_host,
};
use pipemoe_model::{Backend, ModelConfig, Row, SliceSpec, Stage, StageInput};

fn models() -> PathBuf {
    std::env::var_os("PIPEMOE_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/models"))
}

/// One row's settings: greedy and sampled, with and without logprobs, ones the candidates settle and ones that
/// need the whole row (hot, top_k past the candidates, top_logprobs past them).
fn settings(vocab: usize) -> Vec<(SamplingParams, Option<usize>)> {
    let p = |temperature: f32, top_p: f32, top_k: usize, seed: u64| SamplingParams {
        temperature,
        top_p,
        top_k,
        seed: Some(seed),
    };
    vec![
        (p(0.0, 1.0, 0, 1), None),
        (p(0.0, 1.0, 0, 2), Some(5)),
        (p(0.7, 0.9, 40, 3), Some(3)),
        (p(1.0, 1.0, 0, 4), None),
        (p(0.6, 0.95, 0, 5), Some(0)),
        (p(4.0, 1.0, 0, 6), None),
        (p(1.0, 1.0, (vocab * 3 / 4).min(MAX_CANDIDATES + 10), 7), Some(20)),
        (p(0.8, 1.0, 1, 8), Some(20)),
    ]
}

fn samplers(settings: &[(SamplingParams, Option<usize>)]) -> Vec<Sampler> {
    settings.iter().map(|s| Sampler::new(s.0).expect("sampler")).collect()
}

fn lend<'a>(s: &'a mut [Sampler], settings: &[(SamplingParams, Option<usize>)]) -> Vec<SampleRow<'a>> {
    s.iter_mut().zip(settings).map(|(sampler, s)| SampleRow { sampler, logprobs: s.1 }).collect()
}

/// The device's answer against the host's, row by row.
fn same(what: &str, got: &[SampledToken], want: &[SampledToken]) {
    assert_eq!(got.len(), want.len(), "{what}");
    let close = |a: f32, b: f32| a == b || (a - b).abs() <= (b.abs() * f32::EPSILON).max(1e-9);
    for (r, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.token, w.token, "{what}: token of row {r}");
        match (&g.logprobs, &w.logprobs) {
            (Some(g), Some(w)) => {
                assert!(close(g.chosen, w.chosen), "{what}: row {r} logprob {} vs {}", g.chosen, w.chosen);
                let ids = |t: &[(u32, f32)]| t.iter().map(|x| x.0).collect::<Vec<_>>();
                assert_eq!(ids(&g.top), ids(&w.top), "{what}: top_logprobs of row {r}");
                assert!(g.top.iter().zip(&w.top).all(|(a, b)| close(a.1, b.1)), "{what}: top_logprobs of row {r}");
            }
            (g, w) => assert_eq!(g.is_some(), w.is_some(), "{what}: logprobs of row {r}"),
        }
    }
}

#[test]
fn the_demo_samples_on_the_gpu_as_on_the_host() {
    if no_gpu() {
        return;
    }
    let dir = models().join("tiny-dsv32-w3a16");
    let cfg = ModelConfig::from_dir(&dir).expect("config");
    let gpu = CudaBackend::new(0).expect("gpu");
    for act in [ActDtype::Bf16, ActDtype::F32] {
        let mut stage = Stage::open(gpu.clone().with_act_dtype(act), &dir, SliceSpec::full(&cfg)).expect("loads");
        // Two prompts in one prefill step; eight rows of it to sample, the prompts' last rows among them.
        let (a, b): (Vec<u32>, Vec<u32>) =
            ((1..40).map(|i| i * 7 % 300).collect(), (1..25).map(|i| i * 13 % 300).collect());
        let mut rows: Vec<Row> = (0..a.len()).map(|pos| Row { seq: 1, pos }).collect();
        rows.extend((0..b.len()).map(|pos| Row { seq: 2, pos }));
        let h = stage.forward(&rows, StageInput::Tokens(&[a.clone(), b].concat())).expect("forward");
        let which = [a.len() - 1, rows.len() - 1, 0, 5, 17, a.len() + 3, a.len() + 11, 30];
        let logits = stage.logits(&h, &which).expect("logits");
        // The premise: lm_head gives the same logits every time, so both paths see one row each.
        assert!(logits == stage.logits(&h, &which).expect("logits"), "{act:?}: lm_head is not deterministic");
        let settings = settings(cfg.vocab_size);
        let (mut dev, mut host) = (samplers(&settings), samplers(&settings));
        for step in 0..40 {
            let got = stage.sample(&h, &which, &mut lend(&mut dev, &settings)).expect("sample on the GPU");
            let want = sample_host(&logits, &mut lend(&mut host, &settings)).expect("sample on the host");
            same(&format!("demo {act:?} step {step}"), &got, &want);
        }
        stage.free(1);
        stage.free(2);
    }
}

/// A language-model-like row of the real vocabulary: a few strong logits over a long flat tail.
fn lm_row(rng: &mut Rng, vocab: usize) -> Vec<f32> {
    (0..vocab).map(|_| rng.uniform() * 6.0 + if rng.uniform() < 0.0005 { 9.0 } else { 0.0 }).collect()
}

#[test]
fn real_vocabulary_rows_sample_on_the_gpu_as_on_the_host() {
    if no_gpu() {
        return;
    }
    let vocab = 129_280;
    let settings = settings(vocab);
    let mut rng = Rng::new(11);
    let flat: Vec<f32> = (0..settings.len()).flat_map(|_| lm_row(&mut rng, vocab)).collect();
    let gpu = CudaBackend::new(0).expect("gpu");
    for act in [ActDtype::Bf16, ActDtype::F32] {
        let b = gpu.clone().with_act_dtype(act);
        let t = b.upload(settings.len(), vocab, flat.clone()).expect("upload");
        // What the host path sees (bf16-rounded in bf16).
        let logits = b.download(&t).expect("download");
        let (mut dev, mut host) = (samplers(&settings), samplers(&settings));
        for step in 0..30 {
            let got = b.sample(&t, &mut lend(&mut dev, &settings)).expect("sample on the GPU");
            let want = sample_host(&logits, &mut lend(&mut host, &settings)).expect("sample on the host");
            same(&format!("vocab {vocab} {act:?} step {step}"), &got, &want);
        }
    }

    // Which rows the reduced view settles and which come back whole: the same pieces `CudaBackend::sample` runs,
    // with the whole-row download counted.
    let b = gpu.with_act_dtype(ActDtype::F32);
    let t = b.upload(settings.len(), vocab, flat.clone()).expect("upload");
    let Act::F32(dev_logits) = &t.data else { panic!("f32 activations hold f32") };
    let mut dev = samplers(&settings);
    let mut fetched = vec![0usize; settings.len()];
    for _ in 0..30 {
        let mut rows = lend(&mut dev, &settings);
        let specs: Vec<RowSpec> = rows
            .iter()
            .map(|r| RowSpec { temperature: r.temperature(), sample: r.draws(), logprobs: r.logprobs.is_some() })
            .collect();
        let m = candidates(&rows).min(MAX_CANDIDATES);
        let red = reduce_logits(&b.gpu, &dev_logits.as_view(), vocab, &specs, m).expect("reduce");
        let red = red.to_host().expect("read back");
        let whole = Cell::new(Vec::new());
        sample_from_reduced(
            &mut rows,
            |i| red.row(i),
            |which| {
                whole.set(which.to_vec());
                Ok(which.iter().flat_map(|&i| flat[i * vocab..(i + 1) * vocab].iter().copied()).collect())
            },
        )
        .expect("finish");
        whole.take().into_iter().for_each(|i| fetched[i] += 1);
    }
    eprintln!("rows fetched whole in 30 steps: {fetched:?}");
    assert_eq!(fetched[..3], [0, 0, 0], "greedy rows and top_k within the candidates settle on the device");
    assert_eq!(fetched[7], 0, "top_k = 1 is greedy");
    assert_eq!(fetched[6], 30, "top_k past the candidates needs the whole row");
    assert!(fetched[5] > 0, "a hot row over a flat tail needs the whole row");
}
