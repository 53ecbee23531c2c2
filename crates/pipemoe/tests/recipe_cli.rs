//! `pipemoe recipe upsert|list|show|rm` through the built binary, against a database in a temporary directory.

use std::path::Path;
use std::process::{Command, Output};

use anyhow::Result;
use serde_json::Value;

/// The binary with `--db` in `dir` and no PIPEMOE_* variables from the caller's environment.
fn pipemoe(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pipemoe"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("PIPEMOE_") {
            cmd.env_remove(k);
        }
    }
    cmd.arg("recipe").arg("--db").arg(dir.join("controller.db")).args(args).current_dir(dir);
    cmd
}

fn run(dir: &Path, args: &[&str]) -> Result<Output> {
    Ok(pipemoe(dir, args).output()?)
}

fn ok_json(out: &Output) -> Result<Value> {
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn failed(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[test]
fn upsert_from_flags_then_list_show_rm() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let out = run(
        d,
        &[
            "upsert",
            "--id",
            "r1",
            "--model",
            "models/big",
            "--devices",
            "cpu,cuda:1",
            "--max-model-len",
            "2048",
            "--kv-cache-dtype",
            "fp8",
            "--quantization",
            "gptq",
            "--env",
            "A=1",
            "--env",
            "B=x=y",
            "--extra",
            r#"{"k": [1, 2]}"#,
            "--placement",
            r#"[{"layers": [0, 2]}, {"layers": [2, 4], "experts": [0, 8]}]"#,
        ],
    )?;
    let r = ok_json(&out)?;
    // A relative --model is made absolute against the current directory.
    let model = std::fs::canonicalize(d)?.join("models/big");
    assert_eq!(r["model_path"].as_str().map(Path::new), Some(model.as_path()));
    assert_eq!(r["served_model_name"], "big");
    assert_eq!(r["name"], "r1");
    assert_eq!(r["devices"], serde_json::json!(["cpu", "cuda:1"]));
    assert_eq!((r["max_model_len"].as_u64(), r["max_memory_gib"].as_f64()), (Some(2048), Some(18.0)));
    assert_eq!(
        (r["kv_cache_dtype"].as_str(), r["dtype"].as_str(), r["quantization"].as_str()),
        (Some("fp8"), Some("auto"), Some("gptq"))
    );
    assert_eq!(r["env"], serde_json::json!({"A": "1", "B": "x=y"}));
    assert_eq!(r["extra"], serde_json::json!({"k": [1, 2]}));
    assert_eq!(r["placement"][1], serde_json::json!({"layers": [2, 4], "experts": [0, 8]}));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("warning: ") && stderr.contains("no config.json"), "{stderr}");
    assert!(!model.exists());

    let list = run(d, &["list"])?;
    assert!(list.status.success());
    let table = String::from_utf8_lossy(&list.stdout);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("ID") && lines[0].contains("DEVICES"), "{table}");
    assert!(lines[1].starts_with("r1  ") && lines[1].contains("cpu,cuda:1") && lines[1].contains("2048"), "{table}");

    let shown = ok_json(&run(d, &["show", "r1"])?)?;
    assert_eq!(shown, r);

    // Updating one field keeps the others and created_at; --db also works after the subcommand.
    let out = Command::new(env!("CARGO_BIN_EXE_pipemoe"))
        .args(["recipe", "upsert", "--id", "r1", "--max-memory-gib", "4.5", "--quantization", "none", "--db"])
        .arg(d.join("controller.db"))
        .output()?;
    let updated = ok_json(&out)?;
    assert_eq!(updated["max_memory_gib"].as_f64(), Some(4.5));
    assert_eq!(updated["quantization"], Value::Null);
    assert_eq!(
        (&updated["created_at"], &updated["devices"], &updated["env"]),
        (&r["created_at"], &r["devices"], &r["env"])
    );

    let out = run(d, &["rm", "r1"])?;
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "removed recipe r1 (r1)");
    let stderr = failed(&run(d, &["show", "r1"])?);
    assert!(stderr.starts_with("error: no recipe \"r1\""), "{stderr}");
    let stderr = failed(&run(d, &["rm", "r1"])?);
    assert!(stderr.starts_with("error: no recipe \"r1\""), "{stderr}");
    let list = run(d, &["list"])?;
    assert!(String::from_utf8_lossy(&list.stdout).starts_with("no recipes"));
    Ok(())
}

