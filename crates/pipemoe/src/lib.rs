//! The `pipemoe` command line. Today: `inspect` and `generate`. The server (`serve`, `start`, `stop`, `status`), `recipe`,
//! `worker` and `bench` subcommands come with the controller and worker issues (docs/ARCHITECTURE.md).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

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
    }
}
