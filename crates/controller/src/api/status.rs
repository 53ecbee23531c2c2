//! `/health`, `/v1/workers`, `/v1/models`, `/metrics` and the dashboard: what operators and clients see of the
//! fleet. Worker state is asked of each worker live (with a short deadline), never cached past the request.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use pipemoe_proto::worker_v1::WorkerState;
use serde_json::{Value, json};

use super::AppState;
use crate::fleet;
use crate::scheduler::FleetState;

fn state_name(s: WorkerState) -> &'static str {
    match s {
        WorkerState::Unspecified => "UNKNOWN",
        WorkerState::Loading => "LOADING",
        WorkerState::Ready => "READY",
        WorkerState::Failed => "FAILED",
        WorkerState::Draining => "DRAINING",
    }
}

/// Every worker's plan and live health, as JSON objects.
async fn worker_rows(st: &AppState) -> Vec<Value> {
    let views = st.scheduler.shared.workers.read().map(|w| w.clone()).unwrap_or_default();
    let answers = futures_util::future::join_all(views.iter().map(|v| fleet::health(&v.client))).await;
    views
        .iter()
        .zip(answers)
        .map(|(v, h)| {
            let p = &v.plan;
            let (state, message, memory, steps) = match &h {
                Some(h) => (state_name(h.state()), h.message.clone(), h.memory_bytes, h.steps),
                None => ("UNREACHABLE", "the worker does not answer Health".to_string(), 0, 0),
            };
            // Positions of KV cache: capacity null = grows without a bound (CPU).
            let kv = h.as_ref().map_or(Value::Null, |h| {
                json!({
                    "capacity_positions": h.kv_capacity_positions, "used_positions": h.kv_used_positions,
                    "reserved_positions": h.kv_reserved_positions, "block_positions": h.kv_block_positions,
                })
            });
            json!({
                "rank": p.rank, "pid": v.pid, "device": p.device, "layers": [p.layers.start, p.layers.end],
                "experts": Value::Null, "embed": p.embed, "head": p.head, "state": state, "healthy": state == "READY",
                "memory_bytes": memory, "planned_bytes": p.total_bytes(), "steps": steps, "message": message,
                "kv_cache": kv,
            })
        })
        .collect()
}

pub async fn workers(State(st): State<Arc<AppState>>) -> Response {
    axum::Json(Value::Array(worker_rows(&st).await)).into_response()
}

/// 200 only when the fleet is up and every worker answers READY; else 503 saying which are not.
pub async fn health(State(st): State<Arc<AppState>>) -> Response {
    let fleet_state = st
        .scheduler
        .shared
        .state
        .read()
        .map(|s| s.clone())
        .unwrap_or(FleetState::Failed { reason: "lock poisoned".into() });
    let rows = worker_rows(&st).await;
    let unhealthy: Vec<Value> = rows
        .iter()
        .filter(|r| r["healthy"] != json!(true))
        .map(|r| json!({"rank": r["rank"], "state": r["state"], "message": r["message"]}))
        .collect();
    let (code, status, reason) = match &fleet_state {
        FleetState::Ready if unhealthy.is_empty() && !rows.is_empty() => (StatusCode::OK, "ok", String::new()),
        FleetState::Ready => (StatusCode::SERVICE_UNAVAILABLE, "unhealthy", "workers not ready".to_string()),
        FleetState::Restarting { reason } => (StatusCode::SERVICE_UNAVAILABLE, "restarting", reason.clone()),
        FleetState::Failed { reason } => (StatusCode::SERVICE_UNAVAILABLE, "failed", reason.clone()),
        FleetState::Draining => (StatusCode::SERVICE_UNAVAILABLE, "draining", "shutting down".to_string()),
    };
    let body = json!({"status": status, "reason": reason, "workers": rows.len(), "unhealthy": unhealthy, "model": st.model_name});
    (code, axum::Json(body)).into_response()
}

pub async fn models(State(st): State<Arc<AppState>>) -> Response {
    let created = st.started.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    axum::Json(json!({"object": "list", "data": [{
        "id": st.model_name, "object": "model", "created": created, "owned_by": "pipemoe",
        "max_model_len": st.max_model_len, "recipe": st.recipe_id,
    }]}))
    .into_response()
}

