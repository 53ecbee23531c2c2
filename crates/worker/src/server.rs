//! Starting a worker: bind the socket first (so Health answers at once), load the slice in the background,
//! serve until drained. [`start`] is the in-process entry (tests, and `run`); [`run`] is `pipemoe worker`.

use std::io::ErrorKind;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pipemoe_model::cpu::CpuBackend;
use pipemoe_model::{Checkpoint, ModelConfig, SliceSpec, Stage};
use pipemoe_proto::worker_v1::worker_server::WorkerServer;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tracing::{error, info, warn};

use crate::config::{Device, Listen, WorkerArgs, WorkerConfig};
use crate::device::{CacheUsage, WorkerBackend};
use crate::engine::Engine;
use crate::error::{Error, Result, chain};
use crate::memory;
use crate::next::{MAX_MESSAGE_BYTES, Next};
use crate::service::{Loaded, Shared, WorkerService};

/// While draining, the server stops once no step has been in flight or begun for this long: a worker after the
/// first may still receive the rest of a chain step the worker before it is running.
const DRAIN_QUIET: Duration = Duration::from_millis(200);

/// A worker serving in this process.
pub struct WorkerHandle {
    addr: String,
    drain: watch::Sender<bool>,
    task: JoinHandle<Result<()>>,
}

impl WorkerHandle {
    /// The address to dial it at: `unix:/path` or `http://host:port` (the port actually bound).
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Starts the drain, as SIGTERM and the Shutdown rpc do: new steps are refused, in-flight ones finish.
    pub fn shutdown(&self) {
        self.drain.send_replace(true);
    }

    /// Waits until the worker has drained and stopped serving (the socket file is removed by then).
    pub async fn wait(self) -> Result<()> {
        self.task.await.map_err(|e| Error::Task { reason: e.to_string() })?
    }
}

/// Binds the worker's socket, starts loading its slice in the background and serves it; returns once the
/// socket is bound (Health answers LOADING until the slice is loaded).
pub async fn start(config: WorkerConfig) -> Result<WorkerHandle> {
    config.validate()?;
    match config.device {
        Device::Cpu => start_with(config, CpuBackend::F32).await,
        Device::Cuda(n) => {
            // Opened before the socket is bound: no GPU is a start-up error the controller sees at once.
            let backend = pipemoe_cuda::CudaBackend::new(n as usize)
                .map_err(|e| Error::Cuda { device: config.device_name(), reason: e.to_string() })?
                .with_kv_dtype(config.kv_dtype);
            start_with(config, backend).await
        }
    }
}

/// `pipemoe worker`: logs to stderr, serves until SIGTERM/SIGINT or Shutdown, drains, returns Ok (exit 0).
pub fn run(args: WorkerArgs) -> Result<()> {
    init_logging(args.log_json);
    let config = args.config()?;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|source| Error::Runtime { source })?;
    let result = runtime.block_on(async {
        let handle = start(config).await?;
        let drain = handle.drain.clone();
        tokio::spawn(async move {
            match signal().await {
                Ok(name) => info!(signal = name, "received a signal"),
                Err(e) => warn!(error = %e, "cannot listen for signals; only the Shutdown rpc stops this worker"),
            }
            drain.send_replace(true);
        });
        handle.wait().await
    });
    // A load still running on a blocking thread must not hold the exit.
    runtime.shutdown_background();
    result
}

/// Text or JSON logs on stderr, filtered by `PIPEMOE_LOG` (default `info`). A no-op if already set up.
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PIPEMOE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}

/// SIGTERM or SIGINT, whichever comes first.
async fn signal() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

enum Bound {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

async fn start_with<B: WorkerBackend + 'static>(config: WorkerConfig, backend: B) -> Result<WorkerHandle> {
    let next = config.next.as_deref().map(Next::new).transpose()?;
    let (bound, addr) = bind(&config.listen).await?;
    let loading = format!("loading {} of {} on {}", describe(&config.slice), config.model.display(), config.device);
    let shared = Arc::new(Shared::<B>::new(config, next, loading));
    info!(rank = shared.config.rank, addr, "listening");
    tokio::spawn(load(shared.clone(), backend));

