"""The server through the official ``openai`` client and raw HTTP: completions, chat, streaming, errors."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.infer.chat import default_template, encode_chat, special_token_ids
from lmforge.infer.generate import SamplingConfig, generate
from lmforge.infer.loading import load_for_inference, open_chat
from tests.conftest import require_module

openai = require_module("openai")
httpx = require_module("httpx")


def client(server, key: str = "none"):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def reference(checkpoint, prompt: str, n: int) -> str:
    loaded = load_for_inference(checkpoint, device=torch.device("cpu"))
    sampling = SamplingConfig(max_new_tokens=n, temperature=0.0)
    return generate(loaded.model, loaded.tokenizer, [prompt], sampling, device=torch.device("cpu"))[0]


def test_models_and_health(server):
    assert [m.id for m in client(server).models.list().data] == ["tiny"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_completion_matches_generate(server, checkpoint):
    out = client(server).completions.create(model="tiny", prompt="Hello", max_tokens=12, temperature=0)
    ref = reference(checkpoint, "Hello", 12)
    assert out.choices[0].text == ref.text
    assert out.choices[0].finish_reason == ("length" if ref.finish_reason == "length" else "stop")
    assert out.usage.prompt_tokens == 5 and out.usage.completion_tokens == len(ref.tokens)
    assert out.usage.total_tokens == 5 + len(ref.tokens)


def test_streamed_completion_equals_whole(server):
    c = client(server)
    whole = c.completions.create(model="tiny", prompt="abc", max_tokens=20, temperature=0)
    pieces = list(c.completions.create(model="tiny", prompt="abc", max_tokens=20, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == whole.choices[0].text
    assert pieces[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_chat_and_stream(server, checkpoint):
    c = client(server)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    whole = c.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    assert whole.choices[0].message.role == "assistant"
    # the same conversation through lmforge chat's session (its template, generate_ids): the same reply
    sampling = SamplingConfig(max_new_tokens=16, temperature=0.0)
    session, _ = open_chat(checkpoint, sampling, device=torch.device("cpu"), system="Be brief.")
    assert session.send("Hi!").text == whole.choices[0].message.content
    stream = c.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # the raw event stream: OpenAI chunks, then data: [DONE]
    body = {"model": "tiny", "messages": messages, "max_tokens": 4, "temperature": 0, "stream": True}
    raw = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).text
    events = [e for e in raw.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_seeded_sampling_is_reproducible(server):
    c = client(server)
    a, b = (
        c.completions.create(model="tiny", prompt="x", max_tokens=10, temperature=1.0, top_p=0.9, seed=7)
        for _ in range(2)
    )
    assert a.choices[0].text == b.choices[0].text


def test_stop_string(server):
    c = client(server)
    whole = c.completions.create(model="tiny", prompt="Hello", max_tokens=30, temperature=0).choices[0].text
    stop = whole[5:7]
    cut = c.completions.create(model="tiny", prompt="Hello", max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].text == whole[: whole.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_errors(server):
    c = client(server)
    with pytest.raises(openai.NotFoundError) as exc:
        c.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert exc.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as exc:
        c.completions.create(model="tiny", prompt="x", max_tokens=1000)
    assert "context of 256 tokens" in exc.value.body["message"] and exc.value.body["param"] == "max_tokens"
    bad = httpx.post(server.url + "/v1/completions", content=b"{not json", timeout=10)
    assert bad.status_code == 400 and set(bad.json()["error"]) == {"message", "type", "param", "code"}
    wrong = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "temperature": "hot"}, timeout=10)
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "temperature"
    big = httpx.post(server.url + "/v1/completions", content=b"x" * 2_000_000, timeout=10)
    assert big.status_code == 413 and "1000000 bytes" in big.json()["error"]["message"]
    n17 = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "n": 17}, timeout=10)
    assert n17.status_code == 400 and n17.json()["error"]["param"] == "n"


def metric_values(server) -> dict[str, float]:
    """Every sample of /metrics as {name{labels}: value}."""
    text = httpx.get(server.url + "/metrics").text
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_metrics(server):
    """The counters move by what a request used (its usage), the histograms by one observation."""
    before = metric_values(server)
    out = client(server).completions.create(model="tiny", prompt="metrics", max_tokens=3, temperature=0)
    after = metric_values(server)

    def moved(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert moved('lmforge_requests_total{route="/v1/completions",status="200"}') == 1
    assert moved("lmforge_prompt_tokens_total") == out.usage.prompt_tokens == 7
    assert moved("lmforge_completion_tokens_total") == out.usage.completion_tokens
    assert moved("lmforge_request_latency_seconds_count") == 1
    assert moved("lmforge_time_to_first_token_seconds_count") == 1
    assert moved("lmforge_time_to_first_token_seconds_sum") <= moved("lmforge_request_latency_seconds_sum")
    assert after["lmforge_queue_depth"] == 0 and after["lmforge_batch_size"] == 0


def test_content_parts_and_developer_role(server):
    """Content as a list of text parts is their text joined by newlines, and the developer role is the
    system role: the replies equal those of the plain-string, system-role conversation."""
    c = client(server)
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!\nHow are you?"}]
    parts = [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hi!"}, {"type": "text", "text": "How are you?"}],
        },
    ]
    a, b = (
        c.chat.completions.create(model="tiny", messages=m, max_tokens=12, temperature=0)
        for m in (plain, parts)
    )
    assert b.choices[0].message.content == a.choices[0].message.content
    assert b.usage.prompt_tokens == a.usage.prompt_tokens
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    with pytest.raises(openai.BadRequestError) as exc:
        c.chat.completions.create(model="tiny", messages=image, max_tokens=2)
    assert exc.value.body["param"] == "messages" and "'image_url' part" in exc.value.body["message"]


def test_logprobs_equal_a_log_softmax_of_the_logits(server, checkpoint):
    """Each token's log-probability and the top ones equal a log-softmax of the model's logits, from one
    full forward pass over prompt + completion (no cache), for the completions and the chat API."""
    loaded = load_for_inference(checkpoint, device=torch.device("cpu"))
    tok = loaded.tokenizer

    def reference(prompt_ids: list[int], tokens: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = loaded.model(torch.tensor([prompt_ids + tokens]))[0].float()  # (P + N, V)
        return logits.log_softmax(-1)[len(prompt_ids) - 1 : -1]  # (N, V): the positions choosing them

    c = client(server)
    out = c.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=0, logprobs=3)
    got = out.choices[0].logprobs
    tokens = [tok.encode(t)[0] for t in got.tokens]  # one character per token
    assert "".join(got.tokens) == out.choices[0].text and len(tokens) == out.usage.completion_tokens
    ref = reference(tok.encode("Hello"), tokens)
    for n, token in enumerate(tokens):
        assert got.token_logprobs[n] == pytest.approx(float(ref[n, token]), abs=1e-4)
        top = ref[n].topk(3)
        expected = {tok.decode([int(i)]): float(v) for v, i in zip(top.values, top.indices)}
        assert got.top_logprobs[n] == pytest.approx(expected, abs=1e-4)
    assert got.text_offset == list(range(len(tokens)))

    messages = [{"role": "user", "content": "Hi!"}]
    chat = c.chat.completions.create(
        model="tiny", messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert "".join(item.token for item in content) == chat.choices[0].message.content
    template = loaded.chat_template or default_template(tok)
    text = template.render(messages, add_generation_prompt=True)
    prompt_ids = encode_chat(tok, text, special_token_ids(tok, template))
    assert len(prompt_ids) == chat.usage.prompt_tokens
    tokens = [tok.encode(item.token)[0] for item in content]
    ref = reference(prompt_ids, tokens)
    for n, item in enumerate(content):
        assert item.logprob == pytest.approx(float(ref[n, tokens[n]]), abs=1e-4)
        assert [t.logprob for t in item.top_logprobs] == pytest.approx(
            ref[n].topk(2).values.tolist(), abs=1e-4
        )
    with pytest.raises(openai.BadRequestError) as exc:
        c.chat.completions.create(model="tiny", messages=messages, max_tokens=2, top_logprobs=2)
    assert exc.value.body["param"] == "top_logprobs"


def test_n_choices_are_sampled_independently_and_seeded(server):
    """n=3: choice i is the answer an n=1 request with seed + i gets (reproducible), the choices differ, usage
    counts the prompt once and every completion; streamed, each choice's deltas join to the same text."""
    c = client(server)
    args = dict(model="tiny", prompt="Once", max_tokens=12, temperature=1.0, seed=5)
    three = c.completions.create(n=3, **args)
    assert [choice.index for choice in three.choices] == [0, 1, 2]
    texts = [choice.text for choice in three.choices]
    singles = [c.completions.create(**dict(args, seed=5 + i)) for i in range(3)]
    assert texts == [single.choices[0].text for single in singles]
    assert len(set(texts)) > 1
    assert three.usage.prompt_tokens == 4
    assert three.usage.completion_tokens == sum(single.usage.completion_tokens for single in singles)
    messages = [{"role": "user", "content": "Hi!"}]
    chat_args = dict(model="tiny", messages=messages, max_tokens=8, temperature=1.0, seed=9, n=2)
    whole = c.chat.completions.create(**chat_args)
    streamed = ["", ""]
    for chunk in c.chat.completions.create(stream=True, **chat_args):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == [choice.message.content for choice in whole.choices]


