//! `pipemoe bench`: one GPU's share of the real model, timed through the serving code path, every figure next to
//! a ceiling measured in the same run, and a projection to the 8 × RTX 3090 target.
//!
//! - `ceiling`: the streaming-read bandwidth and cuBLAS's bf16 GEMM on the prefill shapes; event timing.
//! - `floor`: the bytes a decode step must read, the GEMMs and attention FLOPs of a prefill chunk.
//! - `stage`: decode, batched decode and prefill through `Stage<CudaBackend>`; one layer's blocks alone.
//! - `ipc`: the activation hand-off between two processes (CUDA IPC), timed with a child process.
//! - `report`: the projection, the table (printed last) and the JSON.

pub mod ab;
pub mod ceiling;
pub mod floor;
pub mod ipc;
pub mod report;
pub mod stage;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use pipemoe_cuda::CudaBackend;
use pipemoe_cuda::cache::KvDtype;
use pipemoe_model::footprint::{CacheBytes, head_bytes, layer_bytes};
use pipemoe_model::random_checkpoint::{self, Dims, RandomSpec};
use pipemoe_model::{Checkpoint, ModelConfig, SliceSpec, Stage};

use floor::SliceBytes;

/// Which stage of an 8-GPU pipeline the slice stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SliceKind {
    /// Layers from 0 (the dense ones first) with the embeddings.
    First,
    /// MoE layers after the dense ones, no embeddings or head: the case of most GPUs.
    Middle,
    /// The model's last layers, the final norm and lm_head.
    Last,
}

