//! `pipemoe start` in the background, `status`, a refused second start, and `stop` leaving nothing behind.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
}

#[test]
fn start_status_stop_leave_no_process_and_no_pid_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("data");
    upsert_demo_recipe(&data, "life", "cpu,cpu,cpu", 512);
    // Whatever happens below, nothing outlives the test.
    struct Stop<'a>(&'a std::path::Path);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            let _ = pipemoe(self.0, &["stop", "--timeout", "5"]);
        }
    }
    let _guard = Stop(&data);
    let port = free_port().to_string();
    let start = |extra: &[&str]| {
        Command::new(bin())
            .args(["start", "--recipe", "life", "--port", &port])
            .args(extra)
            .env("PIPEMOE_DATA_DIR", &data)
            .env("PIPEMOE_DB", data.join("controller.db"))
            .output()
            .expect("run start")
    };
    let out = start(&[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("127.0.0.1:{port}")), "{stdout}");
    assert!(data.join("pipemoe.pid").exists());

    // The API answers as soon as start returns.
    let addr = format!("127.0.0.1:{port}");
    let r =
        request(&addr, "POST", "/v1/chat/completions", Some(&chat_body("What is 12 + 30?").to_string())).expect("chat");
    assert_eq!(r.status, 200, "{}", r.body);
    let workers: Vec<i32> = r_workers(&addr);
    assert_eq!(workers.len(), 3);
    let controller: i32 =
        std::fs::read_to_string(data.join("pipemoe.pid")).expect("pid").trim().parse().expect("pid number");

    let out = pipemoe(&data, &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains(&controller.to_string()) && text.matches("READY").count() >= 3, "{text}");

    // A second start is refused while one runs.
    let out = start(&[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already running"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = pipemoe(&data, &["stop"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && (alive(controller) || workers.iter().any(|&p| alive(p))) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!alive(controller), "controller {controller} still running");
    for p in workers {
        assert!(!alive(p), "worker {p} still running");
    }
    assert!(!data.join("pipemoe.pid").exists(), "PID file left behind");
    assert!(!data.join("pipemoe.json").exists(), "state file left behind");
    let out = pipemoe(&data, &["status"]);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stdout));
}

fn r_workers(addr: &str) -> Vec<i32> {
    let r = request(addr, "GET", "/v1/workers", None).expect("workers");
    r.json()
        .as_array()
        .map(|a| a.iter().filter_map(|w| w["pid"].as_i64()).map(|p| p as i32).collect())
        .unwrap_or_default()
}
