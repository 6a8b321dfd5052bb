"""Issue 25: one bad client cannot hurt the others. Each test reproduces one fault of the issue's list over
real HTTP on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import socket
import threading

import pytest

from tests.conftest import require_module

httpx = require_module("httpx")


def post(server, body: dict, route: str = "/v1/completions") -> httpx.Response:
    return httpx.post(server.url + route, json=body, timeout=60)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seed", 2**64),  # torch.Generator.manual_seed overflows past 64 bits
        ("seed", -(2**63) - 1),
        ("temperature", 1e-40),  # logits / temperature overflow to inf: sampling fails
        ("temperature", 10**400),  # an integer float() cannot hold
        ("top_p", 10**400),
        ("stop", "s" * 1001),  # matched at every step of the shared batch
    ],
    ids=[
        "seed-2**64",
        "seed-below-int64",
        "temperature-1e-40",
        "temperature-10**400",
        "top_p-10**400",
        "stop-long",
    ],
)
def test_out_of_range_values_are_refused_before_the_scheduler(server, field, value):
    """Values that passed validation and then raised on the scheduler thread (failing every request of the
    running batch) are a 400 naming the field."""
    response = post(server, {"prompt": "x", "max_tokens": 3, "temperature": 0.5, field: value})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and error["type"] == "invalid_request_error"


def test_extreme_values_in_range_are_served(server):
    """The largest seed torch takes is served, and a top_p that is 0 in float32 keeps the most likely token:
    the answer is the greedy one."""
    greedy = post(server, {"prompt": "Hi", "max_tokens": 8, "temperature": 0}).json()["choices"][0]["text"]
    for extra in ({"seed": 2**64 - 1}, {"seed": -(2**63)}, {"top_p": 1e-300, "seed": 3}):
        response = post(server, {"prompt": "Hi", "max_tokens": 8, "temperature": 1.0, **extra})
        assert response.status_code == 200, response.text
        if "top_p" in extra:
            assert response.json()["choices"][0]["text"] == greedy


@pytest.mark.parametrize("depth", [40, 100_000])
def test_deeply_nested_json_is_a_400(server, depth):
    """JSON nested beyond the interpreter's recursion limit was a plain-text 500 (a RecursionError); any
    nesting over 32 levels is now a 400 OpenAI error object."""
    raw = b'{"prompt": "x", "user": ' + b"[" * depth + b"]" * depth + b"}"
    response = httpx.post(server.url + "/v1/completions", content=raw, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_json" and "nested more than 32 levels" in error["message"]
    fine = b'{"prompt": "x", "max_tokens": 2, "user": ' + b"[" * 30 + b"]" * 30 + b"}"
    assert httpx.post(server.url + "/v1/completions", content=fine, timeout=60).status_code == 200


def test_chunked_body_is_refused_at_the_limit(server):
    """A chunked body (no Content-Length) was read whole before its size was checked. Now the server answers
    413 once the limit is passed, before the body has ended: this client never sends the last chunk."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        piece = b"x" * 65536
        for _ in range(17):  # 1.11 MB, over the 1 MB limit; the terminating chunk is never sent
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        sock.settimeout(10)  # before the fix the server waits here for the rest of the body
        answer = b""
        with contextlib.suppress(ConnectionError):
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer[:200]
    error = json.loads(payload)["error"]
    assert error["code"] == "request_too_large" and "1000000 bytes" in error["message"]


class HeldTokenizer:
    """Stands in for a tokenizer's Hugging Face core: encoding waits until the test releases it, as a long
    prompt would keep it busy; everything else passes through."""

    def __init__(self, real):
        self.real, self.entered, self.release = real, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.real, name)

    def _hold(self):
        self.entered.set()
        assert self.release.wait(60)

    def encode(self, *args, **kwargs):
        self._hold()
        return self.real.encode(*args, **kwargs)

    def encode_batch_fast(self, *args, **kwargs):
        self._hold()
        return self.real.encode_batch_fast(*args, **kwargs)


def test_tokenizing_a_prompt_leaves_the_event_loop_free(server):
    """A prompt was tokenized on the event loop, so every other client (running streams included) froze
    until it was done. With tokenization held mid-way, the server still answers."""
    tokenizer = server.scheduler.tokenizer
    held = HeldTokenizer(tokenizer.hf)
    tokenizer.hf = held
    answers = []
    slow = threading.Thread(target=lambda: answers.append(post(server, {"prompt": "long", "max_tokens": 2})))
    try:
        slow.start()
        assert held.entered.wait(30)  # the prompt is being tokenized now
        health = httpx.get(server.url + "/health", timeout=5)
        assert health.status_code == 200 and health.json()["status"] == "ok"
    finally:
        held.release.set()
        slow.join(timeout=60)
        tokenizer.hf = held.real
    assert answers[0].status_code == 200 and answers[0].json()["usage"]["prompt_tokens"] == 4


def test_gil_free_encoder_gives_the_same_ids():
    """The encoder used off the event loop (batch encoding, which releases the GIL) gives the ids of
    ``Tokenizer.encode``."""
    from lmforge.serve.app import GilFreeEncoder
    from tests.serve.conftest import ascii_tokenizer

    tokenizer = ascii_tokenizer()
    for text in ("", "Hello, world!", "line one\nline two " * 50, "<|endoftext|> after a special"):
        assert GilFreeEncoder(tokenizer).encode(text) == tokenizer.encode(text)


def counter(server, route: str, status: str) -> float:
    """lmforge_requests_total{route, status} read from /metrics (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(server.url + "/metrics").text):
        for sample in family.samples:
            if sample.name == "lmforge_requests_total" and sample.labels == {
                "route": route,
                "status": status,
            }:
                return sample.value
    return 0.0


def test_every_path_answers_openai_errors_and_metrics_count_them(server, monkeypatch):
    """Unknown routes and wrong methods answered FastAPI's {"detail": ...}, an unexpected exception a
    plain-text 500 counted as 200; now all are OpenAI error objects, /metrics counts each status (500s
    too), and it has the process series."""
    import lmforge.serve.app as app_module

    keys = {"message", "type", "param", "code"}
    before = {key: counter(server, *key) for key in [("other", "404"), ("/v1/completions", "405")]}
    missing = httpx.get(server.url + "/v1/nothing-here", timeout=10)
    assert missing.status_code == 404 and set(missing.json()) == {"error"}
    assert set(missing.json()["error"]) == keys and missing.json()["error"]["code"] == "not_found"
    wrong = httpx.get(server.url + "/v1/completions", timeout=10)
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert wrong.json()["error"]["code"] == "method_not_allowed" and set(wrong.json()["error"]) == keys
    assert counter(server, "other", "404") == before[("other", "404")] + 1
    assert counter(server, "/v1/completions", "405") == before[("/v1/completions", "405")] + 1

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the server")

    monkeypatch.setattr(app_module, "parse_request", broken)
    failures = counter(server, "/v1/completions", "500")
    crashed = post(server, {"prompt": "x", "max_tokens": 2})
    assert crashed.status_code == 500 and set(crashed.json()["error"]) == keys
    assert crashed.json()["error"]["type"] == "server_error"
    assert counter(server, "/v1/completions", "500") == failures + 1
    text = httpx.get(server.url + "/metrics").text
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds"):
        assert f"\n{name} " in text, name
    rss = float(text.split("\nprocess_resident_memory_bytes ")[1].split()[0])
    assert rss > 10e6  # a process holding torch uses tens of MB at least
