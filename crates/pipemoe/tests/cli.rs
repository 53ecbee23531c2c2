//! The built binary against synthetic checkpoints: a good model prints its summary and exits 0; a damaged
//! or absent one prints `error: …` naming the problem and exits 1, never a panic.

use std::process::{Command, Output};

use anyhow::Result;
use pipemoe_model::synthetic::{self, SyntheticSpec};

fn inspect(dir: &std::path::Path) -> Result<Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_pipemoe")).args(["inspect", "--model"]).arg(dir).output()?)
}

#[test]
fn inspect_prints_the_summary() -> Result<()> {
    let dir = tempfile::tempdir()?;
    synthetic::write(dir.path(), &SyntheticSpec::default())?;
    let out = inspect(dir.path())?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("DeepseekV32ForCausalLM (deepseek_v32)"), "{stdout}");
    assert!(stdout.contains("2 (1 dense + 1 MoE)"), "{stdout}");
    assert!(stdout.contains("auto-round 3-bit, group 32, sym, v1 zeros"), "{stdout}");
    assert!(stdout.lines().any(|l| l.contains("GPTQ 3-bit") && l.contains(" 31 modules")), "{stdout}");
    assert!(stdout.contains("1 MTP tensor ignored"), "{stdout}");
    Ok(())
}

#[test]
fn inspect_fails_cleanly() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = inspect(&dir.path().join("absent"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("error: reading the config:") && stderr.contains("config.json"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    // Two damaged tensors: both are listed.
    let spec = SyntheticSpec::default();
    let mut tensors = synthetic::tensors(&spec);
    tensors.retain(|t| t.name != "model.norm.weight" && t.name != "model.layers.1.mlp.experts.0.up_proj.scales");
    synthetic::write_with(dir.path(), &spec, &tensors)?;
    let out = inspect(dir.path())?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("(2 problems)"), "{stderr}");
    assert!(stderr.contains("missing tensor model.norm.weight"), "{stderr}");
    assert!(stderr.contains("missing tensor model.layers.1.mlp.experts.0.up_proj.scales"), "{stderr}");
    Ok(())
}

fn demo() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/models/tiny-dsv32-w3a16")
}

fn generate(args: &[&str]) -> Result<Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_pipemoe")).args(["generate", "--model"]).arg(demo()).args(args).output()?)
}

/// The demo model answers held-out questions (never seen in training) through the whole CLI path.
#[test]
fn generate_chat_answers_held_out_questions() -> Result<()> {
    for (question, answer) in [("What is 12 + 30?", "42"), ("Reverse the word apple", "elppa")] {
        let out = generate(&["--chat", "--prompt", question, "--max-tokens", "8"])?;
        assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim_end(), answer, "{question}");
    }
    let out = generate(&["--chat", "--thinking", "--prompt", "Reverse the word apple", "--max-tokens", "24"])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("\n</think>\nelppa"), "{stdout}");
    Ok(())
}

#[test]
fn generate_refuses_bad_input_clearly() -> Result<()> {
    let out = generate(&["--prompt", "hi", "--temperature=-1"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("temperature"), "{stderr}");
    let out = generate(&["--prompt", "hi", "--max-tokens", "100000"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("limit is 4096"), "{stderr}");
    Ok(())
}
