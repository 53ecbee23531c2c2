//! The controller: owns the recipe database, the worker fleet and the public OpenAI-compatible endpoint.
//! It never links CUDA.
//!
//! - `recipes`: recipes in SQLite (`data/controller.db`, schema in `migrations/`), and the `recipe` CLI.
//! - `pidfile`, `lifecycle`: the PID file under `flock`, and `start` / `stop` / `status`.
//! - `planner`: placement of the model's layers onto devices under memory budgets.
//! - `fleet`: spawning and supervising worker processes; `scheduler`: continuous batching over the pipeline
//!   (`requests`: what it exchanges with the HTTP side; `ring`: the steps' outcomes from the workers' Results
//!   streams);
//!   `admission`: the rule that admits sequences against the KV caches the workers report.
//! - `api`: the HTTP server (OpenAI API, `/health`, `/v1/workers`, the dashboard).
pub mod admission;
pub mod api;
pub mod error;
pub mod fleet;
pub mod lifecycle;
pub mod pidfile;
pub mod planner;
pub mod recipes;
pub mod requests;
pub mod ring;
pub mod scheduler;
pub mod serve;

pub use error::{Error, Result};
