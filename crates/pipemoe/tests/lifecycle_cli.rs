//! `pipemoe start|stop|status` through the built binary, around PID files in a temporary data directory:
//! no server, a stale PID file, a PID file this test holds, and a server that fails to start.

use std::path::Path;
use std::process::{Command, Output};

use anyhow::Result;
use pipemoe_controller::pidfile::{PidFile, ServerState};

/// The binary with `--data-dir` (and the database) in `dir`, no PIPEMOE_* variables from the environment.
fn pipemoe(dir: &Path, cmd: &str, args: &[&str]) -> Result<Output> {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pipemoe"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("PIPEMOE_") {
            c.env_remove(k);
        }
    }
    Ok(c.arg(cmd).arg("--data-dir").arg(dir).args(args).output()?)
}

fn text(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn stop_and_status_without_a_server() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = pipemoe(dir.path(), "stop", &[])?;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout.trim(), "pipemoe is not running");

    let out = pipemoe(dir.path(), "status", &[])?;
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    assert_eq!(text(&out).0.trim(), "pipemoe is not running");
    Ok(())
}

#[test]
fn stop_removes_a_stale_pid_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (pid, state) = (dir.path().join("pipemoe.pid"), dir.path().join("pipemoe.json"));
    std::fs::write(&pid, "999999\n")?;
    std::fs::write(&state, "{}")?;

    let out = pipemoe(dir.path(), "status", &[])?;
    assert_eq!(out.status.code(), Some(3));
    assert!(text(&out).0.contains("stale PID file") && text(&out).0.contains("pid 999999"), "{:?}", text(&out));

    let out = pipemoe(dir.path(), "stop", &[])?;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.starts_with("pipemoe is not running (removed a stale PID file") && stdout.contains("pid 999999"),
        "{stdout}"
    );
    assert!(!pid.exists() && !state.exists());
    Ok(())
}

#[test]
fn start_is_refused_while_another_process_holds_the_lock() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let held = PidFile::acquire(&dir.path().join("pipemoe.pid"))?;
    // An address nothing listens on: `status` must report the server unhealthy, not hang.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    held.write_state(&ServerState::new(format!("127.0.0.1:{port}"), "demo"))?;
    let me = std::process::id();

    for args in [&[][..], &["--foreground"][..]] {
        let out = pipemoe(dir.path(), "start", args)?;
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert_eq!(
            stderr.trim(),
            format!("error: pipemoe is already running (pid {me}) at http://127.0.0.1:{port}; `pipemoe stop` first")
        );
    }
    assert!(!dir.path().join("pipemoe.log").exists(), "nothing was spawned");

    let out = pipemoe(dir.path(), "status", &[])?;
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(4), "{stdout}");
    assert!(stdout.starts_with(&format!("pipemoe is running (pid {me}) at http://127.0.0.1:{port}")), "{stdout}");
    assert!(stdout.contains("recipe demo") && stdout.contains("health: no answer"), "{stdout}");

    drop(held);
    assert!(!dir.path().join("pipemoe.pid").exists());
    Ok(())
}

#[test]
fn start_refuses_an_unknown_recipe_before_spawning() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = pipemoe(dir.path(), "start", &["--recipe", "nope"])?;
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("error: no recipe \"nope\""), "{stderr}");
    assert!(!dir.path().join("pipemoe.log").exists() && !dir.path().join("pipemoe.pid").exists());
    Ok(())
}

/// A recipe whose model is missing: the background server exits at once, and `start` says so with its log.
#[test]
fn start_reports_a_server_that_exits_with_its_log() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("controller.db");
    let upsert = Command::new(env!("CARGO_BIN_EXE_pipemoe"))
        .args(["recipe", "upsert", "--id", "broken", "--devices", "cpu", "--model"])
        .arg(dir.path().join("no-such-model"))
        .arg("--db")
        .arg(&db)
        .output()?;
    assert!(upsert.status.success(), "{:?}", text(&upsert));

    let out = pipemoe(dir.path(), "start", &["--recipe", "broken", "--port", "0", "--wait-timeout", "60"])?;
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stderr.contains("starting pipemoe (pid "), "{stderr}");
    assert!(
        stderr.contains("error: `pipemoe serve` exited (exit status: 1) before answering; last lines of"),
        "{stderr}"
    );
    assert!(stderr.contains("no-such-model"), "the log tail shows why: {stderr}");
    let log = std::fs::read_to_string(dir.path().join("pipemoe.log"))?;
    assert!(log.starts_with("==== pipemoe start, "), "{log}");
    assert!(!dir.path().join("pipemoe.pid").exists(), "the failed server released its PID file");
    assert_eq!(pipemoe(dir.path(), "status", &[])?.status.code(), Some(3));
    Ok(())
}
