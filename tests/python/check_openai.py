"""mtl serve's OpenAI-compatible routes through OpenAI's own Python client (the `openai` package).

Usage: check_openai.py ADDR BASE GREEDY_ANSWER
  ADDR           the server (host:port), serving a decoder base model without adapters
  BASE           the name /v1/models lists for it
  GREEDY_ANSWER  a file with `mtl generate --chat`'s greedy answer to PROMPT (below), max 24 new tokens

Checks: the model list; a greedy chat completion equals `mtl generate --chat`'s answer, whole and streamed
(the chunks joined), with `usage` and the finish reason, the second time from the prefix cache (all but the
last prompt token cached, the same answer); a completion with a stop string; seeded sampling
repeats; several requests at once all answer; an unsupported parameter is an error the client raises.
"""
import concurrent.futures
import sys

import openai

PROMPT = "What is the capital of France?"

addr, base, answer_file = sys.argv[1:]
want = open(answer_file, encoding="utf-8").read().rstrip("\n")
client = openai.OpenAI(base_url=f"http://{addr}/v1", api_key="unused", max_retries=0, timeout=120)

ids = [m.id for m in client.models.list().data]
assert ids == [base], ids

chat = client.chat.completions.create(
    model=base, messages=[{"role": "user", "content": PROMPT}], temperature=0, max_tokens=24)
got = chat.choices[0].message.content
assert got == want, (got, want)
assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
assert chat.usage.completion_tokens <= 24 and chat.usage.prompt_tokens > 0
assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
assert chat.usage.prompt_tokens_details.cached_tokens == 0, chat.usage
assert chat.choices[0].finish_reason in ("stop", "length")

stream = client.chat.completions.create(
    model=base, messages=[{"role": "user", "content": PROMPT}], temperature=0, max_tokens=24, stream=True,
    stream_options={"include_usage": True})
pieces, usage, finish = [], None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            pieces.append(c.delta.content)
        finish = c.finish_reason or finish
assert "".join(pieces) == want, ("".join(pieces), want)
assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens
assert usage.prompt_tokens_details.cached_tokens == chat.usage.prompt_tokens - 1, usage
assert finish == chat.choices[0].finish_reason

done = client.completions.create(model=base, prompt="One, two, three, four,", max_tokens=20, temperature=0,
                                 stop=[" six"])
assert " six" not in done.choices[0].text and done.choices[0].finish_reason == "stop", done

def sample(seed):
    r = client.completions.create(model=base, prompt="Once upon a time", max_tokens=12, temperature=0.9,
                                  top_p=0.95, seed=seed)
    return r.choices[0].text

assert sample(7) == sample(7), "a seed repeats its sample"

with concurrent.futures.ThreadPoolExecutor(8) as pool:
    answers = list(pool.map(lambda i: client.completions.create(
        model=base, prompt=f"Count from {i}:", max_tokens=8, temperature=0).choices[0].text, range(8)))
assert all(answers), answers

try:
    client.completions.create(model=base, prompt="x", n=2)
    raise AssertionError("n=2 must be refused")
except openai.UnprocessableEntityError:
    pass
try:
    client.completions.create(model="no-such-model", prompt="x")
    raise AssertionError("an unknown model must be refused")
except openai.NotFoundError:
    pass
print(f"openai client: models, chat (whole and streamed = mtl generate), completions, seeds, 8 at once: ok")