/// The sequence of the untimed prefill chunk (the timed ones use 1 and 2, the streams 100..).
const WARMUP_SEQ: u64 = 99;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// A model directory to time instead of a generated one (its config chooses the dims).
    #[arg(long, env = "PIPEMOE_MODEL")]
    pub model: Option<PathBuf>,
    /// Decoder layers in the slice (8 = one RTX 3090's share of the real model).
    #[arg(long, env = "PIPEMOE_BENCH_LAYERS", default_value_t = 8)]
    pub layers: usize,
    /// Which pipeline stage the slice is.
    #[arg(long, env = "PIPEMOE_BENCH_SLICE", value_enum, default_value_t = SliceKind::Middle)]
    pub slice: SliceKind,
    /// Also hold the embeddings, final norm and lm_head (whatever the slice).
    #[arg(long, env = "PIPEMOE_BENCH_WITH_HEAD")]
    pub with_head: bool,
    /// Where generated checkpoints are kept between runs (one directory per spec hash).
    #[arg(long, env = "PIPEMOE_BENCH_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Seed of the generated weights.
    #[arg(long, env = "PIPEMOE_BENCH_SEED", default_value_t = 1)]
    pub seed: u64,
    /// Only generate (or find) the checkpoint and print its bytes; needs no GPU.
    #[arg(long)]
    pub generate_only: bool,
    /// CUDA device ordinal.
    #[arg(long, env = "PIPEMOE_BENCH_DEVICE", default_value_t = 0)]
    pub device: usize,
    /// Cached positions before the single-stream decode (prefilled first; also the prefill figure's prompt).
    #[arg(long, env = "PIPEMOE_BENCH_CONTEXT", default_value_t = 4096)]
    pub context: usize,
    /// Decode steps timed (after 3 untimed ones).
    #[arg(long, env = "PIPEMOE_BENCH_STEPS", default_value_t = 32)]
    pub steps: usize,
    /// Sequences decoding together in the batched figure (0 skips it).
    #[arg(long, env = "PIPEMOE_BENCH_STREAMS", default_value_t = 32)]
    pub streams: usize,
    /// Cached positions of each batched sequence (default: --context).
    #[arg(long, env = "PIPEMOE_BENCH_STREAMS_CONTEXT")]
    pub streams_context: Option<usize>,
    /// Prefill chunk in rows (the scheduler's tokens per step).
    #[arg(long, env = "PIPEMOE_BENCH_CHUNK", default_value_t = 512)]
    pub chunk: usize,
    /// KV cache dtype, as a recipe's kv_cache_dtype (auto = bf16).
    #[arg(long, env = "PIPEMOE_BENCH_KV_CACHE_DTYPE", default_value = "auto")]
    pub kv_cache_dtype: String,
    /// Per-hop hand-off in µs for the projection, instead of the measured IPC round trip.
    #[arg(long, env = "PIPEMOE_BENCH_HOP_US")]
    pub hop_us: Option<f64>,
    /// The serving path's cost per hop in µs (the gRPC step call down and the worker's hand-offs; ring steps
    /// relay no reply back up), added to the IPC landing: the bench runs no workers. Default: `tools/hop-cost.sh
    /// … cuda` on a host of two H200s (GPU workers, one per GPU: a hop is the gRPC step and a CUDA IPC hand-off
    /// between the devices) measured 0.065 ms a hop in all, of which the IPC landing the bench measures on the
    /// same host is 12 µs: 53 µs (docs/PERF.md, session 18). CPU workers measure 0.27–0.70 ms a hop, their engines'
    /// threads competing with the hand-off for the cores.
    #[arg(long, env = "PIPEMOE_BENCH_GRPC_US", default_value_t = 53.0)]
    pub grpc_us: f64,
    /// Memory bandwidth of the projection's GPU in GB/s (RTX 3090: 936).
    #[arg(long, env = "PIPEMOE_BENCH_TARGET_GBPS", default_value_t = 936.0)]
    pub target_gbps: f64,
    /// Multiprocessors × boost clock of the projection's GPU in G cycles/s (RTX 3090: 82 × 1.695), for the
    /// projection whose time above the floor scales with SM cycles.
    #[arg(long, env = "PIPEMOE_BENCH_TARGET_SM_GHZ", default_value_t = 82.0 * 1.695)]
    pub target_sm_ghz: f64,
    /// bf16 tensor-core rate of the projection's GPU with f32 accumulation in TFLOP/s (RTX 3090: 71, dense), for
    /// the check of the tensor-core work a token issues.
    #[arg(long, env = "PIPEMOE_BENCH_TARGET_TFLOPS", default_value_t = 71.0)]
    pub target_tflops: f64,
    /// Also time each op of two single-stream decode steps, of a second prefill of the same length and of two
    /// steps of the batched streams (device and host time; adds CUDA events per op).
    #[arg(long)]
    pub profile: bool,
    /// Measure the decode steps (and with --profile their ops) and what they need only: no cuBLAS ceiling, no
    /// profiled second prefill, no per-block rows, no IPC hand-off. For A/B runs of the decode step
    /// (tools/device/ab-bins.sh): at long context those prefill --context positions again, twice (the profiled
    /// prefill, and the per-block rows' own cache from host-made activations).
    #[arg(long)]
    pub decode_only: bool,
    /// Also time single-stream decode with each of these fusions, overlaps or kernels undone and not, in turns in
    /// this process (`--ab-rounds` rounds of `--steps` steps each way): separate runs drift by a few % (host and
    /// clocks), which hides changes of that size. Repeat the flag for several.
    #[arg(long, value_enum)]
    pub ab: Vec<ab::AbSwitch>,
    /// Rounds of each `--ab` comparison.
    #[arg(long, default_value_t = 8)]
    pub ab_rounds: usize,
    /// Write every figure as JSON here.
    #[arg(long, env = "PIPEMOE_BENCH_JSON")]
    pub json: Option<PathBuf>,
    /// Also write each block's SM, start and end of 4 single-stream decode steps as CSV here, and of 2 steps of the
    /// batched streams to the same name with `.streams` before its extension (`tools/device/trace_summary.py`
    /// reads them). Needs kernels built with their records: PIPEMOE_TRACE=1 (pipemoe_cuda::trace).
    #[arg(long)]
    pub trace: Option<PathBuf>,
}

