//! Real clients against the real server: headless Chromium renders the dashboard, and the official `openai`
//! Python package talks to the API. Each skips with a printed reason where its tool is missing, except under
//! CI (`CI=true`), whose `.ci/run` installs both.

use std::path::PathBuf;
use std::process::Command;

use crate::support::*;

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

fn skip(why: &str) {
    assert!(!in_ci(), "under CI this must run: {why}");
    eprintln!("SKIPPED: {why}");
}

fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"].iter().find_map(|name| {
        let out = Command::new("which").arg(name).output().ok()?;
        out.status.success().then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    })
}

#[test]
fn the_dashboard_renders_worker_health_in_headless_chromium() {
    let Some(browser) = chromium() else { return skip("no chromium on PATH (apt-get install chromium)") };
    let s = Server::start();
    let profile = tempfile::tempdir().expect("profile dir");
    let shot = s.dir.path().join("dashboard.png");
    let url = format!("http://{}/", s.addr);
    let common = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--virtual-time-budget=5000",
    ];
    let out = Command::new(&browser)
        .args(common)
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--dump-dom", &url])
        .output()
        .expect("run chromium");
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(dom.contains("tiny-dsv32"), "{dom}");
    // The page's script fetched /health and /v1/workers and drew one row per worker.
    for rank in 0..3 {
        assert!(dom.contains(&format!(r#"<tr data-rank="{rank}">"#)), "{dom}");
    }
    assert!(!dom.contains(r#"<tr data-rank="3">"#), "{dom}");
    assert_eq!(dom.matches(r#"class="READY""#).count(), 3, "{dom}");
    assert!(dom.contains(r#"<span id="status" class="ok">ok</span>"#), "{dom}");
    let _ = Command::new(&browser)
        .args(common)
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args([&format!("--screenshot={}", shot.display()), "--window-size=1100,420", &url])
        .output();
    if let Ok(dir) = std::env::var("PIPEMOE_TEST_ARTIFACTS") {
        let _ = std::fs::copy(&shot, PathBuf::from(dir).join("dashboard.png"));
    }
}

fn python_with_openai() -> Option<String> {
    let mut candidates = std::env::var("PIPEMOE_TEST_PYTHON").into_iter().chain(["python3".to_string()]);
    candidates.find(|py| Command::new(py).args(["-c", "import openai"]).output().is_ok_and(|o| o.status.success()))
}

#[test]
fn the_official_openai_python_client_works() {
    let Some(py) = python_with_openai() else {
        return skip("no Python with the `openai` package (set PIPEMOE_TEST_PYTHON; .ci/run makes one)");
    };
    let s = Server::start();
    let script = repo().join("tests/e2e/openai_client.py");
    let out = Command::new(py).arg(script).arg(&s.addr).output().expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("openai client OK"));
}