def test_streamed_logprobs_equal_the_whole_answers(server):
    """Streamed, each chunk carries the log-probabilities of the tokens since the previous one: together they
    are the non-streamed answer's (chat content list, and the completions API's parallel lists)."""
    c = client(server)
    messages = [{"role": "user", "content": "Hey"}]
    args = dict(model="tiny", messages=messages, max_tokens=10, temperature=0, logprobs=True, top_logprobs=2)
    whole = c.chat.completions.create(**args).choices[0].logprobs.content
    streamed = []
    for chunk in c.chat.completions.create(stream=True, **args):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.content
    # the second request's prompt comes from the prefix cache: the same values up to float rounding
    assert [x.token for x in streamed] == [x.token for x in whole]
    assert [x.logprob for x in streamed] == pytest.approx([x.logprob for x in whole], abs=1e-5)
    for s, w in zip(streamed, whole):
        assert [t.token for t in s.top_logprobs] == [t.token for t in w.top_logprobs]
        assert [t.logprob for t in s.top_logprobs] == pytest.approx(
            [t.logprob for t in w.top_logprobs], abs=1e-5
        )
    args = dict(model="tiny", prompt="Well", max_tokens=10, temperature=0, logprobs=1)
    full = c.completions.create(**args).choices[0].logprobs
    tokens, offsets, values = [], [], []
    for chunk in c.completions.create(stream=True, **args):
        part = chunk.choices[0].logprobs
        if part is not None:
            tokens, offsets, values = (
                tokens + part.tokens,
                offsets + part.text_offset,
                values + part.token_logprobs,
            )
    assert (tokens, offsets) == (full.tokens, full.text_offset)
    assert values == pytest.approx(full.token_logprobs, abs=1e-5)
