//! The PID file (`data/pipemoe.pid`) and the state file beside it (`data/pipemoe.json`).
//!
//! The server holds an exclusive `flock` on the PID file for its whole life (DEPENDENCIES.md §8): the lock, not
//! the file's existence, says it runs, so a file left by a crash is harmless (`Probe::Stale`). Files are
//! removed only by a process holding the lock (the server on exit, `stop` for a stale file), state file
//! first, so a remover never deletes a newer server's files. The state file says where the running server
//! listens and what it serves; whoever holds the PID file writes it.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Environment variable `pipemoe start` sets for the server it spawns: the log file its output goes to.
pub const LOG_FILE_ENV: &str = "PIPEMOE_LOG_FILE";

/// A lock attempt can meet a `probe` holding the lock for a few microseconds: try a few times.
const LOCK_TRIES: u32 = 5;
const LOCK_RETRY: Duration = Duration::from_millis(20);
/// How long a reader waits for a fresh holder to write its pid (between `set_len(0)` and the write).
const PID_READ_PATIENCE: Duration = Duration::from_secs(1);

/// The PID file of this process, locked. Dropping it removes the state file and the PID file.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
    state_path: PathBuf,
    /// Held, never read: the flock lasts as long as this value.
    _lock: Flock<File>,
}

/// What a PID file says about the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// No PID file.
    NotRunning,
    /// A PID file nobody holds: its server is gone. The pid it names, if readable.
    Stale(Option<u32>),
    /// A process holds the lock; its pid.
    Running(u32),
}

impl PidFile {
    /// Takes the PID file at `path` (creating it and its directory), writes this process's pid and syncs it.
    /// Another holder gives `Error::AlreadyRunning` with the pid it wrote.
    pub fn acquire(path: &Path) -> Result<Self> {
        let io = |e| Error::Io { path: path.to_path_buf(), source: e };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::Io { path: dir.to_path_buf(), source: e })?;
        }
        for attempt in 1..=LOCK_TRIES {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .open(path)
                .map_err(io)?;
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => {
                    // Between our open and lock, the previous holder may have removed the file: then we locked
                    // an unlinked inode, and must start over on the new path.
                    if !is_current(&lock, path)? {
                        continue;
                    }
                    let mut f: &File = &lock;
                    f.set_len(0).map_err(io)?;
                    f.write_all(format!("{}\n", std::process::id()).as_bytes()).map_err(io)?;
                    f.sync_all().map_err(io)?;
                    return Ok(Self { path: path.to_path_buf(), state_path: state_path_for(path), _lock: lock });
                }
                Err((_, Errno::EWOULDBLOCK)) if attempt < LOCK_TRIES => std::thread::sleep(LOCK_RETRY),
                Err((_, Errno::EWOULDBLOCK)) => {
                    return Err(Error::AlreadyRunning { pid: read_pid_patiently(path), url: None });
                }
                Err((_, e)) => return Err(Error::Lock { path: path.to_path_buf(), what: "locking", source: e }),
            }
        }
        Err(Error::AlreadyRunning { pid: read_pid_patiently(path), url: None })
    }

    /// Says whether a server holds the PID file at `path`, without disturbing it (the lock test lasts
    /// microseconds, and `acquire` retries across it).
    pub fn probe(path: &Path) -> Result<Probe> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Probe::NotRunning),
            Err(e) => return Err(Error::Io { path: path.to_path_buf(), source: e }),
        };
        match Flock::lock(file, FlockArg::LockSharedNonblock) {
            Ok(lock) => {
                drop(lock);
                Ok(Probe::Stale(read_pid(path)))
            }
            Err((_, Errno::EWOULDBLOCK)) => match read_pid_patiently(path) {
                Some(pid) => Ok(Probe::Running(pid)),
                None => Err(Error::PidFileContent {
                    path: path.to_path_buf(),
                    content: std::fs::read_to_string(path).unwrap_or_default(),
                }),
            },
            Err((_, e)) => Err(Error::Lock { path: path.to_path_buf(), what: "testing the lock", source: e }),
        }
    }

    /// Removes a stale PID file and its state file, under the lock. Returns false (and removes nothing) when
    /// a server holds it, true when the files are gone (or were never there).
    pub fn remove_stale(path: &Path) -> Result<bool> {
        let file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(true),
            Err(e) => return Err(Error::Io { path: path.to_path_buf(), source: e }),
        };
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => {
                if is_current(&lock, path)? {
                    remove_if_present(&state_path_for(path))?;
                    remove_if_present(path)?;
                }
                Ok(true)
            }
            Err((_, Errno::EWOULDBLOCK)) => Ok(false),
            Err((_, e)) => Err(Error::Lock { path: path.to_path_buf(), what: "locking", source: e }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The state file beside the PID file (`pipemoe.pid` → `pipemoe.json`).
    pub fn state_path(&self) -> &Path {
        &self.state_path
    }

    /// Writes the state file (atomically: a temporary file renamed over it).
    pub fn write_state(&self, state: &ServerState) -> Result<()> {
        write_state(&self.state_path, state)
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        // The state file first: once the PID file is gone a new server may start and write its own.
        for p in [&self.state_path, &self.path] {
            if let Err(e) = remove_if_present(p) {
                tracing::warn!("{e}");
            }
        }
        // `_lock` drops after this body: the flock is released only once the files are gone.
    }
}

/// The state file of the PID file at `pid_path`: same directory and stem, `.json`.
pub fn state_path_for(pid_path: &Path) -> PathBuf {
    pid_path.with_extension("json")
}

