//! Starting the real `pipemoe` binary on the demo model, and a small HTTP/1.1 client (no client library: the
//! requests are written out as bytes, so the tests see exactly what a client would).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The binary under test; `PIPEMOE_BIN` overrides it (on the GPU machine the tests run from a copied tree).
pub fn bin() -> String {
    std::env::var("PIPEMOE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_pipemoe").to_string())
}

/// The repository; `PIPEMOE_REPO` overrides it, as for the binary.
pub fn repo() -> PathBuf {
    std::env::var_os("PIPEMOE_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
        .canonicalize()
        .expect("repo root")
}

pub fn demo_model() -> PathBuf {
    repo().join("data/models/tiny-dsv32-w3a16")
}

/// A controller with three CPU workers on the demo model, in its own data dir, on a free port.
pub struct Server {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub addr: String,
}

/// Stores recipe `id`: the demo model by absolute path, served as `tiny-dsv32` on `devices`.
pub fn upsert_demo_recipe(data: &Path, id: &str, devices: &str, max_model_len: u32) {
    let model = demo_model();
    let len = max_model_len.to_string();
    let out = pipemoe(
        data,
        &[
            "recipe",
            "upsert",
            "--id",
            id,
            "--model",
            model.to_str().expect("utf-8 path"),
            "--served-model-name",
            "tiny-dsv32",
            "--devices",
            devices,
            "--max-model-len",
            &len,
            "--max-memory-gib",
            "2",
        ],
    );
    assert!(out.status.success(), "recipe upsert: {}", String::from_utf8_lossy(&out.stderr));
}

pub fn pipemoe(data: &Path, args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env("PIPEMOE_DATA_DIR", data)
        .env("PIPEMOE_DB", data.join("controller.db"))
        .output()
        .expect("run pipemoe")
}

impl Server {
    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Upserts the `e2e` recipe (the demo model by absolute path, 3 CPU workers), starts `serve` on port 0 and
    /// waits for `/health` to answer 200.
    pub fn start() -> Server {
        Server::start_on("cpu,cpu,cpu", &[])
    }

    /// The same on `devices`, with extra environment for `serve`.
    pub fn start_on(devices: &str, env: &[(&str, &str)]) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).expect("data dir");
        upsert_demo_recipe(&data, "e2e", devices, 256);
        let log = std::fs::File::create(dir.path().join("serve.log")).expect("log");
        let child = Command::new(bin())
            .args(["serve", "--recipe", "e2e", "--port", "0"])
            .env("PIPEMOE_DATA_DIR", &data)
            .env("PIPEMOE_DB", data.join("controller.db"))
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn serve");
        let mut s = Server { dir, child: Some(child), addr: String::new() };
        s.addr = s.wait_addr();
        s.wait_healthy(Duration::from_secs(60));
        s
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }

    fn wait_addr(&mut self) -> String {
        let state = self.data().join("pipemoe.json");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(text) = std::fs::read_to_string(&state)
                && let Ok(v) = serde_json::from_str::<Value>(&text)
                && let Some(a) = v["http_addr"].as_str()
            {
                return a.to_string();
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(Child::try_wait) {
                panic!("serve exited ({st}) before listening:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "no state file after 60 s:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn wait_healthy(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(r) = request(&self.addr, "GET", "/health", None)
                && r.status == 200
            {
                return;
            }
            assert!(Instant::now() < deadline, "not healthy within {within:?}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn post(&self, path: &str, body: &Value) -> Response {
        request(&self.addr, "POST", path, Some(&body.to_string())).expect("request")
    }

    pub fn get(&self, path: &str) -> Response {
        request(&self.addr, "GET", path, None).expect("request")
    }

    pub fn chat(&self, question: &str) -> Value {
        let r = self.post("/v1/chat/completions", &chat_body(question));
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn chat_body(question: &str) -> Value {
    serde_json::json!({"model": "tiny-dsv32", "temperature": 0, "max_tokens": 16, "messages": [{"role": "user", "content": question}]})
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: String,
    pub body: String,
}

impl Response {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The `data:` payloads of an SSE body.
    pub fn sse(&self) -> Vec<String> {
        self.body
            .lines()
            .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
            .map(str::to_string)
            .collect()
    }
}

/// One HTTP/1.1 request with `Connection: close`; the body is read to EOF (chunked encoding decoded).
pub fn request(addr: &str, method: &str, path: &str, body: Option<&str>) -> std::io::Result<Response> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").map_or(raw.len(), |i| i + 4);
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let rest = &raw[split..];
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(rest) } else { rest.to_vec() };
    Ok(Response { status, headers: head, body: String::from_utf8_lossy(&body).to_string() })
}

fn dechunk(mut s: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(i) = s.windows(2).position(|w| w == b"\r\n") {
        let size = String::from_utf8_lossy(&s[..i]).to_string();
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        let rest = &s[i + 2..];
        if n == 0 || rest.len() < n {
            break;
        }
        out.extend_from_slice(&rest[..n]);
        s = rest[n..].strip_prefix(b"\r\n").unwrap_or(&rest[n..]);
    }
    out
}

/// The text of a chat completion's first choice.
pub fn content(v: &Value) -> String {
    v["choices"][0]["message"]["content"].as_str().unwrap_or_default().to_string()
}

/// The greedy answers of CPU workers to `questions`: what GPU or capped workers must answer too.
pub fn cpu_answers(questions: &[&str]) -> Vec<String> {
    let cpu = Server::start();
    questions.iter().map(|q| content(&cpu.chat(q))).collect()
}

/// Each worker's KV cache capacity in positions, as `/v1/workers` reports it (panics on an unbounded one).
pub fn capacities(s: &Server) -> Vec<u64> {
    let w = s.get("/v1/workers").json();
    let w = w.as_array().expect("workers").clone();
    w.iter()
        .map(|x| x["kv_cache"]["capacity_positions"].as_u64().unwrap_or_else(|| panic!("no cache bound: {x}")))
        .collect()
}
