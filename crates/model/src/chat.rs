//! Chat messages (OpenAI shape) → prompt text, by the model's HF Jinja chat template when it ships one, else by
//! the built-in DeepSeek-V3.2 encoding (MODEL_SPEC.md §5, after DeepSeek's `encoding/encoding_dsv32.py`).

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value as Json;

use crate::chat_template::{ChatTemplate, PyJson};
use crate::error::{Error, Result};
use crate::tokenizer::{DEFAULT_TEMPLATE, Tokenizer};

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    /// OpenAI's newer name for system-level instructions; DeepSeek-V3.2 renders it as a user turn.
    Developer,
    User,
    Assistant,
    Tool,
}

/// One chat message as the OpenAI API sends it. `content` may arrive as a string, null, or a list of text parts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    #[serde(default, deserialize_with = "content_text")]
    pub content: String,
    /// The assistant's thinking, sent back by clients of reasoning models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(default, deserialize_with = "null_as_default", skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// On a tool result: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A call the assistant made (OpenAI `tool_calls[]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    /// A JSON object, as a string (OpenAI's encoding).
    pub arguments: String,
}

fn function_type() -> String {
    "function".to_string()
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Message {
            role,
            content: content.into(),
            reasoning_content: None,
            tool_calls: Vec::new(),
            tool_call_id: None,
            name: None,
        }
    }

    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }

    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }

    pub fn tool(content: impl Into<String>) -> Self {
        Self::new(Role::Tool, content)
    }

    /// The message as a Jinja template sees it. Tool-call arguments that parse as a JSON object are passed as
    /// that object, since HF templates apply `tojson` to them (vLLM does the same).
    pub(crate) fn to_template_json(&self) -> Json {
        let mut v = serde_json::to_value(self).unwrap_or(Json::Null);
        if let Some(calls) = v.get_mut("tool_calls").and_then(Json::as_array_mut) {
            for call in calls {
                if let Some(args) = call.pointer_mut("/function/arguments") {
                    let parsed = args.as_str().and_then(|s| serde_json::from_str::<Json>(s).ok());
                    if let Some(obj @ Json::Object(_)) = parsed {
                        *args = obj;
                    }
                }
            }
        }
        v
    }
}

/// `content`: a string, null (assistant turns that only call tools), or `[{"type": "text", "text": …}, …]`.
fn content_text<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Content {
        Text(String),
        Parts(Vec<Part>),
    }
    #[derive(Deserialize)]
    struct Part {
        #[serde(rename = "type")]
        kind: String,
        text: Option<String>,
    }
    match Option::<Content>::deserialize(d)? {
        None => Ok(String::new()),
        Some(Content::Text(s)) => Ok(s),
        Some(Content::Parts(parts)) => parts
            .into_iter()
            .map(|p| match (p.kind.as_str(), p.text) {
                ("text", Some(t)) => Ok(t),
                (kind, _) => {
                    Err(serde::de::Error::custom(format!("content part of type {kind:?}: only text is supported")))
                }
            })
            .collect(),
    }
}

fn null_as_default<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(d: D) -> std::result::Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// How to render, beyond the messages.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatOptions {
    /// End with the assistant's turn opener (Jinja templates; the DeepSeek encoding always does after a user turn).
    pub add_generation_prompt: bool,
    /// Thinking mode: the prompt opens `<think>` and the model reasons before answering.
    pub thinking: bool,
    /// Further template variables (HF `apply_chat_template(**kwargs)`), e.g. `tools`, `enable_thinking`.
    pub extra: serde_json::Map<String, Json>,
}

impl Default for ChatOptions {
    fn default() -> Self {
        ChatOptions { add_generation_prompt: true, thinking: false, extra: serde_json::Map::new() }
    }
}

/// How this model turns messages into a prompt.
#[derive(Debug)]
pub enum ChatFormat {
    /// The HF Jinja template from tokenizer_config.json (or chat_template.jinja).
    Template(Box<ChatTemplate>),
    /// DeepSeek-V3.2's `encoding_dsv32.py`, which V3.2 ships instead of a template.
    DeepSeekV32,
}

impl ChatFormat {
    /// The tokenizer's default chat template if it has one; else the built-in DeepSeek-V3.2 encoding for
    /// `deepseek_v32`/`deepseek_v3` (whose special tokens must then all be in the vocabulary); else an error.
    pub fn for_model(model_type: &str, tokenizer: &Tokenizer) -> Result<Self> {
        if let Some(source) = tokenizer.chat_template(None) {
            let tmpl = ChatTemplate::new(DEFAULT_TEMPLATE, source)?;
            return Ok(ChatFormat::Template(Box::new(
                tmpl.with_special_tokens(tokenizer.bos_token(), tokenizer.eos_token()),
            )));
        }
        match model_type {
            "deepseek_v32" | "deepseek_v3" => {
                for token in [BOS, EOS, USER, ASSISTANT, THINK, END_THINK] {
                    tokenizer.require_token(token, "the DeepSeek-V3.2 prompt format")?;
                }
                Ok(ChatFormat::DeepSeekV32)
            }
            _ => Err(Error::NoChatTemplate { model_type: model_type.to_string() }),
        }
    }

