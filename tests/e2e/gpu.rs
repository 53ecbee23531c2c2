//! GPU workers end to end (skipped without a GPU): three worker processes sharing cuda:0 answer as the CPU
//! workers do, with activations handed over by CUDA IPC and with the inline-bytes fallback forced; with a KV
//! cache too small for one full context, requests wait for room and one that can never fit is refused.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::*;

fn has_gpu() -> bool {
    // The driver library is what a worker needs first; without it there is nothing to test here.
    let found =
        ["/usr/lib/x86_64-linux-gnu/libcuda.so.1", "/usr/local/nvidia/lib64/libcuda.so.1", "/usr/lib64/libcuda.so.1"]
            .iter()
            .any(|p| std::path::Path::new(p).exists());
    if !found {
        eprintln!("SKIPPED (no GPU): libcuda.so.1 not found");
    }
    found
}

#[test]
fn gpu_workers_answer_through_cuda_ipc_and_through_the_fallback() {
    if !has_gpu() {
        return;
    }
    let questions = ["What is 12 + 30?", "Reverse the word apple", "what's 45 plus 38", "Spell tiger backwards."];
    let want = cpu_answers(&questions);
    for env in [vec![], vec![("PIPEMOE_IPC", "0")]] {
        let s = Server::start_on("cuda:0,cuda:0,cuda:0", &env);
        let got: Vec<String> = questions.iter().map(|q| content(&s.chat(q))).collect();
        assert_eq!(got, want, "{env:?}");
        let ipc_lines = s.log().matches("CUDA IPC handles").count();
        assert_eq!(ipc_lines > 0, env.is_empty(), "{env:?}: {}", s.log());
    }
}

/// Each worker's KV cache in positions, from `/v1/workers` (every GPU worker reports a bound).
#[test]
fn a_small_gpu_kv_cache_queues_requests_and_refuses_what_cannot_fit() {
    if !has_gpu() {
        return;
    }
    let questions = ["What is 12 + 30?", "Reverse the word apple", "what's 45 plus 38", "Spell tiger backwards."];
    let want = cpu_answers(&questions);
    // bf16 latent + k_pe + indexer key and three f32 scales: 460 bytes a position and layer, 29,440 a block of
    // 64. 117,760 bytes give a two-layer worker two blocks a layer (128 positions), a one-layer worker four.
    let s = Server::start_on("cuda:0,cuda:0,cuda:0", &[("PIPEMOE_KV_CACHE_BYTES", "117760")]);
    let caps = capacities(&s);
    let cap = caps.iter().copied().min().expect("three workers");
    assert!((64..256).contains(&cap), "the cache must bind below max_model_len 256: {caps:?}");
    assert!(s.log().contains("KV cache sized"), "{}", s.log());

    // prompt + max_tokens past the cache but within max_model_len: a 400 naming the numbers, at once.
    let mut body = chat_body(questions[0]);
    body["max_tokens"] = json!(cap);
    let r = s.post("/v1/chat/completions", &body);
    assert_eq!(r.status, 400, "{}", r.body);
    let e = r.json();
    let msg = e["error"]["message"].as_str().unwrap_or_default().to_string();
    assert!(msg.contains("KV cache") && msg.contains(&format!("holds {cap}")), "{msg}");
    assert_eq!(e["error"]["code"], "context_length_exceeded");

    // Requests that each need more than half the cache run one after another, all answered, none failing
    // on a full cache.
    let started = Instant::now();
    let answers: Vec<(u16, Value)> = std::thread::scope(|sc| {
        let handles: Vec<_> = questions
            .iter()
            .map(|q| {
                let s = &s;
                sc.spawn(move || {
                    let mut body = chat_body(q);
                    body["max_tokens"] = json!(cap / 2 + 1);
                    let r = s.post("/v1/chat/completions", &body);
                    (r.status, if r.status == 200 { r.json() } else { json!({"error": r.body}) })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    for ((status, v), want) in answers.iter().zip(&want) {
        assert_eq!(*status, 200, "{v}");
        assert_eq!(&content(v), want, "{v}");
    }
    assert!(!s.log().contains("KV cache full"), "admission let a step overflow:\n{}", s.log());
    eprintln!("4 queued requests took {:?}", started.elapsed());

    // Every block is back on every worker once the requests are done (Free went down the chain).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let w = s.get("/v1/workers").json();
        let used: Vec<u64> = w
            .as_array()
            .expect("workers")
            .iter()
            .map(|x| x["kv_cache"]["reserved_positions"].as_u64().unwrap_or(u64::MAX))
            .collect();
        if used.iter().all(|&u| u == 0) {
            assert!(w.as_array().is_some_and(|a| a.iter().all(|x| x["memory_bytes"].as_u64() > Some(0))), "{w}");
            break;
        }
        assert!(Instant::now() < deadline, "cache still held after the requests: {used:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