/// The extension of the batched streams' trace: `streams.csv` beside `trace.csv`.
fn streams_extension(path: &Path) -> String {
    match path.extension() {
        Some(e) => format!("streams.{}", e.to_string_lossy()),
        None => "streams".into(),
    }
}

/// Why a figure `--decode-only` leaves out has no value.
const SKIPPED: &str = "skipped (--decode-only)";

/// Decode steps a `--trace` records, one stream and many.
const TRACE_STEPS: (usize, usize) = (4, 2);

/// Runs `steps` decode steps of `seqs` with every kernel's blocks recorded, and writes them to `path` as CSV.
fn trace_steps(run: &mut stage::Runner, backend: &CudaBackend, seqs: &[u64], steps: usize, path: &Path) -> Result<()> {
    let gpu = &backend.gpu;
    gpu.trace_clear()?;
    run.decode(seqs, 0, steps)?;
    let trace = gpu.trace_take()?;
    std::fs::write(path, trace.csv()).with_context(|| format!("writing {}", path.display()))?;
    eprintln!(
        "bench: trace of {steps} decode steps of {} stream(s): {} blocks ({} past the room) in {}",
        seqs.len(),
        trace.records.len(),
        trace.dropped,
        path.display()
    );
    Ok(())
}

/// The slice's layer range for `kind` in a model of `layers` layers, `dense` of them dense.
fn slice_layers(kind: SliceKind, n: usize, layers: usize, dense: usize) -> std::ops::Range<usize> {
    let n = n.min(layers);
    match kind {
        SliceKind::First => 0..n,
        SliceKind::Middle => {
            let start = dense.min(layers - n);
            start..start + n
        }
        SliceKind::Last => layers - n..layers,
    }
}

fn default_cache_dir() -> PathBuf {
    std::env::var_os("HOME").map_or_else(std::env::temp_dir, PathBuf::from).join(".cache/pipemoe/bench-models")
}

/// The model directory and the slice to load from it.
fn model_and_slice(args: &BenchArgs) -> Result<(PathBuf, SliceSpec)> {
    let ends =
        |kind: SliceKind| (kind == SliceKind::First || args.with_head, kind == SliceKind::Last || args.with_head);
    let (embed, head) = ends(args.slice);
    if let Some(dir) = &args.model {
        let cfg = ModelConfig::from_dir(dir).context("reading the model's config")?;
        let layers = slice_layers(args.slice, args.layers, cfg.num_hidden_layers, cfg.first_k_dense_replace);
        return Ok((dir.clone(), SliceSpec { layers, experts: None, embed, head }));
    }
    let dims = Dims::deepseek_v32_reap();
    let layers = slice_layers(args.slice, args.layers, dims.layers, dims.first_dense);
    let spec = RandomSpec { dims, layers: layers.clone(), embed, head, seed: args.seed };
    let root = args.cache_dir.clone().unwrap_or_else(default_cache_dir);
    let t0 = Instant::now();
    eprintln!("bench: checkpoint for layers {layers:?} (embed {embed}, head {head}) under {}", root.display());
    let (dir, fresh) = random_checkpoint::cached(&root, &spec).context("generating the checkpoint")?;
    let verb = if fresh { "generated" } else { "reused" };
    eprintln!("bench: {verb} {} in {:.1} s", dir.display(), t0.elapsed().as_secs_f64());
    Ok((dir, SliceSpec { layers, experts: None, embed, head }))
}

fn has_indexer(cfg: &ModelConfig, ckpt: &Checkpoint, layer: usize) -> bool {
    let wk = format!("model.layers.{layer}.self_attn.indexer.wk");
    cfg.indexer.is_some() && (ckpt.contains(&format!("{wk}.qweight")) || ckpt.contains(&format!("{wk}.weight")))
}

