"""``lmforge serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the batching scheduler.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both stream server-sent events
with ``stream: true``), POST /v1/embeddings, GET /health, GET /metrics (Prometheus text), GET / (the chat
page). One scheduler thread owns the model; HTTP handlers only parse, queue, and relay text deltas.
``response_format`` and forced tool calls are enforced by a grammar (``serve/grammar.py``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hmac
import json
import logging
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.errors import ConfigError
from lmforge.infer.chat import ChatTemplate, special_token_ids
from lmforge.infer.generate import SamplingConfig
from lmforge.serve.embeddings import embed
from lmforge.serve.grammar import Grammars
from lmforge.serve.protocol import (
    POOLINGS,
    ApiError,
    Parsed,
    parse_embeddings,
    parse_json,
    parse_request,
    parse_tool_calls,
)
from lmforge.serve.scheduler import QueueFull, Request, Scheduler, ShuttingDown

logger = logging.getLogger(__name__)
PAGE = Path(__file__).parent / "static" / "chat.html"
ROUTES = (
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/health",
    "/metrics",
    "/",
)
SHUTTING_DOWN = ApiError(
    503, "the server is shutting down: the request was cancelled", kind="server_error", code="shutting_down"
)
OPEN_ROUTES = ("/health", "/")  # the page is static (no model output); it sends the key it is given


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """How the server runs; built once by the CLI."""

    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the one bound is reported)
    max_batch: int = 8
    max_queue: int = 64
    max_prefill_tokens: int = 2048  # per step: joining rows x longest uncached prompt; 0: one prompt alone
    prefix_cache_mb: float = 256.0  # keys/values of prompt prefixes kept for reuse; 0: no prefix cache
    api_key: str | None = None
    max_body_bytes: int = 1_000_000
    grace_seconds: float = 10.0  # on SIGTERM: how long running requests may finish before they are cancelled
    model_name: str | None = None  # what /v1/models lists; default: the model folder's name
    embedding_pooling: str = "last"  # /v1/embeddings: "last" (the last token's state) or "mean"

    def problems(self) -> list[str]:
        out = []
        if not 0 <= self.port <= 65535:
            out.append(f"--port {self.port} must be in 0..65535 (0: any free port)")
        if self.max_batch < 1:
            out.append(f"--max-batch {self.max_batch} must be >= 1")
        if self.max_queue < 1:
            out.append(f"--max-queue {self.max_queue} must be >= 1")
        if self.max_prefill_tokens < 0:
            out.append(
                f"--max-prefill-tokens {self.max_prefill_tokens} must be >= 0 (0: one prompt prefilled per step)"
            )
        if not self.prefix_cache_mb >= 0:
            out.append(f"--prefix-cache-mb {self.prefix_cache_mb} must be >= 0 (0: no prefix cache)")
        if self.max_body_bytes < 1024:
            out.append(f"--max-body-bytes {self.max_body_bytes} must be >= 1024")
        if not self.grace_seconds >= 0:
            out.append(f"--grace {self.grace_seconds} must be >= 0")
        if self.api_key is not None and not self.api_key:
            out.append("--api-key must not be empty")
        if self.embedding_pooling not in POOLINGS:
            out.append(f"--embedding-pooling {self.embedding_pooling} must be one of {', '.join(POOLINGS)}")
        return out


def check_serve_config(cfg: ServeConfig) -> None:
    problems = cfg.problems()
    if problems:
        raise ConfigError("invalid serve settings:\n  " + "\n  ".join(problems))


class Metrics:
    """Prometheus metrics in a registry of their own (several servers may live in one test process)."""

    def __init__(self, scheduler: Scheduler):
        import prometheus_client as prom

        self.registry = prom.CollectorRegistry()
        r = self.registry
        prom.ProcessCollector(registry=r)  # process_resident_memory_bytes, cpu seconds, open fds, ...
        prom.PlatformCollector(registry=r)
        prom.GCCollector(registry=r)
        self.requests = prom.Counter(
            "lmforge_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.prompt_tokens = prom.Counter("lmforge_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.completion_tokens = prom.Counter("lmforge_completion_tokens", "tokens generated", registry=r)
        self.finished = prom.Counter(
            "lmforge_finished_requests", "finished requests by reason", ["reason"], registry=r
        )
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        self.latency = prom.Histogram(
            "lmforge_request_latency_seconds", "queue to last token", buckets=buckets, registry=r
        )
        self.first_token = prom.Histogram(
            "lmforge_time_to_first_token_seconds", "queue to first token", buckets=buckets, registry=r
        )
        queue = prom.Gauge("lmforge_queue_depth", "requests waiting to join the batch", registry=r)
        queue.set_function(lambda: len(scheduler.waiting))
        batch = prom.Gauge("lmforge_batch_size", "requests decoding in the batch", registry=r)
        batch.set_function(lambda: len(scheduler.rows))
        self.prefills = prom.Counter(
            "lmforge_prefill_forwards",
            "prefill forward passes (each prefills a group of joining requests)",
            registry=r,
        )
        self.prefix_hits = prom.Counter(
            "lmforge_prefix_cache_hits", "prefilled requests that found a cached prompt prefix", registry=r
        )
        self.prefix_misses = prom.Counter(
            "lmforge_prefix_cache_misses", "prefilled requests that found no cached prompt prefix", registry=r
        )
        self.cached_tokens = prom.Counter(
            "lmforge_prefix_cache_hit_tokens",
            "prompt tokens taken from the prefix cache, not prefilled",
            registry=r,
        )
        cache_bytes = prom.Gauge(
            "lmforge_prefix_cache_bytes", "bytes of keys/values in the prefix cache", registry=r
        )
        cache_bytes.set_function(lambda: scheduler.prefix_cache.bytes)
        blocks = prom.Gauge(
            "lmforge_prefix_cache_blocks", "blocks (16 tokens) in the prefix cache", registry=r
        )
        blocks.set_function(lambda: len(scheduler.prefix_cache))

    def on_prefill(self, requests: list[Request]) -> None:  # on the scheduler thread
        self.prefills.inc()
        for request in requests:
            (self.prefix_hits if request.cached else self.prefix_misses).inc()
            self.cached_tokens.inc(request.cached)

    def on_finish(self, request: Request, final: dict) -> None:  # on the scheduler thread
        if request.tracker is not None:  # it was prefilled (the cached prefix included)
            self.prompt_tokens.inc(final["prompt_tokens"])
        self.completion_tokens.inc(final["completion_tokens"])
        self.finished.labels(final["finish_reason"]).inc()
        self.latency.observe(final["latency"])
        if request.first_token_at is not None:
            self.first_token.observe(final["time_to_first_token"])

    def render(self) -> bytes:
        import prometheus_client as prom

        return prom.generate_latest(self.registry)


class GilFreeEncoder:
    """``encode`` through ``encode_batch``: Hugging Face tokenizers hold the GIL in ``encode`` and release it
    in batch encoding, so a long prompt encoded on a worker thread leaves the event loop running (measured:
    a 960 kB prompt froze the loop's thread for 2.3 s through ``encode``, 0.02 s at most batched)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode_batch([text])[0]


def route_label(path: str) -> str:
    """The metrics label of a path: a label per unknown path would grow without bound."""
    if path in ROUTES:
        return path
    return "/v1/models" if path.startswith("/v1/models/") else "other"


class Guard:
    """The app's outermost middleware (plain ASGI): the API key, the Content-Length limit, the count of every
    answer by route and status, and an OpenAI error object (500) for anything a route lets escape."""

    def __init__(self, app, *, cfg: ServeConfig, metrics: Metrics):
        self.app, self.cfg, self.metrics = app, cfg, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, status = scope["path"], None

        async def counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                self.metrics.requests.labels(route_label(path), str(status)).inc()
            await send(message)

        refusal = self.refusal(path, Headers(scope=scope))
        if refusal is not None:
            await error_response(refusal)(scope, receive, counted)
            return
        try:
            await self.app(scope, receive, counted)
        except Exception:
            logger.exception("unhandled error answering %s %s", scope["method"], path)
            if status is None:  # once the answer has started, closing the connection is all that is left
                problem = ApiError(
                    500, "internal server error (the server's log has the details)", kind="server_error"
                )
                await error_response(problem)(scope, receive, counted)

    def refusal(self, path: str, headers: Headers) -> ApiError | None:
        if self.cfg.api_key is not None and path not in OPEN_ROUTES:
            header = headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), self.cfg.api_key.encode()):
                return ApiError(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer KEY'",
                    kind="authentication_error",
                    code="invalid_api_key",
                )
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.cfg.max_body_bytes:
            return ApiError(
                413,
                f"the request body is {length} bytes; the limit is {self.cfg.max_body_bytes} "
                "bytes (lmforge serve --max-body-bytes)",
                code="request_too_large",
            )
        return None


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _finish_reason(reason: str) -> str:
    return "length" if reason in ("length", "context") else "stop"


