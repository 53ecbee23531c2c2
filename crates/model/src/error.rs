//! The crate's one error type. Variants about files name the file; variants about tensors name the tensor.
//! A wrapped foreign error is the variant's `source()`, not part of its message, so chain printers
//! (anyhow's `{:#}`) show it exactly once.

use std::path::PathBuf;

/// Everything that can go wrong reading a DeepSeek config or checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}", path.display())]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{}: invalid JSON", file.display())]
    Json { file: PathBuf, source: serde_json::Error },

    /// A config.json field is missing, mistyped, or holds a value this server cannot run.
    #[error("{}: {field}: {reason}", file.display())]
    ConfigField { file: PathBuf, field: String, reason: String },

    #[error("{}: model_type {model_type:?} is not supported (expected deepseek_v3 or deepseek_v32)", file.display())]
    UnsupportedModelType { file: PathBuf, model_type: String },

    #[error("{}: architectures {found:?} do not match model_type {model_type:?} (expected {expected:?})", file.display())]
    ArchitectureMismatch { file: PathBuf, model_type: String, expected: String, found: Vec<String> },

    /// The `quantization_config` object of config.json cannot be read.
    #[error("{}: quantization_config", file.display())]
    QuantConfig { file: PathBuf, source: pipemoe_quant::Error },

    /// Neither `model.safetensors.index.json` nor `model.safetensors` exists in the directory.
    #[error("{}: no model.safetensors.index.json or model.safetensors", dir.display())]
    NoCheckpoint { dir: PathBuf },

    /// A safetensors file whose header is unreadable, or whose size does not match its header (truncated).
    #[error("{}", file.display())]
    SafeTensors { file: PathBuf, source: safetensors::SafeTensorError },

    /// The index names a shard or tensor that is not where it says.
    #[error("{}: {reason}", file.display())]
    Index { file: PathBuf, reason: String },

    #[error("tensor {tensor} appears in both {} and {}", first.display(), second.display())]
    DuplicateTensor { tensor: String, first: PathBuf, second: PathBuf },

    #[error("missing tensor {tensor}")]
    MissingTensor { tensor: String },

    #[error("{tensor}: expected shape {expected:?}, found {found:?}")]
    ShapeMismatch { tensor: String, expected: Vec<usize>, found: Vec<usize> },

    #[error("{tensor}: expected dtype {expected}, found {found}")]
    DtypeMismatch { tensor: String, expected: String, found: String },

    /// The tensors present contradict the quantization config (e.g. `.qweight` for a module declared 16-bit).
    #[error("{module}: {reason}")]
    QuantMismatch { module: String, reason: String },

    /// A quantized module whose geometry the GPTQ format cannot hold.
    #[error("{module}")]
    Quant { module: String, source: pipemoe_quant::Error },

    /// A backend operation was handed inconsistent shapes or state (a bug in the caller, reported, not a panic).
    #[error("backend: {reason}")]
    Backend { reason: String },

    #[error("token id {token} is outside the vocabulary of {vocab}")]
    TokenOutOfRange { token: usize, vocab: usize },

    #[error("sequence {seq} is not in the cache")]
    UnknownSequence { seq: u64 },

    /// A step's row does not continue its sequence where the cache ends.
    #[error("sequence {seq}: the cache holds {expected} positions, the step writes position {found}")]
    CachePosition { seq: u64, expected: usize, found: usize },

    /// The latent cache's pool (sized from the memory budget) cannot hold a step's new positions; nothing of the
    /// step was written, and freeing finished sequences makes room.
    #[error("KV cache full: {used} positions in use of {capacity}, the step needs {needed} more")]
    CacheFull { needed: usize, used: usize, capacity: usize },

    /// A prompt the model cannot take: longer than its context (never truncated), or empty.
    #[error("{reason}: {tokens} tokens, the model's limit is {limit}")]
    PromptTooLong { tokens: usize, limit: usize, reason: &'static str },

    /// A layer slice that the model does not have, or a step for a stage that cannot run it.
    #[error("slice: {reason}")]
    Slice { reason: String },

    /// tokenizer.json cannot be read or parsed by the `tokenizers` crate.
    #[error("{}: cannot load tokenizer", file.display())]
    TokenizerLoad { file: PathBuf, source: tokenizers::Error },

    /// The tokenizer failed to encode or decode (`op` says which).
    #[error("tokenizer {op} failed")]
    Tokenize { op: &'static str, source: tokenizers::Error },

    /// A special token that `needed_by` relies on is not a single token of the vocabulary.
    #[error("{}: special token {token:?} (needed by {needed_by}) is not in the vocabulary", file.display())]
    MissingSpecialToken { file: PathBuf, token: String, needed_by: String },

    /// Neither tokenizer_config.json nor a built-in prompt format can turn messages into a prompt.
    #[error(
        "no chat template: tokenizer_config.json has none and model_type {model_type:?} has no built-in prompt format"
    )]
    NoChatTemplate { model_type: String },

    /// A Jinja chat template that does not compile or fails while rendering.
    #[error("chat template {name:?}")]
    ChatTemplate { name: String, source: minijinja::Error },

    /// The chat template called `raise_exception(message)`: the messages break the template's rules.
    #[error("chat template rejected the messages: {message}")]
    ChatTemplateRaised { message: String },

    /// Messages that the prompt format cannot encode (e.g. a tool result with no tool call before it).
    #[error("messages[{index}]: {reason}")]
    InvalidMessage { index: usize, reason: String },

    /// A sampling parameter out of its range.
    #[error("sampling parameter {param} = {value}: {reason}")]
    InvalidSamplingParam { param: &'static str, value: String, reason: &'static str },
}

impl Error {
    pub(crate) fn backend(reason: impl Into<String>) -> Self {
        Error::Backend { reason: reason.into() }
    }
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
