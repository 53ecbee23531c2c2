//! `pipemoe status`: whether a server holds the PID file, where it listens (state file), its `/health`, and
//! its workers (`/v1/workers`). Exit codes follow LSB/systemctl: 0 running and healthy, 3 not running
//! (a stale PID file included), 4 running but not answering as healthy (starting, or in trouble).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde_json::Value;

use super::http::{http_get, local_target};
use super::{Paths, block_on, text_table};
use crate::error::Result;
use crate::pidfile::{PidFile, Probe, read_state};

const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

pub const EXIT_RUNNING: i32 = 0;
pub const EXIT_NOT_RUNNING: i32 = 3;
pub const EXIT_UNHEALTHY: i32 = 4;

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// Data directory holding pipemoe.pid and pipemoe.json.
    #[arg(long, env = "PIPEMOE_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,
}

/// What `status` prints, and its exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusReport {
    pub text: String,
    pub exit_code: i32,
}

impl fmt::Display for StatusReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

pub fn status(args: StatusArgs) -> Result<StatusReport> {
    let paths = Paths::new(&args.data_dir, None);
    let report = |text: String, exit_code| Ok(StatusReport { text, exit_code });
    let pid = match PidFile::probe(&paths.pid)? {
        Probe::NotRunning => return report("pipemoe is not running".into(), EXIT_NOT_RUNNING),
        Probe::Stale(pid) => {
            let was = pid.map(|p| format!(", pid {p}")).unwrap_or_default();
            let text = format!(
                "pipemoe is not running (stale PID file {}{was}; `pipemoe stop` removes it)",
                paths.pid.display()
            );
            return report(text, EXIT_NOT_RUNNING);
        }
        Probe::Running(pid) => pid,
    };
    let Some(state) = read_state(&paths.state).ok().flatten().filter(|s| s.pid == pid) else {
        return report(format!("pipemoe is running (pid {pid}) but not listening yet (starting)"), EXIT_UNHEALTHY);
    };
    let mut lines = vec![format!("pipemoe is running (pid {pid}) at {}", state.url())];
    let log = state.log_path.clone().or_else(|| paths.log.exists().then(|| paths.log.clone()));
    let log = log.map(|l| format!(", log {}", l.display())).unwrap_or_default();
    lines.push(format!("  recipe {}, started {}{log}", state.recipe_id, state.started_at));
    let target = local_target(&state.http_addr);
    let (health, workers) = block_on(async {
        tokio::join!(http_get(&target, "/health", HTTP_TIMEOUT), http_get(&target, "/v1/workers", HTTP_TIMEOUT))
    })?;
    let healthy = matches!(health, Ok((200, _)));
    lines.push(format!("  health: {}", describe_health(&health)));
    match workers {
        Ok((200, body)) => match serde_json::from_str::<Value>(&body) {
            Ok(v) => lines.push(workers_table(&v)),
            Err(e) => lines.push(format!("  workers: unreadable answer ({e})")),
        },
        Ok((code, body)) => lines.push(format!("  workers: HTTP {code} {}", one_line(&body))),
        Err(e) => lines.push(format!("  workers: {e}")),
    }
    report(lines.join("\n"), if healthy { EXIT_RUNNING } else { EXIT_UNHEALTHY })
}

fn describe_health(health: &Result<(u16, String)>) -> String {
    match health {
        Ok((code, body)) => {
            let status =
                serde_json::from_str::<Value>(body).ok().and_then(|v| v["status"].as_str().map(str::to_string));
            match (code, status) {
                (200, Some(s)) => s,
                (200, None) => "ok".into(),
                (code, Some(s)) => format!("{s} (HTTP {code})"),
                (code, None) => format!("HTTP {code} {}", one_line(body)),
            }
        }
        Err(e) => format!("no answer ({e})"),
    }
}

/// The `/v1/workers` answer (a list, or an object with the list under `workers` or `data`) as a table.
fn workers_table(v: &Value) -> String {
    let list = v.as_array().or_else(|| v["workers"].as_array()).or_else(|| v["data"].as_array());
    let Some(list) = list else {
        return format!("  workers: {}", one_line(&v.to_string()));
    };
    if list.is_empty() {
        return "  workers: none".into();
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|w| {
            vec![
                cell(&w["rank"]),
                cell(&w["pid"]),
                cell(&w["device"]),
                cell(&w["state"]),
                range(&w["layers"], "-"),
                range(&w["experts"], "all"),
                w["memory_bytes"].as_u64().map_or_else(|| cell(&w["memory_bytes"]), bytes),
                cell(&w["message"]),
            ]
        })
        .collect();
    text_table(&["RANK", "PID", "DEVICE", "STATE", "LAYERS", "EXPERTS", "MEMORY", "MESSAGE"], &rows)
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => one_line(s),
        other => other.to_string(),
    }
}

/// `[a, b]` (half-open) as `a..b`; `null` as `absent`.
fn range(v: &Value, absent: &str) -> String {
    match v.as_array().map(Vec::as_slice) {
        Some([a, b]) => format!("{}..{}", cell(a), cell(b)),
        _ if v.is_null() => absent.to_string(),
        _ => cell(v),
    }
}

fn bytes(n: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    let x = n as f64;
    if x >= GIB { format!("{:.2} GiB", x / GIB) } else { format!("{:.1} MiB", x / MIB) }
}

fn one_line(s: &str) -> String {
    let flat: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > 120 { format!("{}…", flat.chars().take(120).collect::<String>()) } else { flat }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn workers_print_as_a_table() {
        let v = json!([
            {"rank": 0, "pid": 11, "device": "cpu", "state": "ready", "layers": [0, 2], "experts": null, "memory_bytes": 3_145_728, "message": ""},
            {"rank": 1, "pid": 12, "device": "cuda:0", "state": "loading", "layers": [2, 4], "experts": [0, 8], "memory_bytes": 21_474_836_480u64, "message": "loading\nshards"}
        ]);
        let t = workers_table(&v);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "RANK  PID  DEVICE  STATE    LAYERS  EXPERTS  MEMORY     MESSAGE");
        assert_eq!(lines[1], "0     11   cpu     ready    0..2    all      3.0 MiB");
        assert_eq!(lines[2], "1     12   cuda:0  loading  2..4    0..8     20.00 GiB  loading shards");
        assert_eq!(workers_table(&json!({"workers": []})), "  workers: none");
    }

    #[test]
    fn health_is_summarized() {
        assert_eq!(describe_health(&Ok((200, r#"{"status":"ok"}"#.into()))), "ok");
        assert_eq!(describe_health(&Ok((503, r#"{"status":"degraded"}"#.into()))), "degraded (HTTP 503)");
        assert_eq!(describe_health(&Ok((500, "oops".into()))), "HTTP 500 oops");
    }
}
