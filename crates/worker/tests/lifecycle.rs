//! A worker's life outside the happy path: a slice that cannot load reports FAILED with the reason and keeps
//! answering; a dead next worker is named; Shutdown drains, stops serving and removes the socket; a live
//! worker's socket is not stolen.

mod common;

use std::path::PathBuf;

use anyhow::Result;
use common::*;
use pipemoe_model::SliceSpec;
use pipemoe_worker::proto::{ShutdownRequest, WorkerState};
use pipemoe_worker::{Device, Listen, WorkerConfig};
use tonic::Code;

fn single(socket: PathBuf, model: PathBuf, layers: std::ops::Range<usize>) -> WorkerConfig {
    WorkerConfig {
        rank: 0,
        device: Device::Cpu,
        model,
        slice: SliceSpec { layers, experts: None, embed: true, head: true },
        listen: Listen::Unix(socket),
        next: None,
        ipc: false,
        kv_dtype: Default::default(),
        memory: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slice_that_cannot_load_reports_failed() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cases = [(dir.path().join("absent-model"), 0..4, "config.json"), (demo(), 2..9, "outside the model's 0..4")];
    for (i, (model, layers, why)) in cases.into_iter().enumerate() {
        let w = pipemoe_worker::start(single(dir.path().join(format!("w{i}.sock")), model, layers)).await?;
        let mut c = connect(w.addr()).await?;
        let h = wait_loaded(&mut c).await?;
        assert_eq!(h.state, WorkerState::Failed as i32, "{}", h.message);
        assert!(h.message.contains(why), "{}", h.message);
        assert_eq!(h.memory_bytes, 0);
        // Steps are refused with the reason; Health keeps answering.
        let err = step(&mut c, 1, vec![chunk(1, 0, &[1, 2], Some(greedy()))]).await.err();
        let (code, message) = err.map(|s| (s.code(), s.message().to_string())).unwrap_or((Code::Ok, String::new()));
        assert_eq!(code, Code::FailedPrecondition);
        assert!(message.contains("FAILED") && message.contains(why), "{message}");
        assert_eq!(health(&mut c).await?.state, WorkerState::Failed as i32);
        w.shutdown();
        w.wait().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_next_worker_is_named() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let dead = dir.path().join("nobody.sock");
    let mut config = single(dir.path().join("w0.sock"), demo(), 0..1);
    config.slice.head = false;
    config.next = Some(format!("unix:{}", dead.display()));
    let w = pipemoe_worker::start(config).await?;
    let mut c = connect(w.addr()).await?;
    wait_ready(&mut c).await?;
    let err = step(&mut c, 1, vec![chunk(1, 0, &[1, 2], Some(greedy()))]).await.err();
    let (code, message) = err.map(|s| (s.code(), s.message().to_string())).unwrap_or((Code::Ok, String::new()));
    assert_eq!(code, Code::Unavailable, "{message}");
    assert!(message.contains(&dead.display().to_string()), "{message}");
    w.shutdown();
    w.wait().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_and_removes_the_socket() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("w0.sock");
    let w = pipemoe_worker::start(single(socket.clone(), demo(), 0..4)).await?;
    let mut c = connect(w.addr()).await?;
    wait_ready(&mut c).await?;

    // A second worker on the same socket is refused while the first is alive.
    let taken = pipemoe_worker::start(single(socket.clone(), demo(), 0..4)).await.err().map(|e| e.to_string());
    assert!(taken.as_deref().is_some_and(|e| e.contains("another process is listening")), "{taken:?}");

    step(&mut c, 1, vec![chunk(1, 0, &[1, 2, 3], Some(greedy()))]).await?;
    c.shutdown(ShutdownRequest {}).await?;
    // From now on, new steps from the controller are refused (or the server is already gone).
    let after = step(&mut c, 2, vec![chunk(2, 0, &[1, 2, 3], Some(greedy()))]).await;
    assert!(after.is_err_and(|s| s.code() == Code::Unavailable), "a step after Shutdown must be refused");
    w.wait().await?;
    assert!(!socket.exists(), "the socket file is removed on exit");

    // A stale socket file (no one listening) is replaced.
    let stale = std::os::unix::net::UnixListener::bind(&socket)?;
    drop(stale);
    assert!(socket.exists());
    let w = pipemoe_worker::start(single(socket.clone(), demo(), 0..4)).await?;
    wait_ready(&mut connect(w.addr()).await?).await?;
    w.shutdown();
    w.wait().await?;
    Ok(())
}

/// Without a GPU, `cuda:N` fails at start with the reason (here: no driver), before binding anything.
#[tokio::test]
async fn cuda_without_a_gpu_is_refused_clearly() {
    let Some(why) = pipemoe_cuda::gpu::unavailable() else {
        eprintln!("SKIPPED: this machine has a GPU");
        return;
    };
    let mut config = single(PathBuf::from("/nonexistent/w.sock"), demo(), 0..4);
    config.device = Device::Cuda(0);
    let err = pipemoe_worker::start(config).await.err().map(|e| e.to_string());
    assert!(err.as_deref().is_some_and(|e| e.starts_with("device cuda:0: ")), "{err:?} ({why})");
}
