//! HF chat templates (`tokenizer_config.json` `chat_template`, Jinja) rendered by minijinja set up the way
//! transformers sets up jinja2 (DEPENDENCIES.md §7): trim_blocks, lstrip_blocks, loop controls, Python string
//! and dict methods (minijinja-contrib pycompat), `raise_exception`, `strftime_now`, and a `tojson` that writes
//! what Python's `json.dumps` writes (", " / ": " separators, no HTML escaping, keys in their given order).

use minijinja::value::{Kwargs, Serde, Value};
use minijinja::{Environment, ErrorKind, syntax::SyntaxConfig};
use serde_json::Value as Json;

use crate::chat::{ChatOptions, Message};
use crate::error::{Error, Result};

const TEMPLATE: &str = "chat";

/// One compiled chat template with its environment.
pub struct ChatTemplate {
    env: Environment<'static>,
    name: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("name", &self.name).finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`; `name` only labels errors. A syntax error is reported here, not at render time.
    pub fn new(name: &str, source: &str) -> Result<Self> {
        let err = |source| Error::ChatTemplate { name: name.to_string(), source };
        let mut env = Environment::new();
        env.set_syntax(SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build().map_err(err)?);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE, source.to_string()).map_err(err)?;
        Ok(ChatTemplate { env, name: name.to_string(), bos_token: None, eos_token: None })
    }

    /// The `bos_token`/`eos_token` variables the template sees (HF passes the tokenizer's special tokens).
    pub fn with_special_tokens(mut self, bos: Option<&str>, eos: Option<&str>) -> Self {
        self.bos_token = bos.map(str::to_string);
        self.eos_token = eos.map(str::to_string);
        self
    }

    /// Renders with the variables `messages`, `add_generation_prompt`, `thinking`, `bos_token`, `eos_token`
    /// and then every entry of `opts.extra` (which may override them, as HF's `**kwargs` do).
    pub fn render(&self, messages: &[Message], opts: &ChatOptions) -> Result<String> {
        let mut ctx = serde_json::Map::new();
        ctx.insert("messages".into(), Json::Array(messages.iter().map(Message::to_template_json).collect()));
        ctx.insert("add_generation_prompt".into(), Json::Bool(opts.add_generation_prompt));
        ctx.insert("thinking".into(), Json::Bool(opts.thinking));
        for (key, tok) in [("bos_token", &self.bos_token), ("eos_token", &self.eos_token)] {
            if let Some(tok) = tok {
                ctx.insert(key.into(), Json::String(tok.clone()));
            }
        }
        ctx.extend(opts.extra.iter().map(|(k, v)| (k.clone(), v.clone())));
        let tmpl = self
            .env
            .get_template(TEMPLATE)
            .map_err(|source| Error::ChatTemplate { name: self.name.clone(), source })?;
        tmpl.render(Value::from(Serde(&ctx))).map_err(|e| match raised_message(&e) {
            Some(message) => Error::ChatTemplateRaised { message },
            None => Error::ChatTemplate { name: self.name.clone(), source: e },
        })
    }
}

/// Marks an error as the template's own `raise_exception`, so it can be told from a broken template.
#[derive(Debug)]
struct Raised(String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message.clone()).with_source(Raised(message)))
}

fn raised_message(e: &minijinja::Error) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<Raised>() {
            return Some(r.0.clone());
        }
        cur = err.source();
    }
    None
}

/// HF's `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`, keyword arguments only.
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let bad = |msg: &str| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {msg}"));
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match (v.as_i64(), v.as_str()) {
            (Some(n), _) => Some(" ".repeat(usize::try_from(n).unwrap_or(0))),
            (None, Some(s)) => Some(s.to_string()),
            _ => return Err(bad("indent must be an integer or a string")),
        },
    };
    let mut opts = PyJson::new(indent);
    opts.ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    opts.sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    if let Some(seps) = kwargs.get::<Option<Vec<String>>>("separators")? {
        let [item, key] = <[String; 2]>::try_from(seps).map_err(|_| bad("separators must be two strings"))?;
        (opts.item_sep, opts.key_sep) = (item, key);
    }
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(value).map_err(|e| bad(&e.to_string()))?;
    Ok(Value::from_safe_string(opts.dumps(&json)))
}

/// Python's `json.dumps` output format.
pub(crate) struct PyJson {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    ensure_ascii: bool,
    sort_keys: bool,
}

impl PyJson {
    /// Python's defaults: separators `(", ", ": ")`, or `(",", ": ")` when indenting; `ensure_ascii=False`.
    pub(crate) fn new(indent: Option<String>) -> Self {
        let item_sep = if indent.is_some() { "," } else { ", " }.to_string();
        PyJson { indent, item_sep, key_sep: ": ".to_string(), ensure_ascii: false, sort_keys: false }
    }

    pub(crate) fn dumps(&self, v: &Json) -> String {
        let mut out = String::new();
        self.write(v, 0, &mut out);
        out
    }

    fn newline(&self, level: usize, out: &mut String) {
        if let Some(ind) = &self.indent {
            out.push('\n');
            (0..level).for_each(|_| out.push_str(ind));
        }
    }

    fn write(&self, v: &Json, level: usize, out: &mut String) {
        match v {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Number(n) => match n.as_f64().filter(|_| n.is_f64()) {
                Some(f) => out.push_str(&py_float(f)),
                None => out.push_str(&n.to_string()),
            },
            Json::String(s) => self.write_str(s, out),
            Json::Array(items) if items.is_empty() => out.push_str("[]"),
            Json::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    self.write(item, level + 1, out);
                }
                self.newline(level, out);
                out.push(']');
            }
            Json::Object(map) if map.is_empty() => out.push_str("{}"),
            Json::Object(map) => {
                let mut entries: Vec<_> = map.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (k, item)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    self.write_str(k, out);
                    out.push_str(&self.key_sep);
                    self.write(item, level + 1, out);
                }
                self.newline(level, out);
                out.push('}');
            }
        }
    }

    fn write_str(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && !(' '..='~').contains(&c)) => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// Python's `repr(float)`: shortest round-trip digits, exponent form below 1e-4 and from 1e16 on.
fn py_float(f: f64) -> String {
    if !f.is_finite() {
        return if f.is_nan() {
            "NaN"
        } else if f > 0.0 {
            "Infinity"
        } else {
            "-Infinity"
        }
        .to_string();
    }
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = mantissa.strip_prefix('-').map_or(("", mantissa), |m| ("-", m));
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let n = digits.len() as i32;
    if !(-4..16).contains(&exp) {
        let frac = if n > 1 { format!(".{}", &digits[1..]) } else { String::new() };
        let esign = if exp < 0 { '-' } else { '+' };
        return format!("{sign}{}{frac}e{esign}{:02}", &digits[..1], exp.abs());
    }
    if exp < 0 {
        return format!("{sign}0.{}{digits}", "0".repeat((-exp - 1) as usize));
    }
    let int_len = (exp + 1) as usize;
    if n as usize <= int_len {
        format!("{sign}{digits}{}.0", "0".repeat(int_len - n as usize))
    } else {
        format!("{sign}{}.{}", &digits[..int_len], &digits[int_len..])
    }
}

/// `strftime_now(format)`: the current UTC time, with the common C `strftime` fields (`%-d` style too).
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    strftime(&format, secs)
}

fn strftime(format: &str, unix_secs: u64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    let days = (unix_secs / 86_400) as i64;
    let sod = unix_secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (sod / 3600, sod / 60 % 60, sod % 60);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday.
    let yday = days - days_from_civil(year, 1, 1) + 1;
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut spec = chars.next();
        let pad = spec != Some('-');
        if !pad {
            spec = chars.next();
        }
        let num = |v: i64, width: usize| if pad { format!("{v:0width$}") } else { v.to_string() };
        let piece = match spec {
            Some('Y') => year.to_string(),
            Some('y') => num(year.rem_euclid(100), 2),
            Some('m') => num(month, 2),
            Some('d') => num(day, 2),
            Some('e') => format!("{day:>2}"),
            Some('H') => num(hour as i64, 2),
            Some('I') => num(hour12 as i64, 2),
            Some('M') => num(minute as i64, 2),
            Some('S') => num(second as i64, 2),
            Some('j') => num(yday, 3),
            Some('p') => (if hour < 12 { "AM" } else { "PM" }).to_string(),
            Some('B') => MONTHS[(month - 1) as usize].to_string(),
            Some('b') => MONTHS[(month - 1) as usize][..3].to_string(),
            Some('A') => DAYS[weekday].to_string(),
            Some('a') => DAYS[weekday][..3].to_string(),
            Some('%') => "%".to_string(),
            Some(other) => format!("%{}{other}", if pad { "" } else { "-" }),
            None => "%".to_string(),
        };
        out.push_str(&piece);
    }
    out
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant, "chrono-Compatible Low-Level
/// Date Algorithms").
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_json_dumps_format() {
        let v: Json =
            serde_json::from_str(r#"{"b": [1, 2.5, "x<y>&'z\u0001é"], "a": {}, "c": [], "d": 1e-7}"#).unwrap();
        assert_eq!(PyJson::new(None).dumps(&v), r#"{"b": [1, 2.5, "x<y>&'z\u0001é"], "a": {}, "c": [], "d": 1e-07}"#);
        let indented = PyJson::new(Some("  ".into())).dumps(&v);
        assert_eq!(
            indented,
            "{\n  \"b\": [\n    1,\n    2.5,\n    \"x<y>&'z\\u0001é\"\n  ],\n  \"a\": {},\n  \"c\": [],\n  \"d\": 1e-07\n}"
        );
        let mut ascii = PyJson::new(None);
        ascii.ensure_ascii = true;
        assert_eq!(ascii.dumps(&Json::String("é😀".into())), r#""\u00e9\ud83d\ude00""#);
    }

    #[test]
    fn python_float_repr() {
        let cases = [
            (1.0, "1.0"),
            (0.5, "0.5"),
            (-2.25, "-2.25"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (123456789012345.0, "123456789012345.0"),
            (0.0001, "0.0001"),
            (0.00012, "0.00012"),
            (1e-5, "1e-05"),
            (0.0, "0.0"),
            (1e300, "1e+300"),
        ];
        for (f, want) in cases {
            assert_eq!(py_float(f), want, "{f}");
        }
    }

    #[test]
    fn strftime_fields() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let t = 1_709_211_909;
        assert_eq!(strftime("%d %b %Y", t), "29 Feb 2024");
        assert_eq!(strftime("%A %B %-d, %y %H:%M:%S %I%p %j %%", t), "Thursday February 29, 24 13:05:09 01PM 060 %");
        assert_eq!(strftime("%Y-%m-%d %a", 0), "1970-01-01 Thu");
    }
}
