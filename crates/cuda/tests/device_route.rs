//! Device tests of the router (`route`) and sampling's reduction (`sample`) against their host references:
//! `pipemoe_model::routing::route_logits` and `pipemoe_model::sampling::{ReducedRow, Sampler::sample}`.
//! Skipped, with the reason printed, where there is no GPU (docs/CUDA.md says how to run them there).
//!
//! Tolerances. Chosen experts, candidate ids, argmaxes and expert pairs: equal. Candidate logits: equal bits.
//! Router weights: within 2e-6 relative (the kernel rounds as the host does; a score can be one ulp off where
//! glibc's expf is not correctly rounded). Sums: within (vocab + 2048)·ε relative, the bound `sample_reduced`
//! relies on (summation order and one ulp of exp on each side); the log-sum-exp then within 1e-9. NaN fails.
//! Sampled tokens: equal whenever the reduced path decides, and it must decide where the test says it can.

mod common;

use common::*;
use cudarc::driver::CudaSlice;
use pipemoe_cuda::Gpu;
use pipemoe_cuda::route::{HostPairs, route_on_device};
use pipemoe_cuda::sample::{RowSpec, reduce_logits};
use pipemoe_model::backend::{RouterDims, Routing};
use pipemoe_model::routing::route_logits;
use pipemoe_model::sampling::{ReducedRow, Sampler, SamplingParams};

fn gpu() -> Gpu {
    let gpu = Gpu::open(0).expect("gpu");
    eprintln!("{}", gpu.describe());
    gpu
}

fn upload<T: cudarc::driver::DeviceRepr>(gpu: &Gpu, v: &[T]) -> CudaSlice<T> {
    gpu.stream.clone_htod(v).expect("upload")
}

/// Router logits `[rows, e]`: every third row from a handful of values (exact ties of scores, of biased scores
/// and of group sums), the others spread over ±6.
fn router_logits(rng: &mut Rng, rows: usize, e: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(rows * e);
    for r in 0..rows {
        for _ in 0..e {
            let x = if r % 3 == 1 { (rng.uniform() * 4.0).floor() * 0.5 - 1.0 } else { rng.uniform() * 12.0 - 6.0 };
            v.push(x);
        }
    }
    v
}

/// The pairs the host would lay out: per expert, the flat indices that chose it, ascending.
fn host_pairs(r: &Routing, n_experts: usize) -> HostPairs {
    let mut counts = vec![0u32; n_experts];
    r.experts.iter().for_each(|&x| counts[x as usize] += 1);
    let mut offsets = vec![0u32];
    counts.iter().for_each(|c| offsets.push(offsets.last().unwrap() + c));
    let pairs = (0..n_experts as u32)
        .flat_map(|e| r.experts.iter().enumerate().filter(move |(_, x)| **x == e).map(|(i, _)| i as u32))
        .collect();
    let active = (0..n_experts as u32).filter(|&e| counts[e as usize] > 0).collect();
    HostPairs { counts, offsets, pairs, active }
}

