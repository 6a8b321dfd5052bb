"""The batching scheduler: a request's greedy tokens are the same alone and in a batch of mixed lengths, and
equal to ``generate_ids`` (the reference decoding loop)."""

from __future__ import annotations

import threading
import time

import torch

import lmforge.serve.scheduler as scheduler_module
from lmforge.infer.generate import SamplingConfig, generate_ids
from lmforge.serve.scheduler import QueueFull, Request, Scheduler
from tests.infer.conftest import ByteTokenizer, tiny_model

PROMPTS = [
    "a",
    "hello there",
    "The quick brown fox",
    "xy",
    "1234567890abcdef",
    "zz top",
    "q",
    "mixed LENGTHS!",
]
BUDGETS = [5, 20, 9, 14, 3, 17, 11, 8]


def run_all(scheduler: Scheduler, prompts: list[str], budgets: list[int], seeds=None) -> list[dict]:
    tok = ByteTokenizer()
    seeds = seeds or [None] * len(prompts)
    finals: list[dict | None] = [None] * len(prompts)
    done = threading.Semaphore(0)

    def emitter(i):
        def emit(delta, final):
            if final is not None:
                finals[i] = final
                done.release()

        return emit

    requests = [
        Request(tok.encode(p), SamplingConfig(max_new_tokens=n, temperature=0.0, seed=s), emitter(i))
        for i, (p, n, s) in enumerate(zip(prompts, budgets, seeds))
    ]
    for r in requests:
        scheduler.submit(r)
    for _ in prompts:
        assert done.acquire(timeout=60)
    return [dict(f, tokens=r.generated) for f, r in zip(finals, requests)]


def test_batched_greedy_equals_alone_and_reference():
    torch.manual_seed(0)
    model, tok = tiny_model(), ByteTokenizer()
    tok.eot_id = None  # random weights: let every row run its whole budget
    scheduler = Scheduler(model, tok, device=torch.device("cpu"), max_batch=8, max_queue=16)
    scheduler.start()
    try:
        together = run_all(scheduler, PROMPTS, BUDGETS)  # rows leave at different steps
        alone = [run_all(scheduler, [p], [n])[0] for p, n in zip(PROMPTS, BUDGETS)]
    finally:
        scheduler.stop(timeout=10)
    for i, (a, b) in enumerate(zip(together, alone)):
        assert a["tokens"] == b["tokens"], PROMPTS[i]
        assert a["finish_reason"] == "length" and len(a["tokens"]) == BUDGETS[i]
        sampling = SamplingConfig(max_new_tokens=BUDGETS[i], temperature=0.0)
        ref = generate_ids(model, [tok.encode(PROMPTS[i])], sampling, device=torch.device("cpu"))
        assert a["tokens"] == ref.tokens[0]


def test_a_failing_row_fails_alone(monkeypatch):
    """A failure inside one row of a running batch of 8 (its sampling raises at its 6th token) ends that
    request with an error; the other 7 finish with the same tokens as in a run without the failure."""
    torch.manual_seed(0)
    model, tok = tiny_model(), ByteTokenizer()
    tok.eot_id = None
    budgets = [20] * len(PROMPTS)  # everyone is still decoding when row 3 fails
    seeds = [None, None, None, 666, None, None, None, None]  # 666 marks the row that fails
    scheduler = Scheduler(model, tok, device=torch.device("cpu"), max_batch=8, max_queue=16)
    scheduler.start()
    try:
        clean = run_all(scheduler, PROMPTS, budgets, seeds)
        real, calls = scheduler_module.next_tokens, []

        def failing(logits, seen, sampling, generator):
            if sampling.seed == 666:
                calls.append(len(scheduler.rows))
                if len(calls) == 6:
                    raise RuntimeError("injected failure")
            return real(logits, seen, sampling, generator)

        monkeypatch.setattr(scheduler_module, "next_tokens", failing)
        hurt = run_all(scheduler, PROMPTS, budgets, seeds)
    finally:
        scheduler.stop(timeout=10)
    assert calls[-1] == 8  # it failed inside a full batch
    assert hurt[3]["finish_reason"] == "error" and "injected failure" in hurt[3]["error"]
    assert hurt[3]["tokens"] == clean[3]["tokens"][:5]
    for i in range(len(PROMPTS)):
        if i != 3:
            assert hurt[i]["finish_reason"] == "length" and hurt[i]["error"] is None
            assert hurt[i]["tokens"] == clean[i]["tokens"] and hurt[i]["text"] == clean[i]["text"]
    assert scheduler_module.next_tokens is failing  # the injection really was in place


