//! `RecipePatch`: the fields a recipe file or the command line sets. Layers apply in order, the later one
//! winning field by field: the stored recipe (or the defaults, for a new one) < file < environment < flags.
//! Reading a file checks each field by name, so an error says which field is wrong, not a line and column.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value};

use super::{Device, Dtype, KvCacheDtype, PlacementSlice, Quantization, Recipe, invalid};
use crate::error::{Error, Result};

/// Fields a recipe file may hold: `Recipe`'s own (`model` is accepted for `model_path`). `created_at` and
/// `updated_at` are accepted and ignored, so `pipemoe recipe show` output can be fed back as a file.
pub const FILE_FIELDS: &[&str] = &[
    "id",
    "name",
    "model_path",
    "model",
    "served_model_name",
    "max_model_len",
    "kv_cache_dtype",
    "dtype",
    "quantization",
    "devices",
    "max_memory_gib",
    "env",
    "extra",
    "placement",
    "created_at",
    "updated_at",
];

/// A partial recipe. `None` leaves the layer below unchanged; the `Option<Option<_>>` fields can also clear.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecipePatch {
    pub id: Option<String>,
    pub name: Option<String>,
    pub model_path: Option<String>,
    pub served_model_name: Option<String>,
    pub max_model_len: Option<u32>,
    pub kv_cache_dtype: Option<KvCacheDtype>,
    pub dtype: Option<Dtype>,
    pub quantization: Option<Option<Quantization>>,
    pub devices: Option<Vec<Device>>,
    pub max_memory_gib: Option<f64>,
    /// Replaces the whole environment.
    pub env: Option<BTreeMap<String, String>>,
    /// Set on top of the environment (after `env`): `--env K=V`.
    pub env_set: BTreeMap<String, String>,
    pub extra: Option<Map<String, Value>>,
    pub placement: Option<Option<Vec<PlacementSlice>>>,
}

impl RecipePatch {
    /// Reads a `.toml` or `.json` recipe file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let file_err = |reason: String| Error::RecipeFile { path: path.to_path_buf(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
        let value: Value = match path.extension().and_then(|e| e.to_str()) {
            Some("toml") => toml::from_str(&text).map_err(|e| file_err(format!("invalid TOML: {}", e.message())))?,
            Some("json") => serde_json::from_str(&text).map_err(|e| file_err(format!("invalid JSON: {e}")))?,
            _ => return Err(file_err("a recipe file ends in .toml or .json".into())),
        };
        Self::from_json(&value).map_err(|e| file_err(e.to_string()))
    }

    /// Reads a JSON object of recipe fields (`FILE_FIELDS`); unknown keys are refused.
    pub fn from_json(value: &Value) -> Result<Self> {
        let Value::Object(map) = value else {
            return Err(invalid("recipe", format!("expected a table of recipe fields, found {}", kind(value))));
        };
        let mut p = Self::default();
        for (key, v) in map {
            match key.as_str() {
                "id" => p.id = Some(string(key, v)?),
                "name" => p.name = Some(string(key, v)?),
                "model_path" | "model" => p.model_path = Some(string("model_path", v)?),
                "served_model_name" => p.served_model_name = Some(string(key, v)?),
                "max_model_len" => {
                    let n = v.as_u64().and_then(|n| u32::try_from(n).ok());
                    p.max_model_len = Some(n.ok_or_else(|| expected(key, "a positive integer", v))?);
                }
                "kv_cache_dtype" => p.kv_cache_dtype = Some(named(key, v)?),
                "dtype" => p.dtype = Some(named(key, v)?),
                "quantization" => p.quantization = Some(parse_quantization(&optional_string(key, v)?)?),
                "devices" => p.devices = Some(devices(v)?),
                "max_memory_gib" => p.max_memory_gib = Some(v.as_f64().ok_or_else(|| expected(key, "a number", v))?),
                "env" => p.env = Some(env(v)?),
                "extra" => p.extra = Some(object(key, v)?.clone()),
                "placement" => p.placement = Some(placement_value(v)?),
                "created_at" | "updated_at" => {}
                other => {
                    return Err(invalid(other, format!("unknown field (fields: {})", FILE_FIELDS.join(", "))));
                }
            }
        }
        Ok(p)
    }

    /// Lays `over` on top of `self`: every field `over` sets wins; `env_set` entries merge.
    pub fn overlay(mut self, over: RecipePatch) -> RecipePatch {
        macro_rules! take {
            ($($f:ident),+) => { $(if over.$f.is_some() { self.$f = over.$f; })+ };
        }
        take!(
            id,
            name,
            model_path,
            served_model_name,
            max_model_len,
            kv_cache_dtype,
            dtype,
            quantization,
            devices,
            max_memory_gib,
            env,
            extra,
            placement
        );
        self.env_set.extend(over.env_set);
        self
    }

    /// The recipe this patch makes over `base` (the stored recipe with the same id), or over the defaults
    /// when there is none: then `id`, `model_path` and `devices` are required. Does not validate.
    pub fn apply(self, base: Option<Recipe>) -> Result<Recipe> {
        let mut r = match base {
            Some(r) => r,
            None => {
                let id = self.id.clone().ok_or_else(|| invalid("id", "required (--id)"))?;
                let model = self
                    .model_path
                    .clone()
                    .ok_or_else(|| invalid("model_path", "required for a new recipe (--model)"))?;
                let devices = self.devices.clone().ok_or_else(|| {
                    invalid("devices", "required for a new recipe (--devices cuda:0,cuda:1 or --devices cpu)")
                })?;
                Recipe::new(&id, &model, devices)
            }
        };
        macro_rules! set {
            ($($f:ident),+) => { $(if let Some(v) = self.$f { r.$f = v; })+ };
        }
        set!(
            name,
            model_path,
            served_model_name,
            max_model_len,
            kv_cache_dtype,
            dtype,
            quantization,
            devices,
            max_memory_gib,
            env,
            extra,
            placement
        );
        r.env.extend(self.env_set);
        Ok(r)
    }
}

