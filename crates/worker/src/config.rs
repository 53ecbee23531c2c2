//! `pipemoe worker`'s command line ([`WorkerArgs`]) and the validated [`WorkerConfig`] a worker runs with.
//! Tests build a `WorkerConfig` directly; the binary gets one from `WorkerArgs::config`.

use std::ops::Range;
use std::path::PathBuf;

use clap::Args;
use pipemoe_model::SliceSpec;

use crate::error::{Error, Result};
use crate::memory::MemoryPlan;

/// `pipemoe worker`: serve one slice of the model on one device (spawned by the controller).
#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// Position of this worker in the pipeline, 0-based (worker 0 holds the first layers).
    #[arg(long, env = "PIPEMOE_WORKER_RANK")]
    pub rank: u32,
    /// The device this worker owns: `cpu` or `cuda:N`.
    #[arg(long, env = "PIPEMOE_WORKER_DEVICE", default_value = "cpu")]
    pub device: Device,
    /// Model directory (config.json and the safetensors shards).
    #[arg(long, env = "PIPEMOE_MODEL")]
    pub model: PathBuf,
    /// Decoder layers this worker runs, half-open: `A..B`.
    #[arg(long, env = "PIPEMOE_WORKER_LAYERS", value_parser = parse_range)]
    pub layers: Range<usize>,
    /// Routed experts this worker holds in each MoE layer, half-open `A..B`; absent = all.
    #[arg(long, env = "PIPEMOE_WORKER_EXPERTS", value_parser = parse_range)]
    pub experts: Option<Range<usize>>,
    /// Holds the token embeddings (the first stage).
    #[arg(long, env = "PIPEMOE_WORKER_EMBED")]
    pub embed: bool,
    /// Holds the final norm and lm_head, and samples (the last stage).
    #[arg(long, env = "PIPEMOE_WORKER_HEAD")]
    pub head: bool,
    /// Serve gRPC on this Unix socket (a stale socket file is removed first).
    #[arg(long, env = "PIPEMOE_WORKER_SOCKET", conflicts_with = "listen", required_unless_present = "listen")]
    pub socket: Option<PathBuf>,
    /// Serve gRPC on TCP `HOST:PORT` instead (for workers on other hosts; port 0 picks a free one).
    #[arg(long, env = "PIPEMOE_WORKER_LISTEN")]
    pub listen: Option<String>,
    /// The next worker in the chain: `unix:/path/to.sock` or `http://host:port`. Required unless --head.
    #[arg(long, env = "PIPEMOE_WORKER_NEXT")]
    pub next: Option<String>,
    /// How a GPU worker stores its KV cache: auto (= bf16), bf16, fp8 (e4m3 with scales) or f32. CPU: f32.
    #[arg(long, env = "PIPEMOE_KV_CACHE_DTYPE", default_value = "auto")]
    pub kv_cache_dtype: String,
    /// Device memory this worker may hold in all, in bytes: weights + KV cache + workspace (the plan's figure for
    /// its device). A GPU worker's KV cache gets what the weights and the workspace leave of it.
    #[arg(long, env = "PIPEMOE_WORKER_MEMORY_BUDGET_BYTES")]
    pub memory_budget_bytes: Option<u64>,
    /// The plan's estimate of this slice's weights on the device, in bytes (absent: what loading measurably took).
    #[arg(long, env = "PIPEMOE_WORKER_WEIGHT_BYTES")]
    pub weight_bytes: Option<u64>,
    /// Device memory left free for activations and scratch, in bytes.
    #[arg(long, env = "PIPEMOE_WORKER_WORKSPACE_BYTES", default_value_t = crate::memory::DEFAULT_WORKSPACE_BYTES)]
    pub workspace_bytes: u64,
    /// At most this many bytes of GPU KV cache, whatever the budget leaves (to leave room, or to test a full cache).
    #[arg(long, env = "PIPEMOE_KV_CACHE_BYTES")]
    pub kv_cache_bytes: Option<u64>,
    /// Pass activations to the next worker as CUDA IPC handles instead of bytes (both on GPUs of this machine).
    #[arg(long, env = "PIPEMOE_WORKER_IPC", value_parser = clap::builder::BoolishValueParser::new())]
    pub ipc: bool,
    /// Log as JSON lines (stderr) instead of text.
    #[arg(long, env = "PIPEMOE_LOG_JSON", value_parser = clap::builder::BoolishValueParser::new())]
    pub log_json: bool,
}

