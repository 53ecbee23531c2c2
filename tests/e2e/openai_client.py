"""The official `openai` Python client against a running pipemoe (address in argv[1]): chat, streaming,
completions and model listing. Exits non-zero with the reason on any mismatch."""

import sys

from openai import OpenAI

client = OpenAI(base_url=f"http://{sys.argv[1]}/v1", api_key="not-needed", max_retries=0, timeout=120)

models = [m.id for m in client.models.list()]
assert models == ["tiny-dsv32"], models

r = client.chat.completions.create(
    model="tiny-dsv32", messages=[{"role": "user", "content": "What is 12 + 30?"}], temperature=0, max_tokens=16
)
assert r.choices[0].message.content == "42", r
assert r.choices[0].finish_reason == "stop", r
assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, r.usage

stream = client.chat.completions.create(
    model="tiny-dsv32",
    messages=[{"role": "user", "content": "Reverse the word apple"}],
    temperature=0,
    max_tokens=16,
    stream=True,
    stream_options={"include_usage": True},
)
text, usage = "", None
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        text += chunk.choices[0].delta.content
    if chunk.usage:
        usage = chunk.usage
assert text == "elppa", text
assert usage is not None and usage.completion_tokens > 0, usage

c = client.completions.create(
    model="tiny-dsv32",
    prompt="<｜begin▁of▁sentence｜><｜User｜>What is 60 + 39?<｜Assistant｜></think>",
    temperature=0,
    max_tokens=8,
)
assert c.choices[0].text == "99", c

try:
    client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    raise AssertionError("an unknown model was accepted")
except Exception as e:  # the client raises NotFoundError with our message
    assert "does not exist" in str(e), e

print("openai client OK")