/// `--extra`: a JSON object.
pub fn parse_extra(text: &str) -> Result<Map<String, Value>> {
    let v: Value = serde_json::from_str(text).map_err(|e| invalid("extra", format!("invalid JSON: {e}")))?;
    object("extra", &v).cloned()
}

/// `--placement`: a JSON list of `{"layers": [a, b], "experts": [a, b]}`, or `null` to clear it.
pub fn parse_placement(text: &str) -> Result<Option<Vec<PlacementSlice>>> {
    let v: Value = serde_json::from_str(text).map_err(|e| invalid("placement", format!("invalid JSON: {e}")))?;
    placement_value(&v)
}

/// `--quantization`: `auto-round`, `gptq`, or `none`/empty to read it from the checkpoint.
pub fn parse_quantization(text: &Option<String>) -> Result<Option<Quantization>> {
    match text.as_deref() {
        None | Some("" | "none") => Ok(None),
        Some(s) => s.parse().map(Some).map_err(|reason: String| invalid("quantization", format!("{reason}, or none"))),
    }
}

/// `--env K=V`.
pub fn parse_env_pair(text: &str) -> Result<(String, String)> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(invalid("env", format!("{text:?} is not NAME=VALUE"))),
    }
}

fn placement_value(v: &Value) -> Result<Option<Vec<PlacementSlice>>> {
    if v.is_null() {
        return Ok(None);
    }
    serde_json::from_value(v.clone()).map(Some).map_err(|e| {
        invalid(
            "placement",
            format!("{e} (expected a list of {{\"layers\": [start, end], \"experts\": [start, end]}})"),
        )
    })
}

fn devices(v: &Value) -> Result<Vec<Device>> {
    match v {
        Value::String(s) => super::parse_devices(s),
        Value::Array(items) => items
            .iter()
            .map(|d| {
                let s = d.as_str().ok_or_else(|| expected("devices", "device names (cpu, cuda:N)", d))?;
                s.parse().map_err(|reason: String| invalid("devices", reason))
            })
            .collect(),
        other => Err(expected("devices", "a list such as [\"cuda:0\", \"cuda:1\"]", other)),
    }
}

fn env(v: &Value) -> Result<BTreeMap<String, String>> {
    object("env", v)?
        .iter()
        .map(|(k, val)| {
            let s = match val {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                other => return Err(expected("env", &format!("a string value for {k}"), other)),
            };
            Ok((k.clone(), s))
        })
        .collect()
}

