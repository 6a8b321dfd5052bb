"""Group prefill and the prefix cache: a request's tokens and logits are those of the model run on its prompt
alone (``generate_ids``, a plain forward pass), whether it was prefilled in a group of very different
lengths, joined while others decoded, or took part of its prompt from the prefix cache."""

from __future__ import annotations

import threading
import time

import torch

from lmforge.infer.generate import SamplingConfig, generate_ids
from lmforge.serve.prefix_cache import BLOCK, PrefixCache, block_names
from lmforge.serve.scheduler import Request, Scheduler
from tests.infer.conftest import ByteTokenizer, tiny_model

CPU = torch.device("cpu")


def started(model, **kw) -> tuple[Scheduler, list[int], list[torch.Tensor]]:
    """A running scheduler, the size of each prefill group it ran, and each group's first logits (G, V)."""
    tok = ByteTokenizer()
    tok.eot_id = None  # random weights: every request runs its whole budget
    scheduler = Scheduler(model, tok, device=CPU, **{"max_batch": 8, "max_queue": 16, **kw})
    groups, logits = [], []

    def on_prefill(requests):
        groups.append(len(requests))
        logits.append(scheduler.logits[-len(requests) :].clone())

    scheduler.on_prefill = on_prefill
    scheduler.start()
    return scheduler, groups, logits


def run(scheduler: Scheduler, prompts: list[list[int]], samplings: list[SamplingConfig]) -> list[dict]:
    """Submit the requests together; their final dicts with the generated ids."""
    finals: list[dict | None] = [None] * len(prompts)
    done = threading.Semaphore(0)
    requests = []
    for i, (prompt, sampling) in enumerate(zip(prompts, samplings)):

        def emit(delta, final, i=i):
            if final is not None:
                finals[i] = final
                done.release()

        requests.append(Request(prompt, sampling, emit))
    scheduler.submit(*requests)
    for _ in prompts:
        assert done.acquire(timeout=60)
    return [dict(f, tokens=r.generated, cached=r.cached) for f, r in zip(finals, requests)]


def wait_for_rows(scheduler: Scheduler, n: int) -> None:
    deadline = time.monotonic() + 30
    while len(scheduler.rows) < n:
        assert time.monotonic() < deadline
        time.sleep(0.001)


def test_a_group_of_very_different_lengths_joining_running_rows_equals_each_alone():
    """Seven prompts of 1 to 170 tokens join in one group while a request decodes; each one's greedy or
    seeded tokens are ``generate_ids``' on its prompt alone, and the running request's are unchanged."""
    model = tiny_model(max_seq_len=256)
    lengths = [1, 170, 7, 64, 2, 33, 120]
    prompts = [[(i * 31 + j * 7) % 256 for j in range(n)] for i, n in enumerate(lengths)]
    samplings = [
        SamplingConfig(max_new_tokens=12, temperature=0.0)
        if i % 2
        else SamplingConfig(max_new_tokens=12, temperature=0.9, top_p=0.9, seed=100 + i)
        for i in range(len(prompts))
    ]
    first = [5, 9, 200, 3]
    first_sampling = SamplingConfig(max_new_tokens=40, temperature=0.0)
    scheduler, groups, _ = started(model)
    rows_after, counted = [], scheduler.on_prefill
    scheduler.on_prefill = lambda requests: (rows_after.append(len(scheduler.rows)), counted(requests))
    try:
        running = {}
        thread = threading.Thread(target=lambda: running.update(run(scheduler, [first], [first_sampling])[0]))
        thread.start()
        wait_for_rows(scheduler, 1)
        together = run(scheduler, prompts, samplings)
        thread.join(timeout=60)
    finally:
        scheduler.stop(timeout=10)
    assert groups == [1, 7] and rows_after == [1, 8]  # one group of seven, joining the first as it decoded
    for prompt, sampling, got in zip(prompts, samplings, together):
        assert got["tokens"] == generate_ids(model, [prompt], sampling, device=CPU).tokens[0], len(prompt)
    assert running["tokens"] == generate_ids(model, [first], first_sampling, device=CPU).tokens[0]


