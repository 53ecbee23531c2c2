//! DeepSeek V3 / V3.2 model description and checkpoint access.
//!
//! - `config`: config.json (MODEL_SPEC §1.1), checked field by field.
//! - `checkpoint`: memory-mapped sharded safetensors (index or single file).
//! - `validate`: every module of every layer present with the right dtype and shape, quantized or not (§3).
//! - `synthetic`: tiny zero-filled checkpoints for tests in this and other crates.
//! - `random_checkpoint`: random-weight checkpoints at any dims (the real model's, for benchmarks), sliced by layer;
//!   `footprint`: a checkpoint's bytes by what reads them, and a decode step's bytes (bandwidth floors).
//!
//! - `backend`: the fused operations the forward pass is written against; `cpu`: the f32 reference backend.
//! - `rope`, `mla`, `indexer`, `moe`, `layer`: DeepSeek's blocks, each with `load` and `forward`.
//! - `weights`: reading one slice of the checkpoint; `stage`: a slice that runs (the whole model is one stage).

pub mod backend;
pub mod chat;
pub mod chat_template;
pub mod checkpoint;
pub mod config;
pub mod cpu;
pub mod device;
mod error;
pub mod footprint;
pub mod generate;
mod host_linear;
pub mod indexer;
pub mod layer;
pub mod mla;
pub mod moe;
pub mod random_checkpoint;
pub mod rope;
pub mod routing;
pub mod sampling;
pub mod stage;
pub mod synthetic;
pub mod tokenizer;
pub mod validate;
pub mod weights;

pub use backend::{Backend, Row, SeqId};
pub use checkpoint::{Checkpoint, TensorMeta};
pub use config::{Architecture, IndexerConfig, ModelConfig, Rope, Yarn};
pub use device::Device;
pub use error::{Error, Result};
pub use generate::{FinishReason, GenerateOptions, Generation, Generator};
pub use stage::{Stage, StageInput};
pub use validate::{LinearFormat, LinearStats, ModelSummary, Report, check, validate};
pub use weights::SliceSpec;
