//! `pipemoe stop`: SIGTERM to the server named by the PID file, a grace period while it drains and stops its
//! workers, then SIGKILL to its process group. A stale PID file is removed.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

use super::Paths;
use crate::error::{Error, Result};
use crate::pidfile::{PidFile, Probe};

const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How long to wait for the process to vanish after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Args)]
pub struct StopArgs {
    /// Data directory holding pipemoe.pid.
    #[arg(long, env = "PIPEMOE_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,
    /// Seconds to wait after SIGTERM before SIGKILL.
    #[arg(long, env = "PIPEMOE_STOP_TIMEOUT", default_value_t = 30)]
    pub timeout: u64,
}

/// Runs `stop`; returns what happened, in a line.
pub fn stop(args: StopArgs) -> Result<String> {
    let paths = Paths::new(&args.data_dir, None);
    let pid = match PidFile::probe(&paths.pid)? {
        Probe::NotRunning => return Ok("pipemoe is not running".into()),
        Probe::Stale(pid) => {
            PidFile::remove_stale(&paths.pid)?;
            let was = pid.map(|p| format!(", pid {p}")).unwrap_or_default();
            return Ok(format!("pipemoe is not running (removed a stale PID file {}{was})", paths.pid.display()));
        }
        Probe::Running(pid) => pid,
    };
    let target = as_pid(pid)?;
    let started = Instant::now();
    match kill(target, Signal::SIGTERM) {
        Ok(()) => {}
        // Exited between the probe and the signal.
        Err(Errno::ESRCH) => return Ok(finish(&paths, format!("pipemoe (pid {pid}) had already stopped"))),
        Err(e) => return Err(Error::Signal { pid, signal: "SIGTERM", source: e }),
    }
    let grace = Duration::from_secs(args.timeout);
    if wait_gone(target, grace) {
        let secs = started.elapsed().as_secs_f64();
        return Ok(finish(&paths, format!("stopped pipemoe (pid {pid}) in {secs:.1} s")));
    }
    // Its own session (`start`) makes it a group leader; a server started otherwise has no group of its
    // own, and then only it is killed (its workers die with it: parent-death signal).
    match killpg(target, Signal::SIGKILL) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => return Err(Error::Signal { pid, signal: "SIGKILL", source: e }),
    }
    match kill(target, Signal::SIGKILL) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => return Err(Error::Signal { pid, signal: "SIGKILL", source: e }),
    }
    let how = if wait_gone(target, KILL_WAIT) { "killed it" } else { "sent SIGKILL, but it is still there" };
    Ok(finish(&paths, format!("pipemoe (pid {pid}) did not stop within {} s of SIGTERM; {how}", args.timeout)))
}

/// Removes the PID and state files if the server left them (a SIGKILLed one does), and says so.
fn finish(paths: &Paths, mut message: String) -> String {
    let left = paths.pid.exists();
    match PidFile::remove_stale(&paths.pid) {
        Ok(true) if left => message.push_str(&format!("; removed {}", paths.pid.display())),
        Ok(true) => {}
        Ok(false) => message.push_str(&format!("; {} is held by another process now", paths.pid.display())),
        Err(e) => message.push_str(&format!("; could not remove the PID file: {e}")),
    }
    message
}

fn as_pid(pid: u32) -> Result<Pid> {
    // Never signal 0 (our own group), 1 (init) or a negative number (a group): a garbled file must not do that.
    match i32::try_from(pid) {
        Ok(p) if p > 1 => Ok(Pid::from_raw(p)),
        _ => Err(Error::Signal { pid, signal: "any signal", source: Errno::EINVAL }),
    }
}

/// Polls until `pid` no longer exists (or is a zombie: it has exited, its parent has not reaped it yet).
fn wait_gone(pid: Pid, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !alive(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

fn alive(pid: Pid) -> bool {
    match kill(pid, None) {
        Err(Errno::ESRCH) => false,
        // EPERM: it exists but belongs to someone else.
        Ok(()) | Err(_) => !is_zombie(pid),
    }
}

fn is_zombie(pid: Pid) -> bool {
    // /proc/<pid>/stat: "pid (comm) S ...": the state follows the last ')' (comm may contain one).
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_waits_for_a_terminated_child() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pid = Pid::from_raw(child.id() as i32);
        assert!(alive(pid));
        kill(pid, Signal::SIGTERM).unwrap();
        // Unreaped, the child is a zombie: it counts as gone.
        assert!(wait_gone(pid, Duration::from_secs(5)));
        child.wait().unwrap();
        assert!(!alive(pid));
    }

    #[test]
    fn garbled_pids_are_never_signalled() {
        assert!(as_pid(0).is_err());
        assert!(as_pid(1).is_err());
        assert!(as_pid(u32::MAX).is_err());
        assert!(as_pid(1234).is_ok());
    }
}