#[test]
fn upsert_from_files_with_env_and_flag_precedence() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    std::fs::create_dir_all(d.join("conf"))?;
    std::fs::write(
        d.join("conf/r.toml"),
        r#"
id = "from-toml"
name = "From a TOML file"
model_path = "../models/tiny"
devices = ["cpu", "cpu"]
max_model_len = 1000
dtype = "bfloat16"
env = { OMP_NUM_THREADS = 2 }
placement = [{ layers = [0, 1] }, { layers = [1, 2] }]
"#,
    )?;
    let r = ok_json(&run(d, &["upsert", "--file", "conf/r.toml", "--served-model-name", "tiny-override"])?)?;
    // A file's relative model_path is relative to the file.
    assert!(r["model_path"].as_str().unwrap_or_default().ends_with("conf/../models/tiny"), "{r}");
    assert_eq!((r["id"].as_str(), r["name"].as_str()), (Some("from-toml"), Some("From a TOML file")));
    assert_eq!((r["served_model_name"].as_str(), r["max_model_len"].as_u64()), (Some("tiny-override"), Some(1000)));
    assert_eq!((r["dtype"].as_str(), &r["env"]), (Some("bfloat16"), &serde_json::json!({"OMP_NUM_THREADS": "2"})));
    assert_eq!(r["placement"].as_array().map(Vec::len), Some(2));

    // flag > environment > file.
    let via_env =
        pipemoe(d, &["upsert", "--file", "conf/r.toml"]).env("PIPEMOE_RECIPE_MAX_MODEL_LEN", "2000").output()?;
    assert_eq!(ok_json(&via_env)?["max_model_len"].as_u64(), Some(2000));
    let via_flag = pipemoe(d, &["upsert", "--file", "conf/r.toml", "--max-model-len", "3000"])
        .env("PIPEMOE_RECIPE_MAX_MODEL_LEN", "2000")
        .output()?;
    assert_eq!(ok_json(&via_flag)?["max_model_len"].as_u64(), Some(3000));

    // `show` output is a valid recipe file.
    let shown = run(d, &["show", "from-toml"])?;
    let mut copy: Value = serde_json::from_slice(&shown.stdout)?;
    copy["id"] = "copy".into();
    std::fs::write(d.join("copy.json"), serde_json::to_vec(&copy)?)?;
    let c = ok_json(&run(d, &["upsert", "--file", "copy.json"])?)?;
    assert_eq!(
        (&c["model_path"], &c["placement"], &c["max_model_len"]),
        (&copy["model_path"], &copy["placement"], &copy["max_model_len"])
    );
    Ok(())
}

#[test]
fn bad_input_is_refused_clearly_and_changes_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let before = ok_json(&run(d, &["upsert", "--id", "keep", "--model", "/m", "--devices", "cpu"])?)?;

    let stderr = failed(&run(d, &["upsert", "--id", "keep", "--extra", "{not json"])?);
    assert!(stderr.contains("recipe field extra: invalid JSON"), "{stderr}");
    let stderr = failed(&run(d, &["upsert", "--id", "keep", "--max-memory-gib", "0"])?);
    assert!(stderr.contains("recipe field max_memory_gib: 0 is not a positive number"), "{stderr}");
    let stderr = failed(&run(
        d,
        &["upsert", "--id", "keep", "--devices", "cpu", "--placement", r#"[{"layers":[0,2]},{"layers":[2,4]}]"#],
    )?);
    assert!(stderr.contains("recipe field placement: 2 slices for 1 devices"), "{stderr}");
    let stderr = failed(&run(d, &["upsert", "--id", "new", "--model", "/m"])?);
    assert!(stderr.contains("recipe field devices: required"), "{stderr}");
    let stderr = failed(&run(d, &["upsert", "--id", "Bad Id", "--model", "/m", "--devices", "cpu"])?);
    assert!(stderr.contains("recipe field id: \"Bad Id\" is not a slug"), "{stderr}");
    let stderr = failed(&run(d, &["upsert", "--id", "keep", "--devices", "gpu0"])?);
    assert!(stderr.contains("recipe field devices: \"gpu0\" is not a device"), "{stderr}");
    std::fs::write(d.join("bad.toml"), "id = \"keep\"\nmax_model_len = \"long\"\n")?;
    let stderr = failed(&run(d, &["upsert", "--file", "bad.toml"])?);
    assert!(
        stderr.contains("bad.toml: recipe field max_model_len: expected a positive integer, found \"long\""),
        "{stderr}"
    );
    std::fs::write(d.join("broken.json"), "{\"id\": ")?;
    let stderr = failed(&run(d, &["upsert", "--file", "broken.json"])?);
    assert!(stderr.contains("broken.json: invalid JSON"), "{stderr}");

    assert_eq!(ok_json(&run(d, &["show", "keep"])?)?, before);
    let list = run(d, &["list"])?;
    assert_eq!(String::from_utf8_lossy(&list.stdout).lines().count(), 2, "only `keep`");
    Ok(())
}
