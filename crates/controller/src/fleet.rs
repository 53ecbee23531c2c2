//! The worker fleet: one `pipemoe worker` process per planned stage, chained over Unix sockets. Spawned in their
//! own process group with a parent-death signal, so no worker outlives the controller; each child is watched
//! and its exit reported at once (ARCHITECTURE.md "Processes", STYLE.md §7).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pipemoe_proto::worker_v1::worker_client::WorkerClient;
use pipemoe_proto::worker_v1::{HealthRequest, HealthResponse, ShutdownRequest, WorkerState};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

use crate::admission::{CacheLimits, WorkerCache};
use crate::planner::StagePlan;
use crate::ring::Ring;

/// What the fleet tells its owner.
#[derive(Debug)]
pub enum FleetEvent {
    /// A worker process ended (crashed, killed, or exited on its own).
    Exited { generation: u64, rank: usize, pid: u32, status: String },
}

/// How to start the fleet.
#[derive(Clone, Debug)]
pub struct FleetSpec {
    /// The `pipemoe` binary to run as `pipemoe worker`.
    pub exe: PathBuf,
    pub model_dir: PathBuf,
    /// Folder for the workers' sockets.
    pub run_dir: PathBuf,
    pub plan: Vec<StagePlan>,
    /// Extra environment for the workers (the recipe's `env`).
    pub env: Vec<(String, String)>,
    /// How long loading may take before start-up fails.
    pub ready_timeout: Duration,
    /// Counts restarts; events of an older fleet are ignored by the scheduler.
    pub generation: u64,
    /// Let neighbouring GPU workers pass activations by CUDA IPC.
    pub ipc: bool,
    /// The recipe's `kv_cache_dtype` (GPU workers store their cache so).
    pub kv_cache_dtype: String,
}

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("cannot start worker {rank}: {reason}")]
    Spawn { rank: usize, reason: String },
    #[error("worker {rank} failed to load: {message}")]
    LoadFailed { rank: usize, message: String },
    #[error("worker {rank} exited while starting ({status})")]
    ExitedEarly { rank: usize, status: String },
    #[error("worker {rank} was not ready after {secs} s (last state: {last})")]
    Timeout { rank: usize, secs: u64, last: String },
    #[error("worker {rank} would not open its results stream: {message}")]
    Results { rank: usize, message: String },
}

/// A running worker.
pub struct Worker {
    pub plan: StagePlan,
    pub pid: u32,
    pub socket: PathBuf,
    pub client: WorkerClient<Channel>,
    /// Its KV cache as it reported it when ready; `None` when unbounded (CPU).
    pub cache: Option<WorkerCache>,
}

/// What the HTTP side needs of a worker: where it runs and how to ask it.
#[derive(Clone, Debug)]
pub struct WorkerView {
    pub plan: StagePlan,
    pub pid: u32,
    pub client: WorkerClient<Channel>,
}

/// The running fleet. Dropping it kills every worker's process group.
pub struct Fleet {
    pub workers: Vec<Worker>,
    /// The workers' Results streams, for ring steps; `None` sends nested steps (each worker relays the reply).
    pub ring: Option<Arc<Ring>>,
    pgids: Vec<i32>,
}

/// Each fleet generation gets its own sockets, so a restart never races the old workers' files.
fn socket_path(run_dir: &Path, generation: u64, rank: usize) -> PathBuf {
    run_dir.join(format!("worker-{generation}-{rank}.sock"))
}

async fn connect(socket: &Path) -> Option<WorkerClient<Channel>> {
    let ep =
        Endpoint::from_shared(format!("unix://{}", socket.display())).ok()?.connect_timeout(Duration::from_secs(2));
    ep.connect().await.ok().map(WorkerClient::new)
}

