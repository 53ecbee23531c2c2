//! `pipemoe recipe upsert|list|show|rm`. The file and flags are parsed before the database is opened, and the
//! merged recipe is validated before the write, so a refused command leaves the database as it was.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

use super::patch::{parse_env_pair, parse_extra, parse_placement, parse_quantization};
use super::{Dtype, KvCacheDtype, Recipe, RecipePatch, RecipeStore, invalid, parse_devices};
use crate::error::{Error, Result};
use crate::lifecycle::{DataArgs, Paths, block_on, text_table};

/// Manage recipes (what `pipemoe serve` runs) in the controller's database.
#[derive(Debug, Args)]
pub struct RecipeArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[command(subcommand)]
    pub command: RecipeCommand,
}

#[derive(Debug, Subcommand)]
pub enum RecipeCommand {
    /// Insert a recipe, or update the one with the same id; prints the stored recipe. Fields not given keep
    /// their stored values (a new recipe starts from the defaults). Precedence: flag > environment > file.
    Upsert(Box<UpsertArgs>),
    /// List the recipes.
    List,
    /// Print one recipe as JSON.
    Show {
        /// Recipe id.
        id: String,
    },
    /// Delete a recipe.
    Rm {
        /// Recipe id.
        id: String,
    },
}

#[derive(Debug, Args)]
pub struct UpsertArgs {
    /// Read the recipe from a .toml or .json file (the fields of `pipemoe recipe show`); flags override it.
    #[arg(long, env = "PIPEMOE_RECIPE_FILE")]
    pub file: Option<PathBuf>,
    /// Recipe id: a slug (lowercase letters, digits, - and _).
    #[arg(long, env = "PIPEMOE_RECIPE_ID")]
    pub id: Option<String>,
    /// Model directory (config.json + safetensors); a relative path is made absolute here.
    #[arg(long, env = "PIPEMOE_RECIPE_MODEL")]
    pub model: Option<PathBuf>,
    /// Human-readable name [default: the id].
    #[arg(long, env = "PIPEMOE_RECIPE_NAME")]
    pub name: Option<String>,
    /// The model name clients send and /v1/models lists [default: the model directory's name].
    #[arg(long, env = "PIPEMOE_RECIPE_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Longest sequence (prompt + completion) in tokens [default: 65536].
    #[arg(long, env = "PIPEMOE_RECIPE_MAX_MODEL_LEN")]
    pub max_model_len: Option<u32>,
    /// KV cache element type [default: auto].
    #[arg(long, env = "PIPEMOE_RECIPE_KV_CACHE_DTYPE")]
    pub kv_cache_dtype: Option<KvCacheDtype>,
    /// Activation dtype [default: auto].
    #[arg(long, env = "PIPEMOE_RECIPE_DTYPE")]
    pub dtype: Option<Dtype>,
    /// Weight format: auto-round, gptq, or none to read it from the checkpoint [default: none].
    #[arg(long, env = "PIPEMOE_RECIPE_QUANTIZATION")]
    pub quantization: Option<String>,
    /// Devices, one worker each, in pipeline order: `cuda:0,cuda:1` or `cpu,cpu`.
    #[arg(long, env = "PIPEMOE_RECIPE_DEVICES")]
    pub devices: Option<String>,
    /// Memory budget per device, GiB [default: 18].
    #[arg(long, env = "PIPEMOE_RECIPE_MAX_MEMORY_GIB")]
    pub max_memory_gib: Option<f64>,
    /// A worker environment variable, NAME=VALUE; repeatable; added to the recipe's environment.
    #[arg(long = "env", value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// Free-form JSON object stored with the recipe (replaces the stored one).
    #[arg(long, env = "PIPEMOE_RECIPE_EXTRA")]
    pub extra: Option<String>,
    /// Placement override, JSON: one `{"layers": [start, end], "experts": [start, end]}` per device
    /// (half-open ranges; experts optional), or `null` to let the planner choose.
    #[arg(long, env = "PIPEMOE_RECIPE_PLACEMENT")]
    pub placement: Option<String>,
}

impl UpsertArgs {
    /// The flags as a patch (clap has already put environment values in place of absent flags).
    pub fn to_patch(&self) -> Result<RecipePatch> {
        let cwd = std::env::current_dir().map_err(|e| Error::Io { path: ".".into(), source: e })?;
        let mut env_set = std::collections::BTreeMap::new();
        for pair in &self.env {
            let (k, v) = parse_env_pair(pair)?;
            env_set.insert(k, v);
        }
        Ok(RecipePatch {
            id: self.id.clone(),
            name: self.name.clone(),
            model_path: self.model.as_deref().map(|m| absolute(&cwd, m, "model_path")).transpose()?,
            served_model_name: self.served_model_name.clone(),
            max_model_len: self.max_model_len,
            kv_cache_dtype: self.kv_cache_dtype,
            dtype: self.dtype,
            quantization: self.quantization.as_ref().map(|q| parse_quantization(&Some(q.clone()))).transpose()?,
            devices: self.devices.as_deref().map(parse_devices).transpose()?,
            max_memory_gib: self.max_memory_gib,
            env: None,
            env_set,
            extra: self.extra.as_deref().map(parse_extra).transpose()?,
            placement: self.placement.as_deref().map(parse_placement).transpose()?,
        })
    }
}

