//! The tokenizer, chat format and stream decoding against the fixture model's real byte-level BPE tokenizer
//! (`data/models/tiny-dsv32-w3a16`, DeepSeek special tokens, no chat template), and the chat-format policy.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use pipemoe_model::Error;
use pipemoe_model::chat::{ChatFormat, ChatOptions, Message};
use pipemoe_model::tokenizer::{StopMatcher, StreamDecoder, Tokenizer};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/models/tiny-dsv32-w3a16")
}

fn load() -> Result<Tokenizer> {
    let dir = fixture();
    Tokenizer::from_dir(&dir).with_context(|| format!("{}: fixture tokenizer", dir.display()))
}

/// A copy of the fixture's tokenizer files in a temp dir, with `edit` applied to tokenizer.json and `config`
/// written as tokenizer_config.json.
fn variant(edit: impl FnOnce(&mut serde_json::Value), config: serde_json::Value) -> Result<tempfile::TempDir> {
    let tmp = tempfile::tempdir()?;
    let mut tok: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture().join("tokenizer.json"))?)?;
    edit(&mut tok);
    std::fs::write(tmp.path().join("tokenizer.json"), serde_json::to_string(&tok)?)?;
    std::fs::write(tmp.path().join("tokenizer_config.json"), serde_json::to_string(&config)?)?;
    Ok(tmp)
}

#[test]
fn fixture_special_tokens_and_stop_ids() -> Result<()> {
    let tok = load()?;
    assert_eq!(tok.bos_id(), Some(0));
    assert_eq!(tok.eos_ids(), &[1]);
    assert!(tok.is_eos(1) && !tok.is_eos(0));
    for (token, id) in [("<｜User｜>", 2), ("<｜Assistant｜>", 3), ("<think>", 4), ("</think>", 5)] {
        assert_eq!(tok.token_to_id(token), Some(id), "{token}");
    }
    // The special tokens are also entries of the BPE vocabulary, so they do not add to its 360.
    assert_eq!(tok.vocab_size(), 360);
    assert_eq!(tok.chat_template(None), None);
    Ok(())
}

#[test]
fn fixture_chat_prompt_encodes_and_decodes_back() -> Result<()> {
    let tok = load()?;
    let format = ChatFormat::for_model("deepseek_v32", &tok)?;
    assert!(matches!(format, ChatFormat::DeepSeekV32));
    let opts = ChatOptions { thinking: true, ..ChatOptions::default() };
    let prompt = format.render(&[Message::user("What is 12 + 30?")], &opts)?;
    assert_eq!(prompt, "<｜begin▁of▁sentence｜><｜User｜>What is 12 + 30?<｜Assistant｜><think>");

    let ids = tok.encode(&prompt)?;
    assert_eq!(ids[0], 0, "prompt must start with BOS: {ids:?}");
    assert_eq!(ids[1], 2, "then <｜User｜>: {ids:?}");
    assert_eq!(&ids[ids.len() - 2..], &[3, 4], "ends <｜Assistant｜><think>: {ids:?}");
    // Exactly one BOS: encode adds no special tokens of its own.
    assert_eq!(ids.iter().filter(|&&i| i == 0).count(), 1);
    assert_eq!(tok.decode(&ids, false)?, prompt);
    assert_eq!(tok.decode(&ids, true)?, "What is 12 + 30?");

    let mut stream = StreamDecoder::new(false);
    let mut text = String::new();
    for &id in &ids {
        text.push_str(&stream.push(&tok, id)?);
    }
    text.push_str(&stream.flush(&tok)?);
    assert_eq!(text, prompt);
    Ok(())
}

