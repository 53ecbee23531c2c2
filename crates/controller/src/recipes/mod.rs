//! Recipes: what `pipemoe serve` runs (model, context, dtypes, devices, memory budget, worker environment).
//!
//! - this file: the `Recipe` type, its field types and `Recipe::validate`.
//! - `patch`: `RecipePatch`, a partial recipe read from a file or the flags, layered over a stored recipe.
//! - `store`: `RecipeStore`, the recipes table of `data/controller.db` (schema in `migrations/`).
//! - `cli`: `pipemoe recipe upsert|list|show|rm`.
//!
//! `model_path` is stored as given. A relative path is resolved against the parent of the data directory
//! (`Recipe::resolve_model_path`): with the default data dir `data`, that is the directory `pipemoe` runs in, so
//! the demo's `data/models/tiny-dsv32-w3a16` works from a checkout, and data dir `/var/lib/pipemoe/data`
//! resolves it under `/var/lib/pipemoe`. The `recipe` CLI makes a relative path absolute before storing it,
//! so it means what it meant where it was written: `--model` against the current directory, a file's
//! `model_path` against the file's directory.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub mod cli;
pub mod patch;
pub mod store;

pub use patch::RecipePatch;
pub use store::RecipeStore;

pub const DEFAULT_MAX_MODEL_LEN: u32 = 65536;
pub const DEFAULT_MAX_MEMORY_GIB: f64 = 18.0;
/// Far past any released model's context; a larger value is a typo.
pub const MAX_MAX_MODEL_LEN: u32 = 1 << 24;

/// The id, model and context of the demo recipe `ensure_demo` inserts (the fixture model in `data/models`).
pub const DEMO_ID: &str = "demo";
pub const DEMO_MODEL_PATH: &str = "data/models/tiny-dsv32-w3a16";

/// One way to run a model. `created_at`/`updated_at` are set by the store (RFC 3339, UTC).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    /// Slug and primary key: `[a-z0-9][a-z0-9_-]*`, at most 64 characters.
    pub id: String,
    /// Human-readable name.
    pub name: String,
    /// Model directory (config.json + safetensors), stored as given; see `resolve_model_path`.
    pub model_path: String,
    /// The `model` name clients send and `/v1/models` lists.
    pub served_model_name: String,
    /// Longest sequence (prompt + completion) accepted, in tokens.
    pub max_model_len: u32,
    pub kv_cache_dtype: KvCacheDtype,
    /// Activation dtype.
    pub dtype: Dtype,
    /// Quantization format; `None` = read from the checkpoint.
    pub quantization: Option<Quantization>,
    /// One worker per entry, in pipeline order.
    pub devices: Vec<Device>,
    /// Memory budget of each device, GiB.
    pub max_memory_gib: f64,
    /// Environment variables passed to every worker.
    pub env: BTreeMap<String, String>,
    /// Free-form settings for experiments; the server ignores keys it does not know.
    pub extra: serde_json::Map<String, serde_json::Value>,
    /// Placement override: one slice per device, replacing the planner's choice.
    pub placement: Option<Vec<PlacementSlice>>,
    #[serde(default)]
    pub created_at: String,
    #[serde(default)]
    pub updated_at: String,
}

/// One worker's share of the model in a placement override. Ranges are half-open `[start, end)`, like
/// `pipemoe_model::weights::SliceSpec`; `experts: None` = every routed expert of those layers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacementSlice {
    pub layers: [u32; 2],
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experts: Option<[u32; 2]>,
}

impl PlacementSlice {
    pub fn layer_range(&self) -> std::ops::Range<usize> {
        self.layers[0] as usize..self.layers[1] as usize
    }

    pub fn expert_range(&self) -> Option<std::ops::Range<usize>> {
        self.experts.map(|[a, b]| a as usize..b as usize)
    }
}

/// A string-valued enum: `FromStr`/`Display`/serde all use `NAMES`, and a bad value's error lists them.
macro_rules! named_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
        pub enum $name {
            $(#[serde(rename = $text)] #[value(name = $text)] $variant,)+
        }

        impl $name {
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text,)+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = String;

            fn from_str(s: &str) -> std::result::Result<Self, String> {
                match s {
                    $($text => Ok(Self::$variant),)+
                    _ => Err(format!("{s:?} is not one of {}", Self::NAMES.join(", "))),
                }
            }
        }
    };
}

