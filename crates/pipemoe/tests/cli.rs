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