def test_the_prefill_budget_bounds_a_group():
    """G x T (rows x longest prompt) stays within --max-prefill-tokens, the first request always joins, and 0
    prefills one prompt per step (the behaviour before groups)."""
    model, tok = tiny_model(max_seq_len=256), ByteTokenizer()
    sampling = SamplingConfig(max_new_tokens=2)

    def pick(budget: int, lengths: list[int]) -> int:
        scheduler = Scheduler(model, tok, device=CPU, max_batch=8, max_queue=8, max_prefill_tokens=budget)
        return len(scheduler._pick([Request([1] * n, sampling, None) for n in lengths]))

    assert pick(64, [20, 20, 20, 5]) == 3  # 3 x 20 = 60 fits; 4 x 20 = 80 does not
    assert pick(60, [20, 20, 20]) == 3 and pick(59, [20, 20, 20]) == 2  # the budget itself fits
    assert pick(64, [5, 30, 30]) == 2  # 2 x 30 = 60; 3 x 30 = 90
    assert pick(64, [100, 1]) == 1  # the first joins beyond the budget, alone
    assert pick(0, [3, 3, 3]) == 1
    assert pick(10_000, [200] * 8) == 8


def test_prefix_cache_gives_the_same_logits_and_tokens_and_prefills_only_the_suffix():
    """Requests sharing a 70-token system prompt: the later ones take its 4 full blocks (64 tokens) from the
    cache, and their first logits match a plain forward pass over the whole prompt to 1e-5, their greedy
    tokens match ``generate_ids``, and a run with the cache off gives the same tokens."""
    model = tiny_model(max_seq_len=256)
    system = [(j * 13 + 5) % 256 for j in range(70)]
    users = [[65 + k] * n for k, n in enumerate((3, 40, 1, 25))]
    prompts = [system + u for u in users]
    sampling = SamplingConfig(max_new_tokens=10, temperature=0.0)
    cached, groups, logits = started(model, prefix_cache_bytes=10_000_000)
    try:
        first = run(cached, prompts[:1], [sampling])
        rest = run(cached, prompts[1:], [sampling] * 3)  # one group, each with the cached prefix
    finally:
        cached.stop(timeout=10)
    plain, _, plain_logits = started(model, prefix_cache_bytes=0)
    try:
        uncached = run(plain, prompts, [sampling] * 4)
    finally:
        plain.stop(timeout=10)
    assert groups == [1, 3]
    assert first[0]["cached"] == 0 and [r["cached"] for r in rest] == [64, 64, 64]
    assert len(cached.prefix_cache) == 4 + 2 + 1  # 4 shared; 2 more of the 40-token user, 1 of the 25's
    with torch.no_grad():
        for prompt, got in zip(prompts, torch.cat(logits)):
            want = model(torch.tensor([prompt]))[0, -1]  # (V,) the plain forward pass
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for prompt, a, b in zip(prompts, first + rest, uncached):
        assert a["tokens"] == b["tokens"] == generate_ids(model, [prompt], sampling, device=CPU).tokens[0]
    assert all(r["cached"] == 0 for r in uncached) and len(plain.prefix_cache) == 0
    torch.testing.assert_close(torch.cat(logits), torch.cat(plain_logits), atol=1e-5, rtol=1e-5)


def test_a_prompt_that_is_all_cached_still_prefills_its_last_token():
    """The same 32-token prompt twice: the second takes one block (16 tokens), not two, from the cache (the
    last token is always fed, its hidden state gives the first logits), and generates the same tokens."""
    model = tiny_model(max_seq_len=128)
    prompt = list(range(40, 72))
    sampling = SamplingConfig(max_new_tokens=6, temperature=0.0)
    scheduler, _, _ = started(model, prefix_cache_bytes=10_000_000)
    try:
        a = run(scheduler, [prompt], [sampling])[0]
        b = run(scheduler, [prompt], [sampling])[0]
    finally:
        scheduler.stop(timeout=10)
    assert (a["cached"], b["cached"]) == (0, 16) and a["tokens"] == b["tokens"]


def test_prefix_cache_blocks_are_named_by_their_whole_prefix_and_evicted_least_recent_first():
    kv = torch.arange(2 * 2 * 1 * 48 * 1, dtype=torch.float32).reshape(2, 2, 1, 48, 1)  # (L, 2, Hkv, N, hd)
    one_block = kv[:, :, :, :BLOCK].nbytes
    cache = PrefixCache(budget_bytes=4 * one_block)
    a = list(range(48))
    cache.insert(a, kv)
    assert len(cache) == 3 and cache.bytes == 3 * one_block
    hit = cache.lookup(a, 47)  # only blocks wholly within the limit: 2 of them
    assert hit.tokens == 32 and torch.equal(hit.kv, kv[:, :, :, :32])
    b = [99] * 16 + a[16:48]  # blocks 1 and 2 hold the same tokens as a's, after another first block
    assert cache.lookup(b, 48).tokens == 0
    assert block_names(b, 3)[1] != block_names(a, 3)[1]
    cache.insert(b, kv)  # 3 new blocks: 6 > 4, so the 2 least recently used go (a's last two)
    assert len(cache) == 4 and cache.bytes == 4 * one_block
    assert cache.lookup(a, 48).tokens == 16 and cache.lookup(b, 48).tokens == 48
    assert PrefixCache(budget_bytes=0).insert(a, kv) is None and len(PrefixCache(0)) == 0


