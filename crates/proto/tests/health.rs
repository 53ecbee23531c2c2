//! A real gRPC round trip over a Unix socket, the transport workers use: a server with a stub Worker
//! service on a temp socket, a client that calls Health through tonic's native `unix:` URI support.

use pipemoe_proto::worker_v1::worker_client::WorkerClient;
use pipemoe_proto::worker_v1::worker_server::{Worker, WorkerServer};
use pipemoe_proto::worker_v1::{HealthRequest, HealthResponse, LayerRange, WorkerState};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Endpoint, Server};
use tonic::{Request, Response, Status};

struct StubWorker;

#[tonic::async_trait]
impl Worker for StubWorker {
    async fn health(&self, _req: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        Ok(Response::new(HealthResponse {
            rank: 3,
            device: "cpu".into(),
            state: WorkerState::Ready.into(),
            layers: Some(LayerRange { start: 12, end: 20 }),
        }))
    }
}

#[tokio::test]
async fn health_round_trip_over_unix_socket() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("worker-3.sock");
    let listener = tokio::net::UnixListener::bind(&path)?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server =
        tokio::spawn(Server::builder().add_service(WorkerServer::new(StubWorker)).serve_with_incoming_shutdown(
            UnixListenerStream::new(listener),
            async {
                // A dropped sender also stops the server, so a failing test cannot leave it running.
                let _ = stopped.await;
            },
        ));

    let channel = Endpoint::from_shared(format!("unix://{}", path.display()))?.connect().await?;
    let reply = WorkerClient::new(channel).health(HealthRequest {}).await?.into_inner();
    assert_eq!(reply.rank, 3);
    assert_eq!(reply.device, "cpu");
    assert_eq!(reply.state(), WorkerState::Ready);
    assert_eq!(reply.layers, Some(LayerRange { start: 12, end: 20 }));

    let _ = stop.send(());
    server.await??;
    Ok(())
}
