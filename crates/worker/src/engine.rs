//! The loaded slice and the per-sequence sampling state, behind the worker's lock. Everything here is
//! blocking work: the service calls it from `spawn_blocking` with the lock held, and releases the lock before
//! it talks to the next worker.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};

use pipemoe_model::backend::Landed;
use pipemoe_model::sampling::{SampleRow, Sampler, SamplingParams};
use pipemoe_model::{Backend, SeqId, Stage, StageInput};
use pipemoe_proto::worker_v1::{Sampled, TokenLogprob};

use crate::device::{CacheUsage, WorkerBackend};
use crate::error::{Error, Result};
use crate::step::{Hidden, Plan, SampleSpec};

/// What this worker's part of a step produced.
pub enum Output {
    /// The residual stream `[rows, hidden]`, for the next worker.
    Hidden { rows: usize, cols: usize, data: Vec<f32> },
    /// The same, left on the GPU and shared through CUDA IPC (kept alive until this value drops).
    Shared { rows: usize, cols: usize, shared: pipemoe_model::backend::SharedActivations },
    /// The last stage's sampled tokens, in chunk order.
    Sampled(Vec<Sampled>),
}

/// A sequence that has been sampled at least once.
struct SeqState {
    /// The settings of its first sampled chunk; later chunks must repeat them.
    params: SamplingParams,
    /// Its random stream (last stage only).
    sampler: Option<Sampler>,
}

pub struct Engine<B: Backend> {
    stage: Stage<B>,
    seqs: HashMap<SeqId, SeqState>,
    /// Mixed with a sequence id to seed a sequence that brings no seed: differs between processes.
    seed_salt: u64,
    /// Hand the next worker CUDA IPC handles rather than bytes, when the backend can export.
    ipc: bool,
    ipc_announced: bool,
}

impl<B: Backend> Engine<B> {
    pub fn new(stage: Stage<B>, ipc: bool) -> Self {
        let seed_salt = std::collections::hash_map::RandomState::new().build_hasher().finish();
        Self { stage, seqs: HashMap::new(), seed_salt, ipc, ipc_announced: false }
    }

    /// Runs this worker's part of a step: checks every chunk against the cache and the sequence's sampling
    /// settings, then the stage, then (last stage) samples. On an error before the forward pass nothing changed.
    /// With activations from CUDA IPC, also what to wait on until they have been copied in (`Backend::import_landed`).
    pub fn step(&mut self, mut plan: Plan) -> Result<(Output, Option<Landed>)> {
        let step_id = plan.step_id;
        self.check(&plan)?;
        let model = |source| Error::Model { step_id, source };
        let cols = self.stage.config().hidden_size;
        let b = self.stage.backend();
        let mut landed = None;
        let input = match plan.hidden.take() {
            Some(Hidden::Host(h)) => StageInput::Hidden(b.upload(plan.rows.len(), cols, h).map_err(model)?),
            Some(Hidden::Ipc { mem_handle, event_handle }) => {
                let x = b.import(plan.rows.len(), cols, &mem_handle, &event_handle).map_err(model)?;
                landed = b.import_landed().map_err(model)?;
                StageInput::Hidden(x)
            }
            None => StageInput::Tokens(&plan.tokens),
        };
        let out = self.forward(&plan, input)?;
        Ok((out, landed))
    }

    fn forward(&mut self, plan: &Plan, input: StageInput<'_, B>) -> Result<Output> {
        let step_id = plan.step_id;
        let model = |source| Error::Model { step_id, source };
        let hidden = self.stage.forward(&plan.rows, input).map_err(model)?;
        let b = self.stage.backend();
        for c in &plan.chunks {
            if let Some(s) = &c.sample {
                self.seqs.entry(c.seq).or_insert(SeqState { params: s.params, sampler: None });
            }
        }
        if !self.stage.slice().head {
            let (rows, cols) = b.shape(&hidden);
            if self.ipc
                && let Some(shared) = b.export(&hidden).map_err(model)?
            {
                if !self.ipc_announced {
                    tracing::info!(step_id, "activations go to the next worker as CUDA IPC handles");
                    self.ipc_announced = true;
                }
                return Ok(Output::Shared { rows, cols, shared });
            }
            return Ok(Output::Hidden { rows, cols, data: b.download(&hidden).map_err(model)? });
        }
        Ok(Output::Sampled(self.sample(&hidden, plan)?))
    }

