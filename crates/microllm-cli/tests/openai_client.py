"""The official `openai` Python package, unmodified, against a running `microllm serve`.

Usage: python3 openai_client.py BASE_URL [API_KEY]
(BASE_URL like http://127.0.0.1:8080). Run by crates/microllm-cli/tests/serve.rs, which starts
the server and installs the package with pip when it is missing. Prints one "ok NAME" line per
check and exits 0 when every check holds; a failed check raises.
"""

import math
import sys

import openai

base = sys.argv[1].rstrip("/")
key = sys.argv[2] if len(sys.argv) > 2 else "no-key"
client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=300)
passed = 0


def check(name, cond, detail=""):
    global passed
    if not cond:
        raise AssertionError(f"{name}: {detail}")
    passed += 1
    print(f"ok {name}", flush=True)


# Model list.
models = client.models.list()
ids = [m.id for m in models.data]
check("models.list", len(ids) == 1, ids)
model = ids[0]

messages = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Name three colours."},
]

# Chat completion (greedy, so the streamed answer must be the same text).
chat = client.chat.completions.create(
    model=model, messages=messages, max_tokens=24, temperature=0, seed=1
)
answer = chat.choices[0].message.content
u = chat.usage
check("chat.completions", bool(answer) and chat.choices[0].message.role == "assistant", chat)
check(
    "chat usage",
    u.completion_tokens > 0 and u.total_tokens == u.prompt_tokens + u.completion_tokens,
    u,
)
check("chat finish_reason", chat.choices[0].finish_reason in ("stop", "length"), chat)

# Streamed chat completion with usage.
text, finish, usage, n_chunks = "", None, None, 0
stream = client.chat.completions.create(
    model=model,
    messages=messages,
    max_tokens=24,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    n_chunks += 1
    if chunk.usage is not None:
        usage = chunk.usage
    if chunk.choices:
        text += chunk.choices[0].delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
check("streamed chat = non-streamed", text == answer, f"{text!r} vs {answer!r}")
check("streamed chat finish", finish == chat.choices[0].finish_reason, finish)
check("streamed chat usage", usage is not None and usage.total_tokens == u.total_tokens, usage)
check("streamed in pieces", n_chunks > 3, n_chunks)

# Logprobs.
lp = client.chat.completions.create(
    model=model, messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
)
content = lp.choices[0].logprobs.content
check(
    "chat logprobs",
    len(content) >= 1 and all(c.logprob <= 0 and len(c.top_logprobs) == 2 for c in content),
    content,
)

# Text completion.
comp = client.completions.create(
    model=model, prompt="The capital of France is", max_tokens=8, temperature=0
)
check("completions", bool(comp.choices[0].text) and comp.usage.completion_tokens > 0, comp)

# Embeddings: the client asks for base64 by default and decodes it.
emb = client.embeddings.create(model=model, input=["hello world", "goodbye"])
vecs = [d.embedding for d in emb.data]
check("embeddings count", len(vecs) == 2 and len(vecs[0]) > 0, len(vecs))
norm = math.sqrt(sum(x * x for x in vecs[0]))
check("embeddings normalised", abs(norm - 1.0) < 1e-3, norm)
flt = client.embeddings.create(model=model, input="hello world", encoding_format="float")
same = max(abs(a - b) for a, b in zip(flt.data[0].embedding, vecs[0]))
check("embeddings float = base64", same < 1e-6, same)

# Errors come back as the client's typed exceptions.
try:
    client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=2)
    check("unknown model", False, "no error")
except openai.NotFoundError as e:
    check("unknown model", e.status_code == 404, e)
try:
    client.chat.completions.create(model=model, messages=messages, temperature=3)
    check("bad temperature", False, "no error")
except openai.BadRequestError as e:
    check("bad temperature", e.status_code == 400 and "temperature" in str(e), e)

print(f"openai client: all {passed} checks passed")
