//! The `pipemoe.worker.v1.Worker` service: the worker's shared state and its four rpcs.
//!
//! The engine sits behind a `tokio::sync::Mutex`: a step takes it, runs its blocking part in `spawn_blocking`,
//! and releases it before awaiting the next worker, so several steps (micro-batches over disjoint sequences)
//! move down the chain at once, each worker busy with a different one.
//!
//! A ring step (`StepRequest.ring`, what the controller sends) is answered as soon as this worker has run its
//! part, and passed on by a task of its own; its outcome goes to the controller on a Results stream — the
//! sampled tokens from the last worker, a failure to pass it on from the worker that met it. A nested step
//! (without `ring`) is answered with the whole chain's reply, relayed back up through every worker.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as SyncMutex, OnceLock, PoisonError, RwLock};

use pipemoe_model::ModelConfig;
use pipemoe_proto::worker_v1::worker_server::Worker;
use pipemoe_proto::worker_v1::{
    FreeRequest, FreeResponse, HealthRequest, HealthResponse, LayerRange, ResultsRequest, ShutdownRequest,
    ShutdownResponse, StepRequest, StepResponse, StepResult, WorkerState,
};
use tokio::sync::{Mutex, mpsc, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::WorkerConfig;
use crate::device::{CacheUsage, WorkerBackend};
use crate::engine::{Engine, Output};
use crate::error::{Error, Result};
use crate::next::Next;
use crate::step::{Plan, encode, encode_ipc};

/// A slice that finished loading.
pub struct Loaded<B: WorkerBackend> {
    pub engine: Arc<Mutex<Engine<B>>>,
    pub cfg: ModelConfig,
    /// Bytes of the weights on the device: measured on a GPU, estimated on the CPU (memory.rs).
    pub weight_bytes: u64,
    /// Cache bytes per cached position over this slice's layers (the CPU's estimate).
    pub cache_bytes_per_position: u64,
}

/// Everything the rpcs, the loader and the drain share. The worker's life: LOADING until `loaded` or `failed`
/// is set (READY or FAILED), then DRAINING once `draining` is set, whatever it was.
pub struct Shared<B: WorkerBackend> {
    pub config: WorkerConfig,
    /// What Health says while loading.
    pub loading: String,
    pub loaded: OnceLock<Loaded<B>>,
    /// Why loading failed.
    pub failed: OnceLock<String>,
    draining: AtomicBool,
    /// `true` starts the drain (SIGTERM, SIGINT, Shutdown).
    pub drain: watch::Sender<bool>,
    /// Steps running in this worker now (its own part or awaiting the workers after it).
    pub in_flight: watch::Sender<usize>,
    /// Steps ever begun: the drain waits until this stops moving.
    pub begun: AtomicU64,
    /// Steps this worker has completed (its part of them).
    steps: AtomicU64,
    /// Positions cached over all sequences, counted by steps and frees (for a backend that does not count them).
    cached_positions: AtomicU64,
    /// The KV cache as the last step or free left it: Health reads it without waiting for the engine's lock.
    cache: RwLock<CacheUsage>,
    next: Option<Next>,
    /// The Results stream's sender, while one is open.
    results: SyncMutex<Option<mpsc::UnboundedSender<std::result::Result<StepResult, Status>>>>,
}

impl<B: WorkerBackend> Shared<B> {
    pub fn new(config: WorkerConfig, next: Option<Next>, loading: String) -> Self {
        Self {
            config,
            loading,
            loaded: OnceLock::new(),
            failed: OnceLock::new(),
            draining: AtomicBool::new(false),
            drain: watch::Sender::new(false),
            in_flight: watch::Sender::new(0),
            begun: AtomicU64::new(0),
            steps: AtomicU64::new(0),
            cached_positions: AtomicU64::new(0),
            cache: RwLock::new(CacheUsage::default()),
            next,
            results: SyncMutex::new(None),
        }
    }

    /// A new Results stream: the one open before ends.
    fn open_results(&self) -> ResultStream {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.results.lock().unwrap_or_else(PoisonError::into_inner) = Some(tx);
        UnboundedReceiverStream::new(rx)
    }

    /// Ends the Results stream (the drain is over: the server stops only once every response has ended).
    pub fn close_results(&self) {
        self.results.lock().unwrap_or_else(PoisonError::into_inner).take();
    }

    fn has_results(&self) -> bool {
        self.results.lock().unwrap_or_else(PoisonError::into_inner).as_ref().is_some_and(|tx| !tx.is_closed())
    }

    /// Sends a ring step's outcome on the Results stream.
    fn report(&self, step_id: u64, outcome: std::result::Result<StepResponse, Status>) -> Result<()> {
        let r = match outcome {
            Ok(response) => StepResult { step_id, response: Some(response), code: 0, message: String::new() },
            Err(s) => StepResult { step_id, response: None, code: s.code() as i32, message: s.message().to_string() },
        };
        let results = self.results.lock().unwrap_or_else(PoisonError::into_inner);
        match results.as_ref().map(|tx| tx.send(Ok(r))) {
            Some(Ok(())) => Ok(()),
            _ => Err(Error::NoResults { rank: self.config.rank, step_id }),
        }
    }

    /// Records the cache's size and use for Health.
    pub fn publish_cache(&self, usage: CacheUsage) {
        *self.cache.write().unwrap_or_else(PoisonError::into_inner) = usage;
    }

    fn cache(&self) -> CacheUsage {
        *self.cache.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Refuse new steps from now on; the server stops once those in flight are done.
    pub fn start_drain(&self) {
        if !self.draining.swap(true, Ordering::SeqCst) {
            info!(rank = self.config.rank, "draining: finishing in-flight steps");
        }
        self.drain.send_replace(true);
    }

    fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    fn ready(&self) -> Result<&Loaded<B>> {
        let rank = self.config.rank;
        if let Some(l) = self.loaded.get() {
            return Ok(l);
        }
        Err(match self.failed.get() {
            Some(why) => Error::NotReady { rank, state: "FAILED", message: why.clone() },
            None => Error::NotReady { rank, state: "LOADING", message: self.loading.clone() },
        })
    }

    /// Counts a step in flight until the guard drops (a ring step's guard goes with it to the task passing it
    /// on, so the drain waits for that too).
    fn begin_step(self: &Arc<Self>) -> InFlight<B> {
        self.begun.fetch_add(1, Ordering::SeqCst);
        self.in_flight.send_modify(|n| *n += 1);
        InFlight(self.clone())
    }
}

type ResultStream = UnboundedReceiverStream<std::result::Result<StepResult, Status>>;

struct InFlight<B: WorkerBackend>(Arc<Shared<B>>);

impl<B: WorkerBackend> Drop for InFlight<B> {
    fn drop(&mut self) {
        self.0.in_flight.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// The tonic service over the shared state.
pub struct WorkerService<B: WorkerBackend> {
    pub shared: Arc<Shared<B>>,
}

impl<B: WorkerBackend + 'static> WorkerService<B> {
    async fn run_step(&self, mut req: StepRequest) -> std::result::Result<StepResponse, Status> {
        let s = &self.shared;
        let rank = s.config.rank;
        // Steps from the previous worker belong to chain steps already in flight: finish them while draining.
        if s.is_draining() && req.hidden.is_none() {
            return Err(Error::Draining { rank }.into());
        }
        let loaded = s.ready()?;
        let (step_id, ring) = (req.step_id, req.ring);
        // Refused before it runs: its outcome could not be told.
        if ring && !s.has_results() {
            return Err(Error::NoResults { rank, step_id }.into());
        }
        let in_flight = s.begin_step();
        let plan = Plan::new(&req, &loaded.cfg, &s.config.slice)?;
        let rows = plan.rows.len();
        let started = std::time::Instant::now();
        let mut engine = loaded.engine.clone().lock_owned().await;
        let waited = started.elapsed();
        let counters = s.clone();
        // Counted inside: a step whose caller went away still runs to the end and its rows stay cached.
        let ((out, landed), began) = tokio::task::spawn_blocking(move || {
            // When the blocking thread picked the step up: the hand-off's own cost shows in the debug line.
            let began = started.elapsed();
            let out = engine.step(plan);
            counters.publish_cache(engine.cache_usage());
            let out = out.map_err(|e| e.on_rank(rank))?;
            counters.steps.fetch_add(1, Ordering::Relaxed);
            counters.cached_positions.fetch_add(rows as u64, Ordering::Relaxed);
            Ok::<_, Error>((out, began))
        })
        .await
        .map_err(|e| Error::Task { reason: format!("step {step_id}: {e}") })??;
        debug!(
            step_id,
            rows,
            chunks = req.chunks.len(),
            ?waited,
            handoff = ?began.saturating_sub(waited),
            took = ?started.elapsed() - began,
            "ran this stage"
        );
        let keep = match out {
            Output::Sampled(sampled) => {
                let response = StepResponse { sampled };
                if ring {
                    s.report(step_id, Ok(response.clone()))?;
                }
                return Ok(response);
            }
            Output::Hidden { rows, cols, data } => {
                req.hidden = Some(encode(rows, cols, &data));
                None
            }
            Output::Shared { rows, cols, shared } => {
                req.hidden = Some(encode_ipc(rows, cols, &shared.mem_handle, &shared.event_handle));
                Some(shared)
            }
        };
        let Some(next) = s.next.clone() else {
            return Err(Error::Task { reason: format!("step {step_id}: a non-head worker without --next") }.into());
        };
        // `keep` holds the exported buffer (IPC) until the next worker has answered — a ring step's once its copy
        // of the buffer has run (`landed`, below), a nested step's once the whole chain has (the last worker
        // synchronizes a stream that waited on every copy before it: ipc.rs).
        let pass_on = async move {
            let reply = next.step(req).await;
            drop(keep);
            reply.inspect_err(|status| debug!(step_id, next = next.addr(), %status, "the next worker refused the step"))
        };
        if !ring {
            return pass_on.await;
        }
        let shared = s.clone();
        let forward = async move {
            let _in_flight = in_flight;
            if let Err(status) = pass_on.await
                && let Err(e) = shared.report(step_id, Err(status))
            {
                warn!(step_id, error = %e, "a ring step failed past this worker and its outcome could not be sent");
            }
        };
        tokio::spawn(forward.in_current_span());
        // This worker's device may not have copied the previous worker's buffer in yet: the answer waits for it
        // (after the step has been passed on, so the next worker is not held back).
        if let Some(landed) = landed {
            tokio::task::spawn_blocking(move || landed.wait())
                .await
                .map_err(|e| Error::Task { reason: format!("step {step_id}: {e}") })?
                .map_err(|source| Error::Model { step_id, source }.on_rank(rank))?;
        }
        Ok(StepResponse::default())
    }
}

#[tonic::async_trait]
impl<B: WorkerBackend + 'static> Worker for WorkerService<B> {
    async fn health(&self, _: Request<HealthRequest>) -> std::result::Result<Response<HealthResponse>, Status> {
        let s = &self.shared;
        let c = &s.config;
        let (state, message) = match (s.is_draining(), s.loaded.get(), s.failed.get()) {
            (true, _, _) => {
                let n = *s.in_flight.borrow();
                (WorkerState::Draining, format!("finishing {n} in-flight step(s)"))
            }
            (false, Some(_), _) => (WorkerState::Ready, String::new()),
            (false, None, Some(why)) => (WorkerState::Failed, why.clone()),
            (false, None, None) => (WorkerState::Loading, s.loading.clone()),
        };
        let cache = s.cache();
        let counted = s.cached_positions.load(Ordering::Relaxed);
        let used = cache.used.map_or(counted, |u| u as u64);
        // A device cache knows its bytes; the CPU's is estimated from the positions cached.
        let memory_bytes = s.loaded.get().map_or(0, |l| {
            l.weight_bytes
                + if cache.allocated_bytes > 0 { cache.allocated_bytes } else { used * l.cache_bytes_per_position }
        });
        let range = |r: &std::ops::Range<usize>| LayerRange { start: r.start as u32, end: r.end as u32 };
        Ok(Response::new(HealthResponse {
            rank: c.rank,
            device: c.device_name(),
            state: state as i32,
            layers: Some(range(&c.slice.layers)),
            embed: c.slice.embed,
            head: c.slice.head,
            pid: std::process::id(),
            memory_bytes,
            message,
            steps: s.steps.load(Ordering::Relaxed),
            experts: c.slice.experts.as_ref().map(range),
            kv_capacity_positions: cache.capacity.map(|n| n as u64),
            kv_used_positions: used,
            kv_reserved_positions: cache.reserved.map_or(used, |r| r as u64),
            kv_block_positions: cache.block as u32,
        }))
    }

    async fn step(&self, request: Request<StepRequest>) -> std::result::Result<Response<StepResponse>, Status> {
        let req = request.into_inner();
        let span = info_span!("step", step_id = req.step_id, rank = self.shared.config.rank);
        let step_id = req.step_id;
        let result = self.run_step(req).instrument(span).await;
        if let Err(status) = &result {
            warn!(step_id, rank = self.shared.config.rank, code = ?status.code(), message = status.message(), "step failed");
        }
        result.map(Response::new)
    }

    async fn free(&self, request: Request<FreeRequest>) -> std::result::Result<Response<FreeResponse>, Status> {
        // In a task of its own: a caller that stops waiting (its timeout, a dropped connection) cancels this
        // handler, and a free cancelled while it waits for the engine or for the next worker would leave the
        // sequences cached here or further down the chain for good, while the controller counts their room free.
        let shared = self.shared.clone();
        tokio::spawn(free_chain(shared, request.into_inner()))
            .await
            .map_err(|e| Status::from(Error::Task { reason: format!("free: {e}") }))?
            .map(Response::new)
    }

    type ResultsStream = ResultStream;

    async fn results(&self, _: Request<ResultsRequest>) -> std::result::Result<Response<ResultStream>, Status> {
        debug!(rank = self.shared.config.rank, "Results stream opened");
        Ok(Response::new(self.shared.open_results()))
    }

    async fn shutdown(&self, _: Request<ShutdownRequest>) -> std::result::Result<Response<ShutdownResponse>, Status> {
        info!(rank = self.shared.config.rank, "Shutdown rpc");
        self.shared.start_drain();
        Ok(Response::new(ShutdownResponse {}))
    }
}

/// Frees `req`'s sequences here, then on every worker after this one.
async fn free_chain<B: WorkerBackend + 'static>(
    s: Arc<Shared<B>>,
    req: FreeRequest,
) -> std::result::Result<FreeResponse, Status> {
    if let Some(loaded) = s.loaded.get() {
        let mut engine = loaded.engine.clone().lock_owned().await;
        let seqs = req.seqs.clone();
        let shared = s.clone();
        let freed = tokio::task::spawn_blocking(move || {
            let freed = engine.free(&seqs);
            shared.publish_cache(engine.cache_usage());
            freed
        })
        .await
        .map_err(|e| Status::from(Error::Task { reason: format!("free: {e}") }))?;
        let _ = s
            .cached_positions
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n.saturating_sub(freed as u64)));
        debug!(seqs = ?req.seqs, freed, "freed");
    }
    if let Some(next) = &s.next {
        next.free(req).await?;
    }
    Ok(FreeResponse {})
}
