//! The CUDA backend (in progress): `.cu` kernels compiled at run time by NVRTC for the device's own
//! architecture and cached on disk, and the cudarc device plumbing. The controller never links this crate.
//!
//! - `nvrtc`: finding NVRTC and the CUDA headers, compiling to CUBIN, the on-disk cache.
//! - `gpu`: one device with every kernel loaded; "no GPU" is an error, never a panic.
//! - `gemv`: GPTQ weights on the device (g_idx folded at load) and the decode GEMV for 2/3/4/8 bits.
//! - `gemm`: the prefill GEMM over the same weights on tensor cores (more than 16 rows).
//! - `route`, `sample`: the MoE router and sampling's reduction on the device (the host finishes exactly).
//! - `backend`: `CudaBackend`, the model's backend trait on one GPU.
//! - `cache`: the block-paged latent cache; `attention`: cache writes and tiled MLA attention over it;
//!   `indexer`: the V3.2 indexer's scores and top-k, its selection kept on the device.
//! - `graph`: a stage's step: cache slots reserved first, its inputs uploaded once, decode steps as CUDA graphs.
//! - `profile`: per-op device and host time of a step, for benchmarks.

pub mod act;
mod addnorm;
mod attention;
pub mod backend;
pub mod cache;
mod error;
pub mod experts;
mod experts_launch;
mod experts_prefill;
pub mod gemm;
pub mod gemv;
pub mod gpu;
pub mod graph;
pub mod indexer;
pub mod ipc;
mod kvb;
mod launch;
pub mod mma;
pub mod nvrtc;
mod prep;
pub mod profile;
mod qrope;
pub mod route;
mod rowops;
pub mod sample;
pub mod timing;
pub mod trace;
pub(crate) mod wide;

pub use act::{Act, ActDtype, ActView, ActViewMut};
pub use backend::CudaBackend;
pub use error::{Error, Result};
pub use gemm::GemmTile;
pub use gemv::GpuGptq;
pub use gpu::Gpu;
pub use indexer::GpuSelection;
