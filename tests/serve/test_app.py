"""The HTTP app in-process (FastAPI's TestClient, no socket): settings checks, the API key, the body limit,
the metrics' values, model lookup, the event stream's shape, and a template's end-of-turn text."""

from __future__ import annotations

import json
import re

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.infer.chat import ChatTemplate, default_template
from lmforge.infer.generate import SamplingConfig, generate_ids
from lmforge.serve.app import ServeConfig, build_app, check_serve_config
from tests.conftest import require_module
from tests.serve.conftest import ascii_tokenizer, tiny_config

require_module("httpx")
from fastapi.testclient import TestClient  # noqa: E402  (needs httpx)

CPU = torch.device("cpu")


def tiny():
    from lmforge.model.transformer import build_model

    tokenizer = ascii_tokenizer()
    cfg = tiny_config(tokenizer.vocab_size, max_seq_len=128)
    return build_model(cfg, seed=0), tokenizer


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return tiny()


def client(model_and_tokenizer, template=None, **settings) -> TestClient:
    model, tokenizer = model_and_tokenizer
    cfg = ServeConfig(port=0, **settings)
    app = build_app(
        model,
        tokenizer,
        template=template or default_template(tokenizer),
        cfg=cfg,
        model_name="tiny",
        device=CPU,
    )
    return TestClient(app)


def metric(text: str, name: str, labels: str = "") -> float:
    """A sample's value in Prometheus text (0 when the series does not exist yet)."""
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def events(raw: str) -> list:
    """The JSON payloads of a server-sent event stream, [DONE] as the string."""
    out = []
    for block in raw.split("\n\n"):
        if block:
            assert block.startswith("data: "), block
            out.append(block[6:] if block == "data: [DONE]" else json.loads(block[6:]))
    return out


def test_serve_settings_are_checked():
    assert ServeConfig().problems() == []
    cases = {
        "--max-batch 0": dict(max_batch=0),
        "--max-queue 0": dict(max_queue=0),
        "--port 70000": dict(port=70000),
        "--max-body-bytes 100": dict(max_body_bytes=100),
        "--api-key must not be empty": dict(api_key=""),
        "--embedding-pooling max": dict(embedding_pooling="max"),
    }
    for expected, bad in cases.items():
        problems = ServeConfig(**bad).problems()
        assert len(problems) == 1 and problems[0].startswith(expected), (bad, problems)
        with pytest.raises(ConfigError, match=re.escape(expected)):
            check_serve_config(ServeConfig(**bad))


def test_api_key_scheme_and_open_routes_and_bounded_metric_labels(model_and_tokenizer):
    with client(model_and_tokenizer, api_key="s3cret") as c:
        assert c.get("/v1/models", headers={"Authorization": "bearer s3cret"}).status_code == 200  # any case
        assert c.get("/v1/models", headers={"Authorization": "BEARER s3cret"}).status_code == 200
        for wrong in ("Bearer s3cre", "Bearer s3cretx", "Bearer  s3cret", "s3cret", "Basic s3cret"):
            assert c.get("/v1/models", headers={"Authorization": wrong}).status_code == 401, wrong
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200
        for path in ("/nope", "/nope/2", "/admin"):
            assert c.get(path).status_code == 401
        text = c.get("/metrics", headers={"Authorization": "Bearer s3cret"}).text
    # unknown paths share one label; a label per path would grow without bound
    assert metric(text, "lmforge_requests_total", '{route="other",status="401"}') == 3.0
    assert "/nope" not in text


def test_body_limit_is_inclusive(model_and_tokenizer):
    with client(model_and_tokenizer, max_body_bytes=1024) as c:
        body = json.dumps({"prompt": "hi", "max_tokens": 1, "temperature": 0}).encode()
        exact = body + b" " * (1024 - len(body))  # JSON allows trailing whitespace
        assert c.post("/v1/completions", content=exact).status_code == 200
        over = c.post("/v1/completions", content=exact + b" ")
        assert over.status_code == 413 and over.json()["error"]["code"] == "request_too_large"


def test_token_counters_add_each_requests_usage(model_and_tokenizer):
    with client(model_and_tokenizer) as c:
        usages = []
        for prompt, n in (("Hello", 7), ("a", 3)):
            body = {"prompt": prompt, "max_tokens": n, "temperature": 0}
            usages.append(c.post("/v1/completions", json=body).json()["usage"])
        text = c.get("/metrics").text
    assert metric(text, "lmforge_completion_tokens_total") == sum(u["completion_tokens"] for u in usages)
    assert metric(text, "lmforge_prompt_tokens_total") == 5 + 1
    assert [u["total_tokens"] for u in usages] == [
        u["prompt_tokens"] + u["completion_tokens"] for u in usages
    ]
    assert metric(text, "lmforge_finished_requests_total", '{reason="length"}') + metric(
        text, "lmforge_finished_requests_total", '{reason="stop"}'
    ) == len(usages)


def test_a_model_is_found_by_its_exact_name(model_and_tokenizer):
    with client(model_and_tokenizer) as c:
        assert c.get("/v1/models/tiny").json()["id"] == "tiny"
        for name in ("tin", "t", "tinyy", "TINY"):
            missing = c.get(f"/v1/models/{name}")
            assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_chat_stream_opens_with_the_role_and_has_usage_only_when_asked(model_and_tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    base = {"messages": messages, "max_tokens": 6, "temperature": 0}
    with client(model_and_tokenizer) as c:
        whole = c.post("/v1/chat/completions", json=base).json()
        plain = events(c.post("/v1/chat/completions", json={**base, "stream": True}).text)
        asked = {**base, "stream": True, "stream_options": {"include_usage": True}}
        with_usage = events(c.post("/v1/chat/completions", json=asked).text)
    assert plain[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert plain[-1] == "[DONE]" and all("usage" not in e for e in plain[:-1])
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in plain[1:-1])
    assert text == whole["choices"][0]["message"]["content"]
    assert with_usage[-2]["choices"] == [] and with_usage[-2]["usage"] == whole["usage"]
    assert sum("usage" in e for e in with_usage[:-1]) == 1


# A template that never renders its end-of-turn text, so the prompt is the same whatever that text is.
PLAIN = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def test_a_template_end_of_turn_text_ends_the_chat_reply(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    messages = [{"role": "user", "content": "Hi"}]
    prompt = tokenizer.encode(ChatTemplate(PLAIN).render(messages, add_generation_prompt=True))
    sampling = SamplingConfig(max_new_tokens=12, temperature=0.0)
    free = tokenizer.decode(generate_ids(model, [prompt], sampling, device=CPU).tokens[0])
    assert len(free) == 12  # one token per character
    end = free[6]  # the template's end-of-turn "text": a character the free reply contains
    with client(model_and_tokenizer, template=ChatTemplate(PLAIN, eos_token=end)) as c:
        body = {"messages": messages, "max_tokens": 12, "temperature": 0}
        choice = c.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert choice["message"]["content"] == free[: free.index(end)] and choice["finish_reason"] == "stop"
