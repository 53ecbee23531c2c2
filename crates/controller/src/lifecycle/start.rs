//! `pipemoe start`: refuses when a server holds the PID file; checks the recipe; then either serves in this
//! process (`--foreground`, what systemd runs) or spawns `pipemoe serve` in its own session with its output
//! appended to `data/pipemoe.log`, and returns once the API answers `GET /v1/models` with 200.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use clap::Args;
use clap::builder::BoolishValueParser;

use super::http::{http_get, local_target};
use super::{Paths, block_on};
use crate::error::{Error, Result};
use crate::pidfile::{LOG_FILE_ENV, PidFile, Probe, ServerState, read_state, rfc3339};
use crate::recipes::RecipeStore;
use crate::serve::ServeArgs;

/// Lines of the log shown when the server fails to start.
const LOG_TAIL_LINES: usize = 20;
const POLL_INTERVAL: Duration = Duration::from_millis(250);
const DEFAULT_WAIT_SECS: u64 = 600;

#[derive(Debug, Clone, Args)]
pub struct StartArgs {
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Serve in this process (logs to stderr) instead of in the background: for systemd and containers.
    #[arg(long, env = "PIPEMOE_FOREGROUND", action = clap::ArgAction::SetTrue, value_parser = BoolishValueParser::new())]
    pub foreground: bool,
    /// Seconds to wait for the API to answer [default: 600, or --ready-timeout + 60 when that is longer].
    #[arg(long, env = "PIPEMOE_WAIT_TIMEOUT")]
    pub wait_timeout: Option<u64>,
}

/// Runs `start`; returns the line to print (`None` after a foreground run, which logged as it went).
pub fn start(args: StartArgs) -> Result<Option<String>> {
    let paths = Paths::new(&args.serve.data_dir, args.serve.db.as_deref());
    refuse_if_running(&paths)?;
    if args.foreground {
        return foreground(args.serve);
    }
    block_on(check_recipe(&paths, &args.serve.recipe))??;
    let wait = args.wait_timeout.unwrap_or(DEFAULT_WAIT_SECS.max(args.serve.ready_timeout + 60));
    background(&args.serve, &paths, Duration::from_secs(wait)).map(Some)
}

/// `AlreadyRunning` with the address from the state file when a server holds the PID file.
pub fn refuse_if_running(paths: &Paths) -> Result<()> {
    match PidFile::probe(&paths.pid)? {
        Probe::Running(pid) => {
            let url = read_state(&paths.state).ok().flatten().filter(|s| s.pid == pid).map(|s| s.url());
            Err(Error::AlreadyRunning { pid: Some(pid), url })
        }
        Probe::NotRunning | Probe::Stale(_) => Ok(()),
    }
}

async fn check_recipe(paths: &Paths, id: &str) -> Result<()> {
    let store = RecipeStore::open(&paths.db).await?;
    let result = async {
        store.ensure_demo(&paths.root()).await?;
        store.require(id).await?.validate()
    }
    .await;
    store.close().await;
    result
}

/// `pipemoe serve` in this process, on a multi-threaded runtime built here.
fn foreground(serve: ServeArgs) -> Result<Option<String>> {
    crate::serve::init_logging(serve.log_json);
    let rt =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| Error::Runtime { source: e })?;
    rt.block_on(crate::serve::run(serve)).map_err(|e| Error::Serve { source: e })?;
    Ok(None)
}

fn background(serve: &ServeArgs, paths: &Paths, wait: Duration) -> Result<String> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e| Error::Io { path: p, source: e }
    };
    std::fs::create_dir_all(&paths.data_dir).map_err(io(&paths.data_dir))?;
    let mut log = OpenOptions::new().create(true).append(true).open(&paths.log).map_err(io(&paths.log))?;
    // The tail shown on failure starts here, so an older run's lines are never mistaken for this one's.
    let offset = log.metadata().map_err(io(&paths.log))?.len();
    writeln!(log, "==== pipemoe start, {}: serve --recipe {} ====", rfc3339(SystemTime::now()), serve.recipe)
        .map_err(io(&paths.log))?;
    let exe = std::env::current_exe().map_err(|e| Error::Spawn { source: e })?;
    let mut cmd = Command::new(exe);
    cmd.arg("serve")
        .args(serve_cli_args(serve))
        .env(LOG_FILE_ENV, &paths.log)
        // A log file, not a terminal: no colour codes (tracing-subscriber and most tools honour NO_COLOR).
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(io(&paths.log))?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent. A session of its own detaches
    // the server from this terminal (no SIGHUP when it closes) and makes it a process-group leader, so `stop`
    // can signal the group.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(drop).map_err(std::io::Error::from));
    }
    let mut child = cmd.spawn().map_err(|e| Error::Spawn { source: e })?;
    let pid = child.id();
    eprintln!(
        "starting pipemoe (pid {pid}, recipe {}); waiting up to {} s for its API (log {})",
        serve.recipe,
        wait.as_secs(),
        paths.log.display()
    );
    let state = block_on(wait_until_serving(&mut child, paths, wait))?.map_err(|e| with_log_tail(e, paths, offset))?;
    Ok(format!("pipemoe is serving {} at {} (pid {pid}, log {})", state.1, state.0.url(), paths.log.display()))
}

