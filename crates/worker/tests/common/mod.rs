//! Shared by the worker tests: a chain of three in-process workers over the demo model, and a client-side
//! generation loop over it (what the controller's scheduler will do).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use pipemoe_model::chat::{ChatFormat, ChatOptions, Message};
use pipemoe_model::cpu::CpuBackend;
use pipemoe_model::tokenizer::Tokenizer;
use pipemoe_model::{GenerateOptions, Generator, ModelConfig, SliceSpec, Stage};
use pipemoe_worker::proto::worker_client::WorkerClient;
use pipemoe_worker::proto::{
    FreeRequest, HealthRequest, HealthResponse, Sampling, SeqChunk, StepRequest, StepResponse, WorkerState,
};
use pipemoe_worker::{Device, Listen, WorkerConfig, WorkerHandle};
use tonic::transport::{Channel, Endpoint};

pub type Client = WorkerClient<Channel>;

pub fn demo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/models/tiny-dsv32-w3a16")
}

pub const MAX_TOKENS: usize = 12;

/// Three workers: [0,1) + embed on a Unix socket, [1,3) on TCP, [3,4) + head on a Unix socket.
pub struct Chain {
    pub dir: tempfile::TempDir,
    pub workers: Vec<WorkerHandle>,
    /// One client per worker; `clients[0]` is where steps enter.
    pub clients: Vec<Client>,
    pub tokenizer: Tokenizer,
}

impl Chain {
    pub async fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let slices = [(0..1, true, false), (1..3, false, false), (3..4, false, true)];
        let mut workers: Vec<WorkerHandle> = Vec::new();
        // Head first, so each worker's next address is known when it starts (the next is dialled lazily anyway).
        for (rank, (layers, embed, head)) in slices.into_iter().enumerate().rev() {
            let listen = if rank == 1 {
                Listen::Tcp("127.0.0.1:0".into())
            } else {
                Listen::Unix(dir.path().join(format!("w{rank}.sock")))
            };
            let config = WorkerConfig {
                rank: rank as u32,
                device: Device::Cpu,
                model: demo(),
                slice: SliceSpec { layers, experts: None, embed, head },
                listen,
                next: workers.first().map(|w| w.addr().to_string()),
                ipc: false,
                kv_dtype: Default::default(),
                memory: Default::default(),
            };
            workers.insert(0, pipemoe_worker::start(config).await?);
        }
        let mut clients = Vec::new();
        for w in &workers {
            let mut c = connect(w.addr()).await?;
            wait_ready(&mut c).await?;
            clients.push(c);
        }
        Ok(Self { dir, workers, clients, tokenizer: Tokenizer::from_dir(demo())? })
    }

    pub fn entry(&self) -> Client {
        self.clients[0].clone()
    }

    /// Shuts every worker down and waits for each.
    pub async fn stop(self) -> Result<()> {
        for w in &self.workers {
            w.shutdown();
        }
        for w in self.workers {
            w.wait().await?;
        }
        Ok(())
    }
}

pub async fn connect(addr: &str) -> Result<Client> {
    let channel = Endpoint::from_shared(addr.to_string())?.connect().await.with_context(|| format!("dial {addr}"))?;
    Ok(WorkerClient::new(channel))
}

pub async fn health(c: &mut Client) -> Result<HealthResponse> {
    Ok(c.health(HealthRequest {}).await?.into_inner())
}

/// Polls Health until the state leaves LOADING (deadline 60 s); READY or an error carrying the message.
pub async fn wait_ready(c: &mut Client) -> Result<HealthResponse> {
    let h = wait_loaded(c).await?;
    if h.state != WorkerState::Ready as i32 {
        bail!("worker {} is {:?}: {}", h.rank, h.state(), h.message);
    }
    Ok(h)
}

