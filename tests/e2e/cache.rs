//! A capped KV cache on CPU workers (`PIPEMOE_KV_CACHE_BYTES`, whole blocks of 64 positions as on a GPU): the
//! controller's admission, growing holds and preemption run end to end without a GPU, and a preempted request
//! answers exactly what it answers alone (seeded sampling, so a preempted request must resume its stream).

use serde_json::{Value, json};

use super::support::*;

/// The demo caches kv_lora 128 + qk_rope 32 + index_head_dim 64 f32 values a position and layer: 896 bytes.
/// 229,376 bytes give the two-layer worker 128 positions a layer (two blocks), the one-layer workers 256.
const CACHE_BYTES: &str = "229376";

fn long_body(question: &str, seed: u64) -> Value {
    let mut b = chat_body(question);
    // 90 tokens past EOS: each request ends up needing both blocks, so two at once cannot both finish.
    b["max_tokens"] = json!(90);
    b["ignore_eos"] = json!(true);
    b["temperature"] = json!(1.0);
    b["seed"] = json!(seed);
    b
}

fn completion(s: &Server, body: &Value) -> String {
    let r = s.post("/v1/chat/completions", body);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["usage"]["completion_tokens"], 90, "{v}");
    content(&v)
}

#[test]
fn a_capped_cache_preempts_and_recomputes_without_changing_answers() {
    // Holds of prompt + 32 positions fit one block each, so both requests start; both then need two.
    let s =
        Server::start_on("cpu,cpu,cpu", &[("PIPEMOE_KV_CACHE_BYTES", CACHE_BYTES), ("PIPEMOE_RESERVE_AHEAD", "32")]);
    let caps = capacities(&s);
    assert_eq!(caps.iter().min(), Some(&128), "{caps:?}");

    let bodies = [long_body("What is 12 + 30?", 3), long_body("Reverse the word apple", 7)];
    let alone: Vec<String> = bodies.iter().map(|b| completion(&s, b)).collect();
    let together: Vec<String> = std::thread::scope(|sc| {
        let handles: Vec<_> = bodies.iter().map(|b| sc.spawn(|| completion(&s, b))).collect();
        handles.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    let log = s.log();
    assert_eq!(together, alone, "a preempted request answers as it does alone");
    assert!(log.contains("preempted"), "both fit only one after the other, so one was preempted:\n{log}");
    assert!(!log.contains("KV cache full"), "no step overflowed a cache:\n{log}");
}
