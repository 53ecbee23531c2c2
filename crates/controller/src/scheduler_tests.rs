//! The scheduler against an in-process fake worker whose KV cache holds a few 64-position blocks and refuses a
//! step that does not fit, as a GPU worker does (RESOURCE_EXHAUSTED with the numbers).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pipemoe_proto::worker_v1::worker_client::WorkerClient;
use pipemoe_proto::worker_v1::worker_server::{Worker as WorkerRpc, WorkerServer};
use pipemoe_proto::worker_v1::{
    FreeRequest, FreeResponse, HealthRequest, HealthResponse, ResultsRequest, Sampled, ShutdownRequest,
    ShutdownResponse, StepResult, WorkerState,
};
use tonic::transport::{Endpoint, Server};
use tonic::{Request, Response, Status};

use super::*;
use crate::admission::{TooLarge, WorkerCache};
use crate::fleet::Worker;
use crate::planner::StagePlan;

const BLOCK: usize = 64;
/// What the fake worker samples: any id of the demo's vocabulary.
const TOKEN: u32 = 100;

#[derive(Default)]
struct Cache {
    /// Blocks the fake cache really holds.
    capacity_blocks: usize,
    /// Positions cached per sequence.
    seqs: HashMap<u64, usize>,
    peak_seqs: usize,
    full: usize,
    /// Sequences freed and not seen since; one that starts again from position 0 was recomputed.
    freed: std::collections::HashSet<u64>,
    restarts: usize,
}

fn blocks(positions: &usize) -> usize {
    positions.div_ceil(BLOCK)
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<Cache>>);

impl Fake {
    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[tonic::async_trait]
impl WorkerRpc for Fake {
    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        Ok(Response::new(HealthResponse { state: WorkerState::Ready as i32, ..HealthResponse::default() }))
    }

    async fn step(&self, request: Request<StepRequest>) -> Result<Response<StepResponse>, Status> {
        let req = request.into_inner();
        {
            let mut c = self.cache();
            let mut after = c.seqs.clone();
            for chunk in &req.chunks {
                if chunk.start == 0 && c.freed.remove(&chunk.seq) {
                    c.restarts += 1;
                }
                let cached = after.entry(chunk.seq).or_default();
                if chunk.start as usize != *cached {
                    return Err(Status::invalid_argument(format!("sequence {} starts at {}", chunk.seq, chunk.start)));
                }
                *cached += chunk.tokens.len();
            }
            let (before, needed): (usize, usize) =
                (c.seqs.values().map(blocks).sum(), after.values().map(blocks).sum());
            if needed > c.capacity_blocks {
                c.full += 1;
                return Err(Status::resource_exhausted(format!(
                    "worker 0, step {}: KV cache full: {} positions in use of {}, the step needs {} more",
                    req.step_id,
                    before * BLOCK,
                    c.capacity_blocks * BLOCK,
                    (needed - before) * BLOCK
                )));
            }
            c.peak_seqs = c.peak_seqs.max(after.len());
            c.seqs = after;
        }
        // Long enough for other steps to be formed meanwhile.
        tokio::time::sleep(Duration::from_millis(2)).await;
        let sampled = req
            .chunks
            .iter()
            .filter(|c| c.sampling.is_some())
            .map(|c| Sampled { seq: c.seq, token: TOKEN, logprob: None, top: Vec::new() })
            .collect();
        Ok(Response::new(StepResponse { sampled }))
    }

    async fn free(&self, request: Request<FreeRequest>) -> Result<Response<FreeResponse>, Status> {
        let mut c = self.cache();
        for seq in request.into_inner().seqs {
            c.seqs.remove(&seq);
            c.freed.insert(seq);
        }
        Ok(Response::new(FreeResponse {}))
    }

    type ResultsStream = tokio_stream::Empty<Result<StepResult, Status>>;

