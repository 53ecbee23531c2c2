//! Continuous batching over the worker pipeline (ARCHITECTURE.md "Pipeline"). One task owns every sequence and
//! the fleet; the HTTP handlers talk to it over channels. Each step carries prefill chunks and decode tokens of
//! many sequences; up to one step per worker is in flight, over disjoint sequences, so every worker has work
//! when there are enough streams. Token text, stop strings and finish reasons are settled here, once.
//! Sequences enter only while the workers' KV caches have room for what they cache next (admission.rs); the rest
//! wait in order. A sequence's hold grows as it generates; when it cannot, the youngest admitted sequence is
//! preempted — freed on the workers and queued first, to recompute its cache (prompt and tokens so far) when
//! there is room again (scheduler_growth.rs).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, RwLock};

use pipemoe_model::tokenizer::{StopMatcher, StreamDecoder, Tokenizer};
use pipemoe_proto::worker_v1::{SeqChunk, StepRequest, StepResponse};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tonic::{Code, Status};

use crate::admission::CacheBudget;
use crate::fleet::{Fleet, FleetEvent, FleetSpec};
pub use crate::requests::{CacheStatus, Finish, FleetState, GenRequest, SchedulerConfig, SeqEvent, Shared};
pub use pipemoe_proto::worker_v1::Sampling;

enum Msg {
    Submit(GenRequest),
    Drain(oneshot::Sender<()>),
}

/// The handle the HTTP handlers hold.
#[derive(Clone)]
pub struct Scheduler {
    tx: mpsc::UnboundedSender<Msg>,
    pub shared: Arc<Shared>,
}

/// A sequence's life (it ends by leaving `Core::seqs`, reporting `Done` or `Failed`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for room in the KV caches; nothing of it is on the workers.
    Queued,
    /// Positions `[0, done)` of its context (the prompt; after a preemption, with the tokens generated before
    /// the last) are cached; the rest still to prefill.
    Prefilling { done: usize },
    /// The prompt is cached and tokens are being generated.
    Decoding,
}

struct Seq {
    req: GenRequest,
    /// Positions it may fill at most: prompt + max_tokens, within max_model_len.
    limit: usize,
    /// Positions admission holds for it now (0 while queued).
    held: usize,
    /// When it was last admitted: the youngest is preempted first.
    admitted: u64,
    phase: Phase,
    generated: Vec<u32>,
    decoder: StreamDecoder,
    stops: StopMatcher,
    in_flight: bool,
}

impl Scheduler {
    pub fn submit(&self, req: GenRequest) {
        let events = req.events.clone();
        if self.tx.send(Msg::Submit(req)).is_err() {
            let _ = events.send(SeqEvent::Failed { message: "the scheduler has stopped".into() });
        }
    }

