"""Batching through HTTP, and the limits: API key, bounded queue (429), a client that disconnects."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from tests.conftest import require_module
from tests.serve.conftest import RunningServer, tiny_checkpoint

openai = require_module("openai")
httpx = require_module("httpx")

PROMPTS = ["a", "hello there", "The quick brown fox jumps", "xy", "0123456789" * 4, "zz top", "q", "Mixed!"]
BUDGETS = [30, 8, 25, 12, 40, 5, 33, 18]


def complete(url: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    response = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def wait_until(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_batched_greedy_equals_alone(server):
    """8 concurrent mixed-length requests decode in one batch; each answer equals the one it gets alone."""
    alone = [complete(server.url, p, n)["choices"][0]["text"] for p, n in zip(PROMPTS, BUDGETS)]
    together: list[str | None] = [None] * len(PROMPTS)
    sizes = []
    start = threading.Barrier(len(PROMPTS) + 1)

    def worker(i):
        start.wait()
        together[i] = complete(server.url, PROMPTS[i], BUDGETS[i])["choices"][0]["text"]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    start.wait()
    while any(t.is_alive() for t in threads):
        sizes.append(len(server.scheduler.rows))
        time.sleep(0.005)
    for t in threads:
        t.join(timeout=120)
    assert together == alone
    assert max(sizes) > 1  # they really shared a batch


def test_api_key(checkpoint):
    running = RunningServer(checkpoint, api_key="s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=running.url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert httpx.get(running.url + "/v1/models").status_code == 401
        assert httpx.get(running.url + "/metrics").status_code == 401
        assert httpx.get(running.url + "/health").status_code == 200
        good = openai.OpenAI(base_url=running.url + "/v1", api_key="s3cret", max_retries=0, timeout=60)
        out = good.completions.create(model="tiny", prompt="hi", max_tokens=3, temperature=0)
        assert out.usage.prompt_tokens == 2
    finally:
        running.close()


def test_queue_full_and_disconnect(tmp_path):
    """One running, one waiting, a third gets 429 with Retry-After; a client that leaves mid-stream frees
    its slot and its queued follower runs. The first request asks for 4000 tokens (seconds of decoding even
    for this tiny model), so it is still running while the others arrive and when its client leaves."""
    running = RunningServer(tiny_checkpoint(tmp_path, max_seq_len=4096), max_batch=1, max_queue=1)
    body = {"model": "tiny", "prompt": "long one", "max_tokens": 4000, "temperature": 0, "stream": True}
    try:
        with httpx.Client(timeout=60) as first:
            with first.stream("POST", running.url + "/v1/completions", json=body) as stream:
                lines = stream.iter_lines()
                assert next(lines).startswith("data: ")  # it is decoding
                waiter = threading.Thread(target=complete, args=(running.url, "second", 3))
                waiter.start()
                wait_until(lambda: len(running.scheduler.waiting) == 1)
                third = httpx.post(
                    running.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=60
                )
                assert third.status_code == 429 and third.headers["retry-after"] == "1"
                assert third.json()["error"]["code"] == "queue_full"
            # the stream is closed here, long before its 4000 tokens
        waiter.join(timeout=60)
        assert not waiter.is_alive()
        wait_until(lambda: not running.scheduler.rows)
        metrics = httpx.get(running.url + "/metrics", timeout=60).text
        assert 'lmforge_finished_requests_total{reason="cancelled"} 1.0' in metrics
    finally:
        running.close()


def test_non_streaming_disconnect_frees_the_slot(tmp_path):
    """A non-streaming client that leaves mid-decode had its request run to the end of its budget (tokens
    kept arriving, so the disconnect was never checked); now it is cancelled and its slot freed."""
    running = RunningServer(tiny_checkpoint(tmp_path, max_seq_len=4096), max_batch=2, max_queue=1)
    finished = []
    on_finish = running.scheduler.on_finish
    running.scheduler.on_finish = lambda request, final: (finished.append(final), on_finish(request, final))
    body = json.dumps({"prompt": "long one", "max_tokens": 4000, "temperature": 0}).encode()
    host, port = running.url.removeprefix("http://").split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            wait_until(lambda: running.scheduler.rows and running.scheduler.rows[0].generated)  # decoding
        left = time.monotonic()  # the socket is closed: the client has gone
        wait_until(lambda: finished, seconds=60)
        assert finished[0]["finish_reason"] == "cancelled", finished[0]
        assert 0 < finished[0]["completion_tokens"] < 4000
        wait_until(lambda: not running.scheduler.rows)  # on_finish runs just before the row leaves
        assert time.monotonic() - left < 10
        metrics = httpx.get(running.url + "/metrics").text
        assert 'lmforge_finished_requests_total{reason="cancelled"} 1.0' in metrics
    finally:
        running.close()