def test_a_failing_prefill_fails_alone(monkeypatch):
    """A request whose prefill raises gets an error; the request already decoding goes on unharmed, and so
    does the request that joined in the same prefill group (the group is prefilled again one by one)."""
    torch.manual_seed(0)
    model, tok = tiny_model(), ByteTokenizer()
    tok.eot_id = None
    scheduler = Scheduler(model, tok, device=torch.device("cpu"), max_batch=8, max_queue=16)
    real, groups = Scheduler._prefill, []

    def prefill(self, requests):
        groups.append(len(requests))
        if any(r.sampling.seed == 666 for r in requests):
            raise RuntimeError("injected prefill failure")
        return real(self, requests)

    monkeypatch.setattr(Scheduler, "_prefill", prefill)
    scheduler.start()
    try:
        clean = run_all(scheduler, ["hello there", "zz top"], [30, 8])
        groups.clear()
        scheduler.submit(Request(tok.encode("warm up"), SamplingConfig(max_new_tokens=50), lambda d, f: None))
        deadline = time.monotonic() + 30
        while not scheduler.rows:  # it decodes while the three join
            assert time.monotonic() < deadline
            time.sleep(0.001)
        both = run_all(scheduler, ["hello there", "xy", "zz top"], [30, 5, 8], [None, 666, None])
    finally:
        scheduler.stop(timeout=10)
    assert both[1]["finish_reason"] == "error" and "injected prefill failure" in both[1]["error"]
    assert both[0]["finish_reason"] == "length" and both[0]["tokens"] == clean[0]["tokens"]
    assert both[2]["finish_reason"] == "length" and both[2]["tokens"] == clean[1]["tokens"]
    assert groups[1:] == [3, 1, 1, 1]  # a group of three failed, then each was prefilled alone


def test_queue_bound():
    """--max-queue bounds the requests waiting beyond the free batch slots: with 2 slots free and a queue of
    1, three requests are accepted (two bound for the slots) and the fourth is refused."""
    scheduler = Scheduler(tiny_model(), ByteTokenizer(), device=torch.device("cpu"), max_batch=2, max_queue=1)
    sampling = SamplingConfig(max_new_tokens=2, temperature=0.0)
    for _ in range(3):
        scheduler.submit(Request([1, 2], sampling, lambda d, f: None))  # not started: they stay queued
    try:
        scheduler.submit(Request([1], sampling, lambda d, f: None))
    except QueueFull as exc:
        assert "--max-queue 1" in str(exc) and "1 requests are waiting beyond the 2 batch slots" in str(exc)
    else:
        raise AssertionError("a fourth request should not fit 2 free slots and a queue of 1")
    scheduler.rows = [Request([1], sampling, lambda d, f: None)]  # one slot taken: one fewer is admitted
    scheduler.waiting.pop()
    try:
        scheduler.submit(Request([1], sampling, lambda d, f: None))
    except QueueFull:
        pass
    else:
        raise AssertionError("with 1 slot free and 2 waiting, the queue of 1 is full")


def run_requests(scheduler: Scheduler, requests: list[Request]) -> list[dict]:
    """Submit ``requests`` (each with ``emit`` unset) together; their final dicts with the generated ids."""
    finals: list[dict | None] = [None] * len(requests)
    done = threading.Semaphore(0)
    for i, r in enumerate(requests):

        def emit(delta, final, i=i):
            if final is not None:
                finals[i] = final
                done.release()

        r.emit = emit
        scheduler.submit(r)
    for _ in requests:
        assert done.acquire(timeout=60)
    return [dict(f, tokens=r.generated) for f, r in zip(finals, requests)]


def started(model, tok, **kw) -> Scheduler:
    scheduler = Scheduler(model, tok, device=torch.device("cpu"), **{"max_batch": 8, "max_queue": 16, **kw})
    scheduler.start()
    return scheduler


