"""The chat page in a headless Chromium (Playwright): type a message, see the streamed reply appear."""

from __future__ import annotations

import shutil

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
