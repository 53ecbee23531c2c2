//! The crate's one error type, and its one mapping to gRPC status codes (`From<Error> for Status`).

use std::path::PathBuf;

use tonic::Status;

/// Everything that can go wrong starting a worker or running one of its rpcs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A command-line value (or the combination of them) this worker cannot run with.
    #[error("--{arg}: {reason}")]
    InvalidArg { arg: &'static str, reason: String },

    /// `--device cuda:N` could not be opened (no driver, no such device, a kernel that does not compile).
    #[error("device {device}: {reason}")]
    Cuda { device: String, reason: String },

    /// The listening socket could not be set up.
    #[error("cannot listen on {addr}")]
    Listen { addr: String, source: std::io::Error },

    /// Another process is serving on the socket path.
    #[error("{}: another process is listening on this socket", path.display())]
    SocketInUse { path: PathBuf },

    /// A file that is not a socket is in the way of the socket path.
    #[error("{}: exists and is not a socket (refusing to remove it)", path.display())]
    NotASocket { path: PathBuf },

    #[error("cannot start the tokio runtime")]
    Runtime { source: std::io::Error },

    #[error("gRPC server")]
    Serve { source: tonic::transport::Error },

    /// The worker's task panicked or was cancelled.
    #[error("worker task: {reason}")]
    Task { reason: String },

    /// A step or free the worker refuses before touching any state.
    #[error("step {step_id}: {reason}")]
    InvalidStep { step_id: u64, reason: String },

    /// Activations passed as CUDA IPC handles to a backend that cannot open them.
    #[error("step {step_id}: CUDA IPC needs the CUDA backend (send the activations inline)")]
    IpcUnsupported { step_id: u64 },

    /// The worker cannot take steps in its current state (loading, failed).
    #[error("worker {rank} is {state}: {message}")]
    NotReady { rank: u32, state: &'static str, message: String },

    /// SIGTERM or Shutdown was received: new steps are refused.
    #[error("worker {rank} is draining (shutting down): no new steps")]
    Draining { rank: u32 },

    /// The engine failed on a step that passed validation.
    #[error("step {step_id}: the model failed")]
    Model { step_id: u64, source: pipemoe_model::Error },

    /// The step's new positions do not fit this worker's KV cache: nothing of it was cached here (the workers
    /// before this one did cache it, so the caller frees the step's sequences).
    #[error(
        "worker {rank}, step {step_id}: KV cache full: {used} positions in use of {capacity}, the step needs {needed} more"
    )]
    CacheFull { rank: u32, step_id: u64, needed: usize, used: usize, capacity: usize },

    /// The next worker in the chain cannot be reached (or its connection broke).
    #[error("next worker {addr} is unavailable: {message}")]
    NextUnavailable { addr: String, message: String },

    /// A ring step reached a worker with no Results stream to report its outcome on.
    #[error("step {step_id}: a ring step, but worker {rank} has no Results stream open to report it on")]
    NoResults { rank: u32, step_id: u64 },
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// The error and its sources on one line, for a gRPC status message (the client sees no `source()`).
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

impl Error {
    /// A full cache on worker `rank` becomes [`Error::CacheFull`], so the status names the worker and the numbers.
    pub(crate) fn on_rank(self, rank: u32) -> Self {
        match self {
            Error::Model { step_id, source: pipemoe_model::Error::CacheFull { needed, used, capacity } } => {
                Error::CacheFull { rank, step_id, needed, used, capacity }
            }
            other => other,
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let message = chain(&e);
        match e {
            Error::InvalidStep { .. } => Status::invalid_argument(message),
            Error::IpcUnsupported { .. } => Status::unimplemented(message),
            Error::Cuda { .. } => Status::failed_precondition(message),
            Error::NotReady { .. } | Error::NoResults { .. } => Status::failed_precondition(message),
            Error::Draining { .. } | Error::NextUnavailable { .. } => Status::unavailable(message),
            Error::CacheFull { .. } => Status::resource_exhausted(message),
            Error::Model { .. }
            | Error::Task { .. }
            | Error::InvalidArg { .. }
            | Error::Listen { .. }
            | Error::SocketInUse { .. }
            | Error::NotASocket { .. }
            | Error::Runtime { .. }
            | Error::Serve { .. } => {
                tracing::error!(error = %message, "internal error");
                Status::internal(message)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    #[test]
    fn a_full_cache_is_resource_exhausted_with_the_numbers() {
        let full = pipemoe_model::Error::CacheFull { needed: 64, used: 192, capacity: 256 };
        let status = Status::from(Error::Model { step_id: 9, source: full }.on_rank(2));
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(
            status.message(),
            "worker 2, step 9: KV cache full: 192 positions in use of 256, the step needs 64 more"
        );
        // Any other model error stays internal.
        let other = Error::Model { step_id: 9, source: pipemoe_model::Error::UnknownSequence { seq: 3 } }.on_rank(2);
        assert_eq!(Status::from(other).code(), Code::Internal);
    }
}
