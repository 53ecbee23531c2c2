//! A step's sampled rows together, as `Backend::sample` takes them: the host path every backend has (the whole
//! logits downloaded, `Sampler::sample` and `logprobs` per row) and the finish from rows a device reduced
//! (`Reduced`), which fetches whole rows only for the rows whose reduced view cannot decide. Both give the same
//! tokens and PRNG states; logprobs agree within `reduced`'s stated rounding.

use super::{Reduced, Sampler, TokenLogprobs, logprobs, logprobs_reduced};
use crate::{Error, Result};

/// Candidates a device keeps per row at least. The reduction's cost is its passes over the vocabulary, not `m`;
/// more candidates let pure temperature and nucleus sampling decide without the whole row more often
/// (`reduced`'s tests: 256 decides ≥ 90% of draws at T = 0.3 on a peaked 5,000-token row).
pub const MIN_CANDIDATES: usize = 256;

/// One row of a step to sample: its sequence's sampler (advanced by the draw) and the logprobs to report.
pub struct SampleRow<'a> {
    pub sampler: &'a mut Sampler,
    /// `Some(k)`: the chosen token's log-probability and the `k` most likely (k may be 0); `None`: none.
    pub logprobs: Option<usize>,
}

/// A row's token and, when asked, its logprobs.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    pub token: u32,
    pub logprobs: Option<TokenLogprobs>,
}

impl SampleRow<'_> {
    /// The row draws from a distribution; otherwise the argmax alone decides its token.
    pub fn draws(&self) -> bool {
        !self.sampler.params().is_greedy()
    }

    pub fn temperature(&self) -> f32 {
        self.sampler.params().temperature
    }

    /// The row needs candidates (a draw or logprobs), not only the argmax.
    pub fn needs_candidates(&self) -> bool {
        self.draws() || self.logprobs.is_some()
    }

    /// Candidates for the reduced view to decide the row's top_k and top_logprobs: one more than either, since
    /// the last candidate's place is never certain (a token outside may tie it).
    fn candidates(&self) -> usize {
        let top_k = if self.draws() { self.sampler.params().top_k } else { 0 };
        let top_lp = self.logprobs.unwrap_or(0);
        MIN_CANDIDATES.max(top_k.saturating_add(1)).max(top_lp.saturating_add(1))
    }

    /// The whole row's answer; `token` when the reduced view already drew it (the PRNG is not drawn again).
    fn finish_whole(&mut self, logits: &[f32], token: Option<u32>) -> SampledToken {
        let token = token.unwrap_or_else(|| self.sampler.sample(logits));
        SampledToken { token, logprobs: self.logprobs.map(|k| logprobs(logits, token, k)) }
    }
}

