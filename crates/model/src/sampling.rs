//! Next-token choice from logits: greedy, or temperature → top-k → top-p (nucleus) → a draw from a seeded
//! PRNG, plus the log-probabilities OpenAI's `logprobs`/`top_logprobs` report.
//!
//! Probabilities are computed in f64 after subtracting the largest logit, so no logit range overflows. A NaN
//! logit counts as -inf. The draw walks the candidates most likely first, ties to the lower token id, so a seed
//! fixes the output whatever std's selection algorithm does, and a row reduced on the device to its largest
//! logits (`reduced`) can reproduce the draw. `batch` samples a step's rows together, as `Backend::sample` does.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

mod batch;
mod reduced;
pub use batch::{MIN_CANDIDATES, SampleRow, SampledToken, candidates, sample_from_reduced, sample_host};
pub use reduced::{Reduced, ReducedRow, logprobs_reduced};

/// How to pick the next token. The defaults (1.0, 1.0, 0, none) sample from the model's distribution.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 = greedy (argmax); otherwise logits are divided by it before the softmax.
    pub temperature: f32,
    /// Keep the smallest set of most likely tokens whose probability sums to at least this (0 < top_p ≤ 1).
    pub top_p: f32,
    /// Keep only the k most likely tokens; 0 = no limit.
    pub top_k: usize,
    /// Same seed, same logits ⇒ same tokens. None = seeded from the OS's hash randomness.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 1.0, top_p: 1.0, top_k: 0, seed: None }
    }
}

impl SamplingParams {
    /// Always the most likely token.
    pub fn greedy() -> Self {
        SamplingParams { temperature: 0.0, ..Self::default() }
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::InvalidSamplingParam {
                param: "temperature",
                value: self.temperature.to_string(),
                reason: "must be a finite number >= 0",
            });
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::InvalidSamplingParam {
                param: "top_p",
                value: self.top_p.to_string(),
                reason: "must be > 0 and <= 1",
            });
        }
        Ok(())
    }

    /// The argmax decides (temperature 0 or top_k 1): no draw, the PRNG untouched.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }
}

/// Picks tokens for one sequence; owns its PRNG so sequences do not disturb each other's draws.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Xoshiro256,
    /// (token id, probability) of the candidates, reused between calls.
    scratch: Vec<(u32, f64)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let seed = params.seed.unwrap_or_else(random_seed);
        Ok(Sampler { params, rng: Xoshiro256::new(seed), scratch: Vec::new() })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Continues the seeded stream as if `tokens` tokens had been sampled already (a non-greedy sample draws
    /// once; greedy ones never do): a sequence recomputed after a preemption samples as it would have.
    pub fn resume_after(&mut self, tokens: u64) {
        if !self.params.is_greedy() {
            for _ in 0..tokens {
                self.rng.next_u64();
            }
        }
    }

    /// The next token. Logits with no finite value (or an empty slice) give the greedy answer (0 for empty).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.is_greedy() {
            return argmax(logits);
        }
        let max = max_logit(logits);
        if max == f32::NEG_INFINITY {
            return argmax(logits);
        }
        let inv_t = 1.0 / f64::from(self.params.temperature);
        let cand = &mut self.scratch;
        cand.clear();
        cand.extend(logits.iter().enumerate().filter_map(|(i, &l)| {
            let p = (f64::from(l - max) * inv_t).exp();
            (p > 0.0).then_some((i as u32, p))
        }));
        let k = self.params.top_k;
        if k > 0 && k < cand.len() {
            cand.select_nth_unstable_by(k - 1, by_prob);
            cand.truncate(k);
        }
        cand.sort_unstable_by(by_prob);
        if self.params.top_p < 1.0 {
            let total: f64 = cand.iter().map(|c| c.1).sum();
            let target = f64::from(self.params.top_p) * total;
            let mut cum = 0.0;
            // The smallest prefix whose mass reaches top_p, never fewer than one token.
            let keep = cand.iter().position(|c| {
                cum += c.1;
                cum >= target
            });
            cand.truncate(keep.map_or(cand.len(), |i| i + 1));
        }
        let total: f64 = cand.iter().map(|c| c.1).sum();
        let mut u = self.rng.next_f64() * total;
        for &(id, p) in cand.iter() {
            if u < p {
                return id;
            }
            u -= p;
        }
        // Rounding left u at the very top of the range: the last candidate owns it.
        cand.last().map_or_else(|| argmax(logits), |c| c.0)
    }
}

