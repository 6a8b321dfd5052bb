"""Parse and check OpenAI-style request bodies: every problem becomes an ``ApiError`` with the OpenAI error
object (message, type, param, code) and an HTTP status, before anything reaches the scheduler."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from lmforge.errors import DataError
from lmforge.infer.chat import CHAT_ROLES, ChatTemplate, check_messages, encode_chat
from lmforge.infer.generate import SamplingConfig
from lmforge.serve.grammar import JSON_OBJECT_SCHEMA, GrammarError, Grammars

MAX_DEPTH = 32  # JSON nesting: a chat body needs 4 levels (body, messages, message, content parts)
MIN_TEMPERATURE = 1e-3  # below it logits / temperature overflow float32 to inf and sampling fails: use 0
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
MAX_CHOICES = 16  # n: each choice takes a batch slot
MAX_STOP_CHARS = 1000  # a stop string is matched against the text at every step of the shared batch
MAX_TOOLS = 128  # as OpenAI
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # a function's or a response format's name, as OpenAI


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
    grammar: object | None = None  # the compiled grammar each choice follows (response_format, forced call)
    tools: tuple[str, ...] = ()  # names of the functions whose calls are parsed from the output


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
        if message.get("role") == "assistant" and message.get("tool_calls") is not None:
            message["tool_calls"] = _message_tool_calls(message["tool_calls"], i)
            if message.get("content") is None:
                message["content"] = ""
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


def _message_tool_calls(calls, i: int) -> list[dict]:
    """An assistant message's ``tool_calls`` as chat templates take them (the Hugging Face convention):
    each function's ``arguments`` a dict, parsed from the JSON string the OpenAI API carries."""
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise ApiError(400, f"{where} must be a list", param="messages")
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not (isinstance(function, dict) and isinstance(function.get("name"), str)):
            raise ApiError(
                400,
                f"{where}[{j}] must be {{'id', 'type': 'function', 'function': {{'name', 'arguments'}}}}",
                param="messages",
            )
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                arguments = None
        if not isinstance(arguments, dict):
            raise ApiError(
                400, f"{where}[{j}].function.arguments must be a JSON object (as a string)", param="messages"
            )
        out.append(
            {
                "id": call.get("id"),
                "type": "function",
                "function": {"name": function["name"], "arguments": arguments},
            }
        )
    return out


def _response_format(body: dict) -> dict | None:
    """The JSON schema ``response_format`` asks for (json_object: any object), or None (text)."""
    fmt = _typed(body, "response_format", (dict,), None, "an object")
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return JSON_OBJECT_SCHEMA
    if fmt.get("type") != "json_schema":
        raise ApiError(
            400,
            f"response_format.type={json.dumps(fmt.get('type'))[:40]} must be 'text', 'json_object' or "
            "'json_schema'",
            param="response_format",
        )
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not NAME.match(spec["name"]):
        raise ApiError(
            400,
            "response_format.json_schema must be an object with a 'name' (letters, digits, _ and -, at most "
            "64) and a 'schema'",
            param="response_format",
        )
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise ApiError(400, "response_format.json_schema.schema must be an object", param="response_format")
    return schema


def _tools(body: dict) -> tuple[list[dict] | None, dict | None]:
    """The request's ``tools`` (checked) and, when ``tool_choice`` forces a call ("required" or a named
    function), the JSON schema of that call: {"name": one of the functions, "arguments": its parameters}."""
    tools = _typed(body, "tools", (list,), None, "a list")
    choice = body.get("tool_choice")
    if choice is None:
        choice = "auto" if tools else "none"
    if tools is not None and not 1 <= len(tools) <= MAX_TOOLS:
        raise ApiError(400, f"'tools' must hold 1 to {MAX_TOOLS} tools", param="tools")
    functions: dict[str, dict] = {}
    for i, tool in enumerate(tools or []):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise ApiError(
                400,
                f"tools[{i}] must be {{'type': 'function', 'function': {{'name', 'description', 'parameters'}}}}",
                param="tools",
            )
        name = function.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise ApiError(
                400,
                f"tools[{i}].function.name={json.dumps(name)[:80]} must be 1-64 letters, digits, _ or -",
                param="tools",
            )
        if name in functions:
            raise ApiError(400, f"tools[{i}]: a second function named {name!r}", param="tools")
        if not isinstance(function.get("description", ""), str):
            raise ApiError(400, f"tools[{i}].function.description must be a string", param="tools")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise ApiError(400, f"tools[{i}].function.parameters must be a JSON schema object", param="tools")
        functions[name] = parameters
    if choice in ("none", "auto", "required"):
        names = list(functions) if choice == "required" else []
    elif (
        isinstance(choice, dict)
        and choice.get("type") == "function"
        and isinstance(choice.get("function"), dict)
        and isinstance(choice["function"].get("name"), str)
    ):
        names = [choice["function"]["name"]]
        if names[0] not in functions:
            raise ApiError(
                400,
                f"tool_choice names the function {names[0]!r}, which is not in 'tools'",
                param="tool_choice",
            )
    else:
        raise ApiError(
            400,
            "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
            param="tool_choice",
        )
    if choice != "none" and not functions:
        raise ApiError(400, f"tool_choice={json.dumps(choice)[:60]} needs 'tools'", param="tool_choice")
    if choice == "none":
        return None, None  # as vLLM: the functions are neither shown to the model nor parsed back
    forced = None
    if names:
        forced = {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {"name": {"const": name}, "arguments": functions[name]},
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                }
                for name in names
            ]
        }
    return tools, forced


