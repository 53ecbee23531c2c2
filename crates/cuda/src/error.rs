//! The crate's one error type. "No GPU" is an error value, never a panic: cudarc panics when libcuda is missing,
//! so every entry point checks for the libraries first.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no CUDA driver: libcuda.so was not found (is this a machine with an NVIDIA GPU and its driver?)")]
    NoDriver,
    #[error(
        "no NVRTC: libnvrtc.so / libnvrtc.so.12 was not found; put the CUDA toolkit's lib64 (or the \
         nvidia-cuda-nvrtc wheel's lib folder) on LD_LIBRARY_PATH"
    )]
    NoNvrtc,
    #[error("no CUDA headers: looked for cuda_fp16.h in {searched:?}; set CUDA_HOME or PIPEMOE_CUDA_INCLUDE")]
    NoHeaders { searched: Vec<PathBuf> },
    #[error("cuda:{ordinal} does not exist ({count} CUDA devices)")]
    NoDevice { ordinal: usize, count: i32 },
    #[error("compiling {kernel} for {arch}:\n{log}")]
    Compile { kernel: String, arch: String, log: String },
    #[error("CUDA {op}: {source}")]
    Driver { op: &'static str, source: cudarc::driver::DriverError },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{what}: {reason}")]
    Shape { what: &'static str, reason: String },
    #[error("{0}")]
    Quant(#[from] pipemoe_quant::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Maps a driver error, naming the operation.
pub(crate) fn drv(op: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> Error {
    move |source| Error::Driver { op, source }
}
