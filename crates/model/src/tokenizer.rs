//! The model's tokenizer (HF `tokenizer.json` through the `tokenizers` crate) with the special tokens and chat
//! templates of `tokenizer_config.json`, the stop ids of `config.json`/`generation_config.json`, and the two
//! streaming helpers: [`StreamDecoder`] (token ids → text, never splitting a UTF-8 character) and [`StopMatcher`]
//! (text → text up to a stop string).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

/// Name under which a single-string `chat_template` (or `chat_template.jinja`) is stored.
pub const DEFAULT_TEMPLATE: &str = "default";

/// A loaded tokenizer plus what the model directory says about BOS, EOS and chat templates.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    file: PathBuf,
    bos_token: Option<String>,
    eos_token: Option<String>,
    bos_id: Option<u32>,
    eos_ids: Vec<u32>,
    /// `(name, source)`; HF allows one string or a list of `{name, template}`.
    chat_templates: Vec<(String, String)>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("file", &self.file)
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_ids", &self.eos_ids)
            .field("chat_templates", &self.chat_templates.iter().map(|(n, _)| n).collect::<Vec<_>>())
            .finish()
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` (required), `tokenizer_config.json`, `chat_template.jinja`, `config.json` and
    /// `generation_config.json` (each optional) from a model directory.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let file = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&file)
            .map_err(|source| Error::TokenizerLoad { file: file.clone(), source })?;

        let cfg_file = dir.join("tokenizer_config.json");
        let cfg = read_json(&cfg_file)?.unwrap_or(Value::Null);
        let bos_token = special_token_field(&cfg, "bos_token", &cfg_file)?;
        let eos_token = special_token_field(&cfg, "eos_token", &cfg_file)?;
        let mut chat_templates = chat_templates_field(&cfg, &cfg_file)?;
        // transformers >= 4.43 saves the template beside the config; it then wins over the config's copy.
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            let source = std::fs::read_to_string(&jinja).map_err(|source| Error::Io { path: jinja, source })?;
            chat_templates.retain(|(name, _)| name != DEFAULT_TEMPLATE);
            chat_templates.insert(0, (DEFAULT_TEMPLATE.to_string(), source));
        }

        let mut tok = Tokenizer {
            inner,
            file,
            bos_token: None,
            eos_token: None,
            bos_id: None,
            eos_ids: Vec::new(),
            chat_templates,
        };
        let mut eos_ids = Vec::new();
        for name in ["config.json", "generation_config.json"] {
            let path = dir.join(name);
            if let Some(json) = read_json(&path)? {
                eos_ids.extend(token_ids_field(&json, "eos_token_id", &path)?);
            }
        }
        if let Some(eos) = &eos_token {
            eos_ids.push(tok.require_token(eos, "tokenizer_config.json eos_token")?);
        }
        let mut bos_id = match &bos_token {
            Some(bos) => Some(tok.require_token(bos, "tokenizer_config.json bos_token")?),
            None => None,
        };
        if bos_id.is_none() {
            let path = dir.join("config.json");
            if let Some(json) = read_json(&path)? {
                bos_id = token_ids_field(&json, "bos_token_id", &path)?.first().copied();
            }
        }
        let mut seen = std::collections::HashSet::new();
        eos_ids.retain(|id| seen.insert(*id));
        tok.bos_token = bos_token;
        tok.eos_token = eos_token;
        tok.bos_id = bos_id;
        tok.eos_ids = eos_ids;
        Ok(tok)
    }

    /// Token ids of `text`, without adding BOS/EOS: rendered prompts already hold their special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, false).map_err(|source| Error::Tokenize { op: "encode", source })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`; `skip_special` drops special tokens (BOS, EOS, role markers). Unknown ids are skipped.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|source| Error::Tokenize { op: "decode", source })
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// Every id that ends generation: config.json and generation_config.json `eos_token_id` and the
    /// tokenizer's own `eos_token`, without duplicates.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_ids.contains(&id)
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of token ids the tokenizer knows, added tokens included (the embedding may have more rows).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The chat template called `name`, or the default one for `None`.
    pub fn chat_template(&self, name: Option<&str>) -> Option<&str> {
        let name = name.unwrap_or(DEFAULT_TEMPLATE);
        self.chat_templates.iter().find(|(n, _)| n == name).map(|(_, s)| s.as_str())
    }

    /// Names of the chat templates, `"default"` first when present.
    pub fn chat_template_names(&self) -> impl Iterator<Item = &str> {
        self.chat_templates.iter().map(|(n, _)| n.as_str())
    }

    /// The id of `token`, which must be one token of the vocabulary; the error names the token and `needed_by`.
    pub fn require_token(&self, token: &str, needed_by: &str) -> Result<u32> {
        self.token_to_id(token).ok_or_else(|| Error::MissingSpecialToken {
            file: self.file.clone(),
            token: token.to_string(),
            needed_by: needed_by.to_string(),
        })
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// `Ok(None)` when the file does not exist.
fn read_json(path: &Path) -> Result<Option<Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(Error::Io { path: path.to_path_buf(), source }),
    };
    serde_json::from_str(&text).map(Some).map_err(|source| Error::Json { file: path.to_path_buf(), source })
}