/// Candidates per row a step's reduction should keep: the most any row needs (before the device's own cap).
pub fn candidates(rows: &[SampleRow<'_>]) -> usize {
    rows.iter().map(SampleRow::candidates).max().unwrap_or(MIN_CANDIDATES)
}

/// `Backend::sample` on host logits `[rows.len(), vocab]`: each row's `Sampler::sample` and `logprobs`.
pub fn sample_host(logits: &[f32], rows: &mut [SampleRow<'_>]) -> Result<Vec<SampledToken>> {
    let vocab = width(logits.len(), rows.len())?;
    Ok(rows.iter_mut().enumerate().map(|(i, r)| r.finish_whole(&logits[i * vocab..(i + 1) * vocab], None)).collect())
}

/// Rows a device reduced, finished on the host: row `i` from `reduced(i)` where `sample_reduced` and
/// `logprobs_reduced` decide it; the others from whole rows fetched in one call, `whole(&[i, …])` returning
/// `[len, vocab]` in that order. A row whose token the view drew but whose logprobs it cannot give keeps that
/// token (its PRNG has advanced) and takes only the logprobs from the whole row.
pub fn sample_from_reduced<'r>(
    rows: &mut [SampleRow<'_>],
    reduced: impl Fn(usize) -> Reduced<'r>,
    whole: impl FnOnce(&[usize]) -> Result<Vec<f32>>,
) -> Result<Vec<SampledToken>> {
    let mut out: Vec<Option<SampledToken>> = Vec::with_capacity(rows.len());
    // (row, the token when drawn already)
    let mut pending: Vec<(usize, Option<u32>)> = Vec::new();
    for (i, row) in rows.iter_mut().enumerate() {
        let r = reduced(i);
        let decided = row.sampler.sample_reduced(&r).map(|token| match row.logprobs {
            None => Ok(SampledToken { token, logprobs: None }),
            Some(k) => logprobs_reduced(&r, token, k).map(|lp| SampledToken { token, logprobs: Some(lp) }).ok_or(token),
        });
        match decided {
            Some(Ok(s)) => out.push(Some(s)),
            Some(Err(token)) => {
                pending.push((i, Some(token)));
                out.push(None);
            }
            None => {
                pending.push((i, None));
                out.push(None);
            }
        }
    }
    if !pending.is_empty() {
        let which: Vec<usize> = pending.iter().map(|p| p.0).collect();
        let logits = whole(&which)?;
        let vocab = width(logits.len(), which.len())?;
        for (j, &(i, token)) in pending.iter().enumerate() {
            out[i] = Some(rows[i].finish_whole(&logits[j * vocab..(j + 1) * vocab], token));
        }
    }
    out.into_iter().collect::<Option<Vec<_>>>().ok_or_else(|| Error::backend("a sampled row was left undecided"))
}

/// The row width of `len` logits over `rows` rows.
fn width(len: usize, rows: usize) -> Result<usize> {
    if rows == 0 {
        return Ok(0);
    }
    if len == 0 || !len.is_multiple_of(rows) {
        return Err(Error::Backend { reason: format!("{len} logits for {rows} sampled rows") });
    }
    Ok(len / rows)
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::super::{ReducedRow, SamplingParams, argmax};
    use super::*;

    fn sampler(temperature: f32, top_p: f32, top_k: usize, seed: u64) -> Sampler {
        Sampler::new(SamplingParams { temperature, top_p, top_k, seed: Some(seed) }).unwrap()
    }

    /// splitmix64 → uniform [0, 1).
    fn uniform(state: &mut u64) -> f32 {
        *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
    }

    /// A language-model-like row: a few strong logits over a long flat tail.
    fn peaked(seed: u64, vocab: usize) -> Vec<f32> {
        let mut s = seed;
        (0..vocab).map(|_| uniform(&mut s) * 6.0 + if uniform(&mut s) < 0.004 { 8.0 } else { 0.0 }).collect()
    }

    /// What a device hands back for `rows`: `cap` candidates at most, the sums only where asked (as the CUDA
    /// crate's `HostReduced::row`).
    fn device_view(logits: &[f32], vocab: usize, rows: &[SampleRow<'_>], cap: usize) -> Vec<ReducedRow> {
        let m = candidates(rows).min(cap);
        rows.iter()
            .enumerate()
            .map(|(i, r)| {
                let mut red = ReducedRow::new(&logits[i * vocab..(i + 1) * vocab], m, r.temperature());
                if !r.needs_candidates() {
                    (red.ids, red.logits) = (Vec::new(), Vec::new());
                }
                red.sum_t = red.sum_t.filter(|_| r.draws());
                red.sum_1 = red.sum_1.filter(|_| r.logprobs.is_some());
                red
            })
            .collect()
    }

    /// Samples `steps` times both ways from fresh samplers of `params`; every step's result must agree. Returns
    /// how often each row was fetched whole.
    fn agree(logits: &[f32], params: &[(SamplingParams, Option<usize>)], cap: usize, steps: usize) -> Vec<usize> {
        let vocab = logits.len() / params.len();
        let fresh = || params.iter().map(|p| Sampler::new(p.0).unwrap()).collect::<Vec<_>>();
        let (mut host, mut dev) = (fresh(), fresh());
        let fetched = RefCell::new(vec![0; params.len()]);
        fn rows<'a>(s: &'a mut [Sampler], params: &[(SamplingParams, Option<usize>)]) -> Vec<SampleRow<'a>> {
            s.iter_mut().zip(params).map(|(sampler, p)| SampleRow { sampler, logprobs: p.1 }).collect()
        }
        for step in 0..steps {
            let want = sample_host(logits, &mut rows(&mut host, params)).unwrap();
            let mut dev_rows = rows(&mut dev, params);
            let view = device_view(logits, vocab, &dev_rows, cap);
            let whole = |which: &[usize]| -> Result<Vec<f32>> {
                which.iter().for_each(|&i| fetched.borrow_mut()[i] += 1);
                Ok(which.iter().flat_map(|&i| logits[i * vocab..(i + 1) * vocab].iter().copied()).collect())
            };
            let got = sample_from_reduced(&mut dev_rows, |i| view[i].view(), whole).unwrap();
            assert_eq!(got.len(), want.len());
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.token, w.token, "step {step} row {i} {:?}", params[i]);
                // Logprobs within reduced's stated rounding (the reference's sum order differs from `logprobs`).
                match (&g.logprobs, &w.logprobs) {
                    (Some(g), Some(w)) => {
                        let close = |a: f32, b: f32| (a - b).abs() <= (b.abs() * f32::EPSILON).max(1e-9);
                        assert!(close(g.chosen, w.chosen), "row {i}: {} vs {}", g.chosen, w.chosen);
                        assert_eq!(
                            g.top.iter().map(|t| t.0).collect::<Vec<_>>(),
                            w.top.iter().map(|t| t.0).collect::<Vec<_>>()
                        );
                        assert!(g.top.iter().zip(&w.top).all(|(a, b)| close(a.1, b.1)), "row {i}");
                    }
                    (g, w) => assert_eq!(g.is_some(), w.is_some(), "row {i}"),
                }
            }
            // The same PRNG states: a row settled by its view drew exactly once.
            for (h, d) in host.iter().zip(&dev) {
                assert_eq!(h.rng.s, d.rng.s, "step {step}");
            }
        }
        fetched.into_inner()
    }

    fn p(temperature: f32, top_p: f32, top_k: usize, seed: u64) -> SamplingParams {
        SamplingParams { temperature, top_p, top_k, seed: Some(seed) }
    }

    #[test]
    fn the_host_path_is_sample_and_logprobs_per_row() {
        let vocab = 300;
        let logits: Vec<f32> = (0..3).flat_map(|i| peaked(i, vocab)).collect();
        let (mut a, mut b, mut c) = (sampler(0.0, 1.0, 0, 1), sampler(0.8, 0.9, 20, 7), sampler(1.0, 1.0, 0, 9));
        let mut rows = [
            SampleRow { sampler: &mut a, logprobs: Some(3) },
            SampleRow { sampler: &mut b, logprobs: None },
            SampleRow { sampler: &mut c, logprobs: Some(0) },
        ];
        let got = sample_host(&logits, &mut rows).unwrap();
        let mut b2 = sampler(0.8, 0.9, 20, 7);
        let mut c2 = sampler(1.0, 1.0, 0, 9);
        let row = |i: usize| &logits[i * vocab..(i + 1) * vocab];
        let t2 = c2.sample(row(2));
        assert_eq!(got[0].token, argmax(row(0)));
        assert_eq!(got[0].logprobs, Some(logprobs(row(0), got[0].token, 3)));
        assert_eq!(got[1], SampledToken { token: b2.sample(row(1)), logprobs: None });
        assert_eq!(got[2], SampledToken { token: t2, logprobs: Some(logprobs(row(2), t2, 0)) });
        // Logits that do not split into the rows are refused, nothing drawn.
        let before = c.rng.s;
        let mut one = [SampleRow { sampler: &mut c, logprobs: None }, SampleRow { sampler: &mut b, logprobs: None }];
        assert!(sample_host(&logits[..301], &mut one).is_err());
        assert_eq!(c.rng.s, before);
        assert!(sample_host(&[], &mut []).unwrap().is_empty());
    }

    #[test]
    fn candidates_cover_top_k_and_top_logprobs() {
        let (mut g, mut s) = (sampler(0.0, 1.0, 500, 1), sampler(1.0, 1.0, 500, 1));
        // A greedy row's top_k does not count; its top_logprobs do, plus one.
        assert_eq!(candidates(&[SampleRow { sampler: &mut g, logprobs: Some(20) }]), MIN_CANDIDATES);
        assert_eq!(candidates(&[SampleRow { sampler: &mut g, logprobs: Some(300) }]), 301);
        let mut rows = [SampleRow { sampler: &mut g, logprobs: None }, SampleRow { sampler: &mut s, logprobs: None }];
        assert_eq!(candidates(&rows), 501);
        assert!(!rows[0].needs_candidates() && rows[1].needs_candidates() && rows[1].draws());
        rows[0].logprobs = Some(0);
        assert!(rows[0].needs_candidates() && !rows[0].draws());
        assert_eq!(candidates(&[]), MIN_CANDIDATES);
    }

    #[test]
    fn reduced_rows_fetch_only_what_they_cannot_decide() {
        let vocab = 5000;
        let mut logits: Vec<f32> = (10..16).flat_map(|i| peaked(i, vocab)).collect();
        // Row 5: 5 leaders, then 600 equal logits across the candidates' end.
        let tied = &mut logits[5 * vocab..];
        tied.fill(0.0);
        tied[40..45].copy_from_slice(&[9.0, 8.0, 7.0, 6.0, 5.0]);
        tied[100..700].fill(4.0);
        let params = [
            (p(0.0, 1.0, 0, 1), None),      // greedy: the argmax alone
            (p(0.7, 0.95, 40, 2), Some(5)), // top_k inside the candidates: decided with its logprobs
            (p(0.5, 0.9, 0, 3), None),      // nucleus on a peaked row: the mass lies in the candidates
            (p(2.0, 1.0, 0, 4), None),      // hot and flat: needs the tail
            (p(1.0, 1.0, 100, 5), None),    // top_k past the device's cap
            (p(1.0, 1.0, 5, 6), Some(64)),  // token decided, top_logprobs run into the tie
        ];
        let fetched = agree(&logits, &params, 64, 200);
        assert_eq!(fetched[0], 0, "greedy rows never fetch");
        assert_eq!(fetched[1], 0, "top_k 40 of 64 candidates");
        assert_eq!(fetched[2], 0, "top_p 0.9 at T=0.5");
        assert!(fetched[3] > 100, "a hot row fetched only {}/200 times", fetched[3]);
        assert_eq!(fetched[4], 200, "top_k past the cap");
        assert_eq!(fetched[5], 200, "top_logprobs across a tie");
    }

    #[test]
    fn a_whole_row_view_never_fetches() {
        // The vocabulary fits the candidates: every row, every setting, decided from the view.
        let logits: Vec<f32> = (20..24).flat_map(|i| peaked(i, 200)).collect();
        let params = [
            (p(1.0, 1.0, 0, 1), Some(20)),
            (p(2.0, 0.5, 0, 2), None),
            (p(0.3, 1.0, 150, 3), Some(0)),
            (p(0.0, 1.0, 0, 4), Some(200)),
        ];
        assert_eq!(agree(&logits, &params, 1024, 100), [0, 0, 0, 0]);
    }

    #[test]
    fn a_failed_fetch_is_an_error() {
        let logits = peaked(30, 2000);
        let mut s = sampler(2.0, 1.0, 0, 1);
        let mut rows = [SampleRow { sampler: &mut s, logprobs: None }];
        let view = device_view(&logits, 2000, &rows, 8);
        let failed = sample_from_reduced(&mut rows, |i| view[i].view(), |_| Err(Error::backend("download")));
        assert!(failed.is_err());
        let empty = sample_from_reduced(&mut rows, |i| view[i].view(), |_| Ok(Vec::new()));
        assert!(empty.is_err());
    }
}
