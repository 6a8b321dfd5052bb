"""The batching scheduler: a request's greedy tokens are the same alone and in a batch of mixed lengths, and
equal to ``generate_ids`` (the reference decoding loop)."""

from __future__ import annotations

import threading

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
    """A request whose prefill raises gets an error; the request already decoding goes on unharmed."""
    torch.manual_seed(0)
    model, tok = tiny_model(), ByteTokenizer()
    tok.eot_id = None
    scheduler = Scheduler(model, tok, device=torch.device("cpu"), max_batch=8, max_queue=16)
    real = Scheduler._join

    def join(self, request):
        if request.sampling.seed == 666:
            raise RuntimeError("injected prefill failure")
        return real(self, request)

    monkeypatch.setattr(Scheduler, "_join", join)
    scheduler.start()
    try:
        clean = run_all(scheduler, ["hello there"], [30])[0]
        both = run_all(scheduler, ["hello there", "xy"], [30, 5], [None, 666])
    finally:
        scheduler.stop(timeout=10)
    assert both[1]["finish_reason"] == "error" and "injected prefill failure" in both[1]["error"]
    assert both[0]["finish_reason"] == "length" and both[0]["tokens"] == clean["tokens"]


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
