//! Generation in one process: prefill prompts, then decode every live sequence together, one step per token,
//! each sampled with its own settings and stopped on EOS, a stop string or its token budget. This is the loop
//! `pipemoe generate` runs; the controller's scheduler runs the same steps across worker processes.

use crate::backend::{Backend, Row, SeqId};
use crate::sampling::{SampleRow, Sampler, SamplingParams};
use crate::stage::{Stage, StageInput};
use crate::tokenizer::{StopMatcher, StreamDecoder, Tokenizer};
use crate::{Error, Result};

/// What to generate for one prompt.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// New tokens at most.
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Text at which generation ends; the stop string itself is not returned.
    pub stop: Vec<String>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self { max_tokens: 64, sampling: SamplingParams::greedy(), stop: Vec::new() }
    }
}

/// Why generation ended (OpenAI's `finish_reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// Generated ids, EOS included when it ended the text.
    pub token_ids: Vec<u32>,
    /// Generated text without EOS and without a matched stop string.
    pub text: String,
    pub finish_reason: FinishReason,
}

/// One sequence being generated.
struct Live {
    seq: SeqId,
    next_pos: usize,
    last: u32,
    sampler: Sampler,
    decoder: StreamDecoder,
    stops: StopMatcher,
    out: Generation,
    max_tokens: usize,
}

/// A whole model (one stage holding every layer) with its tokenizer.
pub struct Generator<B: Backend> {
    pub stage: Stage<B>,
    pub tokenizer: Tokenizer,
    next_seq: SeqId,
}

impl<B: Backend> Generator<B> {
    pub fn new(stage: Stage<B>, tokenizer: Tokenizer) -> Result<Self> {
        let s = stage.slice();
        if !s.embed || !s.head || s.layers.len() != stage.config().num_hidden_layers || s.experts.is_some() {
            return Err(Error::Slice { reason: "generation in one process needs the whole model in one stage".into() });
        }
        Ok(Self { stage, tokenizer, next_seq: 0 })
    }

    /// Longest prompt plus generation the model's positions allow.
    pub fn max_model_len(&self) -> usize {
        self.stage.config().max_position_embeddings
    }

    pub fn generate(&mut self, prompt: &[u32], opts: &GenerateOptions) -> Result<Generation> {
        let mut out = self.generate_batch(&[prompt.to_vec()], std::slice::from_ref(opts))?;
        out.pop().ok_or_else(|| Error::backend("no generation returned"))
    }

    /// Generates for every prompt at once: one prefill step for all, then one decode step per token for all
    /// sequences still running. Results are in prompt order and equal to generating each alone.
    pub fn generate_batch(&mut self, prompts: &[Vec<u32>], opts: &[GenerateOptions]) -> Result<Vec<Generation>> {
        if prompts.len() != opts.len() {
            return Err(Error::backend("one GenerateOptions per prompt"));
        }
        let limit = self.max_model_len();
        let mut live = Vec::with_capacity(prompts.len());
        for (p, o) in prompts.iter().zip(opts) {
            if p.is_empty() {
                return Err(Error::PromptTooLong { tokens: 0, limit, reason: "the prompt is empty" });
            }
            if p.len() + o.max_tokens > limit {
                return Err(Error::PromptTooLong {
                    tokens: p.len() + o.max_tokens,
                    limit,
                    reason: "prompt + max_tokens",
                });
            }
            let seq = self.next_seq;
            self.next_seq += 1;
            live.push(Live {
                seq,
                next_pos: 0,
                last: 0,
                sampler: Sampler::new(o.sampling)?,
                decoder: StreamDecoder::new(true),
                stops: StopMatcher::new(o.stop.iter().cloned()),
                out: Generation { token_ids: Vec::new(), text: String::new(), finish_reason: FinishReason::Length },
                max_tokens: o.max_tokens,
            });
        }
        let result = self.run(prompts, &mut live);
        for l in &live {
            self.stage.free(l.seq);
        }
        result?;
        Ok(live.into_iter().map(|l| l.out).collect())
    }

    fn run(&mut self, prompts: &[Vec<u32>], live: &mut [Live]) -> Result<()> {
        // Prefill: every prompt in one step; each sequence's last row gives its first token.
        let mut rows = Vec::new();
        let mut ids = Vec::new();
        let mut last_rows = Vec::new();
        for (l, p) in live.iter_mut().zip(prompts) {
            rows.extend((0..p.len()).map(|pos| Row { seq: l.seq, pos }));
            ids.extend_from_slice(p);
            last_rows.push(rows.len() - 1);
            l.next_pos = p.len();
        }
        let mut active: Vec<usize> = (0..live.len()).collect();
        let mut step_rows = last_rows;
        loop {
            let h = self.stage.forward(&rows, StageInput::Tokens(&ids))?;
            let mut samplers: Vec<SampleRow<'_>> = live
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| active.binary_search(i).is_ok())
                .map(|(_, l)| SampleRow { sampler: &mut l.sampler, logprobs: None })
                .collect();
            let sampled = self.stage.sample(&h, &step_rows, &mut samplers)?;
            drop(samplers);
            let mut still = Vec::new();
            for (&i, s) in active.iter().zip(sampled) {
                if self.accept(&mut live[i], s.token)? {
                    still.push(i);
                }
            }
            active = still;
            if active.is_empty() {
                return Ok(());
            }
            rows = active.iter().map(|&i| Row { seq: live[i].seq, pos: live[i].next_pos }).collect();
            ids = active.iter().map(|&i| live[i].last).collect();
            step_rows = (0..active.len()).collect();
            for &i in &active {
                live[i].next_pos += 1;
            }
        }
    }

    /// Records a sampled token; false when the sequence is finished.
    fn accept(&self, l: &mut Live, id: u32) -> Result<bool> {
        l.out.token_ids.push(id);
        l.last = id;
        if self.tokenizer.is_eos(id) {
            let tail = l.decoder.flush(&self.tokenizer)?;
            l.out.text.push_str(&l.stops.push(&tail).text);
            l.out.text.push_str(&l.stops.finish());
            l.out.finish_reason = FinishReason::Stop;
            return Ok(false);
        }
        let piece = l.decoder.push(&self.tokenizer, id)?;
        let chunk = l.stops.push(&piece);
        l.out.text.push_str(&chunk.text);
        if chunk.stop.is_some() {
            l.out.finish_reason = FinishReason::Stop;
            return Ok(false);
        }
        if l.out.token_ids.len() >= l.max_tokens {
            let tail = l.decoder.flush(&self.tokenizer)?;
            l.out.text.push_str(&l.stops.push(&tail).text);
            l.out.text.push_str(&l.stops.finish());
            return Ok(false);
        }
        Ok(true)
    }
}