/// Runs the benchmark; the table is the last thing printed.
pub fn run(args: &BenchArgs) -> Result<()> {
    if !args.generate_only
        && let Some(why) = pipemoe_cuda::gpu::unavailable()
    {
        bail!(
            "pipemoe bench times the CUDA backend and needs a CUDA GPU: {why}. \
             (--generate-only writes the checkpoint without one.)"
        );
    }
    let kv: KvDtype = args.kv_cache_dtype.parse().map_err(anyhow::Error::msg)?;
    if args.layers == 0 || args.context == 0 || args.chunk == 0 {
        bail!("--layers, --context and --chunk must be positive");
    }
    if args.trace.is_some() && !args.generate_only && !pipemoe_cuda::trace::enabled() {
        bail!("--trace needs the kernels built with their records: run with PIPEMOE_TRACE=1");
    }
    let (dir, slice) = model_and_slice(args)?;
    let cfg = ModelConfig::from_dir(&dir)?;
    let ckpt = Checkpoint::open(&dir)?;
    let with_indexer = has_indexer(&cfg, &ckpt, slice.layers.start);
    let bytes = SliceBytes {
        layers: slice.layers.clone().map(|l| layer_bytes(&cfg, &ckpt, l)).collect(),
        head: {
            let h = head_bytes(&ckpt);
            pipemoe_model::footprint::HeadBytes {
                embed: if slice.embed { h.embed } else { 0 },
                norm: if slice.head { h.norm } else { 0 },
                lm_head: if slice.head { h.lm_head } else { 0 },
            }
        },
        cache: CacheBytes::new(&cfg, kv.bytes(), with_indexer),
        hidden: cfg.hidden_size,
        top_k: cfg.num_experts_per_tok,
    };
    if args.generate_only {
        println!("{}: slice {:?}, {:.2} GB of weights", dir.display(), slice.layers, bytes.weights() as f64 / 1e9);
        return Ok(());
    }
    let measured = measure(args, &cfg, &ckpt, &slice, &bytes, kv, with_indexer)?;
    let rep = report::Report::new(args, &cfg, &slice, &bytes, &measured, with_indexer);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&rep.json())? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    print!("{}", rep.table());
    Ok(())
}

/// Everything timed on the GPU.
pub struct Measured {
    pub device: String,
    /// Multiprocessors × clock of this GPU, G cycles/s (`None` when the driver does not say).
    pub sm_ghz: Option<f64>,
    pub read_gbps: f64,
    pub read_buffer_bytes: usize,
    /// cuBLAS seconds per shape, or why there are none.
    pub cublas: std::result::Result<std::collections::BTreeMap<ceiling::Shape, f64>, String>,
    pub load_seconds: f64,
    pub prefill_chunks: Vec<f64>,
    /// The untimed first prefill chunk before them (one-time setup included).
    pub prefill_warmup: f64,
    pub decode: stage::Times,
    /// The host's time to queue each of those steps' launches.
    pub decode_issued: stage::Times,
    /// Each step's time after the host queued its last launch (`Runner::timed_decode`).
    pub decode_after: stage::Times,
    /// The same decode as launches, CUDA graphs off (when they were on), and its host queueing time.
    pub decode_launches: Option<(stage::Times, stage::Times)>,
    /// Decode steps of the timed runs replayed as CUDA graphs.
    pub graph_replays: usize,
    pub streams_context: usize,
    pub streams_prefill_seconds: f64,
    pub streams_decode: Option<stage::Times>,
    pub blocks: Option<stage::BlockTimes>,
    pub ipc: std::result::Result<ipc::IpcTimes, String>,
    /// The bench's device ordinal (the IPC sender).
    pub ordinal: usize,
    /// Per-op times of two decode steps (`--profile`).
    pub profile: Option<pipemoe_cuda::profile::Profile>,
    /// Per-op times of a second prefill of the same prompt length (`--profile`).
    pub prefill_profile: Option<pipemoe_cuda::profile::Profile>,
    /// The same for two steps of the batched streams.
    pub streams_profile: Option<pipemoe_cuda::profile::Profile>,
    /// `--ab`'s comparisons.
    pub ab: Vec<ab::AbResult>,
}

