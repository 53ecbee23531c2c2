//! `/v1/chat/completions` and `/v1/completions`: prompt → n sequences on the scheduler → one JSON response or
//! an SSE stream (`data: {chunk}` … `data: [DONE]`), as OpenAI shapes them.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream, StreamExt};
use pipemoe_model::chat::ChatOptions;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::error::ApiError;
use super::types::{ChatRequest, CompletionRequest, GenParams, Prompt, parse};
use super::{AppState, MAX_BODY_BYTES};
use crate::scheduler::{Finish, GenRequest, SeqEvent};

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat { thinking: bool },
    Completion,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn body(b: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    b.map_err(|r| match r {
        BytesRejection::FailedToBufferBody(_) => ApiError::too_large(MAX_BODY_BYTES),
        other => ApiError::invalid(other.body_text(), None),
    })
}

fn finish_str(f: Finish) -> &'static str {
    match f {
        Finish::Stop => "stop",
        Finish::Length => "length",
    }
}

pub async fn chat(State(st): State<Arc<AppState>>, raw: Result<Bytes, BytesRejection>) -> Response {
    st.metrics.requests.fetch_add(1, Ordering::Relaxed);
    let result = async {
        let req: ChatRequest = parse(&body(raw)?)?;
        check_model(&st, &req.common.model)?;
        if req.messages.is_empty() {
            return Err(ApiError::invalid("`messages` must not be empty.", Some("messages")));
        }
        if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(ApiError::invalid("`tools` is not supported by this server yet.", Some("tools")));
        }
        if req.response_format.as_ref().is_some_and(|f| f.get("type").and_then(Value::as_str) != Some("text")) {
            return Err(ApiError::invalid(
                "Only `response_format: {\"type\": \"text\"}` is supported.",
                Some("response_format"),
            ));
        }
        let thinking = req.thinking()?;
        let params = req.common.params(req.logprobs()?)?;
        let opts = ChatOptions {
            thinking,
            extra: req.chat_template_kwargs.clone().unwrap_or_default(),
            ..ChatOptions::default()
        };
        let text = st.chat.render(&req.messages, &opts).map_err(|e| ApiError::invalid(chain(&e), Some("messages")))?;
        let prompt = st.tokenizer.encode(&text).map_err(ApiError::internal)?;
        Ok(run(st.clone(), vec![prompt], params, Kind::Chat { thinking }).await)
    }
    .await;
    result.unwrap_or_else(|e| error(&st, e))
}

pub async fn completions(State(st): State<Arc<AppState>>, raw: Result<Bytes, BytesRejection>) -> Response {
    st.metrics.requests.fetch_add(1, Ordering::Relaxed);
    let result = async {
        let req: CompletionRequest = parse(&body(raw)?)?;
        check_model(&st, &req.common.model)?;
        if req.echo {
            return Err(ApiError::invalid("`echo` is not supported by this server.", Some("echo")));
        }
        if req.suffix.is_some() {
            return Err(ApiError::invalid("`suffix` is not supported by this server.", Some("suffix")));
        }
        let logprobs = match req.logprobs {
            None => None,
            Some(k) if (0..=20).contains(&k) => Some(k as u32),
            Some(k) => {
                return Err(ApiError::invalid(
                    format!("`logprobs` must be between 0 and 20, got {k}."),
                    Some("logprobs"),
                ));
            }
        };
        let params = req.common.params(logprobs)?;
        let texts = match req.prompt {
            Prompt::One(s) => vec![s],
            Prompt::Many(v) if !v.is_empty() => v,
            Prompt::Many(_) => return Err(ApiError::invalid("`prompt` must not be empty.", Some("prompt"))),
        };
        let prompts =
            texts.iter().map(|t| st.tokenizer.encode(t).map_err(ApiError::internal)).collect::<Result<Vec<_>, _>>()?;
        Ok(run(st.clone(), prompts, params, Kind::Completion).await)
    }
    .await;
    result.unwrap_or_else(|e| error(&st, e))
}

