//! `pipemoe start` / `stop` / `status`: the server's life as seen from the command line.
//!
//! - this file: the data directory's paths (`DataArgs`, `Paths`), a runtime for one command, text tables.
//! - `start`: spawn `pipemoe serve` in the background and wait until its API answers, or serve in the
//!   foreground (what a service manager runs).
//! - `stop`: SIGTERM, a grace period, SIGKILL to the process group; `status`: PID file, state file, `/health`
//!   and `/v1/workers`.
//! - `http`: a minimal HTTP/1.1 GET over a TCP socket, for polling the server.

use std::path::{Path, PathBuf};

use clap::Args;

use crate::error::{Error, Result};

pub mod http;
pub mod start;
pub mod status;
pub mod stop;

pub use http::{http_get, local_target};
pub use start::{StartArgs, start};
pub use status::{StatusArgs, StatusReport, status};
pub use stop::{StopArgs, stop};

/// Where the server keeps its files.
#[derive(Debug, Clone, Args)]
pub struct DataArgs {
    /// Data directory: PID file (pipemoe.pid), state file (pipemoe.json), log (pipemoe.log) and the recipe
    /// database (controller.db, unless --db says otherwise).
    #[arg(long, env = "PIPEMOE_DATA_DIR", default_value = "data", global = true)]
    pub data_dir: PathBuf,
    /// Recipe database [default: <data-dir>/controller.db].
    #[arg(long, env = "PIPEMOE_DB", global = true)]
    pub db: Option<PathBuf>,
}

/// The files under the data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    pub data_dir: PathBuf,
    /// SQLite recipe database.
    pub db: PathBuf,
    /// Locked by the running server (`pidfile`).
    pub pid: PathBuf,
    /// Written by the running server: pid, address, log, recipe, start time.
    pub state: PathBuf,
    /// Output of a server started in the background.
    pub log: PathBuf,
}

impl Paths {
    pub fn new(data_dir: &Path, db: Option<&Path>) -> Self {
        Self {
            data_dir: data_dir.to_path_buf(),
            db: db.map_or_else(|| data_dir.join("controller.db"), Path::to_path_buf),
            pid: data_dir.join("pipemoe.pid"),
            state: data_dir.join("pipemoe.json"),
            log: data_dir.join("pipemoe.log"),
        }
    }

    pub fn from_args(args: &DataArgs) -> Self {
        Self::new(&args.data_dir, args.db.as_deref())
    }

    /// Where relative model paths resolve (`Recipe::resolve_model_path`) and the demo model lives.
    pub fn root(&self) -> PathBuf {
        match self.data_dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }
}

/// Runs one future on a current-thread runtime: the command-line subcommands are short and sequential.
pub fn block_on<F: std::future::Future>(f: F) -> Result<F::Output> {
    let rt =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| Error::Runtime { source: e })?;
    Ok(rt.block_on(f))
}

/// Left-aligned columns two spaces apart; the last column is not padded.
pub fn text_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let n = cells.len();
        let mut out = String::new();
        for (i, (cell, w)) in cells.into_iter().zip(&widths).enumerate() {
            out.push_str(cell);
            if i + 1 < n {
                out.extend(std::iter::repeat_n(' ', w - cell.chars().count() + 2));
            }
        }
        out.trim_end().to_string()
    };
    let mut lines = vec![line(headers.to_vec())];
    lines.extend(rows.iter().map(|r| line(r.iter().map(String::as_str).collect())));
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_live_under_the_data_dir() {
        let p = Paths::new(Path::new("data"), None);
        assert_eq!(p.db, PathBuf::from("data/controller.db"));
        assert_eq!(p.pid, PathBuf::from("data/pipemoe.pid"));
        assert_eq!(p.state, PathBuf::from("data/pipemoe.json"));
        assert_eq!(p.log, PathBuf::from("data/pipemoe.log"));
        assert_eq!(p.root(), PathBuf::from("."));
        let p = Paths::new(Path::new("/var/lib/pipemoe/data"), Some(Path::new("/etc/pipemoe.db")));
        assert_eq!(p.db, PathBuf::from("/etc/pipemoe.db"));
        assert_eq!(p.root(), PathBuf::from("/var/lib/pipemoe"));
    }

    #[test]
    fn tables_align() {
        let t = text_table(&["ID", "NAME"], &[vec!["demo".into(), "x".into()], vec!["a".into(), "long".into()]]);
        assert_eq!(t, "ID    NAME\ndemo  x\na     long");
    }
}