    /// The last stage's tokens for the chunks that ask for one, in chunk order: each sequence's sampler lent to
    /// `Stage::sample` (on a GPU the logits stay on the device, a reduced view of them comes back).
    fn sample(&mut self, hidden: &B::Tensor, plan: &Plan) -> Result<Vec<Sampled>> {
        let step_id = plan.step_id;
        let model = |source| Error::Model { step_id, source };
        let sampled = plan.sampled_rows();
        if sampled.is_empty() {
            return Ok(Vec::new());
        }
        // (row of the step, sequence, spec) of each sampled chunk, in chunk order.
        let wanted: Vec<(usize, SeqId, SampleSpec)> =
            sampled.iter().filter_map(|(row, c)| c.sample.map(|spec| (*row, c.seq, spec))).collect();
        for &(_, seq, spec) in &wanted {
            self.start_sampler(seq, spec.params, spec.generated).map_err(model)?;
        }
        // Each chunk's sampler, lent for the step (sequences are unique within a step).
        let order: HashMap<SeqId, usize> = wanted.iter().enumerate().map(|(k, w)| (w.1, k)).collect();
        let mut lent: Vec<Option<SampleRow<'_>>> = wanted.iter().map(|_| None).collect();
        for (seq, state) in &mut self.seqs {
            if let (Some(&k), Some(sampler)) = (order.get(seq), state.sampler.as_mut()) {
                let spec = wanted[k].2;
                let logprobs = (spec.logprobs || spec.top_logprobs > 0).then_some(spec.top_logprobs);
                lent[k] = Some(SampleRow { sampler, logprobs });
            }
        }
        let missing = || model(pipemoe_model::Error::Backend { reason: "a sampled chunk has no sampler".into() });
        let mut rows: Vec<SampleRow<'_>> = lent.into_iter().collect::<Option<_>>().ok_or_else(missing)?;
        let which: Vec<usize> = wanted.iter().map(|w| w.0).collect();
        let tokens = self.stage.sample(hidden, &which, &mut rows).map_err(model)?;
        Ok(wanted
            .iter()
            .zip(tokens)
            .map(|(&(_, seq, spec), t)| {
                let mut s = Sampled { seq, token: t.token, logprob: None, top: Vec::new() };
                if let Some(lp) = t.logprobs {
                    s.logprob = spec.logprobs.then_some(lp.chosen);
                    s.top = lp.top.into_iter().map(|(token, logprob)| TokenLogprob { token, logprob }).collect();
                }
                s
            })
            .collect())
    }

    /// Every chunk continues its sequence's cache, and repeats its sampling settings.
    fn check(&self, plan: &Plan) -> Result<()> {
        let invalid = |reason: String| Error::InvalidStep { step_id: plan.step_id, reason };
        for c in &plan.chunks {
            let cached = self.stage.cache_len(c.seq);
            if c.start != cached {
                return Err(invalid(format!(
                    "sequence {}: the chunk starts at position {}, but {cached} positions are cached (start must equal it)",
                    c.seq, c.start
                )));
            }
            if let (Some(spec), Some(state)) = (&c.sample, self.seqs.get(&c.seq))
                && spec.params != state.params
            {
                return Err(invalid(format!(
                    "sequence {}: sampling {:?} differs from the settings of its first sampled chunk {:?}",
                    c.seq, spec.params, state.params
                )));
            }
        }
        Ok(())
    }

    /// Creates the sequence's sampler at its first sampled chunk (seeded from the seq id when it has no seed),
    /// its stream resumed after the `generated` tokens the sequence already has (after a preemption).
    fn start_sampler(&mut self, seq: SeqId, params: SamplingParams, generated: u64) -> pipemoe_model::Result<()> {
        let salt = self.seed_salt;
        let state = self.seqs.entry(seq).or_insert(SeqState { params, sampler: None });
        if state.sampler.is_none() {
            let seed = params.seed.unwrap_or_else(|| splitmix64(salt ^ seq));
            let mut sampler = Sampler::new(SamplingParams { seed: Some(seed), ..params })?;
            sampler.resume_after(generated);
            state.sampler = Some(sampler);
        }
        Ok(())
    }

    /// Drops sequences from the cache and the sampler map; returns the positions that were cached.
    pub fn free(&mut self, seqs: &[SeqId]) -> usize {
        let mut positions = 0;
        for &seq in seqs {
            positions += self.stage.cache_len(seq);
            self.stage.free(seq);
            self.seqs.remove(&seq);
        }
        positions
    }
}

impl<B: WorkerBackend> Engine<B> {
    /// The KV cache's size and use now.
    pub fn cache_usage(&self) -> CacheUsage {
        self.stage.backend().cache_usage(self.stage.caches())
    }
}

/// splitmix64's finaliser: neighbouring sequence ids get unrelated seeds.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
