//! A `StepRequest` checked against the model before anything runs ([`Plan`]), and activations on the wire.
//!
//! What can be checked from the request and the config alone is checked here, on the async side, by every
//! worker of the chain; what depends on the cache (each chunk's `start`) is checked by the engine under its
//! lock, also before anything runs. A refused step therefore leaves no trace.

use std::collections::HashSet;

use bytes::Bytes;
use pipemoe_model::sampling::SamplingParams;
use pipemoe_model::{ModelConfig, Row, SeqId, SliceSpec};
use pipemoe_proto::worker_v1::{Activations, DType, Sampling, StepRequest};

use crate::error::{Error, Result};

/// OpenAI's ceiling on `top_logprobs`; larger asks are capped.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// How the last worker picks a sequence's next token, and what it reports about it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleSpec {
    /// The settings a sequence keeps from its first sampled chunk.
    pub params: SamplingParams,
    pub logprobs: bool,
    /// Capped at [`MAX_TOP_LOGPROBS`].
    pub top_logprobs: usize,
    /// Tokens the sequence generated before this one: where a sampler made now resumes its seeded stream.
    pub generated: u64,
}

impl SampleSpec {
    fn from_proto(s: &Sampling, generated: u32) -> Self {
        SampleSpec {
            params: SamplingParams {
                temperature: s.temperature,
                top_p: s.top_p,
                top_k: s.top_k as usize,
                seed: s.seed,
            },
            logprobs: s.logprobs,
            top_logprobs: (s.top_logprobs as usize).min(MAX_TOP_LOGPROBS),
            generated: u64::from(generated),
        }
    }
}

/// One chunk of the step, validated.
#[derive(Debug, Clone)]
pub struct ChunkPlan {
    pub seq: SeqId,
    pub start: usize,
    pub len: usize,
    /// Present when the last worker samples after this chunk.
    pub sample: Option<SampleSpec>,
}

/// A step this worker can run: rows in request order, token ids, and the input activations if any.
#[derive(Debug)]
pub struct Plan {
    pub step_id: u64,
    pub chunks: Vec<ChunkPlan>,
    pub rows: Vec<Row>,
    pub tokens: Vec<u32>,
    /// The previous worker's output `[rows, hidden]`; `None` for the first stage.
    pub hidden: Option<Hidden>,
}

/// How the previous worker's activations arrived.
#[derive(Debug, PartialEq)]
pub enum Hidden {
    /// Inline bytes, decoded to f32.
    Host(Vec<f32>),
    /// CUDA IPC handles (memory, event) of an f32 `[rows, cols]` tensor on the sender's GPU.
    Ipc { mem_handle: Vec<u8>, event_handle: Vec<u8> },
}

impl Plan {
    /// Checks `req` against the model and this worker's slice; nothing about the cache.
    pub fn new(req: &StepRequest, cfg: &ModelConfig, slice: &SliceSpec) -> Result<Self> {
        let step_id = req.step_id;
        let invalid = |reason: String| Error::InvalidStep { step_id, reason };
        if req.chunks.is_empty() {
            return Err(invalid("the step has no chunks".into()));
        }
        let mut seen = HashSet::new();
        let mut chunks = Vec::with_capacity(req.chunks.len());
        let mut rows = Vec::new();
        let mut tokens = Vec::new();
        for (i, c) in req.chunks.iter().enumerate() {
            let seq = c.seq;
            if c.tokens.is_empty() {
                return Err(invalid(format!("chunk {i} (sequence {seq}) has no tokens")));
            }
            if !seen.insert(seq) {
                return Err(invalid(format!("sequence {seq} has more than one chunk in the step")));
            }
            if let Some(&t) = c.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                return Err(invalid(format!(
                    "sequence {seq}: token id {t} is outside the vocabulary of {}",
                    cfg.vocab_size
                )));
            }
            let start = c.start as usize;
            let end = start + c.tokens.len();
            if end > cfg.max_position_embeddings {
                return Err(invalid(format!(
                    "sequence {seq}: positions {start}..{end} run past max_position_embeddings {}",
                    cfg.max_position_embeddings
                )));
            }
            let sample = c.sampling.as_ref().map(|s| SampleSpec::from_proto(s, c.generated));
            if let Some(s) = &sample {
                s.params.validate().map_err(|e| invalid(format!("sequence {seq}: {e}")))?;
            }
            rows.extend((start..end).map(|pos| Row { seq, pos }));
            tokens.extend_from_slice(&c.tokens);
            chunks.push(ChunkPlan { seq, start, len: c.tokens.len(), sample });
        }
        let hidden = match (&req.hidden, slice.embed) {
            (None, true) => None,
            (Some(_), true) => {
                return Err(invalid("the first stage embeds the tokens itself: `hidden` must be absent".into()));
            }
            (None, false) => {
                return Err(invalid("`hidden` is missing: this worker runs on the previous worker's output".into()));
            }
            (Some(a), false) => Some(decode(a, step_id, rows.len(), cfg.hidden_size)?),
        };
        Ok(Plan { step_id, chunks, rows, tokens, hidden })
    }

    /// Index in `rows` of the last row of each chunk that asks for sampling, with that chunk.
    pub fn sampled_rows(&self) -> Vec<(usize, &ChunkPlan)> {
        let mut out = Vec::new();
        let mut end = 0;
        for c in &self.chunks {
            end += c.len;
            if c.sample.is_some() {
                out.push((end - 1, c));
            }
        }
        out
    }
}