fn spawn_one(spec: &FleetSpec, rank: usize) -> Result<Child, FleetError> {
    let p = &spec.plan[rank];
    let socket = socket_path(&spec.run_dir, spec.generation, rank);
    let mut cmd = std::process::Command::new(&spec.exe);
    cmd.arg("worker")
        .args(["--rank", &rank.to_string(), "--device", &p.device])
        .arg("--model")
        .arg(&spec.model_dir)
        .args(["--layers", &format!("{}..{}", p.layers.start, p.layers.end)])
        .arg("--socket")
        .arg(&socket);
    cmd.args(["--kv-cache-dtype", &spec.kv_cache_dtype]);
    // The plan's numbers size a GPU worker's KV cache: what the weights and workspace leave of the device.
    cmd.args(["--memory-budget-bytes", &p.capacity_bytes.to_string()])
        .args(["--weight-bytes", &p.weight_bytes.to_string()])
        .args(["--workspace-bytes", &p.workspace_bytes.to_string()]);
    if p.embed {
        cmd.arg("--embed");
    }
    if p.head {
        cmd.arg("--head");
    }
    if rank + 1 < spec.plan.len() {
        cmd.arg("--next").arg(format!("unix:{}", socket_path(&spec.run_dir, spec.generation, rank + 1).display()));
        // Two GPU workers of this machine hand activations over by CUDA IPC; PIPEMOE_IPC=0 forces bytes.
        let gpu = |d: &str| d.starts_with("cuda:");
        if gpu(&p.device) && gpu(&spec.plan[rank + 1].device) && spec.ipc {
            cmd.arg("--ipc");
        }
    }
    cmd.envs(spec.env.iter().map(|(k, v)| (k, v))).stdin(Stdio::null()).process_group(0);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec. The signal fires when the
    // spawning thread exits, and workers are spawned from the controller's long-lived runtime threads.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM).map_err(std::io::Error::from)
        });
    }
    Command::from(cmd).kill_on_drop(true).spawn().map_err(|e| FleetError::Spawn { rank, reason: e.to_string() })
}

impl Fleet {
    /// Spawns every worker, waits until each answers Health READY (logging progress), and hands each child to a
    /// watcher that reports its exit on `events`.
    pub async fn start(spec: &FleetSpec, events: mpsc::UnboundedSender<FleetEvent>) -> Result<Fleet, FleetError> {
        std::fs::create_dir_all(&spec.run_dir)
            .map_err(|e| FleetError::Spawn { rank: 0, reason: format!("{}: {e}", spec.run_dir.display()) })?;
        let mut children = Vec::new();
        let mut pgids = Vec::new();
        for rank in 0..spec.plan.len() {
            let child = spawn_one(spec, rank)?;
            pgids.push(child.id().map_or(0, |p| p as i32));
            children.push(child);
        }
        let mut fleet = Fleet { workers: Vec::new(), ring: None, pgids };
        let deadline = Instant::now() + spec.ready_timeout;
        for (rank, child) in children.iter_mut().enumerate() {
            let socket = socket_path(&spec.run_dir, spec.generation, rank);
            let (client, health) = wait_ready(rank, child, &socket, deadline, spec.ready_timeout).await?;
            let p = &spec.plan[rank];
            let cache = health.kv_capacity_positions.map(|capacity| WorkerCache {
                rank,
                capacity: usize::try_from(capacity).unwrap_or(usize::MAX),
                block: health.kv_block_positions.max(1) as usize,
            });
            tracing::info!(
                rank,
                device = %p.device,
                layers = ?p.layers,
                kv_cache_positions = cache.map(|c| c.capacity),
                "worker {}/{} ready",
                rank + 1,
                spec.plan.len()
            );
            fleet.workers.push(Worker { plan: p.clone(), pid: child.id().unwrap_or(0), socket, client, cache });
        }
        let clients: Vec<_> = fleet.workers.iter().map(|w| w.client.clone()).collect();
        let ring =
            Ring::open(&clients).await.map_err(|(rank, s)| FleetError::Results { rank, message: s.to_string() })?;
        fleet.ring = Some(Arc::new(ring));
        for (rank, mut child) in children.into_iter().enumerate() {
            let events = events.clone();
            let pid = child.id().unwrap_or(0);
            let generation = spec.generation;
            tokio::spawn(async move {
                let (status, clean) = match child.wait().await {
                    Ok(s) => (s.to_string(), s.success()),
                    Err(e) => (format!("wait failed: {e}"), false),
                };
                if clean {
                    tracing::info!(rank, pid, "worker exited");
                } else {
                    tracing::error!(rank, pid, %status, "worker exited");
                }
                let _ = events.send(FleetEvent::Exited { generation, rank, pid, status });
            });
        }
        Ok(fleet)
    }