/// The device a worker owns, as the controller names it.
pub use pipemoe_model::Device;

/// Where a worker serves gRPC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A Unix socket path.
    Unix(PathBuf),
    /// A TCP `host:port`.
    Tcp(String),
}

/// A validated worker: what [`crate::start`] runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub rank: u32,
    pub device: Device,
    pub model: PathBuf,
    /// Layers, experts, embed, head.
    pub slice: SliceSpec,
    pub listen: Listen,
    /// The next worker's address as tonic dials it (`unix:/path` or `http://host:port`); `None` for the head.
    pub next: Option<String>,
    /// Send activations to the next worker as CUDA IPC handles (falls back to bytes on a CPU backend).
    pub ipc: bool,
    /// The GPU cache's storage.
    pub kv_dtype: pipemoe_cuda::cache::KvDtype,
    /// What the plan allows the device: sizes a GPU worker's KV cache.
    pub memory: MemoryPlan,
}

impl WorkerConfig {
    /// Checks what can be checked without reading the model: a non-empty layer range, exactly one of head
    /// and next, a well-formed next address, a device this build can drive.
    pub fn validate(&self) -> Result<()> {
        if self.slice.layers.is_empty() {
            return Err(Error::InvalidArg {
                arg: "layers",
                reason: format!("{:?} holds no layer (a stage needs at least one)", self.slice.layers),
            });
        }
        if let Some(e) = &self.slice.experts
            && e.is_empty()
        {
            return Err(Error::InvalidArg { arg: "experts", reason: format!("{e:?} holds no expert") });
        }
        match (&self.next, self.slice.head) {
            (Some(_), true) => {
                return Err(Error::InvalidArg {
                    arg: "next",
                    reason: "the head (last) worker samples and has no next worker".into(),
                });
            }
            (None, false) => {
                return Err(Error::InvalidArg {
                    arg: "next",
                    reason: "required unless --head: a worker that does not sample passes its output on".into(),
                });
            }
            (Some(addr), false) => check_next_addr(addr)?,
            (None, true) => {}
        }
        Ok(())
    }

    /// What Health reports as `device`.
    pub fn device_name(&self) -> String {
        self.device.to_string()
    }
}

impl WorkerArgs {
    /// The validated configuration; every error names the flag.
    pub fn config(&self) -> Result<WorkerConfig> {
        let listen = match (&self.socket, &self.listen) {
            (Some(path), None) => Listen::Unix(path.clone()),
            (None, Some(addr)) => Listen::Tcp(addr.clone()),
            _ => {
                return Err(Error::InvalidArg {
                    arg: "socket",
                    reason: "give exactly one of --socket and --listen".into(),
                });
            }
        };
        let config = WorkerConfig {
            rank: self.rank,
            device: self.device,
            model: self.model.clone(),
            slice: SliceSpec {
                layers: self.layers.clone(),
                experts: self.experts.clone(),
                embed: self.embed,
                head: self.head,
            },
            listen,
            next: self.next.clone(),
            ipc: self.ipc,
            kv_dtype: self
                .kv_cache_dtype
                .parse()
                .map_err(|reason| Error::InvalidArg { arg: "kv-cache-dtype", reason })?,
            memory: MemoryPlan {
                budget_bytes: self.memory_budget_bytes,
                weight_bytes: self.weight_bytes,
                workspace_bytes: self.workspace_bytes,
                kv_cache_bytes: self.kv_cache_bytes,
            },
        };
        config.validate()?;
        Ok(config)
    }
}

fn check_next_addr(addr: &str) -> Result<()> {
    let bad = |reason: &str| Error::InvalidArg { arg: "next", reason: format!("{addr:?}: {reason}") };
    if let Some(path) = addr.strip_prefix("unix:") {
        let path = path.strip_prefix("//").unwrap_or(path);
        if path.is_empty() {
            return Err(bad("no socket path after unix:"));
        }
        return Ok(());
    }
    let rest = addr.strip_prefix("http://").ok_or_else(|| bad("expected unix:/path/to.sock or http://host:port"))?;
    let host_port = rest.trim_end_matches('/');
    if host_port.is_empty() || host_port.contains('/') {
        return Err(bad("expected http://host:port"));
    }
    Ok(())
}