/// `[rows, cols]` f32 activations for the wire (little-endian, inline).
pub fn encode(rows: usize, cols: usize, data: &[f32]) -> Activations {
    let mut bytes = Vec::with_capacity(data.len() * 4);
    for v in data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    Activations {
        rows: rows as u32,
        cols: cols as u32,
        dtype: DType::DtypeF32 as i32,
        data: Bytes::from(bytes),
        ipc_mem_handle: Bytes::new(),
        ipc_event_handle: Bytes::new(),
    }
}

/// `[rows, cols]` IPC handles of f32 activations.
pub fn encode_ipc(rows: usize, cols: usize, mem_handle: &[u8], event_handle: &[u8]) -> Activations {
    Activations {
        rows: rows as u32,
        cols: cols as u32,
        dtype: DType::DtypeF32 as i32,
        data: Bytes::new(),
        ipc_mem_handle: Bytes::copy_from_slice(mem_handle),
        ipc_event_handle: Bytes::copy_from_slice(event_handle),
    }
}

/// `a`, which must be `[rows, cols]`: inline (f32 or bf16), or f32 CUDA IPC handles (both of them).
fn decode(a: &Activations, step_id: u64, rows: usize, cols: usize) -> Result<Hidden> {
    let invalid = |reason: String| Error::InvalidStep { step_id, reason };
    if a.rows as usize != rows || a.cols as usize != cols {
        return Err(invalid(format!(
            "hidden is [{}, {}], the step needs [{rows}, {cols}] (rows = the chunks' tokens, cols = hidden_size)",
            a.rows, a.cols
        )));
    }
    if !a.ipc_mem_handle.is_empty() || !a.ipc_event_handle.is_empty() {
        if a.ipc_mem_handle.is_empty() || a.ipc_event_handle.is_empty() || !a.data.is_empty() {
            return Err(invalid("CUDA IPC needs both handles and no inline data".into()));
        }
        if DType::try_from(a.dtype) != Ok(DType::DtypeF32) {
            return Err(invalid(format!("IPC activations must be DTYPE_F32, got {}", a.dtype)));
        }
        return Ok(Hidden::Ipc { mem_handle: a.ipc_mem_handle.to_vec(), event_handle: a.ipc_event_handle.to_vec() });
    }
    let width = match DType::try_from(a.dtype) {
        Ok(DType::DtypeF32) => 4,
        Ok(DType::DtypeBf16) => 2,
        _ => return Err(invalid(format!("hidden has dtype {}: expected DTYPE_F32 or DTYPE_BF16", a.dtype))),
    };
    let expected = rows * cols * width;
    if a.data.len() != expected {
        return Err(invalid(format!(
            "hidden holds {} bytes, [{rows}, {cols}] at {width} bytes per value is {expected}",
            a.data.len()
        )));
    }
    Ok(Hidden::Host(if width == 4 {
        a.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    } else {
        // bfloat16 is the top half of an f32.
        a.data.chunks_exact(2).map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16)).collect()
    }))
}

#[cfg(test)]
mod tests {
    use pipemoe_proto::worker_v1::SeqChunk;

    use super::*;

    fn cfg() -> ModelConfig {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/models/tiny-dsv32-w3a16");
        ModelConfig::from_dir(dir).expect("demo config")
    }

    fn chunk(seq: u64, start: u32, tokens: &[u32], sampling: Option<Sampling>) -> SeqChunk {
        SeqChunk { seq, start, tokens: tokens.to_vec(), sampling, generated: 0 }
    }

    fn greedy() -> Option<Sampling> {
        Some(Sampling { temperature: 0.0, top_p: 1.0, top_logprobs: 50, ..Sampling::default() })
    }

    const FIRST: SliceSpec = SliceSpec { layers: 0..1, experts: None, embed: true, head: false };
    const MIDDLE: SliceSpec = SliceSpec { layers: 1..3, experts: None, embed: false, head: false };

