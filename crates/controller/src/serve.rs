//! `pipemoe serve`: the controller in the foreground. Reads the recipe, plans placement, spawns and waits for
//! the workers, then serves HTTP until SIGTERM/SIGINT, when it stops admitting requests, drains in-flight ones
//! (up to `--drain-timeout`), stops the workers and removes its PID file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use clap::Args;
use pipemoe_model::chat::ChatFormat;
use pipemoe_model::tokenizer::Tokenizer;
use pipemoe_model::{Checkpoint, ModelConfig};
use tokio::sync::mpsc;

use crate::api::{self, AppState, Metrics};
use crate::fleet::{Fleet, FleetSpec};
use crate::planner::{self, DeviceBudget, PlanInput, Residency};
use crate::recipes::{Device, Recipe, RecipeStore};
use crate::scheduler::{Scheduler, SchedulerConfig};

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Recipe to serve (see `pipemoe recipe list`); the bundled `demo` exists from the first start.
    #[arg(long, env = "PIPEMOE_RECIPE", default_value = "demo")]
    pub recipe: String,
    /// Address to listen on.
    #[arg(long, env = "PIPEMOE_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0 picks a free one; the state file says which).
    #[arg(long, env = "PIPEMOE_PORT", default_value_t = 8000)]
    pub port: u16,
    /// Folder of controller.db, the PID file, the log and the workers' sockets.
    #[arg(long, env = "PIPEMOE_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,
    /// Recipe database (default: <data-dir>/controller.db).
    #[arg(long, env = "PIPEMOE_DB")]
    pub db: Option<PathBuf>,
    /// Seconds to let in-flight requests finish after SIGTERM before stopping the workers.
    #[arg(long, env = "PIPEMOE_DRAIN_TIMEOUT", default_value_t = 30)]
    pub drain_timeout: u64,
    /// Seconds the workers may take to load before start-up fails.
    #[arg(long, env = "PIPEMOE_READY_TIMEOUT", default_value_t = 600)]
    pub ready_timeout: u64,
    /// Log as JSON lines.
    #[arg(long, env = "PIPEMOE_LOG_JSON", value_parser = clap::builder::BoolishValueParser::new())]
    pub log_json: bool,
    /// KV cache positions a sequence holds beyond what it has cached, grown by as much when it gets there
    /// (smaller packs more sequences into the cache and preempts sooner when it is full).
    #[arg(long, env = "PIPEMOE_RESERVE_AHEAD", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub reserve_ahead: u32,
}

/// Logs to stderr with `PIPEMOE_LOG` (EnvFilter syntax, default `info`).
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PIPEMOE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if json { b.json().try_init() } else { b.try_init() };
}

/// Everything decided before a worker is spawned: validated once (STYLE.md §6).
struct Prepared {
    recipe: Recipe,
    model_dir: PathBuf,
    cfg: ModelConfig,
    tokenizer: Tokenizer,
    chat: ChatFormat,
    max_model_len: usize,
    plan: Vec<planner::StagePlan>,
}

fn device_budget(d: &Device, gib: f64) -> DeviceBudget {
    let bytes = (gib * (1u64 << 30) as f64) as u64;
    DeviceBudget { device: d.to_string(), budget_bytes: bytes, capacity_bytes: bytes }
}

/// Device memory a worker keeps beside its weights and KV cache: on a GPU, activations and scratch of a
/// 512-token step (the f32 copies of kv_b_proj that attention makes are counted with each layer's weights by
/// the planner). Workers size their cache with it.
fn workspace_bytes(residency: Residency) -> u64 {
    match residency {
        Residency::CpuF32 => 64 << 20,
        Residency::Packed { .. } => 1 << 30,
    }
}