fn error(st: &AppState, e: ApiError) -> Response {
    st.metrics.request_errors.fetch_add(1, Ordering::Relaxed);
    e.into_response()
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

fn check_model(st: &AppState, model: &str) -> Result<(), ApiError> {
    if model != st.model_name {
        return Err(ApiError::model_not_found(model, &st.model_name));
    }
    Ok(())
}

/// One choice being generated.
struct Choice {
    index: usize,
    prompt_tokens: usize,
    rx: mpsc::UnboundedReceiver<SeqEvent>,
}

/// Submits `n` sequences per prompt after checking each fits the context and the workers' KV cache (the
/// scheduler checks the cache again: the fleet may have restarted in between).
fn submit(st: &AppState, prompts: Vec<Vec<u32>>, p: &GenParams, id: &str) -> Result<Vec<Choice>, ApiError> {
    let limit = st.max_model_len;
    let cache = st.scheduler.shared.cache.read().map(|c| c.limits.clone()).unwrap_or_default();
    for prompt in &prompts {
        if prompt.len() >= limit {
            return Err(ApiError::context_length(prompt.len(), None, limit));
        }
        if let Some(m) = p.max_tokens
            && prompt.len() + m > limit
        {
            return Err(ApiError::context_length(prompt.len(), Some(m), limit));
        }
        let positions = prompt.len() + default_max_tokens(p, prompt.len(), limit, cache.capacity());
        cache.check(positions).map_err(|t| ApiError::cache_too_small(&t))?;
    }
    let mut out = Vec::new();
    for prompt in prompts {
        for _ in 0..p.n {
            let index = out.len();
            let (tx, rx) = mpsc::unbounded_channel();
            let mut sampling = p.sampling;
            // Each choice gets its own random stream, reproducible from the request's seed.
            sampling.seed = p.sampling.seed.map(|s| s.wrapping_add(index as u64));
            st.metrics.prompt_tokens.fetch_add(prompt.len() as u64, Ordering::Relaxed);
            out.push(Choice { index, prompt_tokens: prompt.len(), rx });
            st.scheduler.submit(GenRequest {
                request_id: format!("{id}/{index}"),
                max_tokens: default_max_tokens(p, prompt.len(), limit, cache.capacity()),
                prompt: prompt.clone(),
                sampling,
                stop: p.stop.clone(),
                ignore_eos: p.ignore_eos,
                events: tx,
            });
        }
    }
    Ok(out)
}

/// `max_tokens`, or without one the rest of the context: of `max_model_len`, and of the KV cache when it is
/// smaller (a request that does not ask for a length is not refused for the cache's size).
fn default_max_tokens(p: &GenParams, prompt: usize, max_model_len: usize, cache: Option<usize>) -> usize {
    p.max_tokens.unwrap_or_else(|| max_model_len.min(cache.unwrap_or(usize::MAX)).saturating_sub(prompt).max(1))
}

async fn run(st: Arc<AppState>, prompts: Vec<Vec<u32>>, p: GenParams, kind: Kind) -> Response {
    let n = st.next_id.fetch_add(1, Ordering::Relaxed);
    let id = match kind {
        Kind::Chat { .. } => format!("chatcmpl-{:x}{n:06x}", now()),
        Kind::Completion => format!("cmpl-{:x}{n:06x}", now()),
    };
    let choices = match submit(&st, prompts, &p, &id) {
        Ok(c) => c,
        Err(e) => return error(&st, e),
    };
    tracing::info!(request = %id, choices = choices.len(), stream = p.stream, "generating");
    if p.stream {
        stream_response(st, id, kind, p, choices).into_response()
    } else {
        whole_response(st, id, kind, p, choices).await
    }
}

/// Accumulates one choice's output.
struct Acc {
    reasoning: String,
    content: String,
    in_reasoning: bool,
    logprobs: Vec<Value>,
    tokens: Vec<String>,
    token_logprobs: Vec<f32>,
    top_map: Vec<Value>,
    finish: Option<&'static str>,
    completion_tokens: usize,
}

impl Acc {
    fn new(kind: Kind) -> Self {
        Acc {
            reasoning: String::new(),
            content: String::new(),
            in_reasoning: matches!(kind, Kind::Chat { thinking: true }),
            logprobs: Vec::new(),
            tokens: Vec::new(),
            token_logprobs: Vec::new(),
            top_map: Vec::new(),
            finish: None,
            completion_tokens: 0,
        }
    }
}

fn token_str(st: &AppState, id: u32) -> String {
    st.tokenizer.decode(&[id], false).unwrap_or_default()
}

/// Applies one token to `acc`; returns (reasoning delta, content delta).
fn apply(
    st: &AppState,
    acc: &mut Acc,
    kind: Kind,
    token: u32,
    text: String,
    logprob: Option<f32>,
    top: &[(u32, f32)],
) -> (String, String) {
    let was_reasoning = acc.in_reasoning;
    if acc.in_reasoning && Some(token) == st.end_think {
        acc.in_reasoning = false;
    }
    if let Some(lp) = logprob {
        let tok = token_str(st, token);
        match kind {
            Kind::Chat { .. } => {
                let tops: Vec<Value> = top
                    .iter()
                    .map(|(t, l)| {
                        let s = token_str(st, *t);
                        json!({"token": s, "logprob": l, "bytes": s.as_bytes()})
                    })
                    .collect();
                acc.logprobs.push(json!({"token": tok, "logprob": lp, "bytes": tok.as_bytes(), "top_logprobs": tops}));
            }
            Kind::Completion => {
                let mut m = serde_json::Map::new();
                for (t, l) in top {
                    m.insert(token_str(st, *t), json!(l));
                }
                acc.top_map.push(Value::Object(m));
                acc.token_logprobs.push(lp);
                acc.tokens.push(tok);
            }
        }
    }
    if was_reasoning {
        acc.reasoning.push_str(&text);
        (text, String::new())
    } else {
        acc.content.push_str(&text);
        (String::new(), text)
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

fn logprobs_value(kind: Kind, acc: &Acc, with: bool) -> Value {
    if !with {
        return Value::Null;
    }
    match kind {
        Kind::Chat { .. } => json!({"content": acc.logprobs}),
        Kind::Completion => {
            json!({"tokens": acc.tokens, "token_logprobs": acc.token_logprobs, "top_logprobs": acc.top_map})
        }
    }
}

async fn whole_response(st: Arc<AppState>, id: String, kind: Kind, p: GenParams, choices: Vec<Choice>) -> Response {
    let mut out = Vec::new();
    let (mut prompt_tokens, mut completion_tokens) = (0, 0);
    let mut counted = std::collections::HashSet::new();
    for mut c in choices {
        let mut acc = Acc::new(kind);
        while let Some(ev) = c.rx.recv().await {
            match ev {
                SeqEvent::Token { token, text, logprob, top } => {
                    apply(&st, &mut acc, kind, token, text, logprob, &top);
                }
                SeqEvent::Done { finish, completion_tokens: n, .. } => {
                    acc.finish = Some(finish_str(finish));
                    acc.completion_tokens = n;
                    break;
                }
                SeqEvent::Failed { message } => return error(&st, ApiError::unavailable(message)),
                SeqEvent::Refused(t) => return error(&st, ApiError::cache_too_small(&t)),
            }
        }
        let Some(finish) = acc.finish else {
            return error(&st, ApiError::internal("a sequence ended without a finish event"));
        };
        st.metrics.generated_tokens.fetch_add(acc.completion_tokens as u64, Ordering::Relaxed);
        completion_tokens += acc.completion_tokens;
        // n choices of one prompt share its tokens: count each prompt once.
        if counted.insert(c.index / p.n) {
            prompt_tokens += c.prompt_tokens;
        }
        let logprobs = logprobs_value(kind, &acc, p.logprobs.is_some());
        out.push(match kind {
            Kind::Chat { thinking } => {
                let mut message = json!({"role": "assistant", "content": acc.content});
                if thinking {
                    message["reasoning_content"] = json!(acc.reasoning);
                }
                json!({"index": c.index, "message": message, "logprobs": logprobs, "finish_reason": finish})
            }
            Kind::Completion => {
                json!({"index": c.index, "text": acc.content, "logprobs": logprobs, "finish_reason": finish})
            }
        });
    }
    let object = if matches!(kind, Kind::Completion) { "text_completion" } else { "chat.completion" };
    axum::Json(json!({
        "id": id, "object": object, "created": now(), "model": st.model_name,
        "choices": out, "usage": usage(prompt_tokens, completion_tokens),
    }))
    .into_response()
}

fn stream_response(
    st: Arc<AppState>,
    id: String,
    kind: Kind,
    p: GenParams,
    choices: Vec<Choice>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let object = if matches!(kind, Kind::Completion) { "text_completion" } else { "chat.completion.chunk" };
    let created = now();
    let n_choices = choices.len();
    let prompt_tokens: usize = choices.iter().filter(|c| c.index % p.n == 0).map(|c| c.prompt_tokens).sum();
    let merged = stream::select_all(
        choices.into_iter().map(|c| UnboundedReceiverStream::new(c.rx).map(move |ev| (c.index, ev)).boxed()),
    );
    let model = st.model_name.clone();
    let chunk = move |choice: Value| json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]});
    let st2 = st;
    let mut accs: Vec<Acc> = (0..n_choices).map(|_| Acc::new(kind)).collect();
    let mut completion_tokens = 0;
    let mut finished = 0;
    let include_usage = p.include_usage;
    let want_logprobs = p.logprobs.is_some();
    let opening: Vec<Result<Event, Infallible>> = match kind {
        Kind::Chat { .. } => (0..n_choices)
            .map(|i| Ok(Event::default().data(chunk(json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null})).to_string())))
            .collect(),
        Kind::Completion => Vec::new(),
    };
    let chunk2 = chunk.clone();
    let body = merged.flat_map(move |(index, ev)| {
        let mut events: Vec<Result<Event, Infallible>> = Vec::new();
        let data = |v: Value| Ok(Event::default().data(v.to_string()));
        let mut failure = None;
        match ev {
            SeqEvent::Token { token, text, logprob, top } => {
                let acc = &mut accs[index];
                let before = acc.logprobs.len().max(acc.tokens.len());
                let (reasoning, content) = apply(&st2, acc, kind, token, text, logprob, &top);
                let lp = if want_logprobs {
                    match kind {
                        Kind::Chat { .. } => json!({"content": acc.logprobs[before..]}),
                        Kind::Completion => json!({"tokens": acc.tokens[before..], "token_logprobs": acc.token_logprobs[before..], "top_logprobs": acc.top_map[before..]}),
                    }
                } else {
                    Value::Null
                };
                if !reasoning.is_empty() || !content.is_empty() || want_logprobs {
                    events.push(data(chunk2(match kind {
                        Kind::Chat { .. } if !reasoning.is_empty() => json!({"index": index, "delta": {"reasoning_content": reasoning}, "logprobs": lp, "finish_reason": null}),
                        Kind::Chat { .. } => json!({"index": index, "delta": {"content": content}, "logprobs": lp, "finish_reason": null}),
                        Kind::Completion => json!({"index": index, "text": content, "logprobs": lp, "finish_reason": null}),
                    })));
                }
            }
            SeqEvent::Done { finish, completion_tokens: n, .. } => {
                st2.metrics.generated_tokens.fetch_add(n as u64, Ordering::Relaxed);
                completion_tokens += n;
                finished += 1;
                let f = finish_str(finish);
                events.push(data(chunk2(match kind {
                    Kind::Chat { .. } => json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": f}),
                    Kind::Completion => json!({"index": index, "text": "", "logprobs": null, "finish_reason": f}),
                })));
                if finished == n_choices {
                    if include_usage {
                        let mut u = chunk2(Value::Null);
                        u["choices"] = json!([]);
                        u["usage"] = usage(prompt_tokens, completion_tokens);
                        events.push(data(u));
                    }
                    events.push(Ok(Event::default().data("[DONE]")));
                }
            }
            SeqEvent::Failed { message } => failure = Some(ApiError::unavailable(message)),
            SeqEvent::Refused(t) => failure = Some(ApiError::cache_too_small(&t)),
        }
        if let Some(e) = failure {
            st2.metrics.request_errors.fetch_add(1, Ordering::Relaxed);
            events.push(data(e.body()));
            finished += 1;
            if finished == n_choices {
                events.push(Ok(Event::default().data("[DONE]")));
            }
        }
        stream::iter(events)
    });
    Sse::new(stream::iter(opening).chain(body))
        .keep_alive(KeepAlive::new().interval(std::time::Duration::from_secs(15)))
}