def test_a_sliding_window_model_gets_no_prefix_cache():
    model = tiny_model(sliding_window=8)
    scheduler = Scheduler(
        model, ByteTokenizer(), device=CPU, max_batch=2, max_queue=2, prefix_cache_bytes=10**7
    )
    assert scheduler.prefix_cache.budget == 0


def test_metrics_count_prefix_cache_hits_and_prefill_groups(server):
    """Two chat requests with the same long system prompt: the second finds every full block of its prompt
    but the last token's cached, /metrics counts one miss, one hit and those tokens, and both answers are
    the same greedy text."""
    import httpx

    def scrape() -> dict[str, float]:
        text = httpx.get(server.url + "/metrics", timeout=30).text
        out = {}
        for line in text.splitlines():
            if line.startswith("lmforge_prefi"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    system = "Qz7 (a marker no other test sends). You are a careful assistant: answer in one sentence."
    body = {
        "model": "tiny",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}],
        "max_tokens": 5,
        "temperature": 0,
    }
    before = scrape()
    first = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    second = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    after = scrape()

    def delta(name):
        return after[name] - before.get(name, 0.0)

    assert first["choices"][0]["message"] == second["choices"][0]["message"]
    prompt = first["usage"]["prompt_tokens"]
    assert prompt > len(system)  # one token per character (the ASCII tokenizer), and the template's
    assert delta("lmforge_prefix_cache_hits_total") == 1 and delta("lmforge_prefix_cache_misses_total") == 1
    assert delta("lmforge_prefix_cache_hit_tokens_total") == (prompt - 1) // BLOCK * BLOCK
    assert delta("lmforge_prefill_forwards_total") == 2
    assert after["lmforge_prefix_cache_blocks"] >= prompt // BLOCK


def test_the_options_reach_the_scheduler_and_bad_values_are_refused(checkpoint, monkeypatch):
    """`lmforge serve --max-prefill-tokens 0 --prefix-cache-mb 1.5` builds a scheduler with those settings;
    negative values are refused with a message naming the flag."""
    import lmforge.serve.app as app_module
    from lmforge.cli import build_parser
    from lmforge.cli.serve import run_serve
    from lmforge.errors import ConfigError
    from lmforge.infer.chat import default_template
    from lmforge.serve.app import ServeConfig, build_app, check_serve_config
    from tests.serve.conftest import ascii_tokenizer

    seen = {}

    def fake_open_server(model, cfg, *, device, on_notice, quantize=None):
        seen["cfg"] = cfg
        raise ConfigError("stop here")

    monkeypatch.setattr(app_module, "open_server", fake_open_server)
    args = build_parser().parse_args(
        ["serve", str(checkpoint), "--max-prefill-tokens", "0", "--prefix-cache-mb", "1.5", "--device", "cpu"]
    )
    try:
        run_serve(args)
    except ConfigError:
        pass
    assert (seen["cfg"].max_prefill_tokens, seen["cfg"].prefix_cache_mb) == (0, 1.5)
    defaults = build_parser().parse_args(["serve", str(checkpoint)])
    assert (defaults.max_prefill_tokens, defaults.prefix_cache_mb) == (2048, 256.0)
    for field, flag in (
        ("max_prefill_tokens", "--max-prefill-tokens -1"),
        ("prefix_cache_mb", "--prefix-cache-mb -1"),
    ):
        try:
            check_serve_config(ServeConfig(**{field: -1}))
        except ConfigError as exc:
            assert flag in str(exc)
        else:
            raise AssertionError(f"{field} = -1 was accepted")
    tokenizer = ascii_tokenizer()
    model = tiny_model(vocab_size=tokenizer.vocab_size)
    cfg = ServeConfig(max_prefill_tokens=0, prefix_cache_mb=1.5)
    app = build_app(
        model, tokenizer, template=default_template(tokenizer), cfg=cfg, model_name="m", device=CPU
    )
    scheduler = app.state.scheduler
    assert scheduler.max_prefill_tokens == 0 and scheduler.prefix_cache.budget == int(1.5 * 2**20)