/// Log-probabilities of one step, from the raw logits (no temperature), as OpenAI reports them.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// Log-probability of the chosen token (-inf for an id outside the logits).
    pub chosen: f32,
    /// The `k` most likely tokens, most likely first, ties by lower id.
    pub top: Vec<(u32, f32)>,
}

/// log_softmax(logits)[chosen] and the top `k` entries of it.
pub fn logprobs(logits: &[f32], chosen: u32, k: usize) -> TokenLogprobs {
    let max = max_logit(logits);
    if max == f32::NEG_INFINITY {
        return TokenLogprobs { chosen: f32::NEG_INFINITY, top: Vec::new() };
    }
    let sum: f64 = logits.iter().filter(|l| !l.is_nan()).map(|&l| f64::from(l - max).exp()).sum();
    let log_z = f64::from(max) + sum.ln();
    let lp = |l: f32| if l.is_nan() { f32::NEG_INFINITY } else { (f64::from(l) - log_z) as f32 };
    let chosen = logits.get(chosen as usize).map_or(f32::NEG_INFINITY, |&l| lp(l));
    let mut top: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, lp(l))).collect();
    let k = k.min(top.len());
    if k > 0 && k < top.len() {
        top.select_nth_unstable_by(k - 1, by_lp);
    }
    top.truncate(k);
    top.sort_unstable_by(by_lp);
    TokenLogprobs { chosen, top }
}

/// Most likely first, ties by lower id: the order of candidates for the draw.
fn by_prob(a: &(u32, f64), b: &(u32, f64)) -> Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// The order of `top_logprobs`: highest first, ties by lower id.
fn by_lp(a: &(u32, f32), b: &(u32, f32)) -> Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Index of the largest logit; the lowest index among equals; NaN never wins.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_val = f32::NEG_INFINITY;
    for (i, &l) in logits.iter().enumerate() {
        if l > best_val {
            best = i;
            best_val = l;
        }
    }
    best as u32
}

fn max_logit(logits: &[f32]) -> f32 {
    logits.iter().copied().filter(|l| !l.is_nan()).fold(f32::NEG_INFINITY, f32::max)
}

/// A seed from std's per-process random hash keys and the clock (no extra crate needed for a fresh seed).
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    h.write_u128(nanos);
    h.finish()
}

/// xoshiro256** (Blackman & Vigna, prng.di.unimi.it), its state filled by splitmix64 as the authors advise.
#[derive(Debug, Clone)]
struct Xoshiro256 {
    s: [u64; 4],
}

impl Xoshiro256 {
    fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut splitmix = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Xoshiro256 { s: [splitmix(), splitmix(), splitmix(), splitmix()] }
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_resumed_sampler_continues_the_stream() {
        let logits: Vec<f32> = (0..64).map(|i| ((i * 37) % 23) as f32 * 0.25).collect();
        let params = super::SamplingParams { temperature: 1.2, top_p: 0.95, top_k: 0, seed: Some(9) };
        let mut whole = super::Sampler::new(params).unwrap();
        let first: Vec<u32> = (0..10).map(|_| whole.sample(&logits)).collect();
        let mut resumed = super::Sampler::new(params).unwrap();
        resumed.resume_after(4);
        let rest: Vec<u32> = (0..6).map(|_| resumed.sample(&logits)).collect();
        assert_eq!(rest, first[4..], "tokens 4.. of the whole stream");
        assert_ne!(first[..6], first[4..], "the stream is not constant (the check could not fail)");
    }

    use super::*;

    fn sampler(temperature: f32, top_p: f32, top_k: usize, seed: u64) -> Sampler {
        Sampler::new(SamplingParams { temperature, top_p, top_k, seed: Some(seed) }).unwrap()
    }

    /// Logits with a unique maximum at 7 and a near-flat rest, so sampling really varies.
    fn logits() -> Vec<f32> {
        (0..50).map(|i| if i == 7 { 2.0 } else { (i % 5) as f32 * 0.3 }).collect()
    }

