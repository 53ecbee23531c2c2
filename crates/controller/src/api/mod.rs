//! The HTTP server: the OpenAI-compatible API (`/v1/models`, `/v1/chat/completions`, `/v1/completions`),
//! `/health`, `/v1/workers`, `/metrics` and the dashboard at `/`.
//!
//! - `error`: the one `ApiError`; `types`: request bodies and their validation.
//! - `generate`: the two generation endpoints, streaming and not; `status`: health, workers, dashboard.

pub mod error;
mod generate;
mod status;
pub mod types;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use pipemoe_model::chat::ChatFormat;
use pipemoe_model::tokenizer::Tokenizer;

use crate::scheduler::Scheduler;

/// Largest request body accepted (a 64K-token prompt is well under 1 MiB of text).
pub const MAX_BODY_BYTES: usize = 8 << 20;

/// Counters for `/metrics`, described once in `status`.
#[derive(Default)]
pub struct Metrics {
    pub requests: AtomicU64,
    pub request_errors: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
}

pub struct AppState {
    pub scheduler: Scheduler,
    pub tokenizer: Arc<Tokenizer>,
    pub chat: ChatFormat,
    /// The name clients use in `model`.
    pub model_name: String,
    pub max_model_len: usize,
    /// Token id that ends DeepSeek's reasoning (`</think>`), when the tokenizer has it.
    pub end_think: Option<u32>,
    pub recipe_id: String,
    pub started: std::time::SystemTime,
    pub metrics: Metrics,
    pub next_id: AtomicU64,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(status::dashboard))
        .route("/health", get(status::health))
        .route("/metrics", get(status::metrics))
        .route("/v1/workers", get(status::workers))
        .route("/v1/models", get(status::models))
        .route("/v1/chat/completions", post(generate::chat))
        .route("/v1/completions", post(generate::completions))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}
