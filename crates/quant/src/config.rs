//! `quantization_config` from a checkpoint's config.json (AutoRound and GPTQ/GPTQModel flavours, MODEL_SPEC §4.4),
//! resolved per module. Whether a module *is* quantized is decided by the tensors present (`.qweight`), never by
//! this config; the config says how to read it (bits, group size, zero convention) and which modules it
//! declares 16-bit (`extra_config` `bits: 16`, `dynamic` `-:` rules).

use regex::Regex;
use serde_json::{Map, Value};

use crate::{Bits, Error, GptqLayout, GroupSize, Result, ZeroConvention};

/// Which tool wrote the checkpoint. Both use GPTQ packing; they differ in how overrides are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantMethod {
    Gptq,
    AutoRound,
}

/// How to read one quantized module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GptqParams {
    pub bits: Bits,
    pub group_size: GroupSize,
    pub sym: bool,
    pub zero: ZeroConvention,
}

impl GptqParams {
    pub fn layout(&self, in_features: usize, out_features: usize) -> Result<GptqLayout> {
        GptqLayout::new(in_features, out_features, self.bits, self.group_size)
    }
}

/// What the config says about one module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleQuant {
    /// Declared unquantized: expect `<prefix>.weight`.
    Dense,
    Gptq(GptqParams),
}

/// Field-wise overrides of the global parameters; `bits: None` keeps the global width.
#[derive(Clone, Debug, Default)]
struct Override {
    /// `Some(None)` = declared 16-bit (dense); `Some(Some(b))` = quantized at `b` bits.
    bits: Option<Option<Bits>>,
    group_size: Option<GroupSize>,
    sym: Option<bool>,
}

#[derive(Clone, Debug)]
struct ExtraEntry {
    name: String,
    /// The key as an anchored regex, when it is one (newer AutoRound writes regex keys).
    pattern: Option<Regex>,
    over: Override,
}

#[derive(Clone, Debug)]
enum DynamicRule {
    /// `-:regex`: matching modules are not quantized.
    Skip(Regex),
    /// `+:regex` or `regex`: matching modules use these overrides.
    Apply(Regex, Override),
}

/// A parsed, checked `quantization_config`.
#[derive(Clone, Debug)]
pub struct QuantConfig {
    pub quant_method: QuantMethod,
    /// The default for every module without an override.
    pub default: GptqParams,
    pub desc_act: bool,
    pub packing_format: Option<String>,
    pub checkpoint_format: Option<String>,
    extra: Vec<ExtraEntry>,
    dynamic: Vec<DynamicRule>,
}

fn bad(field: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::Config { field: field.into(), reason: reason.into() }
}

fn get_str<'a>(obj: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(bad(field, format!("expected a string, found {other}"))),
    }
}

fn get_bool(obj: &Map<String, Value>, field: &str) -> Result<Option<bool>> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(bad(field, format!("expected true or false, found {other}"))),
    }
}

fn get_int(obj: &Map<String, Value>, field: &str) -> Result<Option<i64>> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_i64().map(Some).ok_or_else(|| bad(field, format!("expected an integer, found {v}"))),
    }
}

/// AutoRound's `data_type` is "int" for integer GPTQ packing; float types (mx_fp, nv_fp, fp8) are other formats.
fn check_data_type(field: &str, data_type: Option<&str>) -> Result<()> {
    match data_type {
        None => Ok(()),
        Some(t) if t.starts_with("int") => Ok(()),
        Some(t) => Err(bad(field, format!("data_type {t:?} is not an integer GPTQ format"))),
    }
}

fn parse_override(path: &str, v: &Value) -> Result<Override> {
    let obj = v.as_object().ok_or_else(|| bad(path, format!("expected an object, found {v}")))?;
    let field = |name: &str| format!("{path}.{name}");
    let bits = match get_int(obj, "bits").map_err(|_| bad(field("bits"), "expected an integer"))? {
        None => None,
        // 16 (or 32) bits is how both tools write "leave this module unquantized".
        Some(b) if b >= 16 => Some(None),
        Some(b) => Some(Some(Bits::new(u32::try_from(b).map_err(|_| bad(field("bits"), format!("{b}")))?)?)),
    };
    if matches!(bits, Some(Some(_))) {
        let dt = get_str(obj, "data_type").map_err(|e| bad(field("data_type"), e.to_string()))?;
        check_data_type(&field("data_type"), dt)?;
    }
    let group_size = match get_int(obj, "group_size").map_err(|_| bad(field("group_size"), "expected an integer"))? {
        None => None,
        Some(g) => Some(GroupSize::from_config(g)?),
    };
    let sym = get_bool(obj, "sym").map_err(|_| bad(field("sym"), "expected true or false"))?;
    Ok(Override { bits, group_size, sym })
}

