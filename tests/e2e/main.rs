//! End to end: the built `pipemoe` binary as a user runs it — controller plus three CPU worker processes on the
//! demo model — talked to over HTTP.

mod cache;
mod clients;
mod gpu;
mod lifecycle;
mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::*;

const QUESTIONS: [(&str, &str); 8] = [
    ("What is 12 + 30?", "42"),
    ("Reverse the word apple", "elppa"),
    ("What is 25 + 17?", "42"),
    ("what's 45 plus 38", "83"),
    ("Reverse the word lemon", "nomel"),
    ("Compute 7 + 9.", "16"),
    ("Spell tiger backwards.", "regit"),
    ("What is 60 + 39?", "99"),
];

#[test]
fn serves_the_demo_over_the_openai_api() {
    let s = Server::start();

    let models = s.get("/v1/models").json();
    assert_eq!(models["data"][0]["id"], "tiny-dsv32");

    // A held-out question (never trained on), answered through the whole pipeline.
    let v = s.chat("What is 12 + 30?");
    assert_eq!(content(&v), "42");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["object"], "chat.completion");
    let u = &v["usage"];
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(u["prompt_tokens"].as_u64().unwrap_or(0) + u["completion_tokens"].as_u64().unwrap_or(0))
    );

    // Streaming: the deltas add up to the same answer, then the usage chunk, then [DONE].
    let mut body = chat_body("What is 12 + 30?");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = s.post("/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.headers.to_ascii_lowercase().contains("text/event-stream"), "{}", r.headers);
    let data = r.sse();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> =
        data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).expect("chunk JSON")).collect();
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, "42");
    assert!(chunks.iter().any(|c| c["choices"][0]["finish_reason"] == "stop"));
    assert_eq!(chunks.last().map(|c| c["usage"]["completion_tokens"].clone()), Some(u["completion_tokens"].clone()));

    // Thinking mode: the reasoning comes back apart from the answer.
    let mut body = chat_body("Reverse the word apple");
    body["max_tokens"] = json!(32);
    body["chat_template_kwargs"] = json!({"thinking": true});
    let v = s.post("/v1/chat/completions", &body).json();
    assert_eq!(content(&v), "elppa", "{v}");
    assert!(v["choices"][0]["message"]["reasoning_content"].as_str().is_some_and(|r| r.contains("elppa")), "{v}");

    // Legacy completions on a raw prompt, with logprobs.
    let prompt = "<｜begin▁of▁sentence｜><｜User｜>What is 12 + 30?<｜Assistant｜></think>";
    let r = s.post(
        "/v1/completions",
        &json!({"model": "tiny-dsv32", "prompt": prompt, "temperature": 0, "max_tokens": 8, "logprobs": 2}),
    );
    let v = r.json();
    assert_eq!(v["choices"][0]["text"], "42", "{v}");
    let lps = &v["choices"][0]["logprobs"];
    assert_eq!(lps["tokens"].as_array().map(Vec::len), v["usage"]["completion_tokens"].as_u64().map(|n| n as usize));

    // Chat logprobs: greedy picks the most likely token.
    let mut body = chat_body("What is 12 + 30?");
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(3);
    let v = s.post("/v1/chat/completions", &body).json();
    for t in v["choices"][0]["logprobs"]["content"].as_array().expect("logprobs") {
        assert_eq!(t["top_logprobs"].as_array().map(Vec::len), Some(3));
        assert_eq!(t["top_logprobs"][0]["logprob"], t["logprob"], "{t}");
    }

    // n choices and stop strings.
    let mut body = chat_body("Reverse the word apple");
    body["n"] = json!(2);
    body["stop"] = json!(["pp"]);
    let v = s.post("/v1/chat/completions", &body).json();
    assert_eq!(v["choices"].as_array().map(Vec::len), Some(2));
    assert_eq!(v["choices"][1]["message"]["content"], "el");
    assert_eq!(v["choices"][1]["finish_reason"], "stop");

    // Eight concurrent requests share pipeline steps and answer exactly as they do alone.
    let alone: Vec<String> = QUESTIONS.iter().map(|(q, _)| content(&s.chat(q))).collect();
    for ((q, want), got) in QUESTIONS.iter().zip(&alone) {
        assert_eq!(got, want, "{q}");
    }
    let together: Vec<String> = std::thread::scope(|sc| {
        let handles: Vec<_> = QUESTIONS.iter().map(|(q, _)| sc.spawn(|| content(&s.chat(q)))).collect();
        handles.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    assert_eq!(together, alone);

    // Bad input gets OpenAI-shaped 4xx errors, never truncation.
    let long = "Reverse the word apple ".repeat(60);
    let r = s.post("/v1/chat/completions", &chat_body(&long));
    assert_eq!(r.status, 400, "{}", r.body);
    let msg = r.json()["error"]["message"].as_str().unwrap_or_default().to_string();
    assert!(msg.contains("256") && msg.contains("prompt has"), "{msg}");
    let r = request(&s.addr, "POST", "/v1/chat/completions", Some("{not json")).expect("request");
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    let r = s.post("/v1/chat/completions", &json!({"model": "tiny-dsv32", "messages": "hello"}));
    assert_eq!(r.status, 400, "{}", r.body);
    let r = s.post("/v1/chat/completions", &json!({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}));
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "model_not_found");
    let mut body = chat_body("hi");
    body["temperature"] = json!(5);
    assert_eq!(s.post("/v1/chat/completions", &body).status, 400);

    // Health and workers.
    let h = s.get("/health");
    assert_eq!(h.status, 200, "{}", h.body);
    let w = s.get("/v1/workers").json();
    let w = w.as_array().expect("workers");
    assert_eq!(w.len(), 3);
    assert!(w.iter().all(|x| x["state"] == "READY" && x["pid"].as_u64().is_some_and(|p| p > 0)), "{w:?}");
    assert_eq!(w[0]["layers"][0], 0);
    assert_eq!(w[2]["layers"][1], 4);
    assert!(s.get("/metrics").body.contains("pipemoe_generated_tokens_total"));
}

#[test]
fn a_dead_worker_fails_requests_clearly_then_the_fleet_recovers() {
    let s = Server::start();
    let w = s.get("/v1/workers").json();
    let pid = w[1]["pid"].as_i64().expect("worker pid") as i32;
    let mut body = chat_body("Reverse the word apple");
    body["max_tokens"] = json!(240);
    body["ignore_eos"] = json!(true);
    // A long request in flight while the middle worker is killed.
    std::thread::scope(|sc| {
        let h = sc.spawn(|| s.post("/v1/chat/completions", &body));
        std::thread::sleep(Duration::from_millis(300));
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL)
            .expect("kill worker");
        let r = h.join().expect("thread");
        // Either the request had already finished, or it ends with a clear 503 naming the worker — whichever
        // the controller saw first: the process exit, or the chain breaking at the dead worker's socket.
        if r.status != 200 {
            assert_eq!(r.status, 503, "{}", r.body);
            assert!(r.body.contains("exited") || r.body.contains("worker"), "{}", r.body);
        }
    });
    // Noticed within a second: /health is no longer 200.
    std::thread::sleep(Duration::from_millis(1000));
    let h = s.get("/health");
    let restarted = h.status == 200 && s.get("/v1/workers").json()[1]["pid"].as_i64() != Some(i64::from(pid));
    assert!(h.status == 503 || restarted, "{}", h.body);
    s.wait_healthy(Duration::from_secs(60));
    assert_eq!(content(&s.chat("What is 12 + 30?")), "42");
    assert!(s.log().contains("exited"), "{}", s.log());
}