def busy(exc: Exception) -> ApiError:
    return ApiError(
        429,
        f"the server is busy: {exc}; retry later",
        kind="rate_limit_error",
        code="queue_full",
        headers={"Retry-After": "1"},
    )


def _grammars(tokenizer, vocab_size: int) -> Grammars | None:
    """The grammar engine over ``tokenizer``, or None (response_format and forced tool calls then answer 400):
    without llguidance, or for a tokenizer the engine cannot read (the server still serves the rest)."""
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return None
    try:
        return Grammars(tokenizer, vocab_size)
    except Exception as exc:  # a tokenizer whose token bytes cannot be read: no constrained decoding
        logger.warning("constrained decoding is off: the grammar engine cannot read the tokenizer (%s)", exc)
        return None


HELD = "<tool_call>"


def _shown_until(text: str) -> int:
    """How much of a streamed choice's text may go out as content while its tool calls are parsed at the end:
    everything before a ``<tool_call>`` tag, or before a tail that may be the tag's beginning."""
    at = text.find(HELD)
    if at >= 0:
        return at
    for keep in range(min(len(HELD) - 1, len(text)), 0, -1):
        if HELD.startswith(text[-keep:]):
            return len(text) - keep
    return len(text)


def build_app(
    model: torch.nn.Module,
    tokenizer,
    *,
    template: ChatTemplate,
    cfg: ServeConfig,
    model_name: str,
    device: torch.device,
):
    """The FastAPI application serving ``model``; its scheduler starts and stops with the app. (Long by choice:
    the routes are closures over one scheduler and its settings, declared together as the API they form.)"""
    scheduler = Scheduler(
        model,
        tokenizer,
        device=device,
        max_batch=cfg.max_batch,
        max_queue=cfg.max_queue,
        max_prefill_tokens=cfg.max_prefill_tokens,
        prefix_cache_bytes=int(cfg.prefix_cache_mb * 2**20),
    )
    metrics = Metrics(scheduler)
    scheduler.on_finish = metrics.on_finish
    scheduler.on_prefill = metrics.on_prefill
    specials = special_token_ids(tokenizer, template)
    end = template.eos_token
    template_stops = (end,) if end and specials.get(end) != tokenizer.eot_id else ()
    context = model.cfg.max_seq_len
    created = int(time.time())
    grammars = _grammars(tokenizer, model.cfg.vocab_size)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        await asyncio.to_thread(scheduler.stop, cfg.grace_seconds)

    app = FastAPI(title="lmforge serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler = scheduler
    app.state.grammars = grammars

    app.add_middleware(Guard, cfg=cfg, metrics=metrics)

    @app.exception_handler(StarletteHTTPException)
    async def no_route(http: HttpRequest, exc: StarletteHTTPException):
        """Unknown paths and wrong methods answer OpenAI error objects, like every other failure."""
        where = f"{http.method} {http.url.path}"
        if exc.status_code == 404:
            message, code = f"no route {where}: this server has {', '.join(ROUTES)}", "not_found"
        elif exc.status_code == 405:
            message, code = (
                f"{where} is not allowed (allowed: {exc.headers.get('allow')})",
                "method_not_allowed",
            )
        else:
            message, code = f"{where}: {exc.detail}", None
        return error_response(ApiError(exc.status_code, message, code=code, headers=exc.headers))

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": len(scheduler.rows), "waiting": len(scheduler.waiting)}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": model_name,
                    "object": "model",
                    "created": created,
                    "owned_by": "lmforge",
                    "context_length": context,
                }
            ],
        }

    @app.get("/v1/models/{name}")
    async def one_model(name: str):
        if name != model_name:
            return error_response(
                ApiError(
                    404,
                    f"the model '{name}' does not exist; this server serves '{model_name}'",
                    param="model",
                    code="model_not_found",
                )
            )
        return {"id": model_name, "object": "model", "created": created, "owned_by": "lmforge"}

    async def read_body(http: HttpRequest) -> bytes:
        """The body, refused as soon as it passes the limit: a chunked body has no Content-Length to check
        first, and reading it whole would let one client fill the server's memory."""
        chunks, size = [], 0
        async for chunk in http.stream():
            size += len(chunk)
            if size > cfg.max_body_bytes:
                raise ApiError(
                    413,
                    f"the request body is over the limit of {cfg.max_body_bytes} bytes "
                    "(lmforge serve --max-body-bytes)",
                    code="request_too_large",
                )
            chunks.append(chunk)
        return b"".join(chunks)

    encoder = GilFreeEncoder(tokenizer) if hasattr(tokenizer, "encode_batch") else tokenizer

    def parse(raw: bytes, chat: bool) -> Parsed:  # on a worker thread: rendering and encoding take time
        body = parse_json(raw, cfg.max_body_bytes)
        return parse_request(
            body,
            chat=chat,
            model_name=model_name,
            tokenizer=encoder,
            template=template,
            specials=specials,
            template_stops=template_stops,
            context=context,
            grammars=grammars,
        )

    async def cancel_on_disconnect(http: HttpRequest, requests: list[Request]) -> None:
        """Wait for the client to leave (the body is read: the next message is the disconnect), then cancel
        its request, which frees its batch slot at the next step. Text deltas arriving meanwhile do not
        delay it, as a check between deltas would."""
        while (await http.receive())["type"] != "http.disconnect":
            pass
        for request in requests:
            request.cancelled = True

    async def complete(http: HttpRequest, chat: bool):
        try:
            parsed = await asyncio.to_thread(parse, await read_body(http), chat)
        except ApiError as exc:
            return error_response(exc)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()  # (choice index, text delta, final)

        def emitter(index: int):
            def emit(delta: str | None, final: dict | None) -> None:  # on the scheduler thread
                with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody is listening
                    loop.call_soon_threadsafe(events.put_nowait, (index, delta, final))

            return emit

        requests = [
            Request(
                parsed.prompt,
                choice_sampling(parsed.sampling, i),
                emitter(i),
                top_logprobs=parsed.top_logprobs,
                constraint=None if parsed.grammar is None else grammars.constraint(parsed.grammar),
            )
            for i in range(parsed.n)
        ]
        try:
            scheduler.submit(*requests)
        except ShuttingDown:
            return error_response(SHUTTING_DOWN)
        except QueueFull as exc:
            return error_response(busy(exc))
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if parsed.stream:
            return StreamingResponse(
                stream(requests, events, parsed, chat, ident),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        watcher = asyncio.create_task(cancel_on_disconnect(http, requests))
        finals: list[dict | None] = [None] * len(requests)
        try:
            while any(final is None for final in finals):
                index, _, final = await events.get()
                if final is not None:
                    finals[index] = final
                    if final["finish_reason"] == "error":  # the answer is an error: the others stop
                        for request in requests:
                            request.cancelled = True
        finally:
            watcher.cancel()
        reasons = [final["finish_reason"] for final in finals]
        if "cancelled" in reasons and watcher.done() and not watcher.cancelled():
            return Response(status_code=499)  # the client left: nobody reads this
        if "error" in reasons:
            return error_response(ApiError(500, finals[reasons.index("error")]["error"], kind="server_error"))
        if "cancelled" in reasons:
            return error_response(SHUTTING_DOWN)
        choices = []
        for index, (request, final) in enumerate(zip(requests, finals)):
            reason = _finish_reason(final["finish_reason"])
            content = final["text"]  # the whole decode: a streamed delta can differ where bytes merge later
            logprobs = None
            if final["logprobs"] is not None:
                logprobs = await asyncio.to_thread(
                    openai_logprobs, tokenizer, request.generated, final["logprobs"], chat=chat
                )
            if chat:
                message = {"role": "assistant", "content": content}
                if parsed.tools:
                    message["content"], calls = parse_tool_calls(content, parsed.tools)
                    if calls:
                        message["tool_calls"], reason = calls, "tool_calls"
                choices.append(
                    {"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason}
                )
            else:
                choices.append(
                    {"index": index, "text": content, "logprobs": logprobs, "finish_reason": reason}
                )
        return {
            "id": ident,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": choices,
            "usage": _usage(finals),
        }

    async def stream(requests: list[Request], events: asyncio.Queue, parsed: Parsed, chat: bool, ident: str):
        now = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        sent = [0] * len(requests)  # per choice: the tokens whose log-probabilities have gone out
        texts = [""] * len(requests)  # per choice, with tools: the text so far, and how much went out
        shown = [0] * len(requests)

        def logprobs_since(index: int) -> dict | None:
            """The log-probabilities of the choice's tokens generated since its last chunk: over the whole
            stream they are those of the non-streamed answer."""
            request = requests[index]
            if request.top_logprobs is None:
                return None
            end = len(request.logprobs)  # the scheduler appends a token before its log-probabilities
            lps = request.logprobs[:end]
            out = openai_logprobs(tokenizer, request.generated[:end], lps, chat=chat, start=sent[index])
            sent[index] = end
            return out

        def chunk(
            index: int, delta: str | None, reason: str | None, role: bool = False, calls: list | None = None
        ) -> str:
            logprobs = None if role else logprobs_since(index)
            if role:
                piece = {"role": "assistant", "content": ""}
            elif calls:  # OpenAI's streamed form: each call with its index, whole here
                piece = {"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]}
            else:
                piece = {} if delta is None else {"content": delta}
            if chat:
                choice = {"index": index, "delta": piece, "logprobs": logprobs, "finish_reason": reason}
            else:
                choice = {"index": index, "text": delta or "", "logprobs": logprobs, "finish_reason": reason}
            out = {"id": ident, "object": kind, "created": now, "model": model_name, "choices": [choice]}
            return f"data: {json.dumps(out)}\n\n"

        finals: list[dict | None] = [None] * len(requests)
        ended = False
        try:
            if chat:
                for index in range(len(requests)):
                    yield chunk(index, None, None, role=True)
            while any(final is None for final in finals):
                index, delta, final = await events.get()
                if final is None and parsed.tools:  # content goes out up to a tool call's tag
                    texts[index] += delta
                    end = _shown_until(texts[index])
                    if end > shown[index]:
                        yield chunk(index, texts[index][shown[index] : end], None)
                        shown[index] = end
                    continue
                if final is None:
                    yield chunk(index, delta, None)
                    continue
                finals[index] = final
                if final["finish_reason"] in ("cancelled", "error"):
                    ended = True
                    for request in requests:  # the answer is an error: the other choices stop
                        request.cancelled = True
                    problem = SHUTTING_DOWN
                    if final["finish_reason"] == "error":
                        problem = ApiError(500, final["error"], kind="server_error")
                    yield f"data: {json.dumps(problem.body())}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                reason = _finish_reason(final["finish_reason"])
                if parsed.tools:
                    _, calls = parse_tool_calls(final["text"], parsed.tools)
                    if calls:
                        yield chunk(index, None, None, calls=calls)
                        reason = "tool_calls"
                    elif len(final["text"]) > shown[index]:
                        yield chunk(index, final["text"][shown[index] :], None)
                yield chunk(index, None, reason)
            ended = True
            if parsed.include_usage:
                out = {"id": ident, "object": kind, "created": now, "model": model_name, "choices": []}
                out["usage"] = _usage(finals)
                yield f"data: {json.dumps(out)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if not ended:  # the client went away: the scheduler drops the rows at its next step
                for request in requests:
                    request.cancelled = True

    @app.post("/v1/embeddings")
    async def embeddings(http: HttpRequest):
        def parse_embedding_body(raw: bytes):
            return parse_embeddings(
                parse_json(raw, cfg.max_body_bytes),
                model_name=model_name,
                tokenizer=encoder,
                vocab_size=model.cfg.vocab_size,
                context=context,
                pooling=cfg.embedding_pooling,
                dimensions=model.cfg.d_model,
            )

        try:
            request = await asyncio.to_thread(parse_embedding_body, await read_body(http))
        except ApiError as exc:
            return error_response(exc)
        vectors = []
        try:  # batches of --max-batch inputs, each a forward on the scheduler thread between decoding steps
            for start in range(0, len(request.inputs), cfg.max_batch):
                batch = request.inputs[start : start + cfg.max_batch]
                job = scheduler.call(lambda batch=batch: embed(model, batch, request.pooling, device))
                vectors.append(await asyncio.wrap_future(job))
        except ShuttingDown:
            return error_response(SHUTTING_DOWN)
        except QueueFull as exc:
            return error_response(busy(exc))
        data = []
        for index, vector in enumerate(torch.cat(vectors)):
            if request.base64:  # little-endian float32, as OpenAI sends it
                value = base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")
            else:
                value = vector.tolist()
            data.append({"object": "embedding", "index": index, "embedding": value})
        tokens = sum(len(ids) for ids in request.inputs)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return {"object": "list", "data": data, "model": model_name, "usage": usage}

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        return await complete(http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        return await complete(http, chat=True)

    return app


def openai_logprobs(tokenizer, tokens: list[int], logprobs: list, *, chat: bool, start: int = 0) -> dict:
    """The ``logprobs`` of a choice's tokens from ``start`` on, in OpenAI's shape: chat's ``content`` list, or
    the completions API's parallel lists (tokens, token_logprobs, top_logprobs, text_offset). ``bytes`` is
    null: a byte-level token's own bytes are not the UTF-8 of its text when it holds part of a character."""
    offsets = [] if chat else [len(tokenizer.decode(tokens[:n])) for n in range(start, len(tokens))]
    tokens, logprobs = tokens[start:], logprobs[start:]

    def text(token: int) -> str:
        return tokenizer.decode([token])

    if chat:
        content = [
            {
                "token": text(token),
                "logprob": lp,
                "bytes": None,
                "top_logprobs": [{"token": text(i), "logprob": v, "bytes": None} for i, v in best],
            }
            for token, (lp, best) in zip(tokens, logprobs)
        ]
        return {"content": content, "refusal": None}
    return {
        "tokens": [text(t) for t in tokens],
        "token_logprobs": [lp for lp, _ in logprobs],
        "top_logprobs": [{text(i): v for i, v in best} for _, best in logprobs],
        "text_offset": offsets,
    }


def _usage(finals: list[dict]) -> dict:
    """Usage of a request's choices: the prompt once (as OpenAI counts it), the completions summed."""
    p, c = finals[0]["prompt_tokens"], sum(final["completion_tokens"] for final in finals)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def choice_sampling(sampling: SamplingConfig, index: int) -> SamplingConfig:
    """Choice ``index`` of a request samples on its own: with a seed, its own (seed + index, within the
    64 bits a generator takes), so every choice is reproducible and the choices differ."""
    if sampling.seed is None or index == 0:
        return sampling
    return dataclasses.replace(sampling, seed=(sampling.seed + index) % 2**64)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port); port 0 picks a free port (read it from ``getsockname``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port} ({exc.strerror}): choose another --port, or 0 for any free port"
        ) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def open_server(
    model_path: str | Path,
    cfg: ServeConfig,
    *,
    device: torch.device,
    on_notice: Callable[[str], None] = logger.warning,
    quantize: str | None = None,
):
    """Load ``model_path`` (with ``quantize``d weights: "int8", "int4", ``infer.quantize``), build the app and
    bind the socket: returns (uvicorn.Server, socket, url)."""
    from lmforge.infer.chat import default_template
    from lmforge.infer.loading import load_for_inference

    check_serve_config(cfg)
    sock = bind(cfg.host, cfg.port)  # before the weights are read: a busy port fails fast
    loaded = load_for_inference(model_path, device=device, quantize=quantize)
    tokenizer = loaded.require_tokenizer()
    template = loaded.chat_template
    if template is None:
        template = default_template(tokenizer)
        on_notice(
            f"{loaded.directory} has no chat template: /v1/chat/completions uses the default lmforge "
            "template; a model not fine-tuned on it may not follow it"
        )
    template.check()
    name = cfg.model_name or Path(model_path).resolve().name
    app = build_app(loaded.model, tokenizer, template=template, cfg=cfg, model_name=name, device=device)
    # uvicorn cancels the tasks of connections still open when its own timeout ends, cutting streams with no
    # ending; so the scheduler cancels at the grace deadline (each client then gets its answer: an error
    # event and [DONE], or a 503) and uvicorn waits a margin past it for those answers to go out
    config = uvicorn.Config(
        app, log_level="info", timeout_graceful_shutdown=cfg.grace_seconds + DRAIN_MARGIN, access_log=False
    )
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return DrainingServer(config, app.state.scheduler, cfg.grace_seconds), sock, f"http://{shown}:{port}"


DRAIN_MARGIN = 5.0  # seconds uvicorn waits past the grace deadline for the cancelled requests' answers


class DrainingServer(uvicorn.Server):
    """uvicorn's server whose shutdown cancels the scheduler's requests ``grace`` seconds after it begins
    (they end with an answer), before uvicorn's own deadline cuts connections."""

    def __init__(self, config, scheduler: Scheduler, grace: float):
        super().__init__(config)
        self.scheduler, self.grace = scheduler, grace

    async def shutdown(self, sockets=None) -> None:
        deadline = asyncio.get_running_loop().call_later(self.grace, self.scheduler.close)
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()
