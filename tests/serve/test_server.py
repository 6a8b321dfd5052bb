"""The server through the official ``openai`` client and raw HTTP: completions, chat, streaming, errors."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.infer.generate import SamplingConfig, generate
from lmforge.infer.loading import load_for_inference, open_chat

openai = pytest.importorskip("openai", reason="the dev extra is not installed: pip install -e '.[dev]'")
httpx = pytest.importorskip("httpx")


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
    n2 = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "n": 2}, timeout=10)
    assert n2.status_code == 400 and n2.json()["error"]["param"] == "n"


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