#[test]
fn router_matches_route_logits() {
    if no_gpu() {
        return;
    }
    let gpu = gpu();
    let mut rng = Rng::new(21);
    let dims = |n_experts, n_group, topk_group, top_k, norm_topk_prob, scaling| RouterDims {
        n_experts,
        top_k,
        n_group,
        topk_group,
        norm_topk_prob,
        scaling,
    };
    let configs = [
        dims(8, 1, 1, 2, true, 1.0),
        dims(32, 4, 2, 4, false, 1.5),
        dims(64, 8, 3, 6, true, 2.5),
        dims(64, 64, 8, 8, true, 1.0),  // one expert per group
        dims(128, 8, 4, 8, true, 2.5),  // REAP-345B (MODEL_SPEC §1.2: n_group/topk_group untouched by pruning)
        dims(256, 8, 4, 8, true, 2.5),  // DeepSeek-V3/V3.2
        dims(256, 1, 1, 8, true, 2.5),  // n_group 1: no grouping
        dims(64, 8, 1, 12, false, 1.0), // more picks than the kept group holds: -inf experts by lowest index
        dims(72, 6, 3, 10, true, 1.0),  // 3 experts a lane, lanes 24-31 empty
        dims(100, 1, 1, 40, true, 1.0), // more slots than lanes, lanes 25-31 empty
    ];
    for d in configs {
        let e = d.n_experts;
        // Biases from five values, so equal logits make equal biased scores.
        let bias: Vec<f32> = (0..e).map(|_| (rng.uniform() * 5.0).floor() * 0.01).collect();
        let bias_d = upload(&gpu, &bias);
        for rows in [1, 16, 300] {
            let logits = router_logits(&mut rng, rows, e);
            let want = route_logits(&logits, rows, &bias, &d).expect("host routing");
            let logits_d = upload(&gpu, &logits);
            let routing = route_on_device(&gpu, &logits_d.as_view(), rows, &bias_d, &d).expect("route");
            let got = routing.to_host().expect("download");
            let what = format!("{e} experts, {} groups keep {}, top {}, {rows} rows", d.n_group, d.topk_group, d.top_k);
            assert_eq!(got.top_k, want.top_k);
            for r in 0..rows {
                let s = r * d.top_k..(r + 1) * d.top_k;
                assert_eq!(got.experts[s.clone()], want.experts[s], "{what}: experts of row {r}");
            }
            let mut worst = 0f32;
            for (g, w) in got.weights.iter().zip(&want.weights) {
                assert!(g.is_finite(), "{what}: weight {g}");
                worst = worst.max((g - w).abs() / w.abs().max(f32::MIN_POSITIVE));
            }
            assert!(worst <= 2e-6, "{what}: weights differ by {worst:e} relative");
            let pairs = routing.pairs(&gpu).expect("pairs").to_host().expect("download pairs");
            assert_eq!(pairs, host_pairs(&want, e), "{what}: expert pairs");
            eprintln!("route {what}: experts and pairs equal, weights within {worst:.1e}");
        }
    }
}

/// Logits of one row: spread values, or (`ties`) a few levels so many equal logits straddle the cut; a NaN and
/// a -inf in each.
fn sample_logits(rng: &mut Rng, vocab: usize, ties: bool) -> Vec<f32> {
    let mut v: Vec<f32> = (0..vocab)
        .map(|_| {
            let base = if ties { (rng.uniform() * 6.0).floor() } else { rng.uniform() * 6.0 };
            base + if rng.uniform() < 0.004 { 8.0 } else { 0.0 }
        })
        .collect();
    if vocab > 4 {
        v[rng.below(vocab as u64) as usize] = f32::NAN;
        v[rng.below(vocab as u64) as usize] = f32::NEG_INFINITY;
    }
    v
}