/// Decides v1 (stored zero − 1) or v2 (stored zero), MODEL_SPEC §4.3. An explicit `checkpoint_format` wins;
/// otherwise AutoRound's `packing_format` tells (`auto_round:auto_gptq` is v1, native `auto_round` is v2);
/// with neither, the GPTQ default v1.
fn zero_convention(checkpoint_format: Option<&str>, packing_format: Option<&str>) -> Result<ZeroConvention> {
    match (checkpoint_format, packing_format) {
        (Some("gptq"), _) => Ok(ZeroConvention::V1),
        (Some("gptq_v2"), _) => Ok(ZeroConvention::V2),
        (Some(other), _) => Err(bad("checkpoint_format", format!("{other:?} is not gptq or gptq_v2"))),
        (None, None | Some("auto_round:auto_gptq" | "auto_gptq" | "auto_round:gptq")) => Ok(ZeroConvention::V1),
        (None, Some("auto_round")) => Ok(ZeroConvention::V2),
        (None, Some(other)) => Err(bad("packing_format", format!("{other:?} is not a GPTQ-style packing we read"))),
    }
}

impl QuantConfig {
    /// Parses the `quantization_config` object of config.json.
    pub fn from_json(v: &Value) -> Result<Self> {
        let obj = v.as_object().ok_or_else(|| bad("", format!("expected an object, found {v}")))?;
        let quant_method = match get_str(obj, "quant_method")? {
            Some("gptq") => QuantMethod::Gptq,
            Some("auto-round" | "auto_round") => QuantMethod::AutoRound,
            Some(other) => return Err(bad("quant_method", format!("{other:?} is not gptq or auto-round"))),
            None => return Err(bad("quant_method", "missing")),
        };
        let bits = get_int(obj, "bits")?.ok_or_else(|| bad("bits", "missing"))?;
        let bits = Bits::new(u32::try_from(bits).map_err(|_| bad("bits", format!("{bits} is negative")))?)?;
        let group_size =
            GroupSize::from_config(get_int(obj, "group_size")?.ok_or_else(|| bad("group_size", "missing"))?)?;
        check_data_type("data_type", get_str(obj, "data_type")?)?;
        let packing_format = get_str(obj, "packing_format")?.map(str::to_string);
        let checkpoint_format = get_str(obj, "checkpoint_format")?.map(str::to_string);
        let zero = zero_convention(checkpoint_format.as_deref(), packing_format.as_deref())?;
        // AutoGPTQ's default is symmetric; sym does not change how stored zeros are read.
        let sym = get_bool(obj, "sym")?.unwrap_or(true);
        let desc_act = get_bool(obj, "desc_act")?.unwrap_or(false);

        let mut extra = Vec::new();
        match obj.get("extra_config") {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => {
                for (name, v) in m {
                    let over = parse_override(&format!("extra_config.{name}"), v)?;
                    let pattern = Regex::new(&format!("^(?:{name})$")).ok();
                    extra.push(ExtraEntry { name: name.clone(), pattern, over });
                }
            }
            Some(other) => return Err(bad("extra_config", format!("expected an object, found {other}"))),
        }

        let mut dynamic = Vec::new();
        match obj.get("dynamic") {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => {
                for (key, v) in m {
                    let field = format!("dynamic.{key}");
                    // GPTQModel matches with Python's re.match: anchored at the start only.
                    let anchored = |re: &str| Regex::new(&format!("^(?:{re})")).map_err(|e| bad(&field, e.to_string()));
                    dynamic.push(match key.strip_prefix("-:") {
                        Some(re) => DynamicRule::Skip(anchored(re)?),
                        None => {
                            let re = key.strip_prefix("+:").unwrap_or(key);
                            DynamicRule::Apply(anchored(re)?, parse_override(&field, v)?)
                        }
                    });
                }
            }
            Some(other) => return Err(bad("dynamic", format!("expected an object, found {other}"))),
        }

        Ok(Self {
            quant_method,
            default: GptqParams { bits, group_size, sym, zero },
            desc_act,
            packing_format,
            checkpoint_format,
            extra,
            dynamic,
        })
    }