    /// The prompt text, BOS included: tokenize it without adding special tokens.
    pub fn render(&self, messages: &[Message], opts: &ChatOptions) -> Result<String> {
        match self {
            ChatFormat::Template(t) => t.render(messages, opts),
            ChatFormat::DeepSeekV32 => encode_dsv32(messages, opts.thinking),
        }
    }
}

const BOS: &str = "<｜begin▁of▁sentence｜>";
const EOS: &str = "<｜end▁of▁sentence｜>";
const USER: &str = "<｜User｜>";
const ASSISTANT: &str = "<｜Assistant｜>";
const THINK: &str = "<think>";
const END_THINK: &str = "</think>";
const DSML: &str = "｜DSML｜";

/// DeepSeek-V3.2 prompt encoding (MODEL_SPEC.md §5; `encode_messages` with BOS, no context, drop_thinking).
///
/// Not covered: the `tools` and `response_format` blocks of the system message. One leniency: in thinking mode
/// an assistant turn after the last user turn with neither reasoning nor tool calls renders as `</think>` +
/// content instead of failing, since OpenAI clients do not send reasoning back.
pub fn encode_dsv32(messages: &[Message], thinking: bool) -> Result<String> {
    let last_user = messages.iter().rposition(|m| matches!(m.role, Role::User | Role::Developer));
    // With no user turn at all every index counts as "after the last user message" (Python's -1).
    let after_last_user = |i: usize| last_user.is_none_or(|u| i > u);
    let think_tag = |opens: bool| if opens { THINK } else { END_THINK };
    let mut out = String::from(BOS);
    for (i, m) in messages.iter().enumerate() {
        match m.role {
            Role::System => out.push_str(&m.content),
            Role::User | Role::Developer => {
                out.push_str(USER);
                if m.role == Role::Developer {
                    if m.content.is_empty() {
                        return Err(Error::InvalidMessage { index: i, reason: "empty developer message".into() });
                    }
                    out.push_str("\n\n# The user's message is: ");
                }
                out.push_str(&m.content);
                out.push_str(ASSISTANT);
                out.push_str(think_tag(thinking && Some(i) == last_user));
            }
            Role::Assistant => {
                // Reasoning of turns before the last user message is dropped (drop_thinking).
                if thinking && after_last_user(i) {
                    out.push_str(m.reasoning_content.as_deref().unwrap_or(""));
                    out.push_str(END_THINK);
                }
                out.push_str(&m.content);
                if !m.tool_calls.is_empty() {
                    out.push_str(
                        &dsml_tool_calls(&m.tool_calls).map_err(|reason| Error::InvalidMessage { index: i, reason })?,
                    );
                }
                out.push_str(EOS);
            }
            Role::Tool => {
                let invalid = |reason: String| Error::InvalidMessage { index: i, reason };
                let caller = messages[..i].iter().rposition(|p| p.role != Role::Tool);
                let Some(caller) = caller.filter(|&c| messages[c].role == Role::Assistant) else {
                    return Err(invalid("tool result without an assistant message before it".into()));
                };
                let order = i - caller;
                let calls = messages[caller].tool_calls.len();
                if order > calls {
                    return Err(invalid(format!(
                        "tool result #{order}, but messages[{caller}] made {calls} tool calls"
                    )));
                }
                if order == 1 {
                    out.push_str("\n\n<function_results>");
                }
                out.push_str("\n<result>");
                out.push_str(&m.content);
                out.push_str("</result>");
                if order == calls {
                    out.push_str("\n</function_results>\n\n");
                    out.push_str(think_tag(thinking && last_user.is_none_or(|u| i >= u)));
                }
            }
        }
    }
    Ok(out)
}

/// `\n\n<｜DSML｜function_calls>` block: one `invoke` per call, one `parameter` per argument, string values raw
/// and others as Python `json.dumps`.
fn dsml_tool_calls(calls: &[ToolCall]) -> std::result::Result<String, String> {
    let json = PyJson::new(None);
    let mut invokes = Vec::with_capacity(calls.len());
    for call in calls {
        let args: serde_json::Map<String, Json> = serde_json::from_str(&call.function.arguments)
            .map_err(|e| format!("tool call {:?}: arguments are not a JSON object: {e}", call.function.name))?;
        let params: Vec<String> = args
            .iter()
            .map(|(k, v)| {
                let (is_str, value) = match v {
                    Json::String(s) => ("true", s.clone()),
                    other => ("false", json.dumps(other)),
                };
                format!("<{DSML}parameter name=\"{k}\" string=\"{is_str}\">{value}</{DSML}parameter>")
            })
            .collect();
        invokes.push(format!("<{DSML}invoke name=\"{}\">\n{}\n</{DSML}invoke>", call.function.name, params.join("\n")));
    }
    Ok(format!("\n\n<{DSML}function_calls>\n{}\n</{DSML}function_calls>", invokes.join("\n")))
}

#[cfg(test)]
#[path = "chat_tests.rs"]
mod tests;