    /// Stops admitting work and resolves when every admitted sequence has finished.
    pub async fn drain(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Drain(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Starts the scheduler task over a running fleet.
    pub fn spawn(
        cfg: SchedulerConfig,
        tokenizer: Arc<Tokenizer>,
        fleet: Fleet,
        spec: FleetSpec,
        events: mpsc::UnboundedReceiver<FleetEvent>,
        events_tx: mpsc::UnboundedSender<FleetEvent>,
    ) -> (Scheduler, tokio::task::JoinHandle<Option<Fleet>>) {
        let budget = CacheBudget::new(fleet.cache_limits());
        let shared = Arc::new(Shared {
            state: RwLock::new(FleetState::Ready),
            workers: RwLock::new(fleet.views()),
            cache: RwLock::new(CacheStatus::default()),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let core = Core {
            cfg,
            tokenizer,
            fleet: Some(fleet),
            spec,
            shared: shared.clone(),
            seqs: HashMap::new(),
            queue: VecDeque::new(),
            next_seq: 1,
            steps: JoinSet::new(),
            next_step: 1,
            drain: None,
            events_tx,
            budget,
            frees: JoinSet::new(),
            admissions: 0,
            starving: false,
        };
        core.warn_if_short();
        core.publish_cache();
        let handle = tokio::spawn(core.run(rx, events));
        (Scheduler { tx, shared }, handle)
    }
}

/// The sequences of a step, each with the prompt position its chunk ends at (prefill) or `None` (decode).
type StepSeqs = Vec<(u64, Option<usize>)>;
type StepResult = (StepSeqs, Result<StepResponse, StepError>);

/// Why a step failed.
#[derive(Debug)]
struct StepError {
    /// A worker's KV cache had no room for the step (RESOURCE_EXHAUSTED).
    cache_full: bool,
    message: String,
}

struct Core {
    cfg: SchedulerConfig,
    tokenizer: Arc<Tokenizer>,
    fleet: Option<Fleet>,
    spec: FleetSpec,
    shared: Arc<Shared>,
    seqs: HashMap<u64, Seq>,
    /// Admission order, for fairness when forming steps.
    queue: VecDeque<u64>,
    next_seq: u64,
    steps: JoinSet<StepResult>,
    next_step: u64,
    drain: Option<oneshot::Sender<()>>,
    events_tx: mpsc::UnboundedSender<FleetEvent>,
    /// Room held in the workers' KV caches by admitted sequences, and by ended ones until Free returns.
    budget: CacheBudget,
    /// Free rpcs under way: each yields its fleet generation and the positions to give back.
    frees: JoinSet<(u64, usize)>,
    /// Admissions so far (each sequence's `admitted` is this count at its admission).
    admissions: u64,
    /// A decoding sequence could not grow its hold this round (`grow_holds`, before admission): admit nothing
    /// until it has (a preempted sequence readmitted at once would take the room back).
    starving: bool,
}

impl Core {
    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Msg>,
        mut fleet_events: mpsc::UnboundedReceiver<FleetEvent>,
    ) -> Option<Fleet> {
        let (restarted_tx, mut restarted_rx) = mpsc::unbounded_channel::<Result<Fleet, String>>();
        loop {
            // Holds grow (or a sequence is preempted) before anything new is admitted into the room.
            let starved = self.grow_holds();
            self.admit_waiting();
            self.schedule(&starved);
            self.publish_cache();
            if self.drain.is_some() && self.seqs.is_empty() {
                if let Some(d) = self.drain.take() {
                    let _ = d.send(());
                }
                return self.fleet.take();
            }
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(Msg::Submit(req)) => self.admit(req),
                    Some(Msg::Drain(done)) => {
                        *write(&self.shared.state) = FleetState::Draining;
                        self.drain = Some(done);
                    }
                    None => return self.fleet.take(),
                },
                Some(done) = self.steps.join_next(), if !self.steps.is_empty() => match done {
                    Ok((ids, result)) => self.finish_step(ids, result),
                    Err(e) if e.is_cancelled() => {}
                    Err(e) => tracing::error!("step task panicked: {e}"),
                },
                Some(freed) = self.frees.join_next(), if !self.frees.is_empty() => match freed {
                    Ok((generation, positions)) if generation == self.spec.generation => self.budget.release(positions),
                    Ok(_) => {}
                    Err(e) => tracing::error!("free task failed: {e}"),
                },
                Some(ev) = fleet_events.recv() => self.on_fleet_event(ev, &restarted_tx),
                Some(r) = restarted_rx.recv() => match r {
                    Ok(f) => {
                        *write(&self.shared.workers) = f.views();
                        // Every sequence of the old fleet ended with it: nothing is held.
                        self.budget = CacheBudget::new(f.cache_limits());
                        self.fleet = Some(f);
                        self.warn_if_short();
                        *write(&self.shared.state) = FleetState::Ready;
                        tracing::info!("fleet restarted");
                    }
                    Err(reason) => {
                        tracing::error!(%reason, "fleet restart failed");
                        *write(&self.shared.state) = FleetState::Failed { reason };
                    }
                },
            }
        }
    }

    fn admit(&mut self, req: GenRequest) {
        let refuse = |req: &GenRequest, message: String| {
            let _ = req.events.send(SeqEvent::Failed { message });
        };
        let state = read(&self.shared.state).clone();
        if state != FleetState::Ready || self.fleet.is_none() {
            return refuse(&req, format!("the worker fleet is not ready ({state:?})"));
        }
        if req.prompt.is_empty() || req.prompt.len() >= self.cfg.max_model_len {
            return refuse(
                &req,
                format!("prompt of {} tokens does not fit max_model_len {}", req.prompt.len(), self.cfg.max_model_len),
            );
        }
        let limit = (req.prompt.len() + req.max_tokens).min(self.cfg.max_model_len);
        if let Err(too_large) = self.budget.limits().check(limit) {
            tracing::info!(request = %req.request_id, %too_large, "refused");
            let _ = req.events.send(SeqEvent::Refused(too_large));
            return;
        }
        let id = self.next_seq;
        self.next_seq += 1;
        tracing::debug!(request = %req.request_id, seq = id, prompt_tokens = req.prompt.len(), limit, "queued");
        let stops = StopMatcher::new(req.stop.iter().cloned());
        self.seqs.insert(
            id,
            Seq {
                req,
                limit,
                held: 0,
                admitted: 0,
                phase: Phase::Queued,
                generated: Vec::new(),
                decoder: StreamDecoder::new(true),
                stops,
                in_flight: false,
            },
        );
        self.queue.push_back(id);
    }

    /// Admits waiting sequences in arrival order while the caches have room for them; one that does not fit
    /// stops the rest (first come, first served). A waiting sequence whose client left is dropped.
    fn admit_waiting(&mut self) {
        if self.fleet.is_none() || self.starving {
            return;
        }
        let waiting: Vec<u64> = self
            .queue
            .iter()
            .copied()
            .filter(|id| self.seqs.get(id).is_some_and(|s| s.phase == Phase::Queued))
            .collect();
        for id in waiting {
            let Some(s) = self.seqs.get(&id) else { continue };
            if s.req.events.is_closed() {
                tracing::debug!(request = %s.req.request_id, "client gone while queued");
                self.end(id, Ok(Finish::Stop));
                continue;
            }
            let want = s.want(self.cfg.reserve_ahead);
            if !self.budget.try_reserve(want) {
                tracing::debug!(request = %s.req.request_id, positions = want, "waiting for KV cache room");
                return;
            }
            tracing::debug!(request = %s.req.request_id, seq = id, positions = want, "admitted");
            self.admissions += 1;
            if let Some(s) = self.seqs.get_mut(&id) {
                s.phase = Phase::Prefilling { done: 0 };
                s.held = want;
                s.admitted = self.admissions;
            }
        }
    }

    /// Forms steps from idle sequences while fewer than `max_inflight` are out.
    fn schedule(&mut self, starved: &HashSet<u64>) {
        let Some(head) = self.fleet.as_ref().and_then(Fleet::head).map(|w| w.client.clone()) else { return };
        while self.steps.len() < self.cfg.max_inflight {
            let idle: Vec<u64> = self
                .queue
                .iter()
                .copied()
                .filter(|id| !starved.contains(id))
                .filter(|id| self.seqs.get(id).is_some_and(|s| !s.in_flight && s.phase != Phase::Queued))
                .collect();
            if idle.is_empty() {
                return;
            }
            // Spread the running sequences over the in-flight slots so every worker has a micro-batch.
            let running = self.seqs.values().filter(|s| s.phase != Phase::Queued).count();
            let per_step = running.div_ceil(self.cfg.max_inflight).max(1);
            let mut chunks = Vec::new();
            let mut ids = Vec::new();
            let mut budget = self.cfg.max_step_tokens;
            for id in idle {
                if ids.len() >= per_step || budget == 0 {
                    break;
                }
                let Some(s) = self.seqs.get_mut(&id) else { continue };
                let (chunk, end) = match s.phase {
                    Phase::Queued => continue,
                    Phase::Prefilling { done } => {
                        let context = s.context_len();
                        let end = (done + budget).min(context);
                        budget -= end - done;
                        let tokens = s.context(done, end);
                        // A recomputed context's next token is known (its last generated one): nothing to sample.
                        let sampling = (end == context && s.generated.is_empty()).then_some(s.req.sampling);
                        let generated = s.generated.len() as u32;
                        (SeqChunk { seq: id, start: done as u32, tokens, sampling, generated }, Some(end))
                    }
                    Phase::Decoding => {
                        budget = budget.saturating_sub(1);
                        let pos = s.req.prompt.len() + s.generated.len() - 1;
                        let tokens = vec![s.generated.last().copied().unwrap_or(0)];
                        let (sampling, generated) = (Some(s.req.sampling), s.generated.len() as u32);
                        (SeqChunk { seq: id, start: pos as u32, tokens, sampling, generated }, None)
                    }
                };
                s.in_flight = true;
                ids.push((id, end));
                chunks.push(chunk);
            }
            if ids.is_empty() {
                return;
            }
            let step_id = self.next_step;
            self.next_step += 1;
            let mut client = head.clone();
            // A ring step's outcome comes on the workers' Results streams (ring.rs): registered before it is sent.
            // Without a ring (or with one whose stream broke, while its workers live on) the step is nested: the
            // reply relayed back up the chain carries the tokens.
            let ring = self.fleet.as_ref().and_then(|f| f.ring.clone());
            let outcome = ring.as_ref().and_then(|r| r.expect(step_id));
            let req = StepRequest { step_id, chunks, hidden: None, ring: outcome.is_some() };
            let limit = self.cfg.step_timeout;
            self.steps.spawn(async move {
                let call = async {
                    let reply = client.step(req).await?.into_inner();
                    match outcome {
                        Some(rx) => rx.await.unwrap_or_else(|_| Err(Status::unavailable("the ring stopped"))),
                        None => Ok(reply),
                    }
                };
                let r = match tokio::time::timeout(limit, call).await {
                    Ok(r) => r.map_err(|s| StepError {
                        cache_full: s.code() == Code::ResourceExhausted,
                        message: s.message().to_string(),
                    }),
                    Err(_) => Err(StepError {
                        cache_full: false,
                        message: format!("step {step_id} took longer than {} s", limit.as_secs()),
                    }),
                };
                if let (Err(_), Some(ring)) = (&r, &ring) {
                    ring.forget(step_id); // refused by worker 0, or timed out
                }
                (ids, r)
            });
        }
    }

    fn finish_step(&mut self, ids: StepSeqs, result: Result<StepResponse, StepError>) {
        let resp = match result {
            Ok(r) => r,
            Err(e) => {
                // The workers before the one that failed cached the step: its sequences cannot go on, and
                // ending them frees them everywhere. Sequences of other steps continue.
                let message = if e.cache_full {
                    tracing::warn!(message = %e.message, seqs = ids.len(), "a KV cache was full; failing the step's sequences");
                    format!("The KV cache is full ({}). Retry the request.", e.message)
                } else {
                    tracing::error!(message = %e.message, "step failed");
                    format!("the pipeline failed: {}", e.message)
                };
                for (id, _) in ids {
                    self.end(id, Err(message.clone()));
                }
                return;
            }
        };
        let mut sampled: HashMap<u64, _> = resp.sampled.into_iter().map(|s| (s.seq, s)).collect();
        for (id, chunk_end) in ids {
            let Some(s) = self.seqs.get_mut(&id) else { continue };
            s.in_flight = false;
            if let Some(end) = chunk_end {
                if end < s.context_len() {
                    s.phase = Phase::Prefilling { done: end };
                    continue;
                }
                s.phase = Phase::Decoding;
                if !s.generated.is_empty() {
                    continue; // a preempted sequence's context is cached again; it decodes from its last token
                }
            }
            let Some(tok) = sampled.remove(&id) else {
                self.end(id, Err("the pipeline returned no token".into()));
                continue;
            };
            let top = tok.top.iter().map(|t| (t.token, t.logprob)).collect();
            if let Some(finish) = self.accept(id, tok.token, tok.logprob, top) {
                self.end(id, Ok(finish));
            }
        }
    }

    /// Records a sampled token and sends its text; `Some` when the sequence is finished.
    fn accept(&mut self, id: u64, token: u32, logprob: Option<f32>, top: Vec<(u32, f32)>) -> Option<Finish> {
        let max_len = self.cfg.max_model_len;
        let tok = self.tokenizer.clone();
        let s = self.seqs.get_mut(&id)?;
        s.generated.push(token);
        let eos = tok.is_eos(token) && !s.req.ignore_eos;
        let piece = if eos {
            s.decoder.flush(&tok).unwrap_or_default()
        } else {
            s.decoder.push(&tok, token).unwrap_or_default()
        };
        let chunk = s.stops.push(&piece);
        let mut text = chunk.text;
        let mut finish = if chunk.stop.is_some() || eos { Some(Finish::Stop) } else { None };
        if finish.is_none()
            && (s.generated.len() >= s.req.max_tokens || s.req.prompt.len() + s.generated.len() >= max_len)
        {
            text.push_str(&s.stops.push(&s.decoder.flush(&tok).unwrap_or_default()).text);
            finish = Some(Finish::Length);
        }
        if finish.is_some() && chunk.stop.is_none() {
            text.push_str(&s.stops.finish());
        }
        let sent = s.req.events.send(SeqEvent::Token { token, text, logprob, top });
        if sent.is_err() {
            // The client went away: stop spending the pipeline on it.
            tracing::debug!(request = %s.req.request_id, "client gone, cancelling");
            return Some(Finish::Stop);
        }
        finish
    }

    /// Removes a sequence, reports how it ended, and frees it on the workers.
    fn end(&mut self, id: u64, how: Result<Finish, String>) {
        let Some(s) = self.seqs.remove(&id) else { return };
        self.queue.retain(|&q| q != id);
        let ev = match how {
            Ok(finish) => {
                SeqEvent::Done { finish, prompt_tokens: s.req.prompt.len(), completion_tokens: s.generated.len() }
            }
            Err(message) => SeqEvent::Failed { message },
        };
        let _ = s.req.events.send(ev);
        if s.phase == Phase::Queued {
            return;
        }
        self.free_on_workers(id, s.held);
    }

    /// Publishes admission's view for the API and `/metrics`.
    fn publish_cache(&self) {
        let status = CacheStatus {
            limits: self.budget.limits().clone(),
            tightest: self.budget.tightest(),
            queued: self.seqs.values().filter(|s| s.phase == Phase::Queued).count(),
        };
        *write(&self.shared.cache) = status;
    }

    /// A cache smaller than one full context refuses the longest requests: said once, at start.
    fn warn_if_short(&self) {
        if let Some(capacity) = self.budget.limits().capacity()
            && capacity < self.cfg.max_model_len
        {
            tracing::warn!(
                capacity,
                max_model_len = self.cfg.max_model_len,
                "the KV cache holds fewer positions than max_model_len: longer requests will be refused"
            );
        }
    }

    fn on_fleet_event(&mut self, ev: FleetEvent, restarted: &mpsc::UnboundedSender<Result<Fleet, String>>) {
        let FleetEvent::Exited { generation, rank, pid, status } = ev;
        if generation != self.spec.generation || self.fleet.is_none() {
            return;
        }
        let reason = format!("worker {rank} (pid {pid}) exited: {status}");
        tracing::error!(%reason, "failing every in-flight request and restarting the fleet");
        *write(&self.shared.state) = FleetState::Restarting { reason: reason.clone() };
        // The other workers go too: their caches are useless without the dead one.
        let old = self.fleet.take();
        self.steps.abort_all();
        let ids: Vec<u64> = self.seqs.keys().copied().collect();
        for id in ids {
            self.end(id, Err(reason.clone()));
        }
        self.spec.generation += 1;
        let spec = self.spec.clone();
        let events = self.events_tx.clone();
        let restarted = restarted.clone();
        tokio::spawn(async move {
            if let Some(old) = old {
                old.kill().await;
            }
            let r = Fleet::start(&spec, events).await.map_err(|e| e.to_string());
            let _ = restarted.send(r);
        });
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[path = "scheduler_growth.rs"]
mod growth;
#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