    /// Nested steps only (`Fleet::attached` opens no ring).
    async fn results(&self, _: Request<ResultsRequest>) -> Result<Response<Self::ResultsStream>, Status> {
        Err(Status::unimplemented("the fake worker answers nested steps only"))
    }

    async fn shutdown(&self, _: Request<ShutdownRequest>) -> Result<Response<ShutdownResponse>, Status> {
        Ok(Response::new(ShutdownResponse {}))
    }
}

fn demo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/models/tiny-dsv32-w3a16")
}

/// A scheduler over one fake worker that reports `reported` positions of cache and really holds `real`.
async fn start(reported: usize, real: usize) -> anyhow::Result<(Scheduler, Fake)> {
    start_with(reported, real, 256).await
}

/// As `start`, with sequences holding `ahead` positions beyond what they have cached.
async fn start_with(reported: usize, real: usize, ahead: usize) -> anyhow::Result<(Scheduler, Fake)> {
    let fake = Fake::default();
    fake.cache().capacity_blocks = real / BLOCK;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = Server::builder().add_service(WorkerServer::new(fake.clone()));
    tokio::spawn(server.serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)));
    let client = WorkerClient::new(Endpoint::from_shared(format!("http://{addr}"))?.connect_lazy());
    let plan = StagePlan {
        rank: 0,
        device: "cuda:0".into(),
        layers: 0..4,
        embed: true,
        head: true,
        weight_bytes: 0,
        kv_bytes: 0,
        workspace_bytes: 0,
        budget_bytes: 0,
        capacity_bytes: 0,
    };
    let cache = Some(WorkerCache { rank: 0, capacity: reported, block: BLOCK });
    let worker = Worker { plan: plan.clone(), pid: 0, socket: PathBuf::new(), client, cache };
    let spec = FleetSpec {
        exe: PathBuf::from("pipemoe"),
        model_dir: demo(),
        run_dir: std::env::temp_dir(),
        plan: vec![plan],
        env: Vec::new(),
        ready_timeout: Duration::from_secs(1),
        generation: 0,
        ipc: false,
        kv_cache_dtype: "auto".into(),
    };
    let cfg = SchedulerConfig {
        max_model_len: 256,
        max_inflight: 2,
        max_step_tokens: 512,
        step_timeout: Duration::from_secs(10),
        reserve_ahead: ahead,
    };
    let tokenizer = Arc::new(Tokenizer::from_dir(demo())?);
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let (scheduler, _task) =
        Scheduler::spawn(cfg, tokenizer, Fleet::attached(vec![worker]), spec, events_rx, events_tx);
    Ok((scheduler, fake))
}

/// Submits a greedy request of a 10-token prompt; its events arrive on the receiver.
fn submit(s: &Scheduler, name: &str, max_tokens: usize) -> mpsc::UnboundedReceiver<SeqEvent> {
    let (events, rx) = mpsc::unbounded_channel();
    s.submit(GenRequest {
        request_id: name.into(),
        prompt: vec![5; 10],
        max_tokens,
        sampling: Sampling { temperature: 0.0, top_p: 1.0, ..Sampling::default() },
        stop: Vec::new(),
        ignore_eos: true,
        events,
    });
    rx
}

/// The event that ends a sequence, and how many tokens came before it.
async fn outcome(rx: &mut mpsc::UnboundedReceiver<SeqEvent>) -> anyhow::Result<(SeqEvent, usize)> {
    let mut tokens = 0;
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(20), rx.recv()).await?;
        match ev {
            Some(SeqEvent::Token { .. }) => tokens += 1,
            Some(end) => return Ok((end, tokens)),
            None => anyhow::bail!("the sequence's channel closed without an ending"),
        }
    }
}