def _compile(grammars: Grammars | None, schema: dict, *, tool_call: bool, param: str) -> object:
    if grammars is None:
        raise ApiError(
            400,
            f"'{param}' needs the grammar engine, which this server does not have: pip install "
            "'lmforge[serve]' (llguidance); the server's log says why if it is installed",
            param=param,
        )
    try:
        return grammars.compile(schema, tool_call=tool_call)
    except GrammarError as exc:
        raise ApiError(400, f"'{param}': the JSON schema cannot be enforced: {exc}", param=param) from None


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
    grammars: Grammars | None = None,
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
    schema = _response_format(body)
    tools, forced = _tools(body) if chat else (None, None)
    if schema is not None and forced is not None:
        raise ApiError(
            400,
            "response_format and a forced tool call (tool_choice) cannot both apply",
            param="response_format",
        )
    grammar = None
    if schema is not None:
        grammar = _compile(grammars, schema, tool_call=False, param="response_format")
    elif forced is not None:
        grammar = _compile(grammars, forced, tool_call=True, param="tool_choice")
    if chat:
        messages = _plain_messages(body.get("messages"))
        try:
            check_messages(messages, "request", roles=(*CHAT_ROLES, "tool"))
        except DataError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        assert template is not None
        try:
            text = template.render(messages, add_generation_prompt=True, where="request", tools=tools)
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
    names = tuple(t["function"]["name"] for t in tools or [])
    return Parsed(
        model, ids, sampling, stream, bool(options.get("include_usage")), top_logprobs, n, grammar, names
    )


TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def parse_tool_calls(text: str, names: tuple[str, ...]) -> tuple[str | None, list[dict]]:
    """The function calls in a model's output, in the Hermes/Qwen form the default template asks for:
    ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one block per call. Returns the text
    outside the blocks (None when empty) and the calls in OpenAI's shape (arguments as a JSON string). A
    block that is not such a call of one of ``names`` leaves the whole output as text, with no calls."""
    calls = []
    for block in TOOL_CALL.findall(text):
        try:
            call = json.loads(block)
        except ValueError:
            return text, []
        arguments = call.get("arguments", call.get("parameters")) if isinstance(call, dict) else None
        if not (isinstance(call, dict) and call.get("name") in names and isinstance(arguments, dict)):
            return text, []
        calls.append(
            {
                "id": "call_" + uuid.uuid4().hex[:24],
                "type": "function",
                "function": {"name": call["name"], "arguments": json.dumps(arguments, ensure_ascii=False)},
            }
        )
    if not calls:
        return text, []
    rest = TOOL_CALL.sub("", text).strip()
    return rest or None, calls


MAX_EMBEDDING_INPUTS = 2048  # as OpenAI
POOLINGS = ("last", "mean")


@dataclass(frozen=True)
class EmbeddingRequest:
    """A checked /v1/embeddings body: each input's token ids, how to pool them, how to encode the vectors."""

    model: str
    inputs: list[list[int]]
    pooling: str
    base64: bool


def parse_embeddings(
    body: dict, *, model_name: str, tokenizer, vocab_size: int, context: int, pooling: str, dimensions: int
) -> EmbeddingRequest:
    """The checked request of a /v1/embeddings body: ``input`` is a string, a list of strings, a list of
    token ids or a list of such lists; ``pooling`` ("last" or "mean", an lmforge extra) overrides the
    server's default."""
    name = _typed(body, "model", (str,), model_name, "a string")
    if name != model_name:
        raise ApiError(
            404,
            f"the model '{name}' does not exist; this server serves '{model_name}'",
            param="model",
            code="model_not_found",
        )
    fmt = _typed(body, "encoding_format", (str,), "float", "a string")
    if fmt not in ("float", "base64"):
        raise ApiError(400, f"'encoding_format'={fmt!r} must be 'float' or 'base64'", param="encoding_format")
    pooling = _typed(body, "pooling", (str,), pooling, "a string")
    if pooling not in POOLINGS:
        raise ApiError(400, f"'pooling'={pooling!r} must be one of {', '.join(POOLINGS)}", param="pooling")
    wanted = _typed(body, "dimensions", (int,), dimensions, "an integer")
    if wanted != dimensions:
        raise ApiError(
            400, f"'dimensions'={wanted}: this model's embeddings have {dimensions}", param="dimensions"
        )
    raw = body.get("input")
    if isinstance(raw, str) or (isinstance(raw, list) and raw and _is_ids(raw)):
        raw = [raw]  # one input: a string or one list of token ids
    if not isinstance(raw, list) or not raw:
        raise ApiError(
            400,
            "'input' must be a string, a list of strings, a list of token ids or a list of lists of them",
            param="input",
            code="invalid_type",
        )
    if len(raw) > MAX_EMBEDDING_INPUTS:
        raise ApiError(
            400, f"'input' holds {len(raw)} inputs; the limit is {MAX_EMBEDDING_INPUTS}", param="input"
        )
    inputs = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            ids = tokenizer.encode(item)
        elif isinstance(item, list) and _is_ids(item):
            ids = item
            if not all(0 <= t < vocab_size for t in ids):
                raise ApiError(400, f"input[{i}] holds a token id outside 0..{vocab_size - 1}", param="input")
        else:
            raise ApiError(
                400, f"input[{i}] must be a string or a list of token ids", param="input", code="invalid_type"
            )
        if not ids:
            raise ApiError(400, f"input[{i}] is empty: give at least one token", param="input")
        if len(ids) > context:
            raise ApiError(
                400,
                f"input[{i}] is {len(ids)} tokens; the model's context is {context} tokens",
                param="input",
                code="context_length_exceeded",
            )
        inputs.append(ids)
    return EmbeddingRequest(name, inputs, pooling, fmt == "base64")


def _is_ids(value) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
