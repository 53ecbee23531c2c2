//! Generated gRPC code for pipemoe's protocols (`proto/` at the repository root). The controller is the
//! client, each worker the server.

/// `package pipemoe.worker.v1`: controller ↔ worker.
pub mod worker_v1 {
    tonic::include_proto!("pipemoe.worker.v1");
}
