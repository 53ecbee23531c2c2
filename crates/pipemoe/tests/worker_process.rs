//! `pipemoe worker` as a process: it binds its socket, loads the demo model, answers Health and Step, and on
//! SIGTERM drains, removes its socket and exits 0. A device this build cannot drive is refused at once.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use pipemoe_model::chat::{ChatFormat, ChatOptions, Message};
use pipemoe_model::tokenizer::Tokenizer;
use pipemoe_worker::proto::worker_client::WorkerClient;
use pipemoe_worker::proto::{HealthRequest, Sampling, SeqChunk, StepRequest, WorkerState};

const DEADLINE: Duration = Duration::from_secs(60);

fn demo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/models/tiny-dsv32-w3a16")
}

fn worker(socket: &Path, log: &Path, extra: &[&str]) -> Result<Child> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pipemoe"));
    cmd.args(["worker", "--rank", "0", "--layers", "0..4", "--embed", "--head", "--model"])
        .arg(demo())
        .arg("--socket")
        .arg(socket)
        .args(extra)
        .env("PIPEMOE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?);
    Ok(cmd.spawn()?)
}

/// The exit status, waiting at most [`DEADLINE`].
async fn wait_exit(child: &mut Child) -> Result<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if start.elapsed() > DEADLINE {
            child.kill()?;
            bail!("the worker did not exit within {DEADLINE:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_serves_steps_and_drains_on_sigterm() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("w0.sock");
    let log = dir.path().join("worker.log");
    let mut child = worker(&socket, &log, &[])?;
    let stderr = || std::fs::read_to_string(&log).unwrap_or_default();

    // Ready: the socket answers Health and the state is READY (polled with a deadline).
    let start = Instant::now();
    let mut client = loop {
        if let Some(status) = child.try_wait()? {
            bail!("the worker exited with {status} before it was ready:\n{}", stderr());
        }
        if start.elapsed() > DEADLINE {
            child.kill()?;
            bail!("not READY within {DEADLINE:?}:\n{}", stderr());
        }
        if let Ok(mut c) = WorkerClient::connect(format!("unix:{}", socket.display())).await
            && let Ok(h) = c.health(HealthRequest {}).await
        {
            let h = h.into_inner();
            assert_ne!(h.state, WorkerState::Failed as i32, "{}", h.message);
            if h.state == WorkerState::Ready as i32 {
                assert_eq!(h.pid, child.id());
                break c;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    // The demo's question, answered greedily token by token: "42" then EOS.
    let tok = Tokenizer::from_dir(demo())?;
    let format = ChatFormat::for_model("deepseek_v32", &tok)?;
    let prompt = tok.encode(&format.render(&[Message::user("What is 12 + 30?")], &ChatOptions::default())?)?;
    let greedy = Some(Sampling { temperature: 0.0, top_p: 1.0, ..Sampling::default() });
    let mut chunk = SeqChunk { seq: 1, start: 0, tokens: prompt, sampling: greedy, generated: 0 };
    let mut answer = Vec::new();
    for step_id in 0..12 {
        let resp = client.step(StepRequest { step_id, chunks: vec![chunk.clone()], hidden: None, ring: false }).await?;
        let token = resp.into_inner().sampled.first().context("no token sampled")?.token;
        if tok.is_eos(token) {
            break;
        }
        answer.push(token);
        chunk = SeqChunk {
            seq: 1,
            start: chunk.start + chunk.tokens.len() as u32,
            tokens: vec![token],
            sampling: greedy,
            generated: 0,
        };
    }
    assert_eq!(tok.decode(&answer, true)?, "42");

    // SIGTERM: drain, remove the socket, exit 0.
    let kill = Command::new("kill").args(["-TERM", &child.id().to_string()]).status()?;
    assert!(kill.success());
    let status = wait_exit(&mut child).await?;
    let log = stderr();
    assert!(status.success(), "exit {status}:\n{log}");
    assert!(!socket.exists(), "socket left behind:\n{log}");
    assert!(log.contains("SIGTERM") && log.contains("drained"), "{log}");
    Ok(())
}

/// Without a GPU, `--device cuda:0` exits 1 with the reason and leaves no socket.
#[tokio::test]
async fn a_cuda_device_without_a_gpu_is_refused_clearly() -> Result<()> {
    if pipemoe_cuda::gpu::unavailable().is_none() {
        eprintln!("SKIPPED: this machine has a GPU");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("worker.log");
    let mut child = worker(&dir.path().join("w.sock"), &log, &["--device", "cuda:0"])?;
    let status = wait_exit(&mut child).await?;
    let stderr = std::fs::read_to_string(&log)?;
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("error: device cuda:0: no CUDA driver"), "{stderr}");
    assert!(!dir.path().join("w.sock").exists());
    Ok(())
}
