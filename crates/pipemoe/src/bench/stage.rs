//! Timings through the serving code path: `Stage` on `CudaBackend` (bf16 activations, the recipe's cache dtype),
//! fed exactly as a worker feeds it — chunked prefill, then one row per sequence per decode step — and, for the
//! per-kernel rows, one layer's attention and MoE block loaded through the same loader and run alone.

use std::time::Instant;

use anyhow::{Context, Result};
use pipemoe_cuda::CudaBackend;
use pipemoe_model::backend::{Backend, Row};
use pipemoe_model::mla::Mla;
use pipemoe_model::moe::Ffn;
use pipemoe_model::sampling::{SampleRow, Sampler, SamplingParams};
use pipemoe_model::weights::Loader;
use pipemoe_model::{Checkpoint, ModelConfig, SeqId, SliceSpec, Stage, StageInput};

use super::ceiling::seconds_per_call;

/// A xorshift stream for inputs (token ids, hidden states): inputs only need to be varied and finite.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in ±√3 (unit RMS), like a normed residual stream.
    pub fn hidden(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| ((self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * 3f32.sqrt()).collect()
    }

    fn token(&mut self, vocab: usize) -> u32 {
        (self.next() % vocab as u64) as u32
    }
}

/// Median, mean and extremes of per-step seconds.
#[derive(Clone, Debug, Default)]
pub struct Times {
    pub median: f64,
    pub mean: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Times {
    pub fn of(mut v: Vec<f64>) -> Self {
        if v.is_empty() {
            return Times::default();
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
        Times { median, mean: v.iter().sum::<f64>() / n as f64, min: v[0], max: v[n - 1], n }
    }
}

/// The stage and what feeding it needs.
pub struct Runner {
    pub stage: Stage<CudaBackend>,
    rng: Rng,
    /// Greedy samplers of the sequences, when this stage holds the head.
    samplers: Vec<(SeqId, Sampler)>,
    /// Each step's host time until its last launch was queued (before the closing synchronize): near the step's
    /// wall time, the host's launching is what the device waits on.
    issued: Vec<f64>,
}

impl Runner {
    pub fn new(stage: Stage<CudaBackend>, seed: u64) -> Self {
        Runner { stage, rng: Rng::new(seed), samplers: Vec::new(), issued: Vec::new() }
    }

    fn sync(&self) -> Result<()> {
        self.stage.backend().gpu.stream.synchronize().context("cuStreamSynchronize")
    }

    /// One step over `rows` as a worker runs it: the stage's input (token ids on the first stage, the previous
    /// stage's hidden state otherwise), the layers, and on the last stage a greedy token for each sequence's last
    /// row. Returns the step's wall time, from the input's arrival to the output ready. A hidden state arrives on
    /// the device before the step starts, as the previous worker's IPC hand-off lands it: its hand-off is the hop's
    /// cost, which the projection adds apart (`bench-ipc`, `--grpc-us`), and HF's baseline feeds its decode steps
    /// from the device too. (Until session 19 the step began with the host upload of the f32 rows: ~16 µs of a
    /// one-row step, ~240 µs of 32 rows, ~5 ms of a 512-row prefill chunk on the H200.)
    pub fn step(&mut self, rows: &[Row]) -> Result<f64> {
        let (h, vocab) = (self.stage.config().hidden_size, self.stage.config().vocab_size);
        let slice = self.stage.slice().clone();
        let ids: Vec<u32> = if slice.embed { rows.iter().map(|_| self.rng.token(vocab)).collect() } else { Vec::new() };
        let hidden = if slice.embed {
            None
        } else {
            Some(self.stage.backend().upload(rows.len(), h, self.rng.hidden(rows.len() * h))?)
        };
        self.sync()?;
        let t0 = Instant::now();
        let input = match hidden {
            Some(x) => StageInput::Hidden(x),
            None => StageInput::Tokens(&ids),
        };
        let out = self.stage.forward(rows, input)?;
        if slice.head {
            self.sample(&out, rows)?;
        }
        self.issued.push(t0.elapsed().as_secs_f64());
        self.sync()?;
        Ok(t0.elapsed().as_secs_f64())
    }

    fn sample(&mut self, out: &<CudaBackend as Backend>::Tensor, rows: &[Row]) -> Result<()> {
        // The last row of each sequence, in order.
        let which: Vec<usize> =
            (0..rows.len()).filter(|&i| i + 1 == rows.len() || rows[i + 1].seq != rows[i].seq).collect();
        for &i in &which {
            if !self.samplers.iter().any(|(s, _)| *s == rows[i].seq) {
                let greedy = SamplingParams { temperature: 0.0, top_p: 1.0, top_k: 0, seed: Some(0) };
                self.samplers.push((rows[i].seq, Sampler::new(greedy)?));
            }
        }
        let mut lent: Vec<SampleRow<'_>> = Vec::new();
        let mut by_seq: Vec<(SeqId, SampleRow<'_>)> =
            self.samplers.iter_mut().map(|(s, sampler)| (*s, SampleRow { sampler, logprobs: None })).collect();
        for &i in &which {
            let k = by_seq.iter().position(|(s, _)| *s == rows[i].seq).context("a sampler per sequence")?;
            lent.push(by_seq.swap_remove(k).1);
        }
        self.stage.sample(out, &which, &mut lent)?;
        Ok(())
    }

    /// Prefills `len` positions of `seq` in chunks of `chunk` rows; returns each chunk's seconds.
    pub fn prefill(&mut self, seq: SeqId, len: usize, chunk: usize) -> Result<Vec<f64>> {
        let mut times = Vec::new();
        let start = self.stage.cache_len(seq);
        for s in (start..start + len).step_by(chunk.max(1)) {
            let rows: Vec<Row> = (s..(s + chunk).min(start + len)).map(|pos| Row { seq, pos }).collect();
            times.push(self.step(&rows)?);
        }
        Ok(times)
    }

    /// `steps` decode steps of one row per sequence of `seqs` after `warm` untimed ones; each step's seconds.
    pub fn decode(&mut self, seqs: &[SeqId], warm: usize, steps: usize) -> Result<Vec<f64>> {
        let mut times = Vec::new();
        for i in 0..warm + steps {
            let rows: Vec<Row> = seqs.iter().map(|&seq| Row { seq, pos: self.stage.cache_len(seq) }).collect();
            let t = self.step(&rows)?;
            if i >= warm {
                times.push(t);
            }
        }
        Ok(times)
    }

    /// [`Runner::decode`]'s times, the host's time to queue each timed step's launches, and each step's time after
    /// that: the device's part, which the host's own jitter (tens of µs a step between runs) does not reach.
    pub fn timed_decode(&mut self, seqs: &[SeqId], warm: usize, steps: usize) -> Result<Decoded> {
        self.issued.clear();
        let times = self.decode(seqs, warm, steps)?;
        let issued = std::mem::take(&mut self.issued);
        let issued = &issued[issued.len().saturating_sub(times.len())..];
        let after = times.iter().zip(issued).map(|(t, q)| t - q).collect();
        Ok(Decoded { steps: Times::of(times), queued: Times::of(issued.to_vec()), after: Times::of(after) })
    }

    pub fn free(&mut self, seqs: &[SeqId]) {
        for &s in seqs {
            self.stage.free(s);
        }
        self.samplers.retain(|(s, _)| !seqs.contains(s));
    }
}

/// [`Runner::timed_decode`]'s three figures.
pub struct Decoded {
    pub steps: Times,
    pub queued: Times,
    pub after: Times,
}

/// Per-kernel rows: one layer's attention (decode rows at `context` cached positions) and MoE block, timed alone.
pub struct BlockTimes {
    pub layer: usize,
    /// Seconds per decode row of attention (projections, indexer, cache write, attention, o_proj).
    pub attention: f64,
    /// Seconds per MoE block call (router, routed experts, shared expert), by batch rows.
    pub moe: Vec<(usize, f64)>,
}

/// Loads layer `layer` again (its attention and FFN) on `backend` and times its blocks.
pub fn time_blocks(
    backend: &CudaBackend,
    cfg: &ModelConfig,
    ckpt: &Checkpoint,
    layer: usize,
    context: usize,
    batches: &[usize],
) -> Result<BlockTimes> {
    let b = backend;
    let ld = Loader { cfg, ckpt };
    let wk = format!("model.layers.{layer}.self_attn.indexer.wk");
    let with_indexer =
        cfg.indexer.is_some() && (ckpt.contains(&format!("{wk}.qweight")) || ckpt.contains(&format!("{wk}.weight")));
    let h = cfg.hidden_size;
    let mut rng = Rng::new(0x5eed ^ layer as u64);
    let rope = pipemoe_model::rope::inv_freq(&cfg.rope, cfg.qk_rope_head_dim);

    let attn = Mla::load(b, &ld, layer, with_indexer).context("loading the attention block")?;
    let mut cache = b.new_layer_cache(&attn.dims, attn.indexer.as_ref().map(|i| &i.dims));
    let seq = 7;
    for s in (0..context).step_by(512) {
        let rows: Vec<Row> = (s..(s + 512).min(context)).map(|pos| Row { seq, pos }).collect();
        let x = b.upload(rows.len(), h, rng.hidden(rows.len() * h))?;
        attn.forward(b, &x, &mut cache, &rope, &rows)?;
    }
    let xs: Vec<_> = (0..8).map(|_| b.upload(1, h, rng.hidden(h))).collect::<Result<_, _>>()?;
    let mut pos = context;
    let attention = seconds_per_call(&b.gpu, 3, 20, &mut |i| {
        attn.forward(b, &xs[i % xs.len()], &mut cache, &rope, &[Row { seq, pos }])?;
        pos += 1;
        Ok(())
    })?;
    drop((attn, cache));

    let mut moe = Vec::new();
    if cfg.is_moe_layer(layer) {
        let slice = SliceSpec { layers: layer..layer + 1, experts: None, embed: false, head: false };
        let ffn = Ffn::load(b, &ld, layer, &slice).context("loading the MoE block")?;
        for &rows in batches {
            let xs: Vec<_> = (0..8).map(|_| b.upload(rows, h, rng.hidden(rows * h))).collect::<Result<_, _>>()?;
            let secs = seconds_per_call(&b.gpu, 3, 20, &mut |i| {
                ffn.forward(b, &xs[i % xs.len()])?;
                Ok(())
            })?;
            moe.push((rows, secs));
        }
    }
    Ok(BlockTimes { layer, attention, moe })
}