/// Where the running server listens and what it serves (`data/pipemoe.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerState {
    pub pid: u32,
    /// The address the HTTP API is bound to, as `SocketAddr` prints it (`127.0.0.1:8000`, `[::1]:8000`).
    pub http_addr: String,
    /// The log file the server's output goes to, when it has one (`pipemoe start` without --foreground).
    pub log_path: Option<PathBuf>,
    pub recipe_id: String,
    /// RFC 3339, UTC.
    pub started_at: String,
}

impl ServerState {
    /// This process's state: its pid, now, and the log file `pipemoe start` named in `PIPEMOE_LOG_FILE`.
    pub fn new(http_addr: impl Into<String>, recipe_id: impl Into<String>) -> Self {
        Self {
            pid: std::process::id(),
            http_addr: http_addr.into(),
            log_path: std::env::var_os(LOG_FILE_ENV).filter(|v| !v.is_empty()).map(PathBuf::from),
            recipe_id: recipe_id.into(),
            started_at: rfc3339(SystemTime::now()),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.http_addr)
    }
}

/// Writes `state` to `path` atomically (temporary file, fsync, rename).
pub fn write_state(path: &Path, state: &ServerState) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e| Error::Io { path: p, source: e }
    };
    let text =
        serde_json::to_string_pretty(state).map_err(|e| Error::StateFile { path: path.to_path_buf(), source: e })?;
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(format!("{text}\n").as_bytes()).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Reads the state file; `None` when there is none.
pub fn read_state(path: &Path) -> Result<Option<ServerState>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::Io { path: path.to_path_buf(), source: e }),
    };
    serde_json::from_str(&text).map(Some).map_err(|e| Error::StateFile { path: path.to_path_buf(), source: e })
}

/// The pid written in a PID file, if it holds one.
pub fn read_pid(path: &Path) -> Option<u32> {
    let mut text = String::new();
    File::open(path).ok()?.read_to_string(&mut text).ok()?;
    text.trim().parse().ok().filter(|&p| p > 0)
}

fn read_pid_patiently(path: &Path) -> Option<u32> {
    let deadline = std::time::Instant::now() + PID_READ_PATIENCE;
    loop {
        match read_pid(path) {
            Some(pid) => return Some(pid),
            None if std::time::Instant::now() >= deadline => return None,
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Whether the open `file` is still the one at `path` (same device and inode).
fn is_current(file: &File, path: &Path) -> Result<bool> {
    let held = file.metadata().map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
    match std::fs::metadata(path) {
        Ok(now) => Ok(now.dev() == held.dev() && now.ino() == held.ino()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::Io { path: path.to_path_buf(), source: e }),
    }
}

fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(Error::Io { path: path.to_path_buf(), source: e }),
        _ => Ok(()),
    }
}

/// `2026-11-28T23:59:01Z`. Days to civil date: Howard Hinnant's `civil_from_days`
/// (<https://howardhinnant.github.io/date_algorithms.html>).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_acquire_fails_with_the_holders_pid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/pipemoe.pid");
        let held = PidFile::acquire(&path).unwrap();
        assert_eq!(read_pid(&path), Some(std::process::id()));
        // A second open file description of the same file: flock refuses it even in this process.
        match PidFile::acquire(&path) {
            Err(Error::AlreadyRunning { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("expected AlreadyRunning, got {other:?}"),
        }
        assert_eq!(PidFile::probe(&path).unwrap(), Probe::Running(std::process::id()));
        assert!(!PidFile::remove_stale(&path).unwrap(), "a held PID file is not stale");
        assert!(path.exists());
        drop(held);
    }

    #[test]
    fn drop_removes_the_pid_and_state_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pipemoe.pid");
        let held = PidFile::acquire(&path).unwrap();
        let state = ServerState::new("127.0.0.1:8000", "demo");
        held.write_state(&state).unwrap();
        assert_eq!(held.state_path(), dir.path().join("pipemoe.json"));
        assert_eq!(read_state(held.state_path()).unwrap(), Some(state));
        drop(held);
        assert!(!path.exists());
        assert!(!dir.path().join("pipemoe.json").exists());
        assert_eq!(PidFile::probe(&path).unwrap(), Probe::NotRunning);
        assert_eq!(read_state(&dir.path().join("pipemoe.json")).unwrap(), None);
        // Taken again after release.
        let again = PidFile::acquire(&path).unwrap();
        drop(again);
    }

    #[test]
    fn a_file_nobody_holds_is_stale() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pipemoe.pid");
        std::fs::write(&path, "4242\n").unwrap();
        std::fs::write(dir.path().join("pipemoe.json"), "{}").unwrap();
        assert_eq!(PidFile::probe(&path).unwrap(), Probe::Stale(Some(4242)));
        std::fs::write(&path, "garbage").unwrap();
        assert_eq!(PidFile::probe(&path).unwrap(), Probe::Stale(None));
        assert!(matches!(read_state(&dir.path().join("pipemoe.json")), Err(Error::StateFile { .. })));
        assert!(PidFile::remove_stale(&path).unwrap());
        assert!(!path.exists() && !dir.path().join("pipemoe.json").exists());
        // A stale file is simply taken over.
        std::fs::write(&path, "4242\n").unwrap();
        let held = PidFile::acquire(&path).unwrap();
        assert_eq!(read_pid(&path), Some(std::process::id()));
        drop(held);
    }

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400 + 86_399)), "2000-02-29T23:59:59Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(1_796_083_200)), "2026-12-01T00:00:00Z");
    }
}
