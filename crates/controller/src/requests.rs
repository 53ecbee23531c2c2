//! What the scheduler and the HTTP side exchange: a generation request, the events of its sequence, the fleet's
//! state and admission's view of the KV caches, and the scheduler's settings.

use std::sync::RwLock;
use std::time::Duration;

use pipemoe_proto::worker_v1::Sampling;
use tokio::sync::mpsc;

use crate::admission::{CacheLimits, TooLarge};

/// One generation: a prompt, how to continue it, and where its events go.
pub struct GenRequest {
    /// For logs: every line about this sequence carries it.
    pub request_id: String,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: Sampling,
    pub stop: Vec<String>,
    /// Keep generating past EOS until `max_tokens` (benchmarks; vLLM's extension of the same name).
    pub ignore_eos: bool,
    pub events: mpsc::UnboundedSender<SeqEvent>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// EOS or a stop string.
    Stop,
    /// max_tokens or the context limit.
    Length,
}

/// What a sequence reports, in order: tokens, then exactly one `Done`, `Failed` or `Refused`.
#[derive(Debug, Clone, PartialEq)]
pub enum SeqEvent {
    /// `text` is what this token completes, after stop strings (may be empty).
    Token {
        token: u32,
        text: String,
        logprob: Option<f32>,
        top: Vec<(u32, f32)>,
    },
    Done {
        finish: Finish,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed {
        message: String,
    },
    /// Refused before it ran: no worker's KV cache can hold it even alone (the client's to change).
    Refused(TooLarge),
}

/// Whether the fleet can take work, for `/health` and the dashboard.
#[derive(Clone, Debug, PartialEq)]
pub enum FleetState {
    Ready,
    /// A worker died; the fleet is being restarted.
    Restarting {
        reason: String,
    },
    /// The restart failed; requests get 503 until the controller is restarted.
    Failed {
        reason: String,
    },
    /// `stop` was asked for: finishing in-flight requests, accepting none.
    Draining,
}

/// What the HTTP side sees of the fleet.
pub struct Shared {
    pub state: RwLock<FleetState>,
    pub workers: RwLock<Vec<crate::fleet::WorkerView>>,
    /// The KV cache as admission sees it.
    pub cache: RwLock<CacheStatus>,
}

/// Admission's view of the KV caches, for the API's early check and `/metrics`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CacheStatus {
    pub limits: CacheLimits,
    /// `(capacity, held)` positions of the worker with the least room; `None` when no cache is bounded.
    pub tightest: Option<(usize, usize)>,
    /// Sequences waiting for room.
    pub queued: usize,
}

#[derive(Clone, Copy, Debug)]
pub struct SchedulerConfig {
    pub max_model_len: usize,
    /// Steps in flight at once (one per worker keeps the pipeline full).
    pub max_inflight: usize,
    /// Prompt tokens per step, across sequences (prefill is chunked to this).
    pub max_step_tokens: usize,
    /// A step that takes longer fails its sequences (a hung worker must not hang requests).
    pub step_timeout: Duration,
    /// Positions a sequence holds in the KV caches beyond what it has cached (its hold grows by this much when
    /// it reaches the end of it; never beyond prompt + max_tokens): requests without max_tokens do not hold a
    /// whole context each from the start.
    pub reserve_ahead: usize,
}