/// Waits until every sequence was freed on the fake worker.
async fn all_freed(fake: &Fake) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fake.cache().seqs.is_empty() {
        anyhow::ensure!(Instant::now() < deadline, "still cached: {:?}", fake.cache().seqs);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequences_wait_for_cache_room_and_one_that_never_fits_is_refused() -> anyhow::Result<()> {
    // Two blocks: two sequences of 10 + 20 positions at a time.
    let (s, fake) = start(128, 128).await?;
    let mut rxs: Vec<_> = (0..5).map(|i| submit(&s, &format!("r{i}"), 20)).collect();
    for rx in &mut rxs {
        let (end, tokens) = outcome(rx).await?;
        assert!(matches!(end, SeqEvent::Done { finish: Finish::Length, completion_tokens: 20, .. }), "{end:?}");
        assert_eq!(tokens, 20);
    }
    let peak_and_full = {
        let c = fake.cache();
        (c.peak_seqs, c.full)
    };
    assert_eq!(peak_and_full, (2, 0), "admission kept the worker's cache from overflowing, and used it");
    all_freed(&fake).await?;

    // 10 + 200 positions cannot fit 128 even alone: refused with the numbers, not queued forever.
    let (end, _) = outcome(&mut submit(&s, "big", 200)).await?;
    assert_eq!(end, SeqEvent::Refused(TooLarge { rank: 0, positions: 210, capacity: 128, block: BLOCK }));
    assert_eq!(s.shared.cache.read().map(|c| c.queued).ok(), Some(0));
    // The room is all back: two more run at once.
    let mut rxs: Vec<_> = (0..2).map(|i| submit(&s, &format!("again{i}"), 20)).collect();
    for rx in &mut rxs {
        assert!(matches!(outcome(rx).await?.0, SeqEvent::Done { .. }));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_worker_cache_fails_only_the_step_that_found_it() -> anyhow::Result<()> {
    // The worker reports two blocks but holds one: the second sequence's prefill finds it full.
    let (s, fake) = start(128, 64).await?;
    let mut a = submit(&s, "a", 40);
    let first = tokio::time::timeout(Duration::from_secs(20), a.recv()).await?;
    assert!(matches!(first, Some(SeqEvent::Token { .. })), "{first:?}");
    let (end, tokens) = outcome(&mut submit(&s, "b", 20)).await?;
    let SeqEvent::Failed { message } = end else { anyhow::bail!("b: {end:?}") };
    assert_eq!(tokens, 0);
    assert!(message.contains("KV cache full") && message.contains("positions in use of 64"), "{message}");
    assert!(message.contains("Retry"), "{message}");
    // The other sequence goes on to its end, and both are freed.
    let (end, tokens) = outcome(&mut a).await?;
    assert!(matches!(end, SeqEvent::Done { completion_tokens: 40, .. }), "{end:?}");
    assert_eq!(tokens, 39);
    assert_eq!(fake.cache().full, 1);
    all_freed(&fake).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequence_that_cannot_grow_preempts_the_youngest_which_recomputes_and_finishes() -> anyhow::Result<()> {
    // Three blocks. Each sequence needs all three by its end (10 + 150 positions) but is admitted holding one
    // (10 + 32 ahead), so both start; when the older one must grow past two blocks, the younger is preempted,
    // and it recomputes its prompt and tokens when the older one is done.
    let (s, fake) = start_with(192, 192, 32).await?;
    let mut rxs = [submit(&s, "older", 150), submit(&s, "younger", 150)];
    for rx in &mut rxs {
        let (end, tokens) = outcome(rx).await?;
        assert_eq!(end, SeqEvent::Done { finish: Finish::Length, prompt_tokens: 10, completion_tokens: 150 });
        assert_eq!(tokens, 150, "every token once, none lost or repeated by the preemption");
    }
    all_freed(&fake).await?;
    let c = fake.cache();
    assert_eq!(c.peak_seqs, 2, "both ran at once (holding whole limits, one would have waited for the other)");
    assert!(c.restarts >= 1, "a preempted sequence recomputed its cache from position 0");
    assert_eq!(c.full, 0, "no step met a full cache");
    Ok(())
}
