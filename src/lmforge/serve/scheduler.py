"""Continuous batching: one thread owns the model and decodes every running request in one batch.

Shape legend: B running requests, G joining requests, Hkv key/value heads, S cache length, hd head dim,
P prompt length, C cached prefix length, T longest uncached suffix, L layers, V vocab.

Design. The running requests share one ``KVCache`` whose rows are right-aligned: every row's last cached
token sits at column ``length - 1`` and the columns before a row's first token are masked out as padding,
so one decoding step feeds one token per row at column ``length``. A finished or cancelled request leaves
at the next step, and the cache is compacted so ``length`` is the longest remaining row: ``length`` never
exceeds the model's context.

Joining. At each step the requests waiting for free batch slots join together: their prompts are prefilled
in ONE forward pass (a group of G rows), then their keys and values are copied into the shared cache,
right-aligned; when a prompt is longer than ``length``, the other rows shift right. The group is bounded by
``max_prefill_tokens``: G x T (the padded tokens the forward computes) stays within it, except that the
first waiting request always joins, so a burst of long prompts stalls the running streams for one bounded
prefill per step. ``max_prefill_tokens`` 0 is the behaviour before groups: one prompt prefilled alone per
step. If a group's forward pass fails, its members are prefilled again one by one, so only a request whose
own prefill fails ends with an error.

Prefix cache. Before prefilling, each joining prompt is looked up in the ``PrefixCache`` (blocks of 16
tokens; see ``prefix_cache.py``); only the uncached suffix is fed, its position ids continuing after the
cached prefix. In the group's own cache, columns [0, C) hold the cached prefixes (right-aligned at C, the
longest) and columns [C, C + T) the suffixes (right-aligned at C + T), with the gaps masked out; every row's
last token is in the last column, whose hidden state gives the row's first logits. After the forward pass
each prompt's full blocks are added to the prefix cache. The last prompt token is never taken from the
cache, so every row feeds at least one token. Models with sliding-window attention get no prefix cache: the
window is measured on cache columns, which a gap would stretch.

Each row carries its own position ids and sampling settings (temperature, top-p, seed), so a request's
greedy output is the same whether it ran alone or in a batch, with or without a cached prefix: padding keys
add exact zeros to attention.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lmforge.infer.generate import SamplingConfig, TextTracker, next_tokens
from lmforge.model.transformer import KVCache, Transformer
from lmforge.serve.grammar import Constraint
from lmforge.serve.prefix_cache import PrefixCache

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests are waiting than the server's ``--max-queue`` allows."""


class ShuttingDown(Exception):
    """The server is draining: it takes no new requests."""


@dataclass(eq=False)
class Request:
    """One completion: prompt ids in, text deltas out through ``emit`` (called on the scheduler thread)."""

    prompt: list[int]
    sampling: SamplingConfig
    emit: Callable[[str | None, dict | None], None]  # (text delta, None) while running; (None, final) once
    top_logprobs: int | None = None  # None: no log-probabilities; k: each token's and its k most likely
    constraint: Constraint | None = None  # a grammar (response_format, forced tool call) masking each token
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    # filled by the scheduler
    generated: list[int] = field(default_factory=list)
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)  # per generated token
    tracker: TextTracker | None = None
    generator: torch.Generator | None = None
    position: int = 0  # position id of the next token fed
    budget: int = 0
    first_token_at: float | None = None
    cached: int = 0  # prompt tokens whose keys and values came from the prefix cache


