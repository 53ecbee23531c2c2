//! `pipemoe inspect`: load config and checkpoint headers, validate every module, and describe the model.
//! Only headers are read, so this is fast even on the 130 GiB checkpoint.

use std::fmt::Write;
use std::path::Path;

use anyhow::{Context, bail};
use pipemoe_model::{Checkpoint, LinearFormat, ModelConfig, ModelSummary, check};
use pipemoe_quant::{GroupSize, QuantMethod, ZeroConvention};

/// Problems listed in the error before "and N more".
const MAX_PROBLEMS_SHOWN: usize = 10;

/// Validates the model in `dir` and returns the report to print, or an error listing what is wrong.
pub fn inspect(dir: &Path) -> anyhow::Result<String> {
    let cfg = ModelConfig::from_dir(dir).context("reading the config")?;
    let ckpt = Checkpoint::open(dir).context("opening the checkpoint")?;
    let report = check(&cfg, &ckpt);
    if !report.problems.is_empty() {
        let n = report.problems.len();
        let mut msg = format!("{} does not match its config.json ({n} problem{}):", dir.display(), plural(n));
        for p in report.problems.iter().take(MAX_PROBLEMS_SHOWN) {
            let _ = write!(msg, "\n  {}", chain(p));
        }
        if n > MAX_PROBLEMS_SHOWN {
            let _ = write!(msg, "\n  … and {} more", n - MAX_PROBLEMS_SHOWN);
        }
        bail!(msg);
    }
    Ok(render(dir, &cfg, &ckpt, &report.summary))
}

/// An error and its sources on one line, the way anyhow's `{:#}` prints them.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let _ = write!(s, ": {c}");
        cause = c.source();
    }
    s
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// Bytes with a binary unit, for people; exact counts stay available in the summary.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{v:.2} {}", UNITS[unit]) }
}

fn quantization(cfg: &ModelConfig) -> String {
    let Some(q) = &cfg.quantization else { return "none (16-bit checkpoint)".into() };
    let method = match q.quant_method {
        QuantMethod::Gptq => "gptq",
        QuantMethod::AutoRound => "auto-round",
    };
    let group = match q.default.group_size {
        GroupSize::Rows(n) => format!("group {n}"),
        GroupSize::All => "one group per column".into(),
    };
    let zeros = match q.default.zero {
        ZeroConvention::V1 => "v1 zeros (stored zero-1)",
        ZeroConvention::V2 => "v2 zeros (stored zero)",
    };
    let sym = if q.default.sym { "sym" } else { "asym" };
    format!("{method} {}-bit, {group}, {sym}, {zeros}", q.default.bits)
}

fn render(dir: &Path, cfg: &ModelConfig, ckpt: &Checkpoint, s: &ModelSummary) -> String {
    let mut o = String::new();
    let attn = if s.indexer { "MLA + lightning indexer (sparse attention)" } else { "MLA (dense)" };
    let rope = match &cfg.rope.yarn {
        Some(y) => format!("YaRN x{} from {}", y.factor, y.original_max_position_embeddings),
        None => "plain RoPE".into(),
    };
    let _ = writeln!(o, "model         {}", dir.display());
    let _ = writeln!(o, "architecture  {} ({})", s.architecture, s.architecture.model_type());
    let _ = writeln!(
        o,
        "layers        {} ({} dense + {} MoE), hidden {}, vocab {}",
        s.num_layers, s.dense_layers, s.moe_layers, cfg.hidden_size, cfg.vocab_size
    );
    let _ = writeln!(
        o,
        "experts       {} routed + {} shared per MoE layer, {} active, {} groups (top {})",
        s.n_routed_experts, s.n_shared_experts, s.num_experts_per_tok, cfg.n_group, cfg.topk_group
    );
    let _ = writeln!(
        o,
        "attention     {attn}: {} heads, q_lora {}, kv_lora {}, qk {}+{}, v {}; {rope}",
        cfg.num_attention_heads,
        cfg.q_lora_rank.map_or("none".to_string(), |r| r.to_string()),
        cfg.kv_lora_rank,
        cfg.qk_nope_head_dim,
        cfg.qk_rope_head_dim,
        cfg.v_head_dim
    );
    let _ = writeln!(o, "quantization  {}", quantization(cfg));
    let shards = ckpt.shard_paths().count();
    let _ = writeln!(
        o,
        "checkpoint    {shards} shard{}, {} tensors, {}",
        plural(shards),
        ckpt.len(),
        human(ckpt.total_bytes())
    );
    let _ = writeln!(o, "linears");
    for (format, l) in &s.linears {
        let label = match format {
            LinearFormat::Gptq { bits } => format!("GPTQ {bits}-bit"),
            LinearFormat::Dense { dtype } => format!("{dtype} dense"),
        };
        let _ = writeln!(o, "  {label:<12} {:>6} modules {:>16} params {:>12}", l.modules, l.params, human(l.bytes));
    }
    let _ = writeln!(o, "  {:<12} {:>6} tensors {:>30}", "other", s.other_tensors, human(s.other_bytes));
    let _ = writeln!(
        o,
        "weights       {} ({} bytes); {} MTP tensor{} ignored; {} unused",
        human(s.weight_bytes),
        s.weight_bytes,
        s.mtp_tensors,
        plural(s.mtp_tensors),
        s.unused.len()
    );
    for name in s.unused.iter().take(MAX_PROBLEMS_SHOWN) {
        let _ = writeln!(o, "  unused: {name}");
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human(1023), "1023 B");
        assert_eq!(human(1536), "1.50 KiB");
        assert_eq!(human(138_800_000_000), "129.27 GiB");
    }
}
