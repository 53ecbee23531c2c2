//! The one HTTP error type: OpenAI-shaped bodies (`{"error":{"message","type","param","code"}}`) with one
//! status mapping (STYLE.md §5). A 500 logs its cause and tells the client little.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400: the request is malformed or asks for something impossible.
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }

    pub fn model_not_found(model: &str, served: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist. This server serves `{served}`."),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }
    }

    pub fn context_length(prompt: usize, requested: Option<usize>, limit: usize) -> Self {
        let message = match requested {
            None => format!(
                "This model's maximum context length is {limit} tokens. However, your prompt has {prompt} tokens. \
                 Shorten the prompt; pipemoe never truncates it."
            ),
            Some(max) => format!(
                "This model's maximum context length is {limit} tokens. However, you requested {} tokens ({prompt} \
                 in the prompt, {max} for the completion). Reduce the prompt or max_tokens.",
                prompt + max
            ),
        };
        Self { code: Some("context_length_exceeded"), ..Self::invalid(message, Some("messages")) }
    }

    /// 400: the request can never fit the workers' KV cache (it would wait forever), with the numbers.
    pub fn cache_too_small(t: &crate::admission::TooLarge) -> Self {
        let message = format!("{t} Reduce the prompt or max_tokens.");
        Self { code: Some("context_length_exceeded"), ..Self::invalid(message, Some("max_tokens")) }
    }

    pub fn too_large(limit: usize) -> Self {
        Self {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("The request body is larger than {limit} bytes."),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }

    /// 503: not ready, restarting, or draining.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    /// 500: logged here with its cause; the client gets a short message.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(%cause, "internal error");
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: "The server failed to handle the request.".into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}