    /// What the config says about the module `name` (e.g. `model.layers.0.self_attn.kv_b_proj`).
    /// Precedence: `extra_config` exact name, then an `extra_config` regex key, then the first matching
    /// `dynamic` rule (GPTQModel's order), then the global parameters.
    pub fn module(&self, name: &str) -> ModuleQuant {
        let extra = self
            .extra
            .iter()
            .find(|e| e.name == name)
            .or_else(|| self.extra.iter().find(|e| e.pattern.as_ref().is_some_and(|p| p.is_match(name))));
        let over = match extra {
            Some(e) => Some(&e.over),
            None => {
                let rule = self.dynamic.iter().find(|r| match r {
                    DynamicRule::Skip(re) | DynamicRule::Apply(re, _) => re.is_match(name),
                });
                match rule {
                    Some(DynamicRule::Skip(_)) => return ModuleQuant::Dense,
                    Some(DynamicRule::Apply(_, o)) => Some(o),
                    None => None,
                }
            }
        };
        let mut p = self.default;
        if let Some(o) = over {
            match o.bits {
                Some(None) => return ModuleQuant::Dense,
                Some(Some(b)) => p.bits = b,
                None => {}
            }
            p.group_size = o.group_size.unwrap_or(p.group_size);
            p.sym = o.sym.unwrap_or(p.sym);
        }
        ModuleQuant::Gptq(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"quant_method": "auto-round", "bits": 3, "group_size": 128, "sym": true, "data_type": "int",
               "packing_format": "auto_round:auto_gptq"})
    }

    fn with(extra: Value) -> Value {
        let mut v = base();
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        v
    }

    #[test]
    fn reads_the_w3a16_config() -> Result<()> {
        let c = QuantConfig::from_json(&base())?;
        assert_eq!(c.quant_method, QuantMethod::AutoRound);
        assert_eq!(c.default.bits, Bits::B3);
        assert_eq!(c.default.group_size, GroupSize::Rows(128));
        assert_eq!(c.default.zero, ZeroConvention::V1);
        assert_eq!(c.module("model.layers.5.mlp.experts.0.up_proj"), ModuleQuant::Gptq(c.default));
        Ok(())
    }

    #[test]
    fn zero_convention_from_formats() -> Result<()> {
        let zero = |v: Value| QuantConfig::from_json(&v).map(|c| c.default.zero);
        assert_eq!(zero(with(json!({"checkpoint_format": "gptq_v2"})))?, ZeroConvention::V2);
        assert_eq!(zero(with(json!({"checkpoint_format": "gptq"})))?, ZeroConvention::V1);
        assert_eq!(zero(json!({"quant_method": "gptq", "bits": 4, "group_size": -1}))?, ZeroConvention::V1);
        assert_eq!(zero(with(json!({"packing_format": "auto_round"})))?, ZeroConvention::V2);
        assert!(matches!(zero(with(json!({"checkpoint_format": "marlin"}))), Err(Error::Config { .. })));
        assert!(matches!(zero(with(json!({"packing_format": "auto_awq"}))), Err(Error::Config { .. })));
        Ok(())
    }

    #[test]
    fn extra_config_overrides_per_module() -> Result<()> {
        let c = QuantConfig::from_json(&with(json!({"extra_config": {
            "model.layers.0.self_attn.kv_b_proj": {"bits": 16, "data_type": "float"},
            "model.layers.1.mlp.down_proj": {"bits": 8, "group_size": 64},
            r"model\.layers\.\d+\.self_attn\.indexer\.weights_proj": {"bits": 16},
        }})))?;
        assert_eq!(c.module("model.layers.0.self_attn.kv_b_proj"), ModuleQuant::Dense);
        assert!(matches!(c.module("model.layers.1.self_attn.kv_b_proj"), ModuleQuant::Gptq(p) if p.bits == Bits::B3));
        let p = GptqParams { bits: Bits::B8, group_size: GroupSize::Rows(64), ..c.default };
        assert_eq!(c.module("model.layers.1.mlp.down_proj"), ModuleQuant::Gptq(p));
        assert_eq!(c.module("model.layers.7.self_attn.indexer.weights_proj"), ModuleQuant::Dense);
        // Keys are whole-name matches: a longer name is not caught by a shorter key.
        assert!(matches!(c.module("model.layers.0.self_attn.kv_b_proj_x"), ModuleQuant::Gptq(_)));
        Ok(())
    }

    #[test]
    fn dynamic_rules_in_order() -> Result<()> {
        let c = QuantConfig::from_json(&json!({"quant_method": "gptq", "bits": 4, "group_size": 128,
            "dynamic": {r"-:.*\.mlp\.gate$": {}, r"+:.*experts\.1\.": {"bits": 2}, r".*experts\.": {"bits": 8}}}))?;
        assert_eq!(c.module("model.layers.3.mlp.gate"), ModuleQuant::Dense);
        assert!(matches!(c.module("model.layers.3.mlp.experts.1.up_proj"), ModuleQuant::Gptq(p) if p.bits == Bits::B2));
        assert!(matches!(c.module("model.layers.3.mlp.experts.2.up_proj"), ModuleQuant::Gptq(p) if p.bits == Bits::B8));
        assert!(matches!(c.module("model.layers.3.self_attn.o_proj"), ModuleQuant::Gptq(p) if p.bits == Bits::B4));
        Ok(())
    }

    #[test]
    fn rejects_what_it_cannot_read() {
        for bits in [5, 16, 1] {
            let err = QuantConfig::from_json(&with(json!({ "bits": bits }))).err();
            assert!(matches!(err, Some(Error::UnsupportedBits { bits: b }) if b == bits), "{bits}");
        }
        let err = QuantConfig::from_json(&with(json!({"extra_config": {"m": {"bits": 5}}}))).err();
        assert!(matches!(err, Some(Error::UnsupportedBits { bits: 5 })));
        assert!(QuantConfig::from_json(&with(json!({"quant_method": "awq"}))).is_err());
        assert!(QuantConfig::from_json(&with(json!({"data_type": "mx_fp"}))).is_err());
        assert!(QuantConfig::from_json(&with(json!({"group_size": 0}))).is_err());
        assert!(QuantConfig::from_json(&with(json!({"bits": "3"}))).is_err());
        assert!(QuantConfig::from_json(&json!({"bits": 3, "group_size": 128})).is_err());
        assert!(QuantConfig::from_json(&with(json!({"dynamic": {"-:(": {}}}))).is_err());
    }
}