fn field_err(file: &Path, field: &str, reason: impl Into<String>) -> Error {
    Error::ConfigField { file: file.to_path_buf(), field: field.to_string(), reason: reason.into() }
}

/// `bos_token`/`eos_token`: a string, an AddedToken object `{"content": ...}`, null or absent.
fn special_token_field(cfg: &Value, field: &str, file: &Path) -> Result<Option<String>> {
    match cfg.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Object(o)) => match o.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(field_err(file, field, "object without a string \"content\"")),
        },
        Some(v) => Err(field_err(file, field, format!("expected a string, found {v}"))),
    }
}

/// `chat_template`: one string, or a list of `{"name", "template"}`.
fn chat_templates_field(cfg: &Value, file: &Path) -> Result<Vec<(String, String)>> {
    match cfg.get("chat_template") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![(DEFAULT_TEMPLATE.to_string(), s.clone())]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match (item.get("name"), item.get("template")) {
                (Some(Value::String(n)), Some(Value::String(t))) => Ok((n.clone(), t.clone())),
                _ => Err(field_err(file, "chat_template", "list items must be {\"name\": str, \"template\": str}")),
            })
            .collect(),
        Some(v) => Err(field_err(file, "chat_template", format!("expected a string or a list, found {v}"))),
    }
}

/// A token id field that may be one id, a list, null or absent.
fn token_ids_field(json: &Value, field: &str, file: &Path) -> Result<Vec<u32>> {
    let one = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
    let bad = |v: &Value| field_err(file, field, format!("bad token id {v}"));
    match json.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(|v| one(v).ok_or_else(|| bad(v))).collect(),
        Some(v) => one(v).map(|id| vec![id]).ok_or_else(|| bad(v)),
    }
}

/// Turns generated token ids into text one id at a time.
///
/// Byte-level BPE tokens can end inside a UTF-8 character, and some decoders treat the first token of a window
/// differently, so each step decodes a short window that starts a few tokens back and emits only what that
/// window adds past the text already emitted, holding back while it ends in U+FFFD (an unfinished character).
/// This is the algorithm of HF `DecodeStream` and TGI, kept here so the decoder owns no borrow of the tokenizer.
#[derive(Debug, Clone, Default)]
pub struct StreamDecoder {
    skip_special: bool,
    /// Ids from the start of the context window to the newest one.
    ids: Vec<u32>,
    /// `ids[..read]` has been emitted.
    read: usize,
}

impl StreamDecoder {
    pub fn new(skip_special: bool) -> Self {
        StreamDecoder { skip_special, ids: Vec::new(), read: 0 }
    }

    /// Adds one token; returns the text it completes (empty while a character is unfinished).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[..self.read], self.skip_special)?;
        let text = tok.decode(&self.ids, self.skip_special)?;
        if text.len() <= prefix.len() || text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let Some(new) = text.get(prefix.len()..).filter(|_| text.starts_with(&prefix)) else {
            // The decoder rewrote earlier text (never for byte-level BPE); wait for more context.
            return Ok(String::new());
        };
        let new = new.to_string();
        // The tokens just emitted become the context window of the next step.
        self.ids.drain(..self.read);
        self.read = self.ids.len();
        Ok(new)
    }

    /// Text still held back at the end of generation (an unfinished character decodes as U+FFFD).
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<String> {
        let prefix = tok.decode(&self.ids[..self.read], self.skip_special)?;
        let text = tok.decode(&self.ids, self.skip_special)?;
        self.ids.clear();
        self.read = 0;
        Ok(text.get(prefix.len()..).filter(|_| text.starts_with(&prefix)).unwrap_or_default().to_string())
    }
}