def test_seeded_sampling_follows_each_requests_seed_alone_and_in_a_batch():
    """A sampled request with a seed draws what ``generate_ids`` draws with that seed, whatever runs beside
    it; another seed draws other tokens."""
    model, tok = tiny_model(), ByteTokenizer()
    tok.eot_id = None
    cpu = torch.device("cpu")

    def sampling(seed):
        return SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=seed)

    prompts = [tok.encode(p) for p in ("seeded", "other row", "x")]
    seeds = [7, 8, 9]
    scheduler = started(model, tok)
    try:
        alone = [run_requests(scheduler, [Request(p, sampling(s), None)])[0] for p, s in zip(prompts, seeds)]
        together = run_requests(scheduler, [Request(p, sampling(s), None) for p, s in zip(prompts, seeds)])
        same_prompt = run_requests(scheduler, [Request(prompts[0], sampling(s), None) for s in (7, 8)])
    finally:
        scheduler.stop(timeout=10)
    for p, s, a, b in zip(prompts, seeds, alone, together):
        ref = generate_ids(model, [p], sampling(s), device=cpu).tokens[0]
        assert a["tokens"] == ref and b["tokens"] == ref
    assert same_prompt[0]["tokens"] == alone[0]["tokens"]
    assert same_prompt[1]["tokens"] != same_prompt[0]["tokens"]  # another seed, another draw


def test_a_budget_past_the_context_ends_at_the_context():
    """max_new_tokens beyond the room left after the prompt: the request stops when the context is full,
    with the tokens ``generate_ids`` gives (which stops there too)."""
    model, tok = tiny_model(), ByteTokenizer()  # a context of 64 tokens
    tok.eot_id = None
    prompt = tok.encode("x" * 58)
    sampling = SamplingConfig(max_new_tokens=20, temperature=0.0)
    scheduler = started(model, tok)
    try:
        (final,) = run_requests(scheduler, [Request(prompt, sampling, None)])
    finally:
        scheduler.stop(timeout=10)
    ref = generate_ids(model, [prompt], sampling, device=torch.device("cpu"))
    assert ref.finish_reasons == ["context"] and len(ref.tokens[0]) == 64 - 58
    assert final["finish_reason"] == "length" and final["error"] is None
    assert final["tokens"] == ref.tokens[0] and final["completion_tokens"] == 6


def test_end_of_text_ends_the_request_and_is_not_part_of_it():
    """With the model's 4th greedy token as end-of-text, a request gets what ``generate_ids`` with that
    ``eos_id`` gets: the tokens before it, no end-of-text among them, finish reason stop."""
    model, tok = tiny_model(), ByteTokenizer()
    cpu = torch.device("cpu")
    prompt = tok.encode("hello there")
    sampling = SamplingConfig(max_new_tokens=10, temperature=0.0)
    free = generate_ids(model, [prompt], sampling, device=cpu).tokens[0]
    tok.eot_id = free[3]
    ref = generate_ids(model, [prompt], sampling, device=cpu, eos_id=tok.eot_id)
    assert ref.finish_reasons == ["eos"] and tok.eot_id not in ref.tokens[0]
    scheduler = started(model, tok)
    try:
        (final,) = run_requests(scheduler, [Request(prompt, sampling, None)])
    finally:
        scheduler.stop(timeout=10)
    assert final["finish_reason"] == "stop" and final["tokens"] == ref.tokens[0]
    assert final["completion_tokens"] == len(ref.tokens[0]) and final["text"] == tok.decode(ref.tokens[0])


def test_stop_cancels_the_running_and_the_queued_requests():
    model, tok = tiny_model(), ByteTokenizer()
    tok.eot_id = None
    scheduler = started(model, tok, max_batch=1)
    finals: list[dict] = []
    done = threading.Semaphore(0)

    def emit(delta, final):
        if final is not None:
            finals.append(final)
            done.release()

    sampling = SamplingConfig(max_new_tokens=59, temperature=0.0)
    requests = [Request(tok.encode(p), sampling, emit) for p in ("first", "second", "third")]
    for r in requests:
        scheduler.submit(r)
    deadline = time.monotonic() + 30
    while not scheduler.rows:  # the first is decoding, the others wait (a batch of one)
        assert time.monotonic() < deadline
        time.sleep(0.001)
    scheduler.stop(timeout=30)
    assert not scheduler.thread.is_alive()
    for _ in requests:
        assert done.acquire(timeout=1)
    assert [f["finish_reason"] for f in finals] == ["cancelled"] * 3
    assert requests[2].generated == [] and finals[-1]["completion_tokens"] == 0