#[test]
fn stream_decoder_holds_back_split_utf8() -> Result<()> {
    let tok = load()?;
    // Characters outside the fixture's merges fall back to one token per byte, so each of these is split.
    let text = "12 + 30 = 42 ✓ 你好 🙂!";
    let ids = tok.encode(text)?;
    assert!(ids.len() > text.chars().count(), "expected byte-level splits: {ids:?}");
    let mut stream = StreamDecoder::new(true);
    let mut pieces = Vec::new();
    for &id in &ids {
        let piece = stream.push(&tok, id)?;
        assert!(!piece.contains('\u{FFFD}'), "a piece split a character: {piece:?}");
        pieces.push(piece);
    }
    assert_eq!(stream.flush(&tok)?, "");
    assert_eq!(pieces.concat(), text);
    // While a character's bytes are still arriving, nothing is emitted.
    assert!(pieces.iter().any(String::is_empty), "{pieces:?}");

    // A stream cut in the middle of a character flushes what it has (the lossy replacement).
    let smile = tok.encode("🙂")?;
    assert!(smile.len() > 1);
    let mut stream = StreamDecoder::new(true);
    assert_eq!(stream.push(&tok, smile[0])?, "");
    assert_eq!(stream.flush(&tok)?, "\u{FFFD}");
    Ok(())
}

#[test]
fn stream_with_stop_string() -> Result<()> {
    let tok = load()?;
    let ids = tok.encode("The answer is 42.\nUser: next")?;
    let mut stream = StreamDecoder::new(true);
    let mut stop = StopMatcher::new(["\nUser:"]);
    let mut out = String::new();
    let mut hit = None;
    for &id in &ids {
        let chunk = stop.push(&stream.push(&tok, id)?);
        out.push_str(&chunk.text);
        if chunk.stop.is_some() {
            hit = chunk.stop;
            break;
        }
    }
    assert_eq!((out.as_str(), hit.as_deref()), ("The answer is 42.", Some("\nUser:")));
    Ok(())
}

#[test]
fn chat_format_policy() -> Result<()> {
    let tok = load()?;
    let err = ChatFormat::for_model("llama", &tok).unwrap_err();
    assert!(matches!(&err, Error::NoChatTemplate { model_type } if model_type == "llama"), "{err}");

    // A template in tokenizer_config.json wins over the built-in encoding; the list form picks "default".
    let dir = variant(
        |_| {},
        serde_json::json!({
            "bos_token": "<｜begin▁of▁sentence｜>",
            "eos_token": {"content": "<｜end▁of▁sentence｜>", "special": true},
            "chat_template": [
                {"name": "tool_use", "template": "tools"},
                {"name": "default", "template": "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{{ eos_token }}"}
            ]
        }),
    )?;
    let tok = Tokenizer::from_dir(dir.path())?;
    assert_eq!(tok.chat_template(Some("tool_use")), Some("tools"));
    let format = ChatFormat::for_model("deepseek_v32", &tok)?;
    let text = format.render(&[Message::user("hi")], &ChatOptions::default())?;
    assert_eq!(text, "<｜begin▁of▁sentence｜>[user]hi<｜end▁of▁sentence｜>");

    // Without <think> the built-in DeepSeek format cannot be used, and the error names the token.
    let dir = variant(
        |t| {
            if let Some(added) = t["added_tokens"].as_array_mut() {
                added.retain(|a| a["content"] != "<think>");
            }
            if let Some(vocab) = t["model"]["vocab"].as_object_mut() {
                vocab.remove("<think>");
            }
        },
        serde_json::json!({"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"}),
    )?;
    let tok = Tokenizer::from_dir(dir.path())?;
    let err = ChatFormat::for_model("deepseek_v32", &tok).unwrap_err();
    assert!(matches!(&err, Error::MissingSpecialToken { token, .. } if token == "<think>"), "{err}");
    assert!(err.to_string().contains("\"<think>\""), "{err}");

    // A bos_token the vocabulary lacks is refused at load.
    let dir = variant(|_| {}, serde_json::json!({"bos_token": "<s>"}))?;
    let err = Tokenizer::from_dir(dir.path()).unwrap_err();
    assert!(matches!(&err, Error::MissingSpecialToken { token, .. } if token == "<s>"), "{err}");
    Ok(())
}
