//! Sampling and logprobs from a row reduced on the device to its largest logits and two sums (`Reduced`):
//! the same token, PRNG state and log-probabilities as `Sampler::sample` / `logprobs` on the whole row, or `None`
//! (nothing consumed) where the view cannot prove that; the caller then uses the whole row.
//!
//! Why it can be exact: a token outside the candidates has a logit ≤ the last candidate's, so its probability is
//! ≤ that candidate's `p_last`. Candidates with p > p_last hold their places in the draw's order (p descending,
//! id ascending) whatever the rest of the row is ("certain"); each one's p is computed here exactly as `sample`
//! computes it. What the view lacks is `sample`'s f64 sum over the whole row: the device sums the same terms in
//! another order with its own exp, within `sum_error` of it. A decision that compares against that sum (the
//! top_p cut, the draw when nothing truncates) is taken only when its margin exceeds that error.
//!
//! Logprobs: `log_z` comes from the device's sum, so a value can differ from `logprobs` on the whole row by the
//! rounding of `l − log_z` to f32: by one f32 ulp, or ≤ 1e-9 absolute near 0, and only where `l − log_z` lies
//! within ~1e-10 of an f32 rounding boundary. Refusing those would refuse most confident tokens (lp ≈ -1e-4 has
//! an ulp of 7e-12), so they are accepted; the ids and their order are exact unless two values straddle such a
//! boundary.

use super::{Sampler, TokenLogprobs, argmax, by_lp, by_prob, max_logit};

/// One row of logits as a device reduced it (`sample_reduce` in the CUDA crate; `ReducedRow` on the host).
#[derive(Debug, Clone, Copy)]
pub struct Reduced<'a> {
    /// The lowest id among the largest logits, NaN never winning (`argmax`).
    pub argmax: u32,
    /// The largest logits' ids: logit descending (NaN as -inf, -0 as +0), ties by lower id. May be empty (a
    /// greedy row without logprobs needs only the argmax).
    pub ids: &'a [u32],
    /// Their logits, bit for bit.
    pub logits: &'a [f32],
    /// The row's length; `ids` is the whole row when it has this many entries.
    pub vocab: usize,
    /// The temperature `sum_t` was taken at.
    pub temperature: f32,
    /// Σ over the row's non-NaN logits `l` of `exp(f64(l − max) / T)` (max: the largest non-NaN logit), in f64.
    pub sum_t: Option<f64>,
    /// The same at T = 1, for logprobs.
    pub sum_1: Option<f64>,
}

impl Reduced<'_> {
    /// The row's largest logit, NaN as -inf; `None` without candidates.
    fn max(&self) -> Option<f32> {
        let &l = self.logits.first()?;
        Some(if l.is_nan() { f32::NEG_INFINITY } else { l })
    }

    fn whole(&self) -> bool {
        self.ids.len() >= self.vocab
    }

    /// Bound on |device sum − `sample`'s sum| / sum: each side's exp is within an ulp; `sample` adds `vocab` terms
    /// in a row (γₙ ≤ n·u), the device ≤ vocab/1024 + 10 per thread and tree level; the subtractions of the draw
    /// add ≤ 2u per candidate walked (≤ 1024). Twice all that, so the margin is never the tight spot.
    fn sum_error(&self) -> f64 {
        (self.vocab as f64 + 2048.0) * f64::EPSILON
    }
}