def token_logprobs(logits: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """``token``'s log-probability under the model's logits (V,), before temperature and top-p (what the
    OpenAI API reports), and the ``k`` most likely tokens with theirs."""
    logprobs = logits.float().log_softmax(dim=-1)  # (V,)
    top = logprobs.topk(k) if k else None
    best = [] if top is None else [(int(i), float(v)) for v, i in zip(top.values, top.indices)]
    return float(logprobs[token]), best


class Scheduler:
    """Owns ``model`` on one thread; ``submit`` queues a request, the thread joins it into the batch."""

    def __init__(
        self,
        model: Transformer,
        tokenizer,
        *,
        device: torch.device,
        max_batch: int,
        max_queue: int,
        max_prefill_tokens: int = 2048,
        prefix_cache_bytes: int = 0,
    ):
        self.model, self.tokenizer, self.device = model.eval(), tokenizer, device
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_prefill_tokens = max_prefill_tokens  # 0: one prompt prefilled alone per step
        windowed = model.cfg.sliding_window is not None  # a gap in a row would stretch the window
        self.prefix_cache = PrefixCache(0 if windowed else prefix_cache_bytes)
        self.on_prefill: Callable[[list[Request]], None] | None = None  # metrics, after each group's forward
        self.context = model.cfg.max_seq_len
        self.dtype = next(model.parameters()).dtype
        self.on_finish: Callable[[Request, dict], None] | None = None  # metrics, on this thread
        self.waiting: collections.deque[Request] = collections.deque()
        self.rows: list[Request] = []
        self.jobs: collections.deque[tuple[Callable, concurrent.futures.Future]] = collections.deque()
        self.cache: KVCache | None = None
        self.logits: torch.Tensor | None = None  # (B, V) next-token logits of each running row
        self.wake = threading.Condition()
        self.stopping = False
        self.closing = False
        self.thread = threading.Thread(target=self._run, name="lmforge-scheduler", daemon=True)

    # -- called from the server -----------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def submit(self, *requests: Request) -> None:
        """Queue ``requests`` (the choices of one API request): all of them, or none."""
        with self.wake:
            if self.closing:
                raise ShuttingDown("the server is shutting down")
            # requests bound for free batch slots join at the next step (within the prefill budget): they
            # are not the queue that --max-queue bounds
            free = max(0, self.max_batch - len(self.rows))
            if len(self.waiting) + len(requests) > self.max_queue + free:
                raise QueueFull(
                    f"{len(self.waiting) - free} requests are waiting beyond the {self.max_batch} batch slots "
                    f"(--max-queue {self.max_queue})"
                )
            self.waiting.extend(requests)
            self.wake.notify()

    def call(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Run ``fn()`` on the scheduler thread (the model's owner) before its next decoding step: side work
        such as an embedding forward, never concurrent with a step. The future holds its result or error.
        At most ``max_queue`` jobs wait (a caller waits for each of its jobs before the next)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.wake:
            if self.closing:
                raise ShuttingDown("the server is shutting down")
            if len(self.jobs) >= self.max_queue:
                raise QueueFull(f"{len(self.jobs)} side jobs are waiting (--max-queue {self.max_queue})")
            self.jobs.append((fn, future))
            self.wake.notify()
        return future

    def close(self) -> None:
        """Take no new requests and cancel every queued or running one: each gets its final answer
        ('cancelled') at the next step, while the thread goes on."""
        with self.wake:
            self.closing = True
            for request in list(self.waiting) + self.rows:
                request.cancelled = True
            self.wake.notify()

    def stop(self, timeout: float) -> None:
        """Cancel everything still queued or running and wait for the thread to end."""
        self.close()
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join(timeout)

    @property
    def busy(self) -> int:
        return len(self.waiting) + len(self.rows)

    # -- the scheduler thread -------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self.wake:
                    while not self.stopping and not self.waiting and not self.rows and not self.jobs:
                        self.wake.wait()
                    jobs = list(self.jobs)
                    self.jobs.clear()
                    if self.stopping and not self.rows and not self.waiting and not jobs:
                        return
                    free = self.max_batch - len(self.rows)
                    candidates = list(itertools.islice(self.waiting, max(0, free)))
                for fn, future in jobs:
                    if future.set_running_or_notify_cancel():
                        try:
                            future.set_result(fn())
                        except Exception as exc:  # the job's caller gets the error; the batch goes on
                            future.set_exception(exc)
                joining = self._pick(candidates)
                if joining:
                    with self.wake:  # only this thread takes requests off the queue: they are its head
                        for _ in joining:
                            self.waiting.popleft()
                    self._join(joining)
                try:
                    if self.rows:
                        self._step()
                except Exception as exc:  # the batch's forward pass failed: every row ends, the server not
                    logger.exception("decoding step failed")
                    for request in self.rows:
                        self._finish(request, "error", error=f"{type(exc).__name__}: {exc}")
                    self.rows, self.cache, self.logits = [], None, None

    def _pick(self, candidates: list[Request]) -> list[Request]:
        """The head of the queue that joins at this step: while G x T (rows x longest uncached suffix, the
        padded tokens of the group's forward) fits ``max_prefill_tokens``; the first always joins."""
        group: list[Request] = []
        rows, longest = 0, 0
        for request in candidates:
            if not request.cancelled:
                suffix = len(request.prompt) - self.prefix_cache.cached_tokens(
                    request.prompt, len(request.prompt) - 1
                )
                cost = (rows + 1) * max(longest, suffix)
                if rows and (self.max_prefill_tokens == 0 or cost > self.max_prefill_tokens):
                    break
                rows, longest = rows + 1, max(longest, suffix)
            group.append(request)  # a cancelled request costs nothing: it is answered at the join
        return group

    def _join(self, requests: list[Request]) -> None:
        """Prefill ``requests`` as one group and add them to the batch; if the group's forward pass fails,
        prefill them one by one, so only the request whose own prefill fails ends with an error."""
        live = []
        for request in requests:
            if request.cancelled:
                self._finish(request, "cancelled")
                continue
            try:
                self._prepare(request)
            except Exception as exc:
                self._fail(request, exc, "prefill")
                continue
            live.append(request)
        if not live:
            return
        try:
            self._prefill(live)
            return
        except Exception as exc:  # the batch is untouched: _prefill changes it only at its last lines
            if len(live) == 1:
                self._fail(live[0], exc, "prefill")
                return
            logger.warning(
                "a group prefill of %d requests failed (%s); prefilling them one by one", len(live), exc
            )
        for request in live:
            try:
                self._prefill([request])
            except Exception as exc:  # its own prefill failed: the batch goes on without it
                self._fail(request, exc, "prefill")

    def _prepare(self, request: Request) -> None:
        """Set a joining request's budget, text tracker and generator (prefill does not draw from it)."""
        prompt = request.prompt
        request.budget = min(request.sampling.max_new_tokens, self.context - len(prompt))
        request.tracker = TextTracker(self.tokenizer, request.sampling.stop)
        if request.sampling.seed is not None:
            request.generator = torch.Generator(device=self.device).manual_seed(request.sampling.seed)
        request.position = len(prompt)

    def _prefill(self, requests: list[Request]) -> None:
        """One forward pass over the uncached suffixes of ``requests`` (G rows), then their keys and values
        go into the prefix cache and, right-aligned, into the batch's cache."""
        cfg, G = self.model.cfg, len(requests)
        hits = [self.prefix_cache.lookup(r.prompt, len(r.prompt) - 1) for r in requests]
        C = max(hit.tokens for hit in hits)
        T = max(len(r.prompt) - hit.tokens for r, hit in zip(requests, hits))
        own = KVCache.empty(cfg, G, C + T, device=self.device, dtype=self.dtype)
        own.key_mask.zero_()
        if self.cache is not None:
            own.rope = self.cache.rope  # a table of the whole context: positions < C + T are in it
        ids = torch.zeros(G, T, dtype=torch.long, device=self.device)  # (G, T)
        positions = torch.zeros(G, T, dtype=torch.long, device=self.device)  # (G, T), 0 on padding
        for i, (request, hit) in enumerate(zip(requests, hits)):
            c, s = hit.tokens, len(request.prompt) - hit.tokens
            if hit.kv is not None:  # (L, 2, Hkv, c, hd)
                for layer in range(cfg.n_layers):
                    own.keys[layer][i, :, C - c : C] = hit.kv[layer, 0]
                    own.values[layer][i, :, C - c : C] = hit.kv[layer, 1]
                own.key_mask[i, C - c : C] = True
            ids[i, T - s :] = torch.tensor(request.prompt[c:], dtype=torch.long, device=self.device)
            positions[i, T - s :] = torch.arange(c, c + s, device=self.device)
            own.key_mask[i, C + T - s :] = True
        own.length = C
        own.padded = not bool(own.key_mask.all())
        hidden = self.model.hidden_states(ids, position_ids=positions, cache=own)  # (G, T, d_model)
        logits = self.model.lm_head(hidden[:, -1])  # (G, V)
        prompts = []  # per request: its prompt's keys and values (L, 2, Hkv, P, hd), gaps removed
        for i, (request, hit) in enumerate(zip(requests, hits)):
            c, s = hit.tokens, len(request.prompt) - hit.tokens
            columns = torch.cat([torch.arange(C - c, C), torch.arange(C + T - s, C + T)]).to(
                self.device
            )  # (P,)
            kv = torch.stack(
                [torch.stack([own.keys[n][i], own.values[n][i]]) for n in range(cfg.n_layers)]
            )  # (L, 2, Hkv, C + T, hd)
            prompts.append(kv[:, :, :, columns])
        old_length = self.cache.length if self.cache is not None else 0
        length = max([old_length] + [len(r.prompt) for r in requests])
        B = len(self.rows)
        cache = KVCache.empty(cfg, B + G, self.context, device=self.device, dtype=self.dtype)
        cache.key_mask.zero_()
        if self.cache is not None:
            shift = length - old_length
            for layer in range(cfg.n_layers):
                cache.keys[layer][:B, :, shift:length] = self.cache.keys[layer][:, :, :old_length]
                cache.values[layer][:B, :, shift:length] = self.cache.values[layer][:, :, :old_length]
            cache.key_mask[:B, shift:length] = self.cache.key_mask[:, :old_length]
        for i, (request, kv) in enumerate(zip(requests, prompts)):
            start = length - len(request.prompt)
            for layer in range(cfg.n_layers):
                cache.keys[layer][B + i, :, start:length] = kv[layer, 0]
                cache.values[layer][B + i, :, start:length] = kv[layer, 1]
            cache.key_mask[B + i, start:length] = True
        cache.key_mask[:, length:] = True  # columns still to be written are real tokens of every row
        logits = logits if self.logits is None else torch.cat([self.logits, logits])  # (B + G, V)
        for request, kv in zip(requests, prompts):
            self.prefix_cache.insert(request.prompt, kv)
        self._install(cache, length)  # nothing of the batch changes before this line: a failure leaves it
        self.rows.extend(requests)
        self.logits = logits
        for request, hit in zip(requests, hits):
            request.cached = hit.tokens
        if self.on_prefill is not None:
            try:
                self.on_prefill(requests)
            except Exception:  # metrics must not end the requests or the thread
                logger.exception("on_prefill failed")

    def _step(self) -> None:
        """Choose every row's next token, retire finished rows, then feed the others one token each."""
        assert self.cache is not None and self.logits is not None
        keep: list[int] = []
        for i, request in enumerate(self.rows):
            try:
                reason = self._advance(request, self.logits[i : i + 1])
            except Exception as exc:  # this row's sampling or text failed: only this row ends
                self._fail(request, exc, "sampling")
                continue
            if reason is None:
                keep.append(i)
            else:
                self._finish(request, reason)
        if not keep:
            self.rows, self.cache, self.logits = [], None, None
            return
        if len(keep) < len(self.rows):
            self._retire(keep)
        ids = torch.tensor([[r.generated[-1]] for r in self.rows], device=self.device)  # (B, 1)
        positions = torch.tensor([[r.position] for r in self.rows], device=self.device)  # (B, 1)
        hidden = self.model.hidden_states(ids, position_ids=positions, cache=self.cache)
        self.logits = self.model.lm_head(hidden[:, -1])  # (B, V)
        for request in self.rows:
            request.position += 1

    def _advance(self, request: Request, logits: torch.Tensor) -> str | None:
        """Sample one token for ``request`` and stream its text; the finish reason when it is done."""
        if request.cancelled:
            return "cancelled"
        constraint, raw = request.constraint, logits
        if constraint is not None:  # end-of-text is allowed only where the grammar accepts
            logits = logits.masked_fill(~constraint.allowed().to(logits.device), float("-inf"))  # (1, V)
        token = int(next_tokens(logits, None, request.sampling, request.generator)[0])
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
        if token == self.tokenizer.eot_id:
            return "stop"
        request.generated.append(token)
        if constraint is not None:
            constraint.accept(token)
        if request.top_logprobs is not None:  # the model's own, before the grammar's mask
            request.logprobs.append(token_logprobs(raw[0], token, request.top_logprobs))
        assert request.tracker is not None
        delta = request.tracker.update(request.generated)
        if delta:
            request.emit(delta, None)
        if request.tracker.stopped:
            return "stop"
        if constraint is not None and constraint.complete:  # the grammar admits nothing more
            return "stop"
        if len(request.generated) >= request.budget:
            return "length"
        return None

    def _retire(self, keep: list[int]) -> None:
        """Drop the rows not in ``keep`` and compact the cache so its length is the longest kept row."""
        assert self.cache is not None and self.logits is not None
        old = self.cache
        rows = [self.rows[i] for i in keep]
        longest = max(r.position for r in rows)
        offset = old.length - longest
        index = torch.tensor(keep, device=self.device)
        cache = KVCache.empty(self.model.cfg, len(rows), self.context, device=self.device, dtype=self.dtype)
        for layer in range(self.model.cfg.n_layers):
            cache.keys[layer][:, :, :longest] = old.keys[layer][index, :, offset : old.length]
            cache.values[layer][:, :, :longest] = old.values[layer][index, :, offset : old.length]
        cache.key_mask[:, :longest] = old.key_mask[index, offset : old.length]
        self.rows, self.logits = rows, self.logits[index]
        self._install(cache, longest)

    def _install(self, cache: KVCache, length: int) -> None:
        """Make ``cache`` (filled up to ``length``) the batch's cache: the padding mask is applied only when
        some row has padding (membership changes are rare next to steps), and the RoPE table is reused."""
        cache.length = length
        cache.padded = not bool(cache.key_mask[:, :length].all())
        if self.cache is not None:
            cache.rope = self.cache.rope
        self.cache = cache

    def _fail(self, request: Request, exc: Exception, stage: str) -> None:
        logger.error("a request failed in %s: %s: %s", stage, type(exc).__name__, exc, exc_info=exc)
        self._finish(request, "error", error=f"{type(exc).__name__}: {exc}")

    def _finish(self, request: Request, reason: str, error: str | None = None) -> None:
        flush = request.tracker is not None and reason not in ("cancelled", "error")
        tail = request.tracker.flush() if flush else ""
        if tail:
            request.emit(tail, None)
        final = {
            "finish_reason": reason,
            "prompt_tokens": len(request.prompt),
            "completion_tokens": len(request.generated),
            "text": request.tracker.text if request.tracker is not None else "",
            "latency": time.perf_counter() - request.submitted,
            "time_to_first_token": (request.first_token_at or time.perf_counter()) - request.submitted,
            "error": error,
            "logprobs": request.logprobs if request.top_logprobs is not None else None,
        }
        if self.on_finish is not None:
            try:
                self.on_finish(request, final)
            except Exception:  # metrics must not end the request or the thread
                logger.exception("on_finish failed")
        request.emit(None, final)
