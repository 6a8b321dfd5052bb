"""The batching scheduler: a request's greedy tokens are the same alone and in a batch of mixed lengths, and
equal to ``generate_ids`` (the reference decoding loop)."""

from __future__ import annotations

import threading

import torch

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


def run_all(scheduler: Scheduler, prompts: list[str], budgets: list[int]) -> list[dict]:
    tok = ByteTokenizer()
    finals: list[dict | None] = [None] * len(prompts)
    done = threading.Semaphore(0)

    def emitter(i):
        def emit(delta, final):
            if final is not None:
                finals[i] = final
                done.release()

        return emit

    requests = [
        Request(tok.encode(p), SamplingConfig(max_new_tokens=n, temperature=0.0), emitter(i))
        for i, (p, n) in enumerate(zip(prompts, budgets))
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


def test_queue_bound():
    scheduler = Scheduler(tiny_model(), ByteTokenizer(), device=torch.device("cpu"), max_batch=1, max_queue=1)
    request = Request([1, 2], SamplingConfig(max_new_tokens=2, temperature=0.0), lambda d, f: None)
    scheduler.submit(request)  # not started: it stays queued
    try:
        scheduler.submit(Request([1], request.sampling, lambda d, f: None))
    except QueueFull as exc:
        assert "--max-queue 1" in str(exc)
    else:
        raise AssertionError("a second request should not fit a queue of 1")