    let service = WorkerServer::from_arc(Arc::new(WorkerService { shared: shared.clone() }))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let drain = shared.drain.clone();
    let drained = drained(shared.clone());
    let router = Server::builder().add_service(service);
    let task = tokio::spawn(async move {
        let served = match bound {
            Bound::Unix(listener, path) => {
                let served = router.serve_with_incoming_shutdown(UnixListenerStream::new(listener), drained).await;
                if let Err(e) = std::fs::remove_file(&path) {
                    warn!(path = %path.display(), error = %e, "cannot remove the socket file");
                }
                served
            }
            Bound::Tcp(listener) => router.serve_with_incoming_shutdown(TcpIncoming::from(listener), drained).await,
        };
        info!(rank = shared.config.rank, "stopped");
        served.map_err(|source| Error::Serve { source })
    });
    Ok(WorkerHandle { addr, drain, task })
}

/// Binds the socket; returns it with the address to dial it at.
async fn bind(listen: &Listen) -> Result<(Bound, String)> {
    match listen {
        Listen::Unix(path) => {
            remove_stale_socket(path).await?;
            let listener = UnixListener::bind(path)
                .map_err(|source| Error::Listen { addr: path.display().to_string(), source })?;
            Ok((Bound::Unix(listener, path.clone()), format!("unix:{}", path.display())))
        }
        Listen::Tcp(addr) => {
            let listen_err = |source| Error::Listen { addr: addr.clone(), source };
            let listener = TcpListener::bind(addr).await.map_err(listen_err)?;
            let local = listener.local_addr().map_err(listen_err)?;
            Ok((Bound::Tcp(listener), format!("http://{local}")))
        }
    }
}

/// A socket file left by a dead worker is removed; one that a live process answers on, or a file that is not a
/// socket, is an error.
async fn remove_stale_socket(path: &Path) -> Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(Error::Listen { addr: path.display().to_string(), source }),
    };
    if !meta.file_type().is_socket() {
        return Err(Error::NotASocket { path: path.to_path_buf() });
    }
    if tokio::net::UnixStream::connect(path).await.is_ok() {
        return Err(Error::SocketInUse { path: path.to_path_buf() });
    }
    warn!(path = %path.display(), "removing a stale socket file");
    std::fs::remove_file(path).map_err(|source| Error::Listen { addr: path.display().to_string(), source })
}

