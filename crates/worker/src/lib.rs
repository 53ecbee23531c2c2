//! The worker: one process per device, holding one contiguous slice of the model, serving
//! `pipemoe.worker.v1.Worker` on a Unix socket (or TCP). Steps pass down the chain of workers; the last samples.
//!
//! - `config`: `pipemoe worker`'s flags ([`WorkerArgs`]) and the validated [`WorkerConfig`].
//! - `server`: bind, load in the background, serve, drain; [`start`] (in-process) and [`run`] (the binary).
//! - `service`: the shared state and the four rpcs.
//! - `step`: a step request checked before anything runs, and activations on the wire.
//! - `engine`: the loaded stage and per-sequence samplers (blocking work, under the lock).
//! - `next`: the client to the next worker.
//! - `memory`: how big a GPU worker's KV cache is made, and Health's `memory_bytes` estimate on the CPU.
//! - `device`: what a worker asks of its backend beyond the model's trait (free memory, the cache's budget and use).

pub mod config;
pub mod device;
mod engine;
mod error;
pub mod memory;
mod next;
pub mod server;
mod service;
pub mod step;

pub use config::{Device, Listen, WorkerArgs, WorkerConfig};
pub use error::{Error, Result};
pub use memory::MemoryPlan;
/// The generated protocol, so callers (the controller, tests) need no direct dependency on `pipemoe-proto`.
pub use pipemoe_proto::worker_v1 as proto;
pub use server::{WorkerHandle, init_logging, run, start};