impl Sampler {
    /// `sample` from a reduced row: the same token, the PRNG advanced the same way; `None` (the PRNG untouched)
    /// where only the whole row can decide.
    pub fn sample_reduced(&mut self, r: &Reduced) -> Option<u32> {
        if self.params.is_greedy() {
            return Some(r.argmax);
        }
        let max = r.max()?;
        if max == f32::NEG_INFINITY {
            return Some(r.argmax);
        }
        let sum = r.sum_t?;
        if max == f32::INFINITY || r.temperature != self.params.temperature || r.ids.len() != r.logits.len() {
            return None;
        }
        let inv_t = 1.0 / f64::from(self.params.temperature);
        // As `sample`: f32 difference, f64 from there on.
        let prob = |l: f32| (f64::from(l - max) * inv_t).exp();
        let mut cand: Vec<(u32, f64)> = (r.ids.iter().zip(r.logits))
            .filter_map(|(&id, &l)| {
                let p = prob(l);
                (p > 0.0).then_some((id, p))
            })
            .collect();
        cand.sort_unstable_by(by_prob);
        let p_last = r.logits.last().map_or(0.0, |&l| prob(l));
        // Complete: every token with p > 0 is a candidate, so `cand` is `sample`'s list itself.
        let complete = r.whole() || p_last.is_nan() || p_last <= 0.0;
        let certain = if complete { cand.len() } else { cand.iter().take_while(|c| c.1 > p_last).count() };
        // Whether the kept tokens (and so their sum) are known exactly; until then the mass is the device's.
        let mut known = complete;
        let margin = 2.0 * r.sum_error() * sum;

        let k = self.params.top_k;
        // `sample` truncates when k < its list's length; an incomplete view's list is longer than `certain`.
        if k > 0 && (!complete || k < cand.len()) {
            if k > certain {
                return None;
            }
            cand.truncate(k);
            known = true;
        }
        if self.params.top_p < 1.0 {
            let total = if known { cand.iter().map(|c| c.1).sum() } else { sum };
            let target = f64::from(self.params.top_p) * total;
            let mut cum = 0.0;
            let mut keep = cand.len();
            for (i, c) in cand.iter().enumerate() {
                if !known && i >= certain {
                    return None;
                }
                cum += c.1;
                if !known && (cum - target).abs() <= margin {
                    return None;
                }
                if cum >= target {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep);
            known = true;
        }
        let total = if known { cand.iter().map(|c| c.1).sum() } else { sum };
        let mut rng = self.rng.clone();
        let mut u = rng.next_f64() * total;
        for (i, &(id, p)) in cand.iter().enumerate() {
            if !known && (i >= certain || (u - p).abs() <= margin) {
                return None;
            }
            if u < p {
                self.rng = rng;
                return Some(id);
            }
            u -= p;
        }
        // `sample` gives the last candidate whatever rounding left at the top; only a known list has its last.
        if !known {
            return None;
        }
        self.rng = rng;
        Some(cand.last().map_or(r.argmax, |c| c.0))
    }
}

/// `logprobs` from a reduced row; `None` where the chosen token or one of the top `k` may lie outside the
/// candidates. The values are within the module's stated rounding of the whole row's.
pub fn logprobs_reduced(r: &Reduced, chosen: u32, k: usize) -> Option<TokenLogprobs> {
    let max = r.max()?;
    if max == f32::NEG_INFINITY {
        return Some(TokenLogprobs { chosen: f32::NEG_INFINITY, top: Vec::new() });
    }
    if max == f32::INFINITY || r.ids.len() != r.logits.len() {
        return None;
    }
    let log_z = f64::from(max) + r.sum_1?.ln();
    let lp = |l: f32| if l.is_nan() { f32::NEG_INFINITY } else { (f64::from(l) - log_z) as f32 };
    let chosen = if chosen as usize >= r.vocab {
        f32::NEG_INFINITY
    } else {
        lp(r.logits[r.ids.iter().position(|&i| i == chosen)?])
    };
    let mut top: Vec<(u32, f32)> = r.ids.iter().zip(r.logits).map(|(&i, &l)| (i, lp(l))).collect();
    top.sort_unstable_by(by_lp);
    let k = k.min(r.vocab);
    if k > top.len() {
        return None;
    }
    top.truncate(k);
    // Outside tokens have lp ≤ the last candidate's; an entry tied with it could lose its place to a lower id.
    let lp_last = r.logits.last().map_or(f32::NEG_INFINITY, |&l| lp(l));
    if !r.whole() && top.last().is_some_and(|t| t.1 <= lp_last) {
        return None;
    }
    Some(TokenLogprobs { chosen, top })
}

/// A reduced row owned on the host: the CPU reference of the device's reduction (sums in id order).
#[derive(Debug, Clone, PartialEq)]
pub struct ReducedRow {
    pub argmax: u32,
    pub ids: Vec<u32>,
    pub logits: Vec<f32>,
    pub vocab: usize,
    pub temperature: f32,
    pub sum_t: Option<f64>,
    pub sum_1: Option<f64>,
}

impl ReducedRow {
    /// `logits` reduced to its `m` largest and its sums at `temperature` (none at 0, greedy) and at 1.
    pub fn new(logits: &[f32], m: usize, temperature: f32) -> Self {
        let key = |l: f32| if l.is_nan() { f32::NEG_INFINITY } else { l };
        let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
        // Keys are never NaN, so partial_cmp is total here (and -0 == +0).
        ids.sort_by(|&a, &b| {
            let (la, lb) = (key(logits[a as usize]), key(logits[b as usize]));
            lb.partial_cmp(&la).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b))
        });
        ids.truncate(m);
        let max = max_logit(logits);
        let sum_at = |inv_t: f64| -> f64 {
            if max == f32::NEG_INFINITY {
                return 0.0;
            }
            let terms = logits.iter().filter(|l| !l.is_nan()).map(|&l| (f64::from(l - max) * inv_t).exp());
            terms.filter(|p| !p.is_nan()).sum()
        };
        ReducedRow {
            argmax: argmax(logits),
            logits: ids.iter().map(|&i| logits[i as usize]).collect(),
            ids,
            vocab: logits.len(),
            temperature,
            sum_t: (temperature > 0.0).then(|| sum_at(1.0 / f64::from(temperature))),
            sum_1: Some(sum_at(1.0)),
        }
    }

    pub fn view(&self) -> Reduced<'_> {
        Reduced {
            argmax: self.argmax,
            ids: &self.ids,
            logits: &self.logits,
            vocab: self.vocab,
            temperature: self.temperature,
            sum_t: self.sum_t,
            sum_1: self.sum_1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{SamplingParams, logprobs};
    use super::*;

    fn sampler(temperature: f32, top_p: f32, top_k: usize, seed: u64) -> Sampler {
        Sampler::new(SamplingParams { temperature, top_p, top_k, seed: Some(seed) }).unwrap()
    }

    /// splitmix64 → uniform [0, 1).
    struct Rng(u64);
    impl Rng {
        fn f32(&mut self) -> f32 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
        }
    }

    /// A language-model-like row: a few strong logits over a long flat tail.
    fn peaked(rng: &mut Rng, vocab: usize) -> Vec<f32> {
        (0..vocab).map(|_| rng.f32() * 6.0 + if rng.f32() < 0.004 { 8.0 } else { 0.0 }).collect()
    }

    /// The device's sums differ from the reference's in the last bits: summed in another order, then nudged by
    /// a few parts in 1e14 (well inside `sum_error`).
    fn as_device(mut row: ReducedRow, logits: &[f32]) -> ReducedRow {
        let max = max_logit(logits);
        let rev = |inv_t: f64| -> f64 {
            logits.iter().rev().filter(|l| !l.is_nan()).map(|&l| (f64::from(l - max) * inv_t).exp()).sum()
        };
        row.sum_t = row.sum_t.map(|_| rev(1.0 / f64::from(row.temperature)) * (1.0 + 3e-14));
        row.sum_1 = Some(rev(1.0) * (1.0 - 3e-14));
        row
    }

    /// Draws `steps` tokens both ways; every reduced answer must be the whole row's, with the same PRNG state
    /// after. Returns how many the reduced view decided.
    fn agree(logits: &[f32], m: usize, (t, top_p, top_k): (f32, f32, usize), seed: u64, steps: usize) -> usize {
        let row = as_device(ReducedRow::new(logits, m, t), logits);
        let (mut full, mut red) = (sampler(t, top_p, top_k, seed), sampler(t, top_p, top_k, seed));
        let mut decided = 0;
        for _ in 0..steps {
            let want = full.sample(logits);
            match red.sample_reduced(&row.view()) {
                Some(got) => {
                    assert_eq!(got, want, "T={t} top_p={top_p} top_k={top_k} seed={seed}");
                    assert_eq!(red.rng.s, full.rng.s, "PRNG state after a reduced draw");
                    decided += 1;
                }
                // The caller falls back to the whole row, from the same PRNG state.
                None => assert_eq!(red.sample(logits), want),
            }
        }
        decided
    }

    #[test]
    fn a_whole_row_is_always_decided_and_matches() {
        let mut rng = Rng(1);
        // Ties in the middle and at the top, a NaN and a -inf.
        let mut l: Vec<f32> = (0..40).map(|_| (rng.f32() * 8.0).round() * 0.5).collect();
        l[3] = f32::NAN;
        l[9] = f32::NEG_INFINITY;
        for params in [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.3, 1.0, 5), (0.5, 0.5, 3), (2.0, 0.95, 40)] {
            assert_eq!(agree(&l, 64, params, 11, 300), 300, "{params:?}");
        }
        // p underflows to 0 past the candidates: complete too.
        let mut sharp = vec![-1.0e4f32; 500];
        sharp[..8].copy_from_slice(&[3.0, 2.0, 2.0, 1.0, 0.5, 0.0, -1.0, -2.0]);
        assert_eq!(agree(&sharp, 16, (1.0, 1.0, 0), 5, 300), 300);
    }

    #[test]
    fn large_rows_match_whenever_decided() {
        let mut rng = Rng(2);
        let l = peaked(&mut rng, 5000);
        // top_k within the certain candidates: always decided.
        for params in [(1.0, 1.0, 20), (0.7, 0.95, 40), (1.5, 0.5, 63)] {
            assert_eq!(agree(&l, 64, params, 3, 300), 300, "{params:?}");
        }
        // More than the candidates: never.
        assert_eq!(agree(&l, 64, (1.0, 1.0, 65), 3, 50), 0);
        // top_p alone and pure sampling: decided whenever the mass needed lies in the candidates.
        let cold = agree(&l, 256, (0.3, 1.0, 0), 4, 500);
        let nucleus = agree(&l, 256, (0.5, 0.9, 0), 4, 500);
        assert!(cold >= 450 && nucleus == 500, "decided {cold}/500 at T=0.3, {nucleus}/500 with top_p 0.9");
        // A hot flat row needs tokens far past the candidates.
        let hot = agree(&l, 64, (2.0, 1.0, 0), 4, 200);
        eprintln!("decided: {cold}/500 cold, {nucleus}/500 nucleus, {hot}/200 hot");
        assert!(hot < 100, "{hot}/200 decided at T=2");
    }

    #[test]
    fn ties_across_the_last_candidate_are_refused() {
        // Five distinct leaders, then 30 equal logits of which 5 fit in the candidates.
        let mut l = vec![0.0f32; 100];
        l[40..45].copy_from_slice(&[9.0, 8.0, 7.0, 6.0, 5.0]);
        (50..80).for_each(|i| l[i] = 4.0);
        let row = ReducedRow::new(&l, 10, 1.0);
        assert_eq!(row.ids, [40, 41, 42, 43, 44, 50, 51, 52, 53, 54]);
        assert_eq!(agree(&l, 10, (1.0, 1.0, 5), 9, 100), 100);
        let mut s = sampler(1.0, 1.0, 6, 9);
        assert_eq!(s.sample_reduced(&row.view()), None);
        assert!(logprobs_reduced(&row.view(), 40, 5).is_some());
        assert!(logprobs_reduced(&row.view(), 40, 6).is_none());
    }

    #[test]
    fn greedy_and_degenerate_rows() {
        let l = [1.0f32, 5.0, 5.0, -2.0];
        let row = ReducedRow::new(&l, 2, 0.0);
        assert_eq!(sampler(0.0, 1.0, 0, 1).sample_reduced(&row.view()), Some(1));
        // A greedy row without candidates still has its argmax; a sampled one cannot go on.
        let bare = Reduced { ids: &[], logits: &[], sum_t: None, sum_1: None, ..row.view() };
        assert_eq!(sampler(0.0, 1.0, 0, 1).sample_reduced(&bare), Some(1));
        assert_eq!(sampler(1.0, 1.0, 0, 1).sample_reduced(&bare), None);
        // Nothing finite: argmax, no draw (as `sample`).
        let dead = [f32::NAN, f32::NEG_INFINITY, f32::NAN];
        let row = ReducedRow::new(&dead, 2, 1.0);
        let mut s = sampler(1.0, 1.0, 0, 1);
        let before = s.rng.s;
        assert_eq!(s.sample_reduced(&row.view()), Some(sampler(1.0, 1.0, 0, 1).sample(&dead)));
        assert_eq!(s.rng.s, before);
        assert_eq!(logprobs_reduced(&row.view(), 0, 3), Some(logprobs(&dead, 0, 3)));
        // A sum at another temperature than the sampler's is not used.
        let row = ReducedRow::new(&l, 4, 0.8);
        assert_eq!(sampler(1.0, 1.0, 0, 1).sample_reduced(&row.view()), None);
    }

    #[test]
    fn logprobs_match_the_whole_row() {
        let mut rng = Rng(3);
        let mut l = peaked(&mut rng, 3000);
        (l[2], l[17]) = (20.0, 20.0); // tied leaders
        l[5] = f32::NAN;
        let best = argmax(&l);
        // With the reference's own sum (the same order as `logprobs`): bit for bit.
        let exact = ReducedRow::new(&l, 64, 1.0);
        for k in [0, 1, 5, 20] {
            assert_eq!(logprobs_reduced(&exact.view(), best, k), Some(logprobs(&l, best, k)), "k={k}");
        }
        // With a device-like sum: the same ids, values within one f32 ulp or 1e-9.
        let dev = as_device(exact.clone(), &l);
        let (got, want) = (logprobs_reduced(&dev.view(), best, 20).unwrap(), logprobs(&l, best, 20));
        let close = |a: f32, b: f32| (a - b).abs() <= (b.abs() * f32::EPSILON).max(1e-9);
        assert!(close(got.chosen, want.chosen), "{} vs {}", got.chosen, want.chosen);
        assert_eq!(got.top.iter().map(|t| t.0).collect::<Vec<_>>(), want.top.iter().map(|t| t.0).collect::<Vec<_>>());
        assert!(got.top.iter().zip(&want.top).all(|(a, b)| close(a.1, b.1)));
        // The chosen token outside the candidates, top_logprobs past them: refused.
        let outside = (0..3000u32).find(|i| !exact.ids.contains(i)).unwrap();
        assert!(logprobs_reduced(&exact.view(), outside, 1).is_none());
        assert!(logprobs_reduced(&exact.view(), best, 64).is_none());
        assert_eq!(logprobs_reduced(&exact.view(), 3000, 0).map(|t| t.chosen), Some(f32::NEG_INFINITY));
    }
}