fn named<T: std::str::FromStr<Err = String>>(field: &str, v: &Value) -> Result<T> {
    string(field, v)?.parse().map_err(|reason: String| invalid(field, reason))
}

fn string(field: &str, v: &Value) -> Result<String> {
    v.as_str().map(str::to_string).ok_or_else(|| expected(field, "a string", v))
}

fn optional_string(field: &str, v: &Value) -> Result<Option<String>> {
    if v.is_null() { Ok(None) } else { string(field, v).map(Some) }
}

fn object<'a>(field: &str, v: &'a Value) -> Result<&'a Map<String, Value>> {
    v.as_object().ok_or_else(|| expected(field, "an object", v))
}

fn expected(field: &str, what: &str, found: &Value) -> Error {
    invalid(field, format!("expected {what}, found {}", kind(found)))
}

fn kind(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("{b}"),
        Value::Number(n) => format!("{n}"),
        Value::String(s) => format!("{s:?}"),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "a table".into(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn field_err(r: Result<impl std::fmt::Debug>) -> String {
        match r {
            Err(Error::InvalidRecipe { field, .. }) => field,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn json_fields_are_read_by_name() {
        let p = RecipePatch::from_json(&json!({
            "id": "r", "model": "/m", "devices": "cpu,cuda:1", "max_model_len": 8192, "quantization": "gptq",
            "env": {"A": "1", "B": 2}, "extra": {"k": [1]}, "placement": [{"layers": [0, 3]}, {"layers": [3, 4], "experts": [0, 8]}],
            "created_at": "ignored"
        }))
        .unwrap();
        let r = p.apply(None).unwrap();
        assert_eq!(r.model_path, "/m");
        assert_eq!(r.devices, vec![Device::Cpu, Device::Cuda(1)]);
        assert_eq!(r.max_model_len, 8192);
        assert_eq!(r.quantization, Some(Quantization::Gptq));
        assert_eq!(r.env["B"], "2");
        assert_eq!(r.placement.as_ref().unwrap()[1].experts, Some([0, 8]));
        r.validate().unwrap();
    }

    #[test]
    fn bad_json_fields_are_named() {
        assert_eq!(field_err(RecipePatch::from_json(&json!({"max_model_len": "x"}))), "max_model_len");
        assert_eq!(field_err(RecipePatch::from_json(&json!({"max_model_len": -1}))), "max_model_len");
        assert_eq!(field_err(RecipePatch::from_json(&json!({"kv_cache_dtype": "fp16"}))), "kv_cache_dtype");
        assert_eq!(field_err(RecipePatch::from_json(&json!({"devices": ["gpu0"]}))), "devices");
        assert_eq!(field_err(RecipePatch::from_json(&json!({"placement": [{"layers": [0]}]}))), "placement");
        assert_eq!(field_err(RecipePatch::from_json(&json!({"env": {"A": []}}))), "env");
        assert_eq!(field_err(RecipePatch::from_json(&json!({"colour": "red"}))), "colour");
        assert_eq!(field_err(parse_extra("{nope")), "extra");
        assert_eq!(field_err(parse_extra("[1]")), "extra");
        assert_eq!(field_err(parse_quantization(&Some("awq".into()))), "quantization");
        assert_eq!(field_err(parse_env_pair("NOVALUE")), "env");
    }

    #[test]
    fn layers_apply_in_order() {
        let stored = Recipe::demo();
        let file = RecipePatch { max_model_len: Some(1024), name: Some("file".into()), ..Default::default() };
        let mut env_set = BTreeMap::new();
        env_set.insert("X".to_string(), "1".to_string());
        let flags = RecipePatch { name: Some("flag".into()), env_set, quantization: Some(None), ..Default::default() };
        let r = file.overlay(flags).apply(Some(stored.clone())).unwrap();
        assert_eq!((r.name.as_str(), r.max_model_len, r.env["X"].as_str()), ("flag", 1024, "1"));
        assert_eq!(r.model_path, stored.model_path);
        assert_eq!(field_err(RecipePatch { id: Some("n".into()), ..Default::default() }.apply(None)), "model_path");
    }
}