/// Polls Health until the state is no longer LOADING.
pub async fn wait_loaded(c: &mut Client) -> Result<HealthResponse> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let h = health(c).await?;
        if h.state != WorkerState::Loading as i32 {
            return Ok(h);
        }
        if Instant::now() > deadline {
            bail!("worker {} still loading after 60 s: {}", h.rank, h.message);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn greedy() -> Sampling {
    Sampling { temperature: 0.0, top_p: 1.0, ..Sampling::default() }
}

pub fn chunk(seq: u64, start: usize, tokens: &[u32], sampling: Option<Sampling>) -> SeqChunk {
    SeqChunk { seq, start: start as u32, tokens: tokens.to_vec(), sampling, generated: 0 }
}

pub async fn step(c: &mut Client, step_id: u64, chunks: Vec<SeqChunk>) -> Result<StepResponse, tonic::Status> {
    c.step(StepRequest { step_id, chunks, hidden: None, ring: false }).await.map(tonic::Response::into_inner)
}

pub async fn free(c: &mut Client, seqs: &[u64]) -> Result<()> {
    c.free(FreeRequest { seqs: seqs.to_vec() }).await?;
    Ok(())
}

/// The demo's chat prompts, token ids.
pub fn prompts(tok: &Tokenizer) -> Result<Vec<Vec<u32>>> {
    let format = ChatFormat::for_model("deepseek_v32", tok)?;
    ["What is 12 + 30?", "Reverse the word apple"]
        .iter()
        .map(|q| Ok(tok.encode(&format.render(&[Message::user(*q)], &ChatOptions::default())?)?))
        .collect()
}

/// What the single-process generator answers (greedy, [`MAX_TOKENS`]).
pub fn expected(prompts: &[Vec<u32>]) -> Result<Vec<Vec<u32>>> {
    let dir = demo();
    let cfg = ModelConfig::from_dir(&dir)?;
    let stage = Stage::open(CpuBackend::F32, &dir, SliceSpec::full(&cfg))?;
    let mut g = Generator::new(stage, Tokenizer::from_dir(&dir)?)?;
    let opts = GenerateOptions { max_tokens: MAX_TOKENS, ..GenerateOptions::default() };
    Ok(g.generate_batch(prompts, &vec![opts; prompts.len()])?.into_iter().map(|o| o.token_ids).collect())
}

/// The generator's loop through the chain: one step prefilling every `(seq, prompt)`, then one decode step
/// per token for the sequences still running (greedy; EOS or [`MAX_TOKENS`] ends one). Step ids start at
/// `first_step`. The sequences are freed at the end.
pub async fn generate(
    c: &mut Client,
    tok: &Tokenizer,
    first_step: u64,
    seqs: &[(u64, Vec<u32>)],
) -> Result<Vec<Vec<u32>>> {
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); seqs.len()];
    let mut chunks: Vec<SeqChunk> = seqs.iter().map(|(s, p)| chunk(*s, 0, p, Some(greedy()))).collect();
    let mut step_id = first_step;
    while !chunks.is_empty() {
        let resp = step(c, step_id, chunks.clone()).await?;
        step_id += 1;
        if resp.sampled.len() != chunks.len() {
            bail!("step {step_id}: {} sampled for {} chunks", resp.sampled.len(), chunks.len());
        }
        let mut next = Vec::new();
        for (sampled, ch) in resp.sampled.iter().zip(&chunks) {
            if sampled.seq != ch.seq {
                bail!("sampled out of chunk order: {} for {}", sampled.seq, ch.seq);
            }
            let i = seqs.iter().position(|(s, _)| *s == ch.seq).context("unknown seq")?;
            out[i].push(sampled.token);
            let pos = ch.start as usize + ch.tokens.len();
            if !tok.is_eos(sampled.token) && out[i].len() < MAX_TOKENS {
                next.push(chunk(ch.seq, pos, &[sampled.token], Some(greedy())));
            }
        }
        chunks = next;
    }
    free(c, &seqs.iter().map(|(s, _)| *s).collect::<Vec<_>>()).await?;
    Ok(out)
}