    fn err(req: &StepRequest, slice: &SliceSpec) -> String {
        Plan::new(req, &cfg(), slice).map(|_| ()).expect_err("refused").to_string()
    }

    #[test]
    fn rows_and_sampled_rows() -> Result<()> {
        let req = StepRequest {
            step_id: 7,
            chunks: vec![chunk(1, 0, &[5, 6, 7], greedy()), chunk(2, 4, &[9], None), chunk(3, 2, &[8, 8], greedy())],
            hidden: None,
            ring: false,
        };
        let plan = Plan::new(&req, &cfg(), &FIRST)?;
        assert_eq!(plan.rows.len(), 6);
        assert_eq!(plan.rows[3], Row { seq: 2, pos: 4 });
        assert_eq!(plan.tokens, [5, 6, 7, 9, 8, 8]);
        let sampled: Vec<(usize, u64)> = plan.sampled_rows().iter().map(|(r, c)| (*r, c.seq)).collect();
        assert_eq!(sampled, [(2, 1), (5, 3)]);
        assert_eq!(plan.chunks[0].sample.map(|s| s.top_logprobs), Some(MAX_TOP_LOGPROBS));
        Ok(())
    }

    #[test]
    fn bad_steps_are_refused_with_the_reason() {
        let step = |chunks: Vec<SeqChunk>| StepRequest { step_id: 3, chunks, hidden: None, ring: false };
        assert!(err(&step(vec![]), &FIRST).contains("no chunks"));
        assert!(err(&step(vec![chunk(1, 0, &[], None)]), &FIRST).contains("has no tokens"));
        assert!(err(&step(vec![chunk(1, 0, &[1], None), chunk(1, 1, &[2], None)]), &FIRST).contains("more than one"));
        assert!(err(&step(vec![chunk(1, 0, &[384], None)]), &FIRST).contains("outside the vocabulary of 384"));
        assert!(err(&step(vec![chunk(1, 4095, &[1, 2], None)]), &FIRST).contains("max_position_embeddings"));
        let bad_top_p = Some(Sampling { temperature: 1.0, top_p: 0.0, ..Sampling::default() });
        assert!(err(&step(vec![chunk(1, 0, &[1], bad_top_p)]), &FIRST).contains("top_p"));
        assert!(err(&step(vec![chunk(1, 0, &[1], None)]), &MIDDLE).contains("`hidden` is missing"));
        let e = err(&step(vec![]), &FIRST);
        assert!(e.starts_with("step 3: "), "{e}");
    }

    #[test]
    fn activations_round_trip_and_are_checked() -> Result<()> {
        let cols = cfg().hidden_size;
        let data: Vec<f32> = (0..2 * cols).map(|i| (i % 64) as f32 * 0.5 - 3.0).collect();
        let mut req = StepRequest { step_id: 1, chunks: vec![chunk(1, 0, &[1, 2], None)], hidden: None, ring: false };
        req.hidden = Some(encode(2, cols, &data));
        assert_eq!(Plan::new(&req, &cfg(), &MIDDLE)?.hidden, Some(Hidden::Host(data.clone())));
        assert!(err(&req, &FIRST).contains("must be absent"));

        let with = |f: &dyn Fn(&mut Activations)| {
            let mut r = req.clone();
            if let Some(h) = r.hidden.as_mut() {
                f(h);
            }
            r
        };
        assert!(err(&with(&|h| h.rows = 3), &MIDDLE).contains("hidden is [3, 256], the step needs [2, 256]"));
        assert!(err(&with(&|h| h.dtype = 0), &MIDDLE).contains("dtype 0"));
        assert!(err(&with(&|h| h.data = h.data.slice(4..)), &MIDDLE).contains("bytes"));
        // IPC: both handles and no inline bytes.
        let half = with(&|h| h.ipc_mem_handle = Bytes::from_static(b"handle"));
        assert!(err(&half, &MIDDLE).contains("both handles"));
        let ipc = encode_ipc(2, cols, b"mem", b"event");
        let r = StepRequest { hidden: Some(ipc), ..req.clone() };
        let want = Hidden::Ipc { mem_handle: b"mem".to_vec(), event_handle: b"event".to_vec() };
        assert_eq!(Plan::new(&r, &cfg(), &MIDDLE)?.hidden, Some(want));

        // bf16: the top 16 bits of each f32 (exact for these values).
        let bf16: Vec<u8> = data.iter().flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes()).collect();
        let r = with(&|h| {
            h.dtype = DType::DtypeBf16 as i32;
            h.data = Bytes::from(bf16.clone());
        });
        assert_eq!(Plan::new(&r, &cfg(), &MIDDLE)?.hidden, Some(Hidden::Host(data)));
        Ok(())
    }
}
