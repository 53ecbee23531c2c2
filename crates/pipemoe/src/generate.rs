//! `pipemoe generate`: one process, the CPU engine, one prompt. Prints only the continuation on stdout, so
//! scripts and tests can compare it; `--chat` wraps the prompt as a user message in the model's chat format.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use pipemoe_model::chat::{ChatFormat, ChatOptions, Message};
use pipemoe_model::cpu::CpuBackend;
use pipemoe_model::sampling::SamplingParams;
use pipemoe_model::tokenizer::Tokenizer;
use pipemoe_model::{GenerateOptions, Generator, ModelConfig, SliceSpec, Stage};

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Model directory (config.json, tokenizer files, safetensors shards).
    #[arg(long, env = "PIPEMOE_MODEL")]
    pub model: PathBuf,
    /// The prompt: raw text, or with --chat the user's message.
    #[arg(long)]
    pub prompt: String,
    /// New tokens at most.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Render the prompt as a user message in the model's chat format.
    #[arg(long)]
    pub chat: bool,
    /// With --chat: DeepSeek thinking mode (the model reasons before `</think>`, then answers).
    #[arg(long, requires = "chat")]
    pub thinking: bool,
    /// With --chat: a system message before the user's.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop at this text (repeatable); it is not printed.
    #[arg(long)]
    pub stop: Vec<String>,
}

/// The continuation text (thinking mode: `reasoning`, a line `</think>`, then the answer).
pub fn generate(args: &GenerateArgs) -> anyhow::Result<String> {
    let dir = &args.model;
    let cfg = ModelConfig::from_dir(dir).context("reading the config")?;
    let tokenizer = Tokenizer::from_dir(dir).context("loading the tokenizer")?;
    let prompt = if args.chat {
        let format = ChatFormat::for_model(cfg.architecture.model_type(), &tokenizer)?;
        let mut messages = Vec::new();
        if let Some(s) = &args.system {
            messages.push(Message::system(s.clone()));
        }
        messages.push(Message::user(args.prompt.clone()));
        format.render(&messages, &ChatOptions { thinking: args.thinking, ..ChatOptions::default() })?
    } else {
        args.prompt.clone()
    };
    let ids = tokenizer.encode(&prompt)?;
    let stage = Stage::open(CpuBackend::F32, dir, SliceSpec::full(&cfg)).context("loading the model")?;
    let mut generator = Generator::new(stage, tokenizer)?;
    let sampling =
        SamplingParams { temperature: args.temperature, top_p: args.top_p, top_k: args.top_k, seed: args.seed };
    let opts = GenerateOptions { max_tokens: args.max_tokens, sampling, stop: args.stop.clone() };
    let out = generator.generate(&ids, &opts)?;
    if args.thinking {
        // Special tokens are not part of `text`: split the ids at `</think>` to show reasoning and answer.
        let tok = &generator.tokenizer;
        let end = tok.token_to_id("</think>");
        let ids: Vec<u32> = out.token_ids.iter().copied().filter(|&i| !tok.is_eos(i)).collect();
        if let Some(cut) = end.and_then(|e| ids.iter().position(|&i| i == e)) {
            let reasoning = tok.decode(&ids[..cut], true)?;
            let answer = tok.decode(&ids[cut + 1..], true)?;
            return Ok(format!("{reasoning}\n</think>\n{answer}"));
        }
    }
    Ok(out.text)
}