/// Runs one `recipe` subcommand; returns what to print.
pub fn run(args: RecipeArgs) -> Result<String> {
    let paths = Paths::from_args(&args.data);
    match args.command {
        RecipeCommand::Upsert(up) => {
            let (recipe, warning) = block_on(upsert(&paths, &up))??;
            if let Some(w) = warning {
                eprintln!("warning: {w}");
            }
            Ok(pretty(&recipe))
        }
        RecipeCommand::List => Ok(list_table(&block_on(with_store(&paths, |s| async move { s.list().await }))??)),
        RecipeCommand::Show { id } => {
            let r = block_on(with_store(&paths, |s| async move { s.require(&id).await }))??;
            Ok(pretty(&r))
        }
        RecipeCommand::Rm { id } => {
            let r = block_on(with_store(&paths, |s| async move { s.remove(&id).await }))??;
            Ok(format!("removed recipe {} ({})", r.id, r.name))
        }
    }
}

/// Parses the file and flags, validates, then writes. Returns the stored recipe and a warning when its model
/// directory has no config.json (it may be mounted later, so that is not an error).
async fn upsert(paths: &Paths, args: &UpsertArgs) -> Result<(Recipe, Option<String>)> {
    let file = match &args.file {
        Some(path) => {
            let mut p = RecipePatch::from_file(path)?;
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
            let dir = std::path::absolute(dir).map_err(|e| Error::Io { path: dir.to_path_buf(), source: e })?;
            p.model_path = p.model_path.map(|m| absolute(&dir, Path::new(&m), "model_path")).transpose()?;
            p
        }
        None => RecipePatch::default(),
    };
    let patch = file.overlay(args.to_patch()?);
    let id = patch.id.clone().ok_or_else(|| invalid("id", "required (--id, or `id` in --file)"))?;
    let store = RecipeStore::open(&paths.db).await?;
    let result = async {
        let base = store.get(&id).await?;
        let recipe = patch.apply(base)?;
        recipe.validate()?;
        store.upsert(&recipe).await
    }
    .await;
    store.close().await;
    let stored = result?;
    let model = stored.resolve_model_path(&paths.data_dir);
    let warning = (!model.join("config.json").is_file()).then(|| {
        format!("{} has no config.json yet; `pipemoe serve` will refuse this recipe until it does", model.display())
    });
    Ok((stored, warning))
}

async fn with_store<T, F, Fut>(paths: &Paths, f: F) -> Result<T>
where
    F: FnOnce(RecipeStore) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let store = RecipeStore::open(&paths.db).await?;
    let result = f(store.clone()).await;
    store.close().await;
    result
}

fn absolute(base: &Path, p: &Path, field: &str) -> Result<String> {
    let joined = if p.is_absolute() { p.to_path_buf() } else { base.join(p) };
    let clean = std::path::absolute(&joined).map_err(|e| invalid(field, format!("{}: {e}", p.display())))?;
    clean.to_str().map(str::to_string).ok_or_else(|| invalid(field, format!("{} is not UTF-8", clean.display())))
}

fn pretty(r: &Recipe) -> String {
    serde_json::to_string_pretty(r).unwrap_or_else(|e| format!("{r:?} ({e})"))
}

fn list_table(recipes: &[Recipe]) -> String {
    if recipes.is_empty() {
        return "no recipes (add one with `pipemoe recipe upsert`)".into();
    }
    let rows: Vec<Vec<String>> = recipes
        .iter()
        .map(|r| {
            vec![
                r.id.clone(),
                r.served_model_name.clone(),
                devices_summary(&r.devices),
                r.max_model_len.to_string(),
                format!("{} GiB", r.max_memory_gib),
                r.model_path.clone(),
                r.updated_at.clone(),
            ]
        })
        .collect();
    text_table(&["ID", "SERVED AS", "DEVICES", "CONTEXT", "MEMORY/DEV", "MODEL", "UPDATED"], &rows)
}

/// `cuda:0,cuda:1`, or `3 × cpu` when every device is the same.
fn devices_summary(devices: &[super::Device]) -> String {
    match devices {
        [first, rest @ ..] if !rest.is_empty() && rest.iter().all(|d| d == first) => {
            format!("{} × {first}", devices.len())
        }
        _ => devices.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
    }
}