/// One batch: every row against `ReducedRow`, then sampling from the device's rows against the whole rows.
fn reduce_case(gpu: &Gpu, rng: &mut Rng, vocab: usize, m: usize, ties: bool) {
    // (temperature, logprobs): sampled rows with and without logprobs, greedy rows with and without.
    let asks = [(1.0f32, true), (0.7, false), (0.0, true), (1.3, false), (0.0, false), (0.5, true)];
    let specs: Vec<RowSpec> =
        asks.iter().map(|&(t, lp)| RowSpec { temperature: t, sample: t > 0.0, logprobs: lp }).collect();
    let mut rows: Vec<Vec<f32>> = specs.iter().map(|_| sample_logits(rng, vocab, ties)).collect();
    // A dead row: NaN and -inf only.
    rows[2].iter_mut().enumerate().for_each(|(i, l)| *l = if i % 2 == 0 { f32::NAN } else { f32::NEG_INFINITY });
    let flat: Vec<f32> = rows.concat();
    let dev = upload(gpu, &flat);
    let t0 = std::time::Instant::now();
    let red = reduce_logits(gpu, &dev.as_view(), vocab, &specs, m).expect("reduce").to_host().expect("download");
    let what = format!("vocab {vocab}, m {m}, ties {ties}");
    eprintln!("sample_reduce {what}: {} rows in {:?} (with the read-back)", specs.len(), t0.elapsed());
    let bound = (vocab as f64 + 2048.0) * f64::EPSILON;
    for (r, (spec, logits)) in specs.iter().zip(&rows).enumerate() {
        let want = ReducedRow::new(logits, m, spec.temperature);
        let got = red.row(r);
        assert_eq!(got.argmax, want.argmax, "{what}: argmax of row {r}");
        if !(spec.sample || spec.logprobs) {
            continue;
        }
        assert_eq!(got.ids, &want.ids[..], "{what}: candidates of row {r}");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(got.logits), bits(&want.logits), "{what}: candidate logits of row {r}");
        let max = want.logits[0];
        let close = |g: Option<f64>, w: Option<f64>, t: f32, name: &str| {
            let (Some(g), Some(w)) = (g, w) else { return assert_eq!(g.is_some(), w.is_some(), "{name}") };
            assert!(g.is_finite() && (g - w).abs() <= bound * w, "{what}: row {r} {name} {g} vs {w}");
            if max.is_finite() {
                let lse = |s: f64| f64::from(max) / f64::from(t) + s.ln();
                assert!((lse(g) - lse(w)).abs() <= 1e-9, "{what}: row {r} log-sum-exp of {name}");
            }
        };
        close(got.sum_t, want.sum_t.filter(|_| spec.sample), spec.temperature, "sum_t");
        close(got.sum_1, want.sum_1.filter(|_| spec.logprobs), 1.0, "sum_1");
        if !spec.sample {
            continue;
        }
        // The same tokens as from the whole row, whenever the reduced row decides.
        let mut decided = 0;
        for (top_p, top_k) in [(1.0, 0), (0.9, 0), (1.0, 20), (0.95, 40)] {
            let params = SamplingParams { temperature: spec.temperature, top_p, top_k, seed: Some(r as u64) };
            let (mut full, mut reduced) = (Sampler::new(params).unwrap(), Sampler::new(params).unwrap());
            for _ in 0..50 {
                let token = full.sample(logits);
                match reduced.sample_reduced(&got) {
                    Some(t) => {
                        assert_eq!(t, token, "{what}: row {r} top_p {top_p} top_k {top_k}");
                        decided += 1;
                    }
                    None => assert_eq!(reduced.sample(logits), token),
                }
            }
        }
        eprintln!("  row {r} (T {}): {decided}/200 draws decided from the candidates", spec.temperature);
        // top_k within the candidates of a row without ties at the cut is always decided.
        if !ties && m >= 21 && vocab > m {
            assert!(decided >= 50, "{what}: row {r} decided only {decided}");
        }
    }
}

#[test]
fn sampling_reduction_matches_the_host() {
    if no_gpu() {
        return;
    }
    let gpu = gpu();
    let mut rng = Rng::new(5);
    let shapes = [(1, 1), (7, 16), (100, 16), (1000, 64), (5000, 256), (4096, 1024), (129_280, 64), (129_280, 256)];
    for (vocab, m) in shapes {
        for ties in [false, true] {
            reduce_case(&gpu, &mut rng, vocab, m, ties);
        }
    }
}

#[test]
fn reduce_and_route_refuse_bad_shapes() {
    if no_gpu() {
        return;
    }
    let gpu = gpu();
    let logits = upload(&gpu, &[0f32; 64]);
    let spec = RowSpec { temperature: 1.0, sample: true, logprobs: false };
    assert!(reduce_logits(&gpu, &logits.as_view(), 32, &[spec; 3], 8).is_err(), "3 rows of 32 from 64 values");
    assert!(reduce_logits(&gpu, &logits.as_view(), 32, &[spec; 2], 1025).is_err(), "1025 candidates");
    let bias = upload(&gpu, &[0f32; 8]);
    let d = RouterDims { n_experts: 8, top_k: 2, n_group: 3, topk_group: 1, norm_topk_prob: true, scaling: 1.0 };
    assert!(route_on_device(&gpu, &logits.as_view(), 2, &bias, &d).is_err(), "8 experts in 3 groups");
    let d = RouterDims { n_group: 2, top_k: 9, ..d };
    assert!(route_on_device(&gpu, &logits.as_view(), 2, &bias, &d).is_err(), "top 9 of 8");
}
