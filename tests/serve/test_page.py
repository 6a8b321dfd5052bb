"""The chat page in a headless Chromium (Playwright): type a message, see the streamed reply appear."""

from __future__ import annotations

import shutil
import time

from tests.conftest import missing

CHROMIUM = "/usr/bin/chromium"


def test_chat_page_streams_a_reply(server):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        missing(f"playwright is not installed ({exc}); pip install -e '.[dev]'")
    if shutil.which(CHROMIUM) is None:
        missing(f"{CHROMIUM} is absent; install Debian's chromium (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.fill("#system", "You are terse.")
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "24")
            page.fill("#message", "Hello, model")
            page.click("#send")
            page.wait_for_selector(".turn.user", timeout=20_000)
            assert page.inner_text(".turn.user").endswith("Hello, model")
            # the reply streams in, then the send button comes back
            page.wait_for_function(
                "document.querySelector('.turn.assistant').textContent.length > 0", timeout=20_000
            )
            page.wait_for_function("!document.getElementById('send').disabled", timeout=20_000)
            reply = page.eval_on_selector(".turn.assistant", "e => e.textContent")
            assert reply and "error" not in page.eval_on_selector(".turn.assistant", "e => e.className")
        finally:
            browser.close()
    import openai

    c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello, model"}]
    same = c.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0)
    assert reply == same.choices[0].message.content  # the page showed exactly the model's greedy reply


def finished(server, reason: str) -> float:
    import httpx

    text = httpx.get(server.url + "/metrics", timeout=30).text
    line = f'lmforge_finished_requests_total{{reason="{reason}"}} '
    return sum(float(row[len(line) :]) for row in text.splitlines() if row.startswith(line))


def test_the_stop_button_ends_the_stream_and_frees_the_slot(server, monkeypatch):
    """A long reply streams in (each decoding step slowed to 30 ms so a person, or this test, can press
    stop); the page's stop button aborts the fetch mid-reply: the text stops growing, short of max_tokens,
    and is a prefix of the model's greedy reply; the server cancels the request and frees its slot."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        missing(f"playwright is not installed ({exc}); pip install -e '.[dev]'")
    if shutil.which(CHROMIUM) is None:
        missing(f"{CHROMIUM} is absent; install Debian's chromium (apt-get install chromium)")
    scheduler = server.scheduler
    real_step = scheduler._step

    def slow_step():
        time.sleep(0.03)
        real_step()

    cancelled = finished(server, "cancelled")
    monkeypatch.setattr(scheduler, "_step", slow_step)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.fill("#system", "You are terse.")
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "150")
            page.fill("#message", "Hello, model")
            page.click("#send")
            length = "document.querySelector('.turn.assistant').textContent.length"
            page.wait_for_function(f"{length} >= 10", timeout=30_000)
            assert len(scheduler.rows) == 1  # it is decoding
            page.click("#stop")
            page.wait_for_function(
                "document.getElementById('status').textContent === 'stopped'", timeout=10_000
            )
            stopped = page.eval_on_selector(".turn.assistant", "e => e.textContent")
            deadline = time.monotonic() + 10
            while scheduler.busy or finished(server, "cancelled") < cancelled + 1:  # the slot is freed
                assert time.monotonic() < deadline, "the server did not cancel the stopped request"
                time.sleep(0.05)
            time.sleep(0.3)
            assert page.eval_on_selector(".turn.assistant", "e => e.textContent") == stopped  # no more text
            assert not page.is_disabled("#send") and page.is_disabled("#stop")
        finally:
            browser.close()
    monkeypatch.undo()
    import openai

    c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello, model"}]
    whole = c.chat.completions.create(model="tiny", messages=messages, max_tokens=150, temperature=0)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 150
    text = whole.choices[0].message.content
    assert 10 <= len(stopped) < len(text) and text.startswith(stopped)  # stopped mid-reply
