//! DeepSeek V3 / V3.2 model description and checkpoint access.
//!
//! - `config`: config.json (MODEL_SPEC §1.1), checked field by field.
//! - `checkpoint`: memory-mapped sharded safetensors (index or single file).
//! - `validate`: every module of every layer present with the right dtype and shape, quantized or not (§3).
//! - `synthetic`: tiny zero-filled checkpoints for tests in this and other crates.
//!
//! The forward pass, KV cache and CPU backend come with later issues.

pub mod checkpoint;
pub mod config;
mod error;
pub mod synthetic;
pub mod validate;

pub use checkpoint::{Checkpoint, TensorMeta};
pub use config::{Architecture, IndexerConfig, ModelConfig, Rope, Yarn};
pub use error::{Error, Result};
pub use validate::{LinearFormat, LinearStats, ModelSummary, Report, check, validate};
