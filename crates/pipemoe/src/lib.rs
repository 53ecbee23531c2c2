//! The `pipemoe` command line: `inspect`, `generate`, the server (`serve`, `start`, `stop`, `status`), `recipe`,
//! `worker`, and `bench` (one GPU's slice of the real model timed against ceilings, docs/PERF.md).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub mod bench;
pub mod generate;
pub mod inspect;

/// Inference server for huge low-bit GPTQ Mixture-of-Experts models.
#[derive(Debug, Parser)]
#[command(name = "pipemoe", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a model directory against its config.json and print what it holds.
    Inspect(InspectArgs),
    /// Generate a continuation in this process on the CPU (no server): for people and for checks.
    Generate(generate::GenerateArgs),
    /// Serve one slice of the model on one device (internal: the controller spawns one per device).
    Worker(pipemoe_worker::WorkerArgs),
    /// Run the controller in the foreground: spawn the recipe's workers, serve the OpenAI API until SIGTERM.
    Serve(pipemoe_controller::serve::ServeArgs),
    /// Manage recipes (what the server runs): upsert, list, show, rm.
    Recipe(pipemoe_controller::recipes::cli::RecipeArgs),
    /// Start the server in the background and wait until its API answers (--foreground: serve here).
    Start(pipemoe_controller::lifecycle::StartArgs),
    /// Stop the server: SIGTERM, a grace period, then SIGKILL.
    Stop(pipemoe_controller::lifecycle::StopArgs),
    /// Say whether the server runs, where, its health and its workers (exit 3 when not running).
    Status(pipemoe_controller::lifecycle::StatusArgs),
    /// Time one GPU's slice of the real model (generated at its dims) against ceilings measured in the same run.
    Bench(bench::BenchArgs),
    /// Time the activation hand-off between two processes (CUDA IPC) alone, e.g. with the peer on another GPU.
    BenchIpc(bench::ipc::IpcArgs),
    /// (internal) The other end of `bench`'s IPC hand-off measurement.
    #[command(hide = true)]
    BenchIpcPeer(bench::ipc::PeerArgs),
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Model directory: config.json plus model.safetensors or model.safetensors.index.json and its shards.
    #[arg(long, env = "PIPEMOE_MODEL")]
    pub model: PathBuf,
}

/// Runs one parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Inspect(args) => {
            print!("{}", inspect::inspect(&args.model)?);
            Ok(())
        }
        Command::Generate(args) => {
            println!("{}", generate::generate(&args)?);
            Ok(())
        }
        Command::Worker(args) => Ok(pipemoe_worker::run(args)?),
        Command::Serve(args) => serve(args),
        Command::Recipe(args) => {
            println!("{}", pipemoe_controller::recipes::cli::run(args)?);
            Ok(())
        }
        Command::Start(args) => {
            // A background start says where the server is; a foreground one has served and logged already.
            if let Some(line) = pipemoe_controller::lifecycle::start(args)? {
                println!("{line}");
            }
            Ok(())
        }
        Command::Stop(args) => {
            println!("{}", pipemoe_controller::lifecycle::stop(args)?);
            Ok(())
        }
        Command::Bench(args) => bench::run(&args),
        Command::BenchIpc(args) => bench::ipc::run(&args),
        Command::BenchIpcPeer(args) => bench::ipc::peer(&args),
        Command::Status(args) => {
            let report = pipemoe_controller::lifecycle::status(args)?;
            println!("{report}");
            // Exit codes are the interface of `status` (3 = not running), not errors.
            std::io::Write::flush(&mut std::io::stdout())?;
            std::process::exit(report.exit_code)
        }
    }
}

/// The controller on a multi-threaded runtime built here (not `#[tokio::main]`: `start` may fork first).
pub fn serve(args: pipemoe_controller::serve::ServeArgs) -> anyhow::Result<()> {
    pipemoe_controller::serve::init_logging(args.log_json);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(pipemoe_controller::serve::run(args))
}