/// Loads the slice on a blocking thread; READY, or FAILED with the reason (the server keeps answering Health).
async fn load<B: WorkerBackend + 'static>(shared: Arc<Shared<B>>, backend: B) {
    let rank = shared.config.rank;
    let dir = shared.config.model.clone();
    let slice = shared.config.slice.clone();
    let ipc = shared.config.ipc;
    let plan = shared.config.memory;
    info!(rank, "{}", shared.loading);
    let started = Instant::now();
    let loaded = tokio::task::spawn_blocking(move || -> std::result::Result<(Loaded<B>, CacheUsage), String> {
        let model = |e: pipemoe_model::Error| chain(&e);
        let cfg = ModelConfig::from_dir(&dir).map_err(model)?;
        let ckpt = Checkpoint::open(&dir).map_err(model)?;
        let free_before = backend.free_bytes()?;
        let mut stage = Stage::load(backend, &cfg, &ckpt, slice.clone()).map_err(model)?;
        let weight_bytes = match free_before {
            // A device of its own: the cache gets what the weights left of the plan's budget.
            Some(before) => {
                let after = stage.backend().free_bytes()?.unwrap_or(0);
                let sizing = memory::size_cache(&plan, before, after);
                stage.renew_caches(|b| b.set_cache_budget(sizing.cache_bytes, slice.layers.len()));
                let usage = stage.backend().cache_usage(stage.caches());
                // A cache that cannot hold one block would make every request a 400 the client cannot fix.
                if usage.capacity.is_some_and(|c| c < usage.block) {
                    return Err(format!(
                        "the KV cache gets {} bytes ({} positions; limited by {}): less than one block of {} \
                         positions. The weights took {} bytes; raise the recipe's memory budget or give this \
                         worker fewer layers",
                        sizing.cache_bytes,
                        usage.capacity.unwrap_or(0),
                        sizing.limited_by,
                        usage.block,
                        sizing.loaded_bytes
                    ));
                }
                info!(
                    rank,
                    loaded_bytes = sizing.loaded_bytes,
                    planned_weight_bytes = plan.weight_bytes,
                    cache_bytes = sizing.cache_bytes,
                    cache_positions = usage.capacity,
                    limited_by = sizing.limited_by,
                    free_bytes = after,
                    "KV cache sized"
                );
                sizing.loaded_bytes
            }
            // Host memory: unbounded, unless an operator caps the cache (tests run admission this way).
            None => {
                if let Some(cap) = plan.kv_cache_bytes {
                    stage.renew_caches(|b| b.set_cache_budget(cap, slice.layers.len()));
                    let usage = stage.backend().cache_usage(stage.caches());
                    if usage.capacity.is_some_and(|c| c < usage.block) {
                        return Err(format!(
                            "PIPEMOE_KV_CACHE_BYTES={cap} gives the KV cache {} positions: less than one block of {}",
                            usage.capacity.unwrap_or(0),
                            usage.block
                        ));
                    }
                    info!(rank, cache_bytes = cap, cache_positions = usage.capacity, "KV cache capped");
                }
                memory::weight_bytes(&cfg, &ckpt, &slice)
            }
        };
        let engine = Engine::new(stage, ipc);
        let usage = engine.cache_usage();
        let loaded = Loaded {
            engine: Arc::new(Mutex::new(engine)),
            weight_bytes,
            cache_bytes_per_position: memory::cache_bytes_per_position(&cfg, &slice),
            cfg,
        };
        Ok((loaded, usage))
    })
    .await;
    let why = match loaded {
        Ok(Ok((loaded, usage))) => {
            let weight_bytes = loaded.weight_bytes;
            shared.publish_cache(usage);
            if shared.loaded.set(loaded).is_ok() {
                info!(rank, weight_bytes, took = ?started.elapsed(), "ready");
            }
            return;
        }
        Ok(Err(e)) => format!("loading {} failed: {e}", shared.config.model.display()),
        Err(e) => format!("loading {} panicked: {e}", shared.config.model.display()),
    };
    error!(rank, error = %why, "FAILED");
    let _ = shared.failed.set(why);
}

/// Resolves once a drain was asked for and no step has been in flight for [`DRAIN_QUIET`].
async fn drained<B: WorkerBackend + 'static>(shared: Arc<Shared<B>>) {
    let mut drain = shared.drain.subscribe();
    // The sender lives in `shared`, so this only ends by the flag being set.
    let _ = drain.wait_for(|&d| d).await;
    shared.start_drain();
    let mut in_flight = shared.in_flight.subscribe();
    loop {
        let _ = in_flight.wait_for(|&n| n == 0).await;
        let begun = shared.begun.load(Ordering::SeqCst);
        tokio::time::sleep(DRAIN_QUIET).await;
        if *in_flight.borrow() == 0 && shared.begun.load(Ordering::SeqCst) == begun {
            break;
        }
    }
    // The server stops once every response has ended: the Results stream too.
    shared.close_results();
    info!(rank = shared.config.rank, "drained");
}

/// "layers 1..3, experts 0..8, embed, head" for logs and Health.
fn describe(slice: &SliceSpec) -> String {
    let mut s = format!("layers {:?}", slice.layers);
    if let Some(e) = &slice.experts {
        s.push_str(&format!(", experts {e:?}"));
    }
    if slice.embed {
        s.push_str(", embed");
    }
    if slice.head {
        s.push_str(", head");
    }
    s
}