    /// A fleet of workers started elsewhere (the scheduler's tests): no process of its own to kill.
    #[cfg(test)]
    pub(crate) fn attached(workers: Vec<Worker>) -> Fleet {
        Fleet { workers, ring: None, pgids: Vec::new() }
    }

    pub fn head(&self) -> Option<&Worker> {
        self.workers.first()
    }

    /// The bounded KV caches of the fleet, as its workers reported them.
    pub fn cache_limits(&self) -> CacheLimits {
        CacheLimits { workers: self.workers.iter().filter_map(|w| w.cache).collect() }
    }

    pub fn views(&self) -> Vec<WorkerView> {
        self.workers.iter().map(|w| WorkerView { plan: w.plan.clone(), pid: w.pid, client: w.client.clone() }).collect()
    }

    /// Asks every worker to finish in-flight work and exit, then kills whatever is left after `grace`.
    pub async fn shutdown(mut self, grace: Duration) {
        for w in &mut self.workers {
            let _ = tokio::time::timeout(Duration::from_secs(2), w.client.shutdown(ShutdownRequest {})).await;
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && self.pgids.iter().any(|&p| alive(p)) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Drop kills what remains.
    }
}

impl Fleet {
    /// Kills every worker now and waits (up to 10 s) until their processes are gone.
    pub async fn kill(self) {
        let pgids = self.pgids.clone();
        drop(self);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && pgids.iter().any(|&p| alive(p)) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn alive(pid: i32) -> bool {
    pid > 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for &pg in &self.pgids {
            if pg > 0 {
                let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pg), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

async fn wait_ready(
    rank: usize,
    child: &mut Child,
    socket: &Path,
    deadline: Instant,
    timeout: Duration,
) -> Result<(WorkerClient<Channel>, HealthResponse), FleetError> {
    let mut last = "not answering".to_string();
    let mut client: Option<WorkerClient<Channel>> = None;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(FleetError::ExitedEarly { rank, status: status.to_string() });
        }
        if client.is_none() && socket.exists() {
            client = connect(socket).await;
        }
        if let Some(c) = client.as_mut() {
            match tokio::time::timeout(Duration::from_secs(2), c.health(HealthRequest {})).await {
                Ok(Ok(h)) => {
                    let h = h.into_inner();
                    match h.state() {
                        WorkerState::Ready => {
                            let client = client.ok_or(FleetError::Spawn { rank, reason: "lost".into() })?;
                            return Ok((client, h));
                        }
                        WorkerState::Failed => return Err(FleetError::LoadFailed { rank, message: h.message }),
                        s => last = format!("{s:?} {}", h.message),
                    }
                }
                Ok(Err(e)) => last = e.message().to_string(),
                Err(_) => last = "Health timed out".into(),
            }
        }
        if Instant::now() > deadline {
            return Err(FleetError::Timeout { rank, secs: timeout.as_secs(), last });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One Health call with a short deadline; `None` when the worker does not answer.
pub async fn health(client: &WorkerClient<Channel>) -> Option<HealthResponse> {
    let mut c = client.clone();
    match tokio::time::timeout(Duration::from_millis(800), c.health(HealthRequest {})).await {
        Ok(Ok(r)) => Some(r.into_inner()),
        _ => None,
    }
}
