//! OpenAI request bodies, parsed by hand from JSON so every mistake gets a 400 that names the field, and the
//! settings every endpoint shares, validated once.

use pipemoe_model::chat::Message;
use pipemoe_proto::worker_v1::Sampling;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::error::ApiError;

/// `stop`: one string or a list of up to four.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Fields shared by chat and completions.
#[derive(Debug, Deserialize)]
pub struct Common {
    pub model: String,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Not in OpenAI's API; vLLM and others accept it.
    pub top_k: Option<i64>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    pub n: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub logit_bias: Option<Map<String, Value>>,
    /// Not in OpenAI's API (vLLM's extension): generate past EOS up to max_tokens.
    #[serde(default)]
    pub ignore_eos: bool,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    #[serde(flatten)]
    pub common: Common,
    pub messages: Vec<Message>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    /// Passed to the chat template; `thinking` (or `enable_thinking`) turns on DeepSeek's thinking mode.
    pub chat_template_kwargs: Option<Map<String, Value>>,
    pub tools: Option<Vec<Value>>,
    pub response_format: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    #[serde(flatten)]
    pub common: Common,
    pub prompt: Prompt,
    /// Legacy completions: the number of top tokens to report per position.
    pub logprobs: Option<i64>,
    #[serde(default)]
    pub echo: bool,
    pub suffix: Option<String>,
}

/// Everything a generation needs besides its prompt, checked.
#[derive(Debug, Clone)]
pub struct GenParams {
    pub n: usize,
    /// `None`: until the context is full.
    pub max_tokens: Option<usize>,
    pub sampling: Sampling,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// Some(k): report the chosen token's logprob and the k most likely.
    pub logprobs: Option<u32>,
    pub ignore_eos: bool,
}

/// Parses a JSON body into `T`, mapping syntax and type errors to 400s.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("The body is not valid JSON: {e}"), None))?;
    if !v.is_object() {
        return Err(ApiError::invalid("The body must be a JSON object.", None));
    }
    serde_json::from_value(v).map_err(|e| ApiError::invalid(format!("Invalid request: {e}"), None))
}

fn range<T: PartialOrd + std::fmt::Display + Copy>(v: T, lo: T, hi: T, name: &str) -> Result<T, ApiError> {
    if v < lo || v > hi {
        return Err(ApiError::invalid(format!("`{name}` must be between {lo} and {hi}, got {v}."), Some(name)));
    }
    Ok(v)
}

impl Common {
    /// Validates the shared fields; `logprobs` comes from the endpoint's own field.
    pub fn params(&self, logprobs: Option<u32>) -> Result<GenParams, ApiError> {
        let unsupported =
            |name: &str| ApiError::invalid(format!("`{name}` is not supported by this server."), Some(name));
        if self.presence_penalty.is_some_and(|p| p != 0.0) {
            return Err(unsupported("presence_penalty"));
        }
        if self.frequency_penalty.is_some_and(|p| p != 0.0) {
            return Err(unsupported("frequency_penalty"));
        }
        if self.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(unsupported("logit_bias"));
        }
        let n = range(self.n.unwrap_or(1), 1, 16, "n")? as usize;
        let max_tokens = match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) => Some(range(m, 1, i64::from(u32::MAX), "max_completion_tokens")? as usize),
            (None, Some(m)) => Some(range(m, 1, i64::from(u32::MAX), "max_tokens")? as usize),
            (None, None) => None,
        };
        let temperature = range(self.temperature.unwrap_or(1.0), 0.0, 2.0, "temperature")?;
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid(format!("`top_p` must be in (0, 1], got {top_p}."), Some("top_p")));
        }
        let top_k = range(self.top_k.unwrap_or(0), -1, 1_000_000, "top_k")?.max(0) as u32;
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) if v.len() <= 4 => v.clone(),
            Some(Stop::Many(v)) => {
                return Err(ApiError::invalid(
                    format!("`stop` takes at most 4 strings, got {}.", v.len()),
                    Some("stop"),
                ));
            }
        };
        if n > 1 && self.seed.is_none() && temperature == 0.0 {
            // n greedy copies are identical; allowed, just wasteful.
            tracing::debug!("n > 1 with greedy sampling");
        }
        let sampling = Sampling {
            temperature,
            top_p,
            top_k,
            seed: self.seed,
            logprobs: logprobs.is_some(),
            top_logprobs: logprobs.unwrap_or(0),
        };
        Ok(GenParams {
            n,
            max_tokens,
            sampling,
            stop,
            stream: self.stream,
            include_usage: self.stream_options.as_ref().is_some_and(|o| o.include_usage),
            logprobs,
            ignore_eos: self.ignore_eos,
        })
    }
}

impl ChatRequest {
    pub fn logprobs(&self) -> Result<Option<u32>, ApiError> {
        let top = match self.top_logprobs {
            None => 0,
            Some(k) => range(k, 0, 20, "top_logprobs")? as u32,
        };
        match self.logprobs {
            Some(true) => Ok(Some(top)),
            _ if self.top_logprobs.is_some_and(|k| k > 0) => {
                Err(ApiError::invalid("`top_logprobs` needs `logprobs: true`.", Some("top_logprobs")))
            }
            _ => Ok(None),
        }
    }

    /// DeepSeek thinking mode, from `chat_template_kwargs`.
    pub fn thinking(&self) -> Result<bool, ApiError> {
        let Some(kw) = &self.chat_template_kwargs else { return Ok(false) };
        match kw.get("thinking").or_else(|| kw.get("enable_thinking")) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(ApiError::invalid(
                format!("`chat_template_kwargs.thinking` must be a boolean, got {other}."),
                Some("chat_template_kwargs"),
            )),
        }
    }
}
