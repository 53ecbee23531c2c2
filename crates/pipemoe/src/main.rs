//! `pipemoe`: the one binary. Everything but argument parsing and the exit code lives in the library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    match pipemoe::run(pipemoe::Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole context chain on one line.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