named_enum!(
    /// Element type of the KV cache (`auto` = the activation dtype).
    KvCacheDtype { Auto = "auto", Bf16 = "bf16", Fp8 = "fp8" }
);
named_enum!(
    /// Activation dtype (`auto` = the checkpoint's `torch_dtype`).
    Dtype { Auto = "auto", Bfloat16 = "bfloat16", Float16 = "float16" }
);
named_enum!(
    /// How the checkpoint's low-bit weights are stored.
    Quantization { AutoRound = "auto-round", Gptq = "gptq" }
);

/// Where one worker runs: `cpu` or `cuda:N` (one type for recipes, flags and workers).
pub use pipemoe_model::Device;

/// Parses `cpu,cpu,cuda:0` (empty entries refused).
pub fn parse_devices(list: &str) -> Result<Vec<Device>> {
    list.split(',').map(|d| d.parse::<Device>().map_err(|reason| invalid("devices", reason))).collect()
}

pub(crate) fn invalid(field: &str, reason: impl Into<String>) -> Error {
    Error::InvalidRecipe { field: field.to_string(), reason: reason.into() }
}

impl Recipe {
    /// A recipe with every default: `name` = id, `served_model_name` = the model directory's name.
    pub fn new(id: &str, model_path: &str, devices: Vec<Device>) -> Self {
        let served = Path::new(model_path).file_name().map_or_else(|| id.to_string(), |n| n.to_string_lossy().into());
        Self {
            id: id.to_string(),
            name: id.to_string(),
            model_path: model_path.to_string(),
            served_model_name: served,
            max_model_len: DEFAULT_MAX_MODEL_LEN,
            kv_cache_dtype: KvCacheDtype::Auto,
            dtype: Dtype::Auto,
            quantization: None,
            devices,
            max_memory_gib: DEFAULT_MAX_MEMORY_GIB,
            env: BTreeMap::new(),
            extra: serde_json::Map::new(),
            placement: None,
            created_at: String::new(),
            updated_at: String::new(),
        }
    }

    /// The bundled demo: the tiny DeepSeek-V3.2 fixture on three CPU workers.
    pub fn demo() -> Self {
        Self {
            name: "Demo: tiny DeepSeek-V3.2 W3A16 on 3 CPU workers".into(),
            served_model_name: "tiny-dsv32".into(),
            max_model_len: 4096, // the demo model's max_position_embeddings
            max_memory_gib: 2.0,
            ..Self::new(DEMO_ID, DEMO_MODEL_PATH, vec![Device::Cpu; 3])
        }
    }

    /// The model directory: absolute as stored, or relative to the data directory's parent.
    pub fn resolve_model_path(&self, data_dir: &Path) -> PathBuf {
        let p = Path::new(&self.model_path);
        if p.is_absolute() {
            return p.to_path_buf();
        }
        data_dir.parent().unwrap_or(Path::new("")).join(p)
    }

    /// Checks every field; the error names the first bad one. Placement is checked for shape here (one
    /// non-empty slice per device); whether it fits the model is the planner's check.
    pub fn validate(&self) -> Result<()> {
        validate_id(&self.id)?;
        check_text("name", &self.name, 200)?;
        if self.model_path.trim().is_empty() {
            return Err(invalid("model_path", "must not be empty"));
        }
        if self.model_path.contains('\0') {
            return Err(invalid("model_path", "must not contain NUL"));
        }
        check_text("served_model_name", &self.served_model_name, 256)?;
        if self.served_model_name.chars().any(char::is_whitespace) {
            return Err(invalid("served_model_name", "must not contain whitespace"));
        }
        if self.max_model_len == 0 || self.max_model_len > MAX_MAX_MODEL_LEN {
            return Err(invalid("max_model_len", format!("{} is not in 1..={MAX_MAX_MODEL_LEN}", self.max_model_len)));
        }
        if self.devices.is_empty() {
            return Err(invalid("devices", "at least one device is needed (cpu or cuda:N)"));
        }
        if !(self.max_memory_gib.is_finite() && self.max_memory_gib > 0.0) {
            return Err(invalid("max_memory_gib", format!("{} is not a positive number of GiB", self.max_memory_gib)));
        }
        for (k, v) in &self.env {
            let name_ok = k.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !name_ok {
                return Err(invalid("env", format!("{k:?} is not a variable name ([A-Za-z_][A-Za-z0-9_]*)")));
            }
            if v.contains('\0') {
                return Err(invalid("env", format!("the value of {k} contains NUL")));
            }
        }
        if let Some(slices) = &self.placement {
            validate_placement(slices, self.devices.len())?;
        }
        Ok(())
    }
}