/// What [`StopMatcher::push`] lets through.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopChunk {
    /// Text safe to send: it cannot be part of a stop string.
    pub text: String,
    /// The stop string that ended the stream (not included in `text`).
    pub stop: Option<String>,
}

/// Cuts a text stream at the first stop string. Text that could still turn into a stop string is held back
/// until the next chunk settles it; the stop string itself is never emitted.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

impl StopMatcher {
    /// Empty strings are ignored (they would match everywhere).
    pub fn new<S: Into<String>>(stops: impl IntoIterator<Item = S>) -> Self {
        let stops = stops.into_iter().map(Into::into).filter(|s: &String| !s.is_empty()).collect();
        StopMatcher { stops, held: String::new(), stopped: false }
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Feeds the next piece of text. After a stop string was hit, every call returns an empty chunk.
    pub fn push(&mut self, text: &str) -> StopChunk {
        if self.stopped {
            return StopChunk::default();
        }
        self.held.push_str(text);
        // The earliest match wins; at the same position the longer stop string does.
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|pos| (pos, s)))
            .min_by(|a, b| a.0.cmp(&b.0).then(b.1.len().cmp(&a.1.len())));
        if let Some((pos, stop)) = hit {
            let stop = stop.clone();
            let mut text = std::mem::take(&mut self.held);
            text.truncate(pos);
            self.stopped = true;
            return StopChunk { text, stop: Some(stop) };
        }
        let keep = self.partial_match_len();
        let text = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        StopChunk { text, stop: None }
    }

    /// The text held back when the stream ends without a stop string.
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        std::mem::take(&mut self.held)
    }

    /// Length of the longest tail of `held` that is a proper prefix of a stop string (on a char boundary).
    fn partial_match_len(&self) -> usize {
        let held = self.held.as_str();
        held.char_indices()
            .map(|(i, _)| i)
            .find(|&i| self.stops.iter().any(|s| s.len() > held.len() - i && s.starts_with(&held[i..])))
            .map_or(0, |i| held.len() - i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], chunks: &[&str]) -> (String, Option<String>, Vec<String>) {
        let mut m = StopMatcher::new(stops.iter().copied());
        let mut out = String::new();
        let mut pieces = Vec::new();
        let mut stop = None;
        for c in chunks {
            let chunk = m.push(c);
            pieces.push(chunk.text.clone());
            out.push_str(&chunk.text);
            if chunk.stop.is_some() {
                stop = chunk.stop;
            }
        }
        out.push_str(&m.finish());
        (out, stop, pieces)
    }

    #[test]
    fn stop_string_across_chunks_is_cut_and_not_emitted() {
        let (out, stop, pieces) = run(&["STOP"], &["hello S", "TO", "P world"]);
        assert_eq!(out, "hello ");
        assert_eq!(stop.as_deref(), Some("STOP"));
        // "S" and "STO" may start the stop string, so they are held back, not emitted early.
        assert_eq!(pieces, ["hello ", "", ""]);
    }

    #[test]
    fn partial_match_that_breaks_is_released() {
        let (out, stop, pieces) = run(&["STOP"], &["a ST", "ONE b"]);
        assert_eq!((out.as_str(), stop), ("a STONE b", None));
        assert_eq!(pieces, ["a ", "STONE b"]);
        // Held text at the end of the stream comes out of finish().
        assert_eq!(run(&["STOP"], &["x ST"]).0, "x ST");
    }

    #[test]
    fn earliest_stop_wins_and_nothing_after() {
        let mut m = StopMatcher::new(["world", "lo"]);
        let c = m.push("hello world");
        assert_eq!(c, StopChunk { text: "hel".into(), stop: Some("lo".into()) });
        assert!(m.is_stopped());
        assert_eq!(m.push("more"), StopChunk::default());
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn multibyte_text_and_stops() {
        let (out, stop, _) = run(&["。", "<｜end▁of▁sentence｜>"], &["你好", "<｜end", "▁of▁sentence｜>tail"]);
        assert_eq!((out.as_str(), stop.as_deref()), ("你好", Some("<｜end▁of▁sentence｜>")));
        let (out, stop, _) = run(&["。"], &["你好。再见"]);
        assert_eq!((out.as_str(), stop.as_deref()), ("你好", Some("。")));
        // No stops: everything passes through at once; empty stop strings are ignored.
        let (out, stop, pieces) = run(&[""], &["ab", "c"]);
        assert_eq!((out.as_str(), stop, pieces), ("abc", None, vec!["ab".to_string(), "c".to_string()]));
    }
}