    #[test]
    fn greedy_takes_lowest_index_among_ties_and_skips_nan() {
        let mut s = sampler(0.0, 1.0, 0, 1);
        assert_eq!(s.sample(&[0.5, 3.0, -1.0, 3.0]), 1);
        assert_eq!(s.sample(&[f32::NAN, 1.0, 2.0, 2.0]), 2);
        assert_eq!(s.sample(&[]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
    }

    #[test]
    fn top_k_1_and_tiny_top_p_are_greedy() {
        let l = logits();
        let mut k1 = sampler(1.5, 1.0, 1, 9);
        let mut p0 = sampler(1.5, 1e-6, 0, 9);
        for _ in 0..100 {
            assert_eq!(k1.sample(&l), 7);
            assert_eq!(p0.sample(&l), 7);
        }
        // Ties under a tiny top_p go to the lower id, as in greedy.
        assert_eq!(sampler(1.0, 1e-6, 0, 3).sample(&[1.0, 4.0, 4.0]), 1);
    }

    #[test]
    fn same_seed_same_tokens_other_seed_other_tokens() {
        let l = logits();
        let draw = |seed| {
            let mut s = sampler(1.0, 0.95, 40, seed);
            (0..200).map(|_| s.sample(&l)).collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
        assert!(draw(42).iter().any(|&t| t != 7), "sampling at temperature 1 never left the argmax");
    }

    #[test]
    fn two_token_distribution_matches_softmax() {
        // softmax([0, ln 3]) = [0.25, 0.75]. With n = 10_000 the std dev of the share is 0.0043;
        // 0.02 is > 4.5 sigma, and the seed is fixed, so this cannot flake.
        let l = [0.0, 3f32.ln()];
        let mut s = sampler(1.0, 1.0, 0, 2024);
        let ones = (0..10_000).filter(|_| s.sample(&l) == 1).count();
        let share = ones as f64 / 10_000.0;
        assert!((share - 0.75).abs() < 0.02, "share of token 1 = {share}");
        // Temperature 0.5 squares the odds: 9:1.
        let mut s = sampler(0.5, 1.0, 0, 2024);
        let share = (0..10_000).filter(|_| s.sample(&l) == 1).count() as f64 / 10_000.0;
        assert!((share - 0.9).abs() < 0.02, "share at T=0.5 = {share}");
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        // Probabilities ~ [0.5, 0.3, 0.15, 0.05].
        let l: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let seen = |mut s: Sampler| {
            let mut seen = [false; 4];
            (0..2000).for_each(|_| seen[s.sample(&l) as usize] = true);
            seen
        };
        assert_eq!(seen(sampler(1.0, 1.0, 2, 5)), [true, true, false, false]);
        // 0.5 + 0.3 = 0.8 reaches top_p = 0.8 exactly-ish; 0.79 surely needs only the first two.
        assert_eq!(seen(sampler(1.0, 0.79, 0, 5)), [true, true, false, false]);
        assert_eq!(seen(sampler(1.0, 0.9, 0, 5)), [true, true, true, false]);
        assert_eq!(seen(sampler(1.0, 1.0, 0, 5)), [true, true, true, true]);
    }

    #[test]
    fn invalid_params_are_rejected_with_their_name() {
        let bad = |p: SamplingParams| Sampler::new(p).unwrap_err().to_string();
        let d = SamplingParams::default();
        assert!(bad(SamplingParams { temperature: -0.1, ..d }).contains("temperature"));
        assert!(bad(SamplingParams { temperature: f32::NAN, ..d }).contains("temperature"));
        assert!(bad(SamplingParams { top_p: 0.0, ..d }).contains("top_p"));
        assert!(bad(SamplingParams { top_p: 1.5, ..d }).contains("top_p"));
        assert!(Sampler::new(SamplingParams::greedy()).is_ok());
    }

    #[test]
    fn logprobs_are_a_log_softmax_of_raw_logits() {
        let l = [1.0f32, 3.0, 3.0, -2.0, f32::NEG_INFINITY];
        let lp = logprobs(&l, 3, 3);
        let all = logprobs(&l, 0, 10);
        assert_eq!(all.top.len(), 5);
        let mass: f64 = all.top.iter().map(|t| f64::from(t.1).exp()).sum();
        assert!((mass - 1.0).abs() < 1e-6, "probabilities sum to {mass}");
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 2, 0]);
        let expected = -2.0 - (1f64.exp() + 2.0 * 3f64.exp() + (-2f64).exp()).ln();
        assert!((f64::from(lp.chosen) - expected).abs() < 1e-6);
        assert_eq!(logprobs(&l, 99, 1).chosen, f32::NEG_INFINITY);
        // Huge logits do not overflow.
        let big = logprobs(&[1000.0, 1000.0], 0, 1);
        assert!((big.chosen - 0.5f32.ln()).abs() < 1e-6);
    }
}