fn measure(
    args: &BenchArgs,
    cfg: &ModelConfig,
    ckpt: &Checkpoint,
    slice: &SliceSpec,
    bytes: &SliceBytes,
    kv: KvDtype,
    with_indexer: bool,
) -> Result<Measured> {
    let backend = CudaBackend::new(args.device).context("opening the GPU")?.with_kv_dtype(kv);
    let device = backend.gpu.describe();
    eprintln!("bench: {device}");
    let clock = cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CLOCK_RATE;
    let sm_ghz = backend.gpu.ctx.attribute(clock).ok().map(|khz| backend.gpu.sm_count as f64 * khz as f64 / 1e6);
    // Ceilings first, while the device memory is free.
    let (read_bps, read_buffer_bytes) = ceiling::stream_read(&backend.gpu, bytes.weights() as usize)?;
    eprintln!("bench: streaming read {:.0} GB/s over {:.1} GB", read_bps / 1e9, read_buffer_bytes as f64 / 1e9);
    let mut shapes: Vec<ceiling::Shape> = slice
        .layers
        .clone()
        .flat_map(|l| floor::prefill_shapes(cfg, l, args.chunk, with_indexer))
        .map(|(s, _)| s)
        .collect();
    shapes.sort();
    shapes.dedup();
    let cublas = if args.decode_only {
        Err(SKIPPED.to_string())
    } else {
        ceiling::cublas(&backend.gpu)
            .and_then(|blas| ceiling::cublas_times(&backend.gpu, &blas, &shapes).map_err(|e| format!("{e:#}")))
    };
    if let Err(why) = &cublas {
        eprintln!("bench: no cuBLAS ceiling: {why}");
    }

    // The cache sized as a worker sizes it, for the larger of the two decode figures.
    let streams_context = args.streams_context.unwrap_or(args.context);
    // Each decode run is 3 untimed steps and `steps` timed ones: the graphs-on and -off runs, the profile's 2 and
    // the A/B's.
    let decoded = 2 * (args.steps + 3) + 2 + ab::positions(args.ab.len(), args.ab_rounds, args.steps) + TRACE_STEPS.0;
    let positions = (args.context + decoded + 8).max(args.streams * (streams_context + args.steps + 8));
    let per_position = (bytes.cache.latent + bytes.cache.index_key) as usize + 12;
    let n_layers = slice.layers.len();
    let budget = (positions + 64 * args.streams.max(1)) * per_position * n_layers * 11 / 10;
    let backend = backend.with_cache_budget(budget, n_layers);
    let t0 = Instant::now();
    let free = || backend.gpu.ctx.mem_get_info().map(|(free, _)| free as f64 / 1e9).unwrap_or(f64::NAN);
    let free_before = free();
    let stage = Stage::load(backend.clone(), cfg, ckpt, slice.clone()).context("loading the slice")?;
    let load_seconds = t0.elapsed().as_secs_f64();
    // What the load took of the device (weights, the cache as sized above, the step's buffers).
    let held = free_before - free();
    eprintln!("bench: loaded {n_layers} layers in {load_seconds:.1} s, {held:.2} GB of device memory");
    let mut run = stage::Runner::new(stage, args.seed);

    // One untimed chunk first, on a sequence of its own: a process's first prefill step loads the prefill
    // kernels' modules and grows the memory pools (0.17 s of the 4K figure in session 11, PERF.md), which a server
    // pays once, not per prompt — as decode's untimed steps. Its time is reported apart.
    let warmup = run.prefill(WARMUP_SEQ, args.chunk.min(args.context), args.chunk)?.iter().sum::<f64>();
    run.free(&[WARMUP_SEQ]);
    let prefill_chunks = run.prefill(1, args.context, args.chunk)?;
    eprintln!("bench: prefill of {} positions in {:.2} s", args.context, prefill_chunks.iter().sum::<f64>());
    let stage::Decoded { steps: decode, queued: decode_issued, after: decode_after } =
        run.timed_decode(&[1], 3, args.steps)?;
    let graph_replays = backend.gpu.steps.replayed();
    eprintln!(
        "bench: decode {:.3} ms/step, queued by the host in {:.3} ms, {:.3} ms after that ({graph_replays} of {} \
         steps replayed as CUDA graphs)",
        decode.median * 1e3,
        decode_issued.median * 1e3,
        decode_after.median * 1e3,
        args.steps + 3
    );
    // The same steps as launches: what the graphs save, in the same run.
    let decode_launches = if backend.gpu.steps.enabled() {
        backend.gpu.steps.set_enabled(false);
        let timed = run.timed_decode(&[1], 3, args.steps);
        backend.gpu.steps.set_enabled(true);
        let stage::Decoded { steps: t, queued: q, .. } = timed?;
        eprintln!("bench: decode as launches {:.3} ms/step, queued in {:.3} ms", t.median * 1e3, q.median * 1e3);
        Some((t, q))
    } else {
        None
    };
    let ab = ab::run(&mut run, &backend, &args.ab, args.ab_rounds, args.steps)?;
    if let Some(path) = &args.trace {
        trace_steps(&mut run, &backend, &[1], TRACE_STEPS.0, path)?;
    }
    let profile = if args.profile {
        backend.gpu.profile_start();
        let wall = run.decode(&[1], 0, 2)?.iter().sum::<f64>();
        let p = backend.gpu.profile_take()?;
        eprint!("bench: profile of 2 decode steps ({:.1} us of wall time):\n{}", wall * 1e6, p.table());
        Some(p)
    } else {
        None
    };
    run.free(&[1]);
    // A second prefill of the same length, profiled (the timed one above ran without the profiler's events); the
    // cache holds one prompt of this length, so it comes after the first sequence is freed.
    let prefill_profile = if args.profile && !args.decode_only {
        backend.gpu.profile_start();
        let wall = run.prefill(2, args.context, args.chunk)?.iter().sum::<f64>();
        let p = backend.gpu.profile_take()?;
        eprint!(
            "bench: profile of a prefill of {} positions ({:.1} ms of wall time):\n{}",
            args.context,
            wall * 1e3,
            p.table()
        );
        run.free(&[2]);
        Some(p)
    } else {
        None
    };

    let (mut streams_prefill_seconds, mut streams_decode, mut streams_profile) = (0.0, None, None);
    if args.streams > 0 {
        let seqs: Vec<u64> = (100..100 + args.streams as u64).collect();
        for &s in &seqs {
            streams_prefill_seconds += run.prefill(s, streams_context, args.chunk)?.iter().sum::<f64>();
        }
        let t = stage::Times::of(run.decode(&seqs, 3, args.steps)?);
        eprintln!("bench: {} streams {:.3} ms/step", args.streams, t.median * 1e3);
        streams_decode = Some(t);
        if let Some(path) = &args.trace {
            trace_steps(&mut run, &backend, &seqs, TRACE_STEPS.1, &path.with_extension(streams_extension(path)))?;
        }
        if args.profile {
            backend.gpu.profile_start();
            let wall = run.decode(&seqs, 0, 2)?.iter().sum::<f64>();
            let p = backend.gpu.profile_take()?;
            eprint!(
                "bench: profile of 2 decode steps of {} streams ({:.1} us of wall time):\n{}",
                args.streams,
                wall * 1e6,
                p.table()
            );
            streams_profile = Some(p);
        }
        run.free(&seqs);
    }
    drop(run);

    let moe_layer = slice.layers.clone().find(|&l| cfg.is_moe_layer(l)).unwrap_or(slice.layers.start);
    let batches: Vec<usize> = [1, args.streams].into_iter().filter(|&b| b > 0).collect();
    let blocks = if args.decode_only {
        None
    } else {
        stage::time_blocks(&backend, cfg, ckpt, moe_layer, args.context, &batches)
            .inspect_err(|e| eprintln!("bench: per-block rows skipped: {e:#}"))
            .ok()
    };
    // A hop is between two GPUs: with a second one here the hand-off goes to it (on one GPU the two processes'
    // contexts take turns on it, which costs ~250 us of landing that two GPUs do not pay).
    let peer = match pipemoe_cuda::gpu::device_count() {
        Ok(n) if n > 1 => (args.device + 1) % n,
        _ => args.device,
    };
    let ipc = if args.decode_only {
        Err(SKIPPED.to_string())
    } else {
        ipc::measure(&backend, peer, cfg.hidden_size, 50).map_err(|e| format!("{e:#}"))
    };
    if let Err(why) = &ipc {
        eprintln!("bench: IPC hand-off not measured: {why}");
    }
    Ok(Measured {
        device,
        sm_ghz,
        read_gbps: read_bps / 1e9,
        read_buffer_bytes,
        cublas,
        load_seconds,
        prefill_chunks,
        prefill_warmup: warmup,
        decode,
        decode_issued,
        decode_after,
        decode_launches,
        graph_replays,
        streams_context,
        streams_prefill_seconds,
        streams_decode,
        blocks,
        ipc,
        ordinal: args.device,
        profile,
        prefill_profile,
        streams_profile,
        ab,
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn slices_sit_where_an_eight_gpu_pipeline_puts_them() {
        assert_eq!(slice_layers(SliceKind::First, 8, 61, 3), 0..8);
        assert_eq!(slice_layers(SliceKind::Middle, 8, 61, 3), 3..11);
        assert_eq!(slice_layers(SliceKind::Last, 8, 61, 3), 53..61);
        assert_eq!(slice_layers(SliceKind::Middle, 70, 61, 3), 0..61);
    }

    #[test]
    fn ab_switches_parse_by_name_and_size_the_cache() {
        let cli =
            crate::Cli::parse_from(["pipemoe", "bench", "--ab", "plan", "--ab", "prep-write", "--ab-rounds", "3"]);
        let crate::Command::Bench(args) = cli.command else { panic!("not the bench command") };
        assert_eq!(args.ab, [ab::AbSwitch::Plan, ab::AbSwitch::PrepWrite]);
        let kernels = crate::Cli::parse_from(["pipemoe", "bench", "--ab", "dense-kvb", "--ab", "exact-flash"]);
        let crate::Command::Bench(k) = kernels.command else { panic!("not the bench command") };
        assert_eq!(k.ab, [ab::AbSwitch::DenseKvb, ab::AbSwitch::ExactFlash]);
        assert_eq!(k.ab.iter().map(|s| s.name()).collect::<Vec<_>>(), ["dense-kvb", "exact-flash"]);
        assert_eq!(args.ab_rounds, 3);
        // Two switches, 3 rounds, 16 timed steps: each round decodes 19 positions each way.
        assert_eq!(ab::positions(args.ab.len(), args.ab_rounds, 16), 2 * 2 * 3 * 19);
        assert!(crate::Cli::try_parse_from(["pipemoe", "bench", "--ab", "nothing"]).is_err());
        // tools/device/ab-bins.sh's usage names --decode-only; the full run is the default.
        assert!(!args.decode_only);
        let quick = crate::Cli::parse_from(["pipemoe", "bench", "--decode-only", "--profile"]);
        let crate::Command::Bench(q) = quick.command else { panic!("not the bench command") };
        assert!(q.decode_only && q.profile);
    }

    #[test]
    fn without_a_gpu_it_says_why_and_fails() {
        let Some(why) = pipemoe_cuda::gpu::unavailable() else {
            eprintln!("SKIPPED (a GPU is present): the no-GPU message");
            return;
        };
        let cli = crate::Cli::parse_from(["pipemoe", "bench", "--layers", "1"]);
        let crate::Command::Bench(args) = cli.command else { panic!("not the bench command") };
        let err = run(&args).expect_err("bench without a GPU must fail").to_string();
        assert!(err.contains("needs a CUDA GPU") && err.contains(&why), "{err}");
    }
}
