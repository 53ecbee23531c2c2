//! The CUDA backend (in progress): `.cu` kernels compiled at run time by NVRTC for the device's own
//! architecture and cached on disk, and the cudarc device plumbing. The controller never links this crate.
//!
//! - `nvrtc`: finding NVRTC and the CUDA headers, compiling to CUBIN, the on-disk cache.
//! - `gpu`: one device with every kernel loaded; "no GPU" is an error, never a panic.
//! - `gemv`: GPTQ weights on the device (g_idx folded at load) and the decode GEMV for 2/3/4/8 bits.
//! - `backend`, `attention`, `cache`: `CudaBackend`, the model's backend trait on one GPU (first version).

pub mod act;
mod attention;
pub mod backend;
pub mod cache;
mod error;
pub mod gemv;
pub mod gpu;
pub mod ipc;
pub mod nvrtc;

pub use act::{Act, ActDtype, ActView, ActViewMut};
pub use backend::CudaBackend;
pub use error::{Error, Result};
pub use gemv::GpuGptq;
pub use gpu::Gpu;
