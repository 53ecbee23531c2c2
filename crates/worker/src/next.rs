//! The client to the next worker of the chain: one channel, connected on first use and reused (tonic's
//! `Channel` multiplexes concurrent steps over one HTTP/2 connection and reconnects after a failure).

use std::time::Duration;

use pipemoe_proto::worker_v1::worker_client::WorkerClient;
use pipemoe_proto::worker_v1::{FreeRequest, StepRequest, StepResponse};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::error::{Error, Result};

/// How long to wait for the next worker to accept a connection before calling it unavailable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Activations of a long prefill exceed tonic's 4 MiB default; a step is as large as the controller makes it.
pub const MAX_MESSAGE_BYTES: usize = usize::MAX;

#[derive(Clone)]
pub struct Next {
    addr: String,
    client: WorkerClient<Channel>,
}

impl Next {
    /// A lazily connected client of `addr` (`unix:/path` or `http://host:port`).
    pub fn new(addr: &str) -> Result<Self> {
        let endpoint = Endpoint::from_shared(addr.to_string())
            .map_err(|e| Error::InvalidArg { arg: "next", reason: format!("{addr:?}: {e}") })?
            .connect_timeout(CONNECT_TIMEOUT);
        let client = WorkerClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Self { addr: addr.to_string(), client })
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub async fn step(&self, req: StepRequest) -> std::result::Result<StepResponse, Status> {
        let mut client = self.client.clone();
        client.step(req).await.map(tonic::Response::into_inner).map_err(|s| self.unreachable(s))
    }

    pub async fn free(&self, req: FreeRequest) -> std::result::Result<(), Status> {
        let mut client = self.client.clone();
        client.free(req).await.map(|_| ()).map_err(|s| self.unreachable(s))
    }

    /// A transport failure (connect refused, connection lost) names the next worker; a status the next worker
    /// chose (invalid argument, not ready, …) passes through unchanged.
    fn unreachable(&self, s: Status) -> Status {
        match s.code() {
            Code::Unavailable | Code::Unknown | Code::Cancelled => {
                Error::NextUnavailable { addr: self.addr.clone(), message: s.message().to_string() }.into()
            }
            _ => s,
        }
    }
}
