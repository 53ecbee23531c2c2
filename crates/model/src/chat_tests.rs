//! DeepSeek-V3.2 encoding against MODEL_SPEC §5 (and encoding_dsv32.py's rules), message parsing, and Jinja
//! templates whose expected output was produced by Python jinja2 set up as transformers sets it up.

use serde_json::json;

use super::*;

fn render_jinja(source: &str, messages: &[Message], opts: &ChatOptions) -> Result<String> {
    ChatTemplate::new("test", source)?
        .with_special_tokens(Some("<|begin_of_text|>"), Some("<|eot_id|>"))
        .render(messages, opts)
}

fn call(name: &str, arguments: &str) -> ToolCall {
    ToolCall {
        id: None,
        kind: "function".into(),
        function: FunctionCall { name: name.into(), arguments: arguments.into() },
    }
}

#[test]
fn dsv32_spec_example_byte_for_byte() {
    let messages = [Message::user("hello"), Message::assistant("Hello! I am DeepSeek."), Message::user("1+1=?")];
    let prompt = encode_dsv32(&messages, true).unwrap();
    assert_eq!(
        prompt,
        "<｜begin▁of▁sentence｜><｜User｜>hello<｜Assistant｜></think>Hello! I am DeepSeek.<｜end▁of▁sentence｜>\
         <｜User｜>1+1=?<｜Assistant｜><think>"
    );
    // Chat mode closes the think block on every user turn, the last one included.
    let chat = ChatFormat::DeepSeekV32.render(&messages, &ChatOptions::default()).unwrap();
    assert!(chat.ends_with("<｜User｜>1+1=?<｜Assistant｜></think>"), "{chat}");
}

#[test]
fn dsv32_system_has_no_role_token_and_old_reasoning_is_dropped() {
    let mut old = Message::assistant("4");
    old.reasoning_content = Some("2+2 is 4".into());
    let messages = [Message::system("Be brief."), Message::user("2+2?"), old, Message::user("3+3?")];
    let prompt = encode_dsv32(&messages, true).unwrap();
    assert_eq!(
        prompt,
        "<｜begin▁of▁sentence｜>Be brief.<｜User｜>2+2?<｜Assistant｜></think>4<｜end▁of▁sentence｜>\
         <｜User｜>3+3?<｜Assistant｜><think>"
    );
}