pub async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let m = &st.metrics;
    let up = u8::from(matches!(st.scheduler.shared.state.read().map(|s| s.clone()), Ok(FleetState::Ready)));
    let cache = st.scheduler.shared.cache.read().map(|c| c.clone()).unwrap_or_default();
    // Without a bounded cache there is no capacity to report.
    let (capacity, held) =
        cache.tightest.map_or((String::from("NaN"), String::from("NaN")), |(c, h)| (c.to_string(), h.to_string()));
    let text = format!(
        "# HELP pipemoe_requests_total Generation requests received.\n# TYPE pipemoe_requests_total counter\npipemoe_requests_total {}\n\
         # HELP pipemoe_request_errors_total Requests that ended in an error.\n# TYPE pipemoe_request_errors_total counter\npipemoe_request_errors_total {}\n\
         # HELP pipemoe_prompt_tokens_total Prompt tokens admitted.\n# TYPE pipemoe_prompt_tokens_total counter\npipemoe_prompt_tokens_total {}\n\
         # HELP pipemoe_generated_tokens_total Tokens generated.\n# TYPE pipemoe_generated_tokens_total counter\npipemoe_generated_tokens_total {}\n\
         # HELP pipemoe_fleet_up 1 when every worker is ready.\n# TYPE pipemoe_fleet_up gauge\npipemoe_fleet_up {up}\n\
         # HELP pipemoe_kv_cache_capacity_tokens Positions the tightest worker's KV cache holds.\n# TYPE pipemoe_kv_cache_capacity_tokens gauge\npipemoe_kv_cache_capacity_tokens {capacity}\n\
         # HELP pipemoe_kv_cache_reserved_tokens Positions admitted sequences hold in the tightest worker's KV cache.\n# TYPE pipemoe_kv_cache_reserved_tokens gauge\npipemoe_kv_cache_reserved_tokens {held}\n\
         # HELP pipemoe_queued_sequences Sequences waiting for room in the KV cache.\n# TYPE pipemoe_queued_sequences gauge\npipemoe_queued_sequences {}\n",
        m.requests.load(Ordering::Relaxed),
        m.request_errors.load(Ordering::Relaxed),
        m.prompt_tokens.load(Ordering::Relaxed),
        m.generated_tokens.load(Ordering::Relaxed),
        cache.queued,
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

pub async fn dashboard(State(st): State<Arc<AppState>>) -> Html<String> {
    Html(
        DASHBOARD.replace("{{MODEL}}", &html_escape(&st.model_name)).replace("{{RECIPE}}", &html_escape(&st.recipe_id)),
    )
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// One page, no external assets: polls `/health` and `/v1/workers` every two seconds.
const DASHBOARD: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>pipemoe — {{MODEL}}</title>
<style>
body{font:14px system-ui,sans-serif;margin:2em;color:#222}
h1{font-size:1.3em}table{border-collapse:collapse;min-width:60%}
th,td{border:1px solid #ccc;padding:4px 10px;text-align:left}th{background:#f4f4f4}
.READY{color:#080;font-weight:bold}.LOADING,.DRAINING{color:#a60}.FAILED,.UNREACHABLE{color:#c00;font-weight:bold}
#status.ok{color:#080}#status.bad{color:#c00}
</style></head><body>
<h1>pipemoe · <span id="model">{{MODEL}}</span> <small>(recipe {{RECIPE}})</small></h1>
<p>Health: <span id="status">…</span> <span id="reason"></span> · updated <span id="updated">never</span></p>
<table><thead><tr><th>rank</th><th>pid</th><th>device</th><th>layers</th><th>state</th><th>memory</th><th>planned</th><th>KV cache (positions)</th><th>steps</th><th>message</th></tr></thead>
<tbody id="workers"><tr><td colspan="10">loading…</td></tr></tbody></table>
<script>
function gib(b){return (b/1073741824).toFixed(2)+" GiB"}
function kv(k){if(!k)return "";const used=k.used_positions;return k.capacity_positions==null?`${used} (no bound)`:`${used} / ${k.capacity_positions} (${k.reserved_positions} held)`}
function esc(s){return String(s).replace(/[&<>"]/g,c=>({"&":"&amp;","<":"&lt;",">":"&gt;","\"":"&quot;"}[c]))}
async function refresh(){
  try{
    const h=await fetch("/health"),hj=await h.json();
    const s=document.getElementById("status");s.textContent=hj.status;s.className=h.ok?"ok":"bad";
    document.getElementById("reason").textContent=hj.reason||"";
    const w=await (await fetch("/v1/workers")).json();
    document.getElementById("workers").innerHTML=w.map(r=>`<tr data-rank="${r.rank}"><td>${r.rank}</td><td>${r.pid}</td><td>${esc(r.device)}</td><td>${r.layers[0]}..${r.layers[1]}${r.embed?" +embed":""}${r.head?" +head":""}</td><td class="${r.state}">${r.state}</td><td>${gib(r.memory_bytes)}</td><td>${gib(r.planned_bytes)}</td><td>${kv(r.kv_cache)}</td><td>${r.steps}</td><td>${esc(r.message)}</td></tr>`).join("");
    document.getElementById("updated").textContent=new Date().toLocaleTimeString();
  }catch(e){const s=document.getElementById("status");s.textContent="unreachable";s.className="bad";}
}
refresh();setInterval(refresh,2000);
</script></body></html>
"#;