fn prepare(recipe: Recipe, data_dir: &Path) -> anyhow::Result<Prepared> {
    let model_dir = recipe.resolve_model_path(data_dir);
    let cfg =
        ModelConfig::from_dir(&model_dir).with_context(|| format!("recipe {}: reading the model config", recipe.id))?;
    let ckpt = Checkpoint::open(&model_dir).with_context(|| format!("recipe {}: opening the checkpoint", recipe.id))?;
    pipemoe_model::validate(&cfg, &ckpt).with_context(|| format!("recipe {}: checking the checkpoint", recipe.id))?;
    let tokenizer = Tokenizer::from_dir(&model_dir).context("loading the tokenizer")?;
    let chat = ChatFormat::for_model(cfg.architecture.model_type(), &tokenizer).context("choosing the chat format")?;
    let max_model_len = recipe.max_model_len as usize;
    if max_model_len > cfg.max_position_embeddings {
        bail!(
            "recipe {}: max_model_len {max_model_len} exceeds the model's max_position_embeddings {}",
            recipe.id,
            cfg.max_position_embeddings
        );
    }
    // The first CUDA backend keeps GPTQ weights packed, dense ones and activations in f32, the cache as the
    // recipe says (auto = bf16).
    let residency = if recipe.devices.iter().all(|d| matches!(d, Device::Cpu)) {
        Residency::CpuF32
    } else {
        Residency::Packed { kv_elem_bytes: if recipe.kv_cache_dtype.as_str() == "fp8" { 1 } else { 2 } }
    };
    let cost = planner::model_cost(&cfg, &ckpt, residency);
    let devices: Vec<DeviceBudget> = recipe.devices.iter().map(|d| device_budget(d, recipe.max_memory_gib)).collect();
    let input = PlanInput {
        cost: &cost,
        devices: &devices,
        context_tokens: max_model_len,
        workspace_bytes: workspace_bytes(residency),
    };
    let plan = match &recipe.placement {
        Some(slices) => {
            if slices.iter().any(|s| s.experts.is_some()) {
                bail!("recipe {}: placement with expert ranges is not supported by the pipeline yet", recipe.id);
            }
            let ranges: Vec<_> = slices.iter().map(|s| s.layer_range()).collect();
            planner::plan_override(&input, &ranges)?
        }
        None => planner::plan(&input)?,
    };
    Ok(Prepared { recipe, model_dir, cfg, tokenizer, chat, max_model_len, plan })
}

/// Runs the controller until SIGTERM/SIGINT.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let data_dir = args.data_dir.clone();
    std::fs::create_dir_all(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    let pid = crate::pidfile::PidFile::acquire(&data_dir.join("pipemoe.pid")).context("taking the PID file")?;
    let db = args.db.clone().unwrap_or_else(|| data_dir.join("controller.db"));
    let store = RecipeStore::open(&db).await.context("opening the recipe database")?;
    store.ensure_demo(data_dir.parent().unwrap_or(Path::new("."))).await.context("adding the demo recipe")?;
    let recipe = store.require(&args.recipe).await.context("reading the recipe")?;
    store.close().await;
    let p = prepare(recipe, &data_dir)?;
    tracing::info!(recipe = %p.recipe.id, model = %p.model_dir.display(), "placement:\n{}", planner::describe(&p.plan));

    let exe = std::env::current_exe().context("finding the pipemoe binary")?;
    let spec = FleetSpec {
        exe,
        model_dir: p.model_dir.clone(),
        run_dir: data_dir.join("run"),
        plan: p.plan.clone(),
        env: p.recipe.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        ready_timeout: Duration::from_secs(args.ready_timeout),
        generation: 0,
        ipc: std::env::var("PIPEMOE_IPC").map_or(true, |v| v != "0"),
        kv_cache_dtype: p.recipe.kv_cache_dtype.as_str().to_string(),
    };
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    tracing::info!(workers = spec.plan.len(), "starting workers");
    let fleet = Fleet::start(&spec, events_tx.clone()).await.context("starting the workers")?;
    let tokenizer = Arc::new(p.tokenizer);
    let cfg = SchedulerConfig {
        max_model_len: p.max_model_len,
        max_inflight: p.plan.len(),
        max_step_tokens: 512,
        step_timeout: Duration::from_secs(300),
        reserve_ahead: args.reserve_ahead as usize,
    };
    let (scheduler, sched_task) = Scheduler::spawn(cfg, tokenizer.clone(), fleet, spec, events_rx, events_tx);
    let state = Arc::new(AppState {
        scheduler: scheduler.clone(),
        end_think: tokenizer.token_to_id("</think>"),
        tokenizer,
        chat: p.chat,
        model_name: p.recipe.served_model_name.clone(),
        max_model_len: p.max_model_len,
        recipe_id: p.recipe.id.clone(),
        started: SystemTime::now(),
        metrics: Metrics::default(),
        next_id: AtomicU64::new(1),
    });
    let addr: SocketAddr = format!("{}:{}", args.host, args.port).parse().context("parsing --host/--port")?;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listening on {addr}"))?;
    let bound = listener.local_addr().context("reading the bound address")?;
    pid.write_state(&crate::pidfile::ServerState::new(bound.to_string(), p.recipe.id.clone()))
        .context("writing the state file")?;
    tracing::info!(model = %p.recipe.served_model_name, layers = p.cfg.num_hidden_layers, "serving at http://{bound}");

    let drain = Duration::from_secs(args.drain_timeout);
    let app = api::router(state);
    let sched = scheduler.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            tracing::info!("stopping: draining in-flight requests (up to {} s)", drain.as_secs());
            if tokio::time::timeout(drain, sched.drain()).await.is_err() {
                tracing::warn!("drain timed out; stopping anyway");
            }
        })
        .await
        .context("serving HTTP")?;
    drop(scheduler);
    if let Ok(Ok(Some(fleet))) = tokio::time::timeout(Duration::from_secs(5), sched_task).await {
        fleet.shutdown(Duration::from_secs(10)).await;
    }
    drop(pid); // removes the state file, then the PID file
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}