#[test]
fn dsv32_tool_round_trip_in_thinking_mode() {
    let mut asked = Message::assistant("");
    asked.reasoning_content = Some("Need the weather.".into());
    asked.tool_calls = vec![
        call("get_weather", r#"{"city": "Paris", "days": 2, "units": ["C"]}"#),
        call("get_time", r#"{"tz": "Europe/Paris"}"#),
    ];
    let messages = [Message::user("Weather?"), asked, Message::tool("18C"), Message::tool("09:00")];
    let prompt = encode_dsv32(&messages, true).unwrap();
    let expected = "<｜begin▁of▁sentence｜><｜User｜>Weather?<｜Assistant｜><think>Need the weather.</think>\n\n\
        <｜DSML｜function_calls>\n\
        <｜DSML｜invoke name=\"get_weather\">\n\
        <｜DSML｜parameter name=\"city\" string=\"true\">Paris</｜DSML｜parameter>\n\
        <｜DSML｜parameter name=\"days\" string=\"false\">2</｜DSML｜parameter>\n\
        <｜DSML｜parameter name=\"units\" string=\"false\">[\"C\"]</｜DSML｜parameter>\n\
        </｜DSML｜invoke>\n\
        <｜DSML｜invoke name=\"get_time\">\n\
        <｜DSML｜parameter name=\"tz\" string=\"true\">Europe/Paris</｜DSML｜parameter>\n\
        </｜DSML｜invoke>\n\
        </｜DSML｜function_calls><｜end▁of▁sentence｜>\n\n\
        <function_results>\n<result>18C</result>\n<result>09:00</result>\n</function_results>\n\n<think>";
    assert_eq!(prompt, expected);
    // In chat mode the results block ends with </think> and no reasoning is rendered.
    let chat = encode_dsv32(&messages, false).unwrap();
    assert!(chat.contains("<｜Assistant｜></think>\n\n<｜DSML｜function_calls>"), "{chat}");
    assert!(chat.ends_with("</function_results>\n\n</think>"), "{chat}");
}

#[test]
fn dsv32_rejects_malformed_tool_turns() {
    let err = encode_dsv32(&[Message::user("hi"), Message::tool("x")], false).unwrap_err();
    assert!(matches!(err, Error::InvalidMessage { index: 1, .. }), "{err}");
    let mut one_call = Message::assistant("");
    one_call.tool_calls = vec![call("f", "{}")];
    let err = encode_dsv32(&[Message::user("hi"), one_call.clone(), Message::tool("a"), Message::tool("b")], false)
        .unwrap_err();
    assert!(err.to_string().contains("messages[3]: tool result #2, but messages[1] made 1 tool calls"), "{err}");
    one_call.tool_calls = vec![call("f", "not json")];
    let err = encode_dsv32(&[Message::user("hi"), one_call], false).unwrap_err();
    assert!(err.to_string().contains("arguments are not a JSON object"), "{err}");
}

#[test]
fn messages_parse_openai_shapes() {
    let v = json!([
        {"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": null, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
        {"role": "tool", "content": "1", "tool_call_id": "c1"},
        {"role": "assistant", "content": "ok", "tool_calls": null, "reasoning_content": "hm"},
    ]);
    let m: Vec<Message> = serde_json::from_value(v).unwrap();
    assert_eq!(m[0].content, "ab");
    assert_eq!((m[1].content.as_str(), m[1].tool_calls[0].function.name.as_str()), ("", "f"));
    assert_eq!(m[2].tool_call_id.as_deref(), Some("c1"));
    assert_eq!((m[3].tool_calls.len(), m[3].reasoning_content.as_deref()), (0, Some("hm")));
    let image = json!({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]});
    let err = serde_json::from_value::<Message>(image).unwrap_err();
    assert!(err.to_string().contains("only text is supported"), "{err}");
    assert!(serde_json::from_value::<Message>(json!({"role": "robot", "content": "x"})).is_err());
}

/// Llama-3's template, shortened.
const LLAMA3: &str = "{{- bos_token }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
";

#[test]
fn jinja_llama3_template_byte_for_byte() {
    let messages = [Message::system("You are helpful."), Message::user("  Hi there\n")];
    let out = render_jinja(LLAMA3, &messages, &ChatOptions::default()).unwrap();
    assert_eq!(
        out,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are helpful.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    let opts = ChatOptions { add_generation_prompt: false, ..ChatOptions::default() };
    let out = render_jinja(LLAMA3, &messages, &opts).unwrap();
    assert!(out.ends_with("Hi there<|eot_id|>"), "{out}");
}

/// No whitespace control markers: trim_blocks and lstrip_blocks do the work, as in HF.
const BLOCKS: &str = "{% set ns = namespace(n=0) %}
{% for m in messages %}
  {% if m.role == 'user' %}
    {% set ns.n = ns.n + 1 %}
U{{ ns.n }}: {{ m.content.strip().upper() }}
  {% elif m.role == 'tool' %}
    {% break %}
  {% else %}
A: {{ m.content | replace('o', '0') }}{% if m.tool_calls %} calls={{ m.tool_calls[0].function.arguments | tojson }}{% endif %}

  {% endif %}
{% endfor %}
{% if thinking %}<think>{% endif %}
{{ tools | tojson }}
{{ tools[0] | tojson(indent=2) }}
";

#[test]
fn jinja_hf_environment_features() {
    let mut asked = Message::assistant("ok go");
    asked.tool_calls = vec![call("f", r#"{"b": "é<&>", "a": 1.0}"#)];
    let messages = [Message::user(" hi "), asked, Message::user("yo"), Message::tool("t"), Message::user("never")];
    let mut opts = ChatOptions { thinking: true, ..ChatOptions::default() };
    opts.extra.insert(
        "tools".into(),
        json!([{"name": "get_weather", "description": "Temp <°C> & 'more'", "parameters": {"type": "object"}}]),
    );
    let out = render_jinja(BLOCKS, &messages, &opts).unwrap();
    // Produced by jinja2 3.1.6 with transformers' settings and its tojson.
    let expected = "U1: HI\nA: 0k g0 calls={\"b\": \"é<&>\", \"a\": 1.0}\nU2: YO\n<think>\
        [{\"name\": \"get_weather\", \"description\": \"Temp <°C> & 'more'\", \"parameters\": {\"type\": \"object\"}}]\n\
        {\n  \"name\": \"get_weather\",\n  \"description\": \"Temp <°C> & 'more'\",\n  \"parameters\": {\n    \"type\": \"object\"\n  }\n}";
    assert_eq!(out, expected);
}

#[test]
fn jinja_raise_exception_and_syntax_errors_are_clear() {
    let source = "{% for m in messages %}{% if m.role == 'system' %}\
        {{ raise_exception('System role not supported') }}{% endif %}{{ m.content }}{% endfor %}";
    let err = render_jinja(source, &[Message::system("x")], &ChatOptions::default()).unwrap_err();
    assert!(matches!(&err, Error::ChatTemplateRaised { message } if message == "System role not supported"), "{err}");
    assert_eq!(err.to_string(), "chat template rejected the messages: System role not supported");
    assert_eq!(render_jinja(source, &[Message::user("fine")], &ChatOptions::default()).unwrap(), "fine");

    let err = ChatTemplate::new("broken", "{% for m in messages %}{{ m.content }}").unwrap_err();
    assert!(matches!(&err, Error::ChatTemplate { name, .. } if name == "broken"), "{err}");
    let cause = std::error::Error::source(&err).map(|e| e.to_string()).unwrap_or_default();
    assert!(cause.contains("syntax error"), "{cause}");
}

#[test]
fn jinja_strftime_now_and_unknown_kwargs() {
    let out = render_jinja("{{ strftime_now('%Y') }}", &[], &ChatOptions::default()).unwrap();
    assert!(out.len() == 4 && out.as_str() >= "2025", "{out}");
    let err = render_jinja("{{ messages | tojson(colour=1) }}", &[], &ChatOptions::default()).unwrap_err();
    assert!(matches!(err, Error::ChatTemplate { .. }), "{err}");
}