fn validate_id(id: &str) -> Result<()> {
    let ok = id.len() <= 64
        && id.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(invalid("id", format!("{id:?} is not a slug (lowercase letters, digits, - and _; at most 64)")))
    }
}

fn check_text(field: &str, value: &str, max_chars: usize) -> Result<()> {
    if value.trim().is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if value.chars().count() > max_chars {
        return Err(invalid(field, format!("longer than {max_chars} characters")));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(field, "must not contain control characters"));
    }
    Ok(())
}

fn validate_placement(slices: &[PlacementSlice], devices: usize) -> Result<()> {
    if slices.len() != devices {
        return Err(invalid("placement", format!("{} slices for {devices} devices (one per device)", slices.len())));
    }
    for (i, s) in slices.iter().enumerate() {
        if s.layers[0] >= s.layers[1] {
            return Err(invalid(
                "placement",
                format!("slice {i}: layers {:?} is empty ([start, end) with start < end)", s.layers),
            ));
        }
        if let Some(e) = s.experts
            && e[0] >= e[1]
        {
            return Err(invalid(
                "placement",
                format!("slice {i}: experts {e:?} is empty ([start, end) with start < end)"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(e: Error) -> String {
        match e {
            Error::InvalidRecipe { field, .. } => field,
            other => panic!("not a validation error: {other}"),
        }
    }

    #[test]
    fn demo_is_valid() {
        Recipe::demo().validate().unwrap();
        assert_eq!(Recipe::demo().devices.len(), 3);
    }

    type Breakage = (&'static str, Box<dyn Fn(&mut Recipe)>);

    #[test]
    fn validation_errors_name_the_field() {
        let bad: Vec<Breakage> = vec![
            ("id", Box::new(|r| r.id = "Has Space".into())),
            ("id", Box::new(|r| r.id = String::new())),
            ("name", Box::new(|r| r.name = " ".into())),
            ("model_path", Box::new(|r| r.model_path = String::new())),
            ("served_model_name", Box::new(|r| r.served_model_name = "a b".into())),
            ("max_model_len", Box::new(|r| r.max_model_len = 0)),
            ("devices", Box::new(|r| r.devices.clear())),
            ("max_memory_gib", Box::new(|r| r.max_memory_gib = 0.0)),
            ("max_memory_gib", Box::new(|r| r.max_memory_gib = f64::NAN)),
            ("env", Box::new(|r| _ = r.env.insert("1X".into(), "v".into()))),
            ("placement", Box::new(|r| r.placement = Some(vec![PlacementSlice { layers: [0, 2], experts: None }]))),
            ("placement", Box::new(|r| r.placement = Some(vec![PlacementSlice { layers: [1, 1], experts: None }; 3]))),
        ];
        for (field, break_it) in bad {
            let mut r = Recipe::demo();
            break_it(&mut r);
            let err = r.validate().unwrap_err();
            assert!(err.to_string().starts_with(&format!("recipe field {field}: ")), "{err}");
            assert_eq!(field_of(err), field);
        }
    }

    #[test]
    fn devices_parse_and_print() {
        assert_eq!(parse_devices("cpu,cuda:0,cuda:12").unwrap(), vec![Device::Cpu, Device::Cuda(0), Device::Cuda(12)]);
        for bad in ["", "cpu,", "gpu", "cuda:", "cuda:-1", "cuda:x"] {
            assert_eq!(field_of(parse_devices(bad).unwrap_err()), "devices", "{bad}");
        }
        assert_eq!(serde_json::to_string(&[Device::Cpu, Device::Cuda(3)]).unwrap(), r#"["cpu","cuda:3"]"#);
        assert!(serde_json::from_str::<Device>(r#""tpu""#).is_err());
    }

    #[test]
    fn model_path_resolves_against_the_data_dirs_parent() {
        let r = Recipe::demo();
        assert_eq!(r.resolve_model_path(Path::new("data")), PathBuf::from(DEMO_MODEL_PATH));
        assert_eq!(r.resolve_model_path(Path::new("/srv/p/data")), PathBuf::from("/srv/p").join(DEMO_MODEL_PATH));
        let abs = Recipe::new("x", "/models/m", vec![Device::Cpu]);
        assert_eq!(abs.resolve_model_path(Path::new("data")), PathBuf::from("/models/m"));
        assert_eq!(abs.served_model_name, "m");
    }
}