/// The flags of the `pipemoe serve` that `start` spawns.
fn serve_cli_args(s: &ServeArgs) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut flag = |name: &str, value: OsString| {
        a.push(name.into());
        a.push(value);
    };
    flag("--recipe", s.recipe.clone().into());
    flag("--host", s.host.clone().into());
    flag("--port", s.port.to_string().into());
    flag("--data-dir", s.data_dir.clone().into());
    if let Some(db) = &s.db {
        flag("--db", db.clone().into());
    }
    flag("--drain-timeout", s.drain_timeout.to_string().into());
    flag("--ready-timeout", s.ready_timeout.to_string().into());
    if s.log_json {
        a.push("--log-json".into());
    }
    a
}

/// Polls until the child has written the state file and its API answers `/v1/models` with 200; returns the
/// state and the served model name. Fails when the child exits first or the deadline passes.
async fn wait_until_serving(child: &mut Child, paths: &Paths, wait: Duration) -> Result<(ServerState, String)> {
    let deadline = Instant::now() + wait;
    let pid = child.id();
    loop {
        if let Some(status) = child.try_wait().map_err(|e| Error::Spawn { source: e })? {
            return Err(Error::ServeExited { status: status.to_string(), log_tail: String::new() });
        }
        // The state file names the bound address (--port 0 included) once the server listens.
        if let Ok(Some(state)) = read_state(&paths.state)
            && state.pid == pid
            && let Ok((200, body)) =
                http_get(&local_target(&state.http_addr), "/v1/models", Duration::from_secs(5)).await
        {
            let model = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["data"][0]["id"].as_str().map(str::to_string))
                .unwrap_or_else(|| "its model".to_string());
            return Ok((state, model));
        }
        if Instant::now() >= deadline {
            return Err(Error::StartTimeout {
                url: format!("http://{}/v1/models", join_addr(paths, pid)),
                secs: wait.as_secs(),
                pid,
                log_tail: String::new(),
            });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

fn join_addr(paths: &Paths, pid: u32) -> String {
    read_state(&paths.state)
        .ok()
        .flatten()
        .filter(|s| s.pid == pid)
        .map_or_else(|| "(not listening yet)".into(), |s| s.http_addr)
}

fn with_log_tail(e: Error, paths: &Paths, offset: u64) -> Error {
    let tail = log_tail(&paths.log, offset, LOG_TAIL_LINES);
    match e {
        Error::ServeExited { status, .. } => Error::ServeExited { status, log_tail: tail },
        Error::StartTimeout { url, secs, pid, .. } => Error::StartTimeout { url, secs, pid, log_tail: tail },
        other => other,
    }
}

/// The last `n` lines written to `log` after byte `offset`, as a message suffix.
fn log_tail(log: &Path, offset: u64, n: usize) -> String {
    let text = match std::fs::read(log) {
        Ok(bytes) => String::from_utf8_lossy(bytes.get(offset as usize..).unwrap_or_default()).into_owned(),
        Err(e) => return format!("; reading {}: {e}", log.display()),
    };
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with("==== pipemoe start")).collect();
    if lines.is_empty() {
        return format!("; {} holds nothing from this run", log.display());
    }
    let tail = &lines[lines.len().saturating_sub(n)..];
    format!(
        "; last lines of {}:\n{}",
        log.display(),
        tail.iter().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_tail_covers_this_run_only() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("pipemoe.log");
        std::fs::write(&log, "old line\n").unwrap();
        let offset = 9;
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        writeln!(f, "==== pipemoe start, now ====").unwrap();
        for i in 0..30 {
            writeln!(f, "line {i}").unwrap();
        }
        let tail = log_tail(&log, offset, 20);
        assert!(tail.contains("    line 10\n") && tail.ends_with("    line 29"), "{tail}");
        assert!(!tail.contains("line 9\n") && !tail.contains("old line") && !tail.contains("===="), "{tail}");
        assert!(log_tail(&log, 10_000, 20).contains("holds nothing"));
    }
}