/// `A..B` (half-open) with `A <= B`.
pub fn parse_range(s: &str) -> std::result::Result<Range<usize>, String> {
    let (a, b) = s.split_once("..").ok_or_else(|| format!("{s:?}: expected a half-open range A..B"))?;
    let num = |v: &str| v.trim().parse::<usize>().map_err(|_| format!("{s:?}: {v:?} is not a number"));
    let (a, b) = (num(a)?, num(b)?);
    if a > b {
        return Err(format!("{s:?}: start is past end"));
    }
    Ok(a..b)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        worker: WorkerArgs,
    }

    fn parse(args: &[&str]) -> std::result::Result<WorkerArgs, String> {
        let argv = std::iter::once("worker").chain(args.iter().copied());
        Cli::try_parse_from(argv).map(|c| c.worker).map_err(|e| e.to_string())
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("1..3"), Ok(1..3));
        assert_eq!(parse_range("0..0"), Ok(0..0));
        assert!(parse_range("3..1").is_err());
        assert!(parse_range("1-3").is_err());
        assert!(parse_range("a..3").is_err());
    }

    #[test]
    fn devices() {
        assert_eq!("cpu".parse::<Device>(), Ok(Device::Cpu));
        assert_eq!("cuda:3".parse::<Device>(), Ok(Device::Cuda(3)));
        assert!("cuda".parse::<Device>().is_err());
        assert!("gpu:0".parse::<Device>().is_err());
    }

    #[test]
    fn flags_become_a_config() -> std::result::Result<(), String> {
        let base = ["--rank", "1", "--model", "m", "--layers", "1..3", "--socket", "/tmp/w1.sock"];
        let mut args: Vec<&str> = base.to_vec();
        args.extend(["--next", "unix:/tmp/w2.sock", "--experts", "0..8"]);
        let c = parse(&args)?.config().map_err(|e| e.to_string())?;
        assert_eq!(c.slice, SliceSpec { layers: 1..3, experts: Some(0..8), embed: false, head: false });
        assert_eq!(c.listen, Listen::Unix("/tmp/w1.sock".into()));
        assert_eq!(c.next.as_deref(), Some("unix:/tmp/w2.sock"));
        assert_eq!(c.memory, MemoryPlan::default());
        let mut sized = args.clone();
        sized.extend(["--memory-budget-bytes", "1000", "--weight-bytes", "300", "--kv-cache-bytes", "50"]);
        sized.extend(["--workspace-bytes", "100"]);
        let m = parse(&sized)?.config().map_err(|e| e.to_string())?.memory;
        let want = MemoryPlan {
            budget_bytes: Some(1000),
            weight_bytes: Some(300),
            workspace_bytes: 100,
            kv_cache_bytes: Some(50),
        };
        assert_eq!(m, want);

        // Not the head and nowhere to send the output; the head with a next; an empty range. (A CUDA device is a
        // valid config: whether the GPU opens is decided at start.)
        let err = |a: &[&str]| parse(a).and_then(|w| w.config().map(|_| ()).map_err(|e| e.to_string()));
        assert!(err(&base).is_err_and(|e| e.contains("--next") && e.contains("required unless --head")));
        let mut head = base.to_vec();
        head.extend(["--head", "--next", "unix:/x"]);
        assert!(err(&head).is_err_and(|e| e.contains("--next")));
        let mut cuda = base.to_vec();
        cuda.extend(["--head", "--device", "cuda:0"]);
        assert!(err(&cuda).is_ok());
        let empty = ["--rank", "0", "--model", "m", "--layers", "2..2", "--socket", "/s", "--head"];
        assert!(err(&empty).is_err_and(|e| e.contains("holds no layer")));
        let bad_next = ["--rank", "0", "--model", "m", "--layers", "0..1", "--socket", "/s", "--next", "tcp://x"];
        assert!(err(&bad_next).is_err_and(|e| e.contains("http://host:port")));
        // Exactly one of --socket and --listen.
        assert!(parse(&["--rank", "0", "--model", "m", "--layers", "0..1", "--head"]).is_err());
        let both = ["--rank", "0", "--model", "m", "--layers", "0..1", "--head", "--socket", "/s", "--listen", ":1"];
        assert!(parse(&both).is_err());
        Ok(())
    }
}
