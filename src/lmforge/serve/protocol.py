"""Parse and check OpenAI-style request bodies: every problem becomes an ``ApiError`` with the OpenAI error
object (message, type, param, code) and an HTTP status, before anything reaches the scheduler."""

from __future__ import annotations

import json
from dataclasses import dataclass

from lmforge.errors import DataError
from lmforge.infer.chat import ChatTemplate, check_messages, encode_chat
from lmforge.infer.generate import SamplingConfig

MAX_DEPTH = 32  # JSON nesting: a chat body needs 4 levels (body, messages, message, content parts)
MIN_TEMPERATURE = 1e-3  # below it logits / temperature overflow float32 to inf and sampling fails: use 0
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
MAX_CHOICES = 16  # n: each choice takes a batch slot
MAX_STOP_CHARS = 1000  # a stop string is matched against the text at every step of the shared batch


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Parsed:
    """A checked request: prompt token ids, sampling settings, and how to answer."""

    model: str
    prompt: list[int]
    sampling: SamplingConfig
    stream: bool
    include_usage: bool
    top_logprobs: int | None = None  # None: no log-probabilities
    n: int = 1  # choices, sampled independently


def parse_json(raw: bytes, max_body_bytes: int) -> dict:
    if len(raw) > max_body_bytes:
        raise ApiError(
            413,
            f"the request body is {len(raw)} bytes; the limit is {max_body_bytes} bytes "
            "(lmforge serve --max-body-bytes)",
            code="request_too_large",
        )
    try:
        body = json.loads(raw)
    except RecursionError:
        body = None  # nested beyond the interpreter's limit: reported as too deep below
    except ValueError as exc:  # not JSON, not UTF-8, or an integer beyond Python's 4300 digits
        raise ApiError(400, f"the request body is not valid JSON ({exc})", code="invalid_json") from None
    if body is None or _depth(body) > MAX_DEPTH:
        raise ApiError(
            400, f"the request body is nested more than {MAX_DEPTH} levels deep", code="invalid_json"
        )
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _depth(value) -> int:
    """How deeply ``value`` nests lists and objects (a scalar is 0), without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        value, level = todo.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        if level > MAX_DEPTH:
            break
        todo.extend((child, level + 1) for child in children)
    return deepest


def _typed(body: dict, key: str, types: tuple, default, what: str):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise ApiError(
            400, f"'{key}' must be {what}, got {json.dumps(value)[:80]}", param=key, code="invalid_type"
        )
    return value


def _number(body: dict, key: str, default: float) -> float:
    value = _typed(body, key, (int, float), default, "a number")
    try:
        return float(value)
    except OverflowError:  # an integer beyond float range
        raise ApiError(400, f"'{key}' is out of range", param=key, code="invalid_value") from None


def _plain_messages(messages):
    """Messages as the chat template takes them: the ``developer`` role (OpenAI's newer name for the system
    message) becomes ``system``, and content given as a list of text parts becomes their text, joined by
    newlines (as vLLM does). Anything else is left for ``check_messages`` to refuse."""
    if not isinstance(messages, list):
        return messages
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            out.append(message)
            continue
        message = dict(message)
        if message.get("role") == "developer":
            message["role"] = "system"
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not (
                    isinstance(part, dict)
                    and part.get("type") == "text"
                    and isinstance(part.get("text"), str)
                ):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ApiError(
                        400,
                        f"messages[{i}].content[{j}] is a {kind!r} part; this server reads text parts only "
                        "({'type': 'text', 'text': ...})",
                        param="messages",
                    )
                texts.append(part["text"])
            message["content"] = "\n".join(texts)
        out.append(message)
    return out


def parse_request(
    body: dict,
    *,
    chat: bool,
    model_name: str,
    tokenizer,
    template: ChatTemplate | None,
    specials: dict[str, int],
    template_stops: tuple[str, ...],
    context: int,
) -> Parsed:
    """The checked request of a /v1/completions (``chat=False``) or /v1/chat/completions body. (Long by
    choice: one field checked after another, in the order of the OpenAI reference, each with its error.)"""
    model = _typed(body, "model", (str,), model_name, "a string")
    if model != model_name:
        raise ApiError(
            404,
            f"the model '{model}' does not exist; this server serves '{model_name}'",
            param="model",
            code="model_not_found",
        )
    n = _typed(body, "n", (int,), 1, "an integer")
    if not 1 <= n <= MAX_CHOICES:
        raise ApiError(400, f"'n'={n} must be between 1 and {MAX_CHOICES}", param="n")
    stream = _typed(body, "stream", (bool,), False, "a boolean")
    options = _typed(body, "stream_options", (dict,), {}, "an object")
    temperature = _number(body, "temperature", 1.0)
    top_p = _number(body, "top_p", 1.0)
    seed = _typed(body, "seed", (int,), None, "an integer")
    stop = _typed(body, "stop", (str, list), [], "a string or a list of strings")
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop) or len(stop) > 4:
        raise ApiError(
            400,
            f"'stop' must be a non-empty string of at most {MAX_STOP_CHARS} characters, or a list of up "
            "to 4 of them",
            param="stop",
        )
    if not (0.0 <= temperature <= 2.0 and (temperature == 0.0 or temperature >= MIN_TEMPERATURE)):
        raise ApiError(
            400,
            f"'temperature'={temperature} must be 0 (greedy) or between {MIN_TEMPERATURE} and 2",
            param="temperature",
        )
    if not 0.0 < top_p <= 1.0:
        raise ApiError(400, f"'top_p'={top_p} must be in (0, 1]", param="top_p")
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ApiError(400, f"'seed'={seed} must fit in 64 bits (-2**63 .. 2**64-1)", param="seed")

    if chat:  # logprobs: true, top_logprobs: 0..20
        wanted = _typed(body, "logprobs", (bool,), False, "a boolean")
        top = _typed(body, "top_logprobs", (int,), None, "an integer")
        if top is not None and not wanted:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        if top is not None and not 0 <= top <= 20:
            raise ApiError(400, f"'top_logprobs'={top} must be between 0 and 20", param="top_logprobs")
        top_logprobs = (top or 0) if wanted else None
    else:  # logprobs: 0..5, the number of most likely tokens shown beside each token
        top_logprobs = _typed(body, "logprobs", (int,), None, "an integer")
        if top_logprobs is not None and not 0 <= top_logprobs <= 5:
            raise ApiError(400, f"'logprobs'={top_logprobs} must be between 0 and 5", param="logprobs")
    stops = tuple(stop)
    if chat:
        messages = _plain_messages(body.get("messages"))
        try:
            check_messages(messages, "request")
        except DataError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        assert template is not None
        try:
            text = template.render(messages, add_generation_prompt=True, where="request")
        except DataError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        ids = encode_chat(tokenizer, text, specials)
        stops += template_stops
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(
                400,
                "'prompt' must be a string (or a list holding one string)",
                param="prompt",
                code="invalid_type",
            )
        ids = tokenizer.encode(prompt)
    if not ids:
        raise ApiError(400, "the prompt is empty: give at least one token of text", param="prompt")
    room = context - len(ids)
    max_tokens = _typed(
        body,
        "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens",
        (int,),
        None,
        "an integer",
    )
    if max_tokens is None:
        max_tokens = max(1, min(16 if not chat else room, room))
    if max_tokens < 1:
        raise ApiError(400, f"'max_tokens'={max_tokens} must be >= 1", param="max_tokens")
    if len(ids) + max_tokens > context:
        raise ApiError(
            400,
            f"the prompt is {len(ids)} tokens and max_tokens={max_tokens}; together they exceed "
            f"the model's context of {context} tokens: ask for at most {max(room, 0)} tokens or "
            "shorten the prompt",
            param="max_tokens",
            code="context_length_exceeded",
        )
    sampling = SamplingConfig(
        max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stops, seed=seed
    )
    return Parsed(model, ids, sampling, stream, bool(options.get("include_usage")), top_logprobs, n)
