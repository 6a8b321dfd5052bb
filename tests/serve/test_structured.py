"""Structured output through the official ``openai`` client against a real server: ``response_format``
(json_object, json_schema) enforced by the grammar engine and checked by an independent validator
(``jsonschema``), tools and ``tool_choice`` through the chat template with ``tool_calls`` parsed back, and
``/v1/embeddings`` against a direct computation from the model."""

from __future__ import annotations

import json
import time

import pytest
import torch

from lmforge.infer.chat import default_template, encode_chat, special_token_ids
from lmforge.infer.loading import load_for_inference
from tests.conftest import require_module
from tests.serve.conftest import RunningServer, tiny_checkpoint

openai = require_module("openai")
httpx = require_module("httpx")
jsonschema = require_module("jsonschema")
require_module("llguidance", "serve")

SCHEMA = {  # every output is bounded: a random model completes it well within max_tokens
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "alerts": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["city", "unit", "days", "alerts", "tags"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 6},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}


CONTEXT = 1024  # tool descriptions make long prompts (the test tokenizer has one token per character)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("structured"), max_seq_len=CONTEXT)


@pytest.fixture(scope="module")
def server(checkpoint):
    running = RunningServer(checkpoint, max_batch=8, max_queue=32)
    yield running
    running.close()


def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "forecast", "schema": schema, "strict": True}}


def test_json_schema_50_of_50_validate_at_temperature_1(server):
    """50 samples (5 requests x n=10, seeds varied) at temperature 1: every one parses and validates."""
    c, outputs = client(server), []
    for seed in range(0, 500, 100):  # choice i of a request samples with seed + i
        out = c.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Forecast, please."}],
            response_format=schema_format(SCHEMA),
            temperature=1.0,
            max_tokens=150,
            n=10,
            seed=seed,
        )
        outputs += [(choice.message.content, choice.finish_reason) for choice in out.choices]
    assert len(outputs) == 50 and len({text for text, _ in outputs}) > 40  # sampled, not one answer
    for text, reason in outputs:
        assert reason == "stop"
        jsonschema.validate(json.loads(text), SCHEMA)


def test_without_the_grammar_the_model_is_not_json(server):
    """The same requests without response_format: the random model's text is not valid JSON (so the
    validation above is the grammar's doing)."""
    out = client(server).chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Forecast, please."}],
        temperature=1.0,
        max_tokens=60,
        n=10,
        seed=0,
    )
    for choice in out.choices:
        with pytest.raises(ValueError):
            json.loads(choice.message.content)


def test_json_object_and_completions_and_stream(server):
    c = client(server)
    out = c.completions.create(
        model="tiny",
        prompt="JSON:",
        max_tokens=200,
        temperature=0.7,
        seed=3,
        n=4,
        extra_body={"response_format": {"type": "json_object"}},
    )
    for choice in out.choices:  # a finished object parses; one cut by max_tokens ends "length"
        assert choice.finish_reason in ("stop", "length")
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.text), dict)
        else:
            assert choice.text.startswith("{")
    assert "stop" in [choice.finish_reason for choice in out.choices]
    # streamed: the deltas join to the same text as the whole answer, and it validates
    kwargs = dict(
        model="tiny",
        messages=[{"role": "user", "content": "go"}],
        response_format=schema_format(SCHEMA),
        temperature=1.0,
        max_tokens=150,
        seed=11,
    )
    whole = c.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(c.chat.completions.create(**kwargs, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == whole
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(whole), SCHEMA)


def test_budget_before_the_grammar_completes_is_length(server):
    """max_tokens ending before the JSON is whole: "length"; ending on the token that completes it: "stop"
    (the request ends when the grammar admits nothing more, not at the next step's end-of-text)."""
    c = client(server)
    kwargs = dict(
        model="tiny", messages=[{"role": "user", "content": "go"}], response_format=schema_format(SCHEMA)
    )
    out = c.chat.completions.create(**kwargs, max_tokens=5, temperature=0)
    assert out.choices[0].finish_reason == "length" and out.choices[0].message.content.startswith('{"')
    whole = c.chat.completions.create(**kwargs, max_tokens=150, temperature=0)
    exact = c.chat.completions.create(**kwargs, max_tokens=whole.usage.completion_tokens, temperature=0)
    assert exact.choices[0].message.content == whole.choices[0].message.content
    assert exact.choices[0].finish_reason == "stop"


def test_grammars_are_cached_by_schema_and_form(server):
    """The same schema compiled bare and as a tool call are two grammars: one starts with "{", the other with
    the tag."""
    grammars = server.server.config.app.state.grammars
    tokenizer = server.scheduler.tokenizer
    bare, call = grammars.compile(SCHEMA), grammars.compile(SCHEMA, tool_call=True)
    assert grammars.compile(SCHEMA) is bare and grammars.compile(SCHEMA, tool_call=True) is call
    for compiled, first in ((bare, "{"), (call, "<")):
        allowed = grammars.constraint(compiled).allowed()
        assert allowed.nonzero().flatten().tolist() == tokenizer.encode(first)


@pytest.mark.parametrize(
    "response_format, words",
    [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}, "nope"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"pattern": "(?<=a)b"}}}, "look"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/missing"}}}, "missing"),
        ({"type": "json_schema", "json_schema": {"schema": {}}}, "name"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": []}}, "schema"),
        ({"type": "xml"}, "json_object"),
        ("json", "object"),
    ],
)
def test_bad_response_format_is_400(server, response_format, words):
    body = {"messages": [{"role": "user", "content": "x"}], "response_format": response_format}
    answer = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    error = answer.json()["error"]
    assert answer.status_code == 400 and error["param"] == "response_format" and words in error["message"]


def test_forced_tool_call_round_trip(server, checkpoint):
    """tool_choice names a function: the call is forced by the grammar, parsed into tool_calls with arguments
    that validate; the second turn carries the call and its result, and the rendered prompt holds both."""
    c = client(server)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    choice = {"type": "function", "function": {"name": "get_weather"}}
    first = c.chat.completions.create(
        model="tiny", messages=messages, tools=[WEATHER, CLOCK], tool_choice=choice, temperature=1.0, seed=5
    )
    answer = first.choices[0]
    assert answer.finish_reason == "tool_calls" and answer.message.content is None
    (call,) = answer.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])
    # "required" forces a call of one of the functions
    required = c.chat.completions.create(
        model="tiny",
        messages=messages,
        tools=[WEATHER, CLOCK],
        tool_choice="required",
        temperature=1.0,
        seed=6,
    )
    assert required.choices[0].message.tool_calls[0].function.name in ("get_weather", "get_time")
    # the second turn: the assistant's call and the tool's result
    history = [
        *messages,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    second = c.chat.completions.create(
        model="tiny", messages=history, tools=[WEATHER], tool_choice="auto", max_tokens=8, temperature=0
    )
    assert (
        second.choices[0].finish_reason in ("stop", "length") and second.choices[0].message.tool_calls is None
    )
    # the prompt the server rendered: the default template, with the call and the result in it
    loaded = load_for_inference(checkpoint, device=torch.device("cpu"))
    template = default_template(loaded.tokenizer)
    sent = {**history[1], "tool_calls": [{"function": {"name": "get_weather", "arguments": arguments}}]}
    rendered = template.render([*messages, sent, history[2]], add_generation_prompt=True, tools=[WEATHER])
    assert '<|tool|>\n{"temperature": 21}<|endoftext|><|assistant|>\n' in rendered
    assert (
        f'<tool_call>{{"name": "get_weather", "arguments": {json.dumps(arguments)}}}</tool_call>' in rendered
    )
    ids = encode_chat(loaded.tokenizer, rendered, special_token_ids(loaded.tokenizer, template))
    assert second.usage.prompt_tokens == len(ids)


def test_streamed_tool_call(server):
    c = client(server)
    kwargs = dict(
        model="tiny",
        messages=[{"role": "user", "content": "Weather?"}],
        tools=[WEATHER],
        tool_choice="required",
        temperature=1.0,
        seed=9,
    )
    whole = c.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
    chunks = [ch for ch in c.chat.completions.create(**kwargs, stream=True) if ch.choices]
    calls = [tc for ch in chunks for tc in ch.choices[0].delta.tool_calls or []]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == json.loads(whole.function.arguments)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == ""
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
        ({"tools": [{"type": "code"}]}, "tools"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}],
                "tool_choice": "required",
            },
            "tool_choice",
        ),
        (
            {
                "messages": [
                    {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}
                ]
            },
            "messages",
        ),
    ],
)
def test_bad_tools_are_400(server, extra, param):
    body = {"messages": [{"role": "user", "content": "x"}], **extra}
    answer = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == param


def direct_embedding(model, tokenizer, text: str, pooling: str) -> torch.Tensor:
    """Independent of the server: one text alone, hidden states -> pooling -> L2 normalisation."""
    ids = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        hidden = model.hidden_states(ids)[0]  # (T, C)
    pooled = hidden[-1] if pooling == "last" else hidden.mean(dim=0)
    return pooled / pooled.norm()


def test_embeddings_match_a_direct_computation(server, checkpoint):
    c = client(server)
    loaded = load_for_inference(checkpoint, device=torch.device("cpu"))
    texts = ["The cat sat.", "A dog ran far away, quickly!", "x"]
    out = c.embeddings.create(model="tiny", input=texts)  # the client asks for base64 and decodes it
    assert out.usage.prompt_tokens == sum(len(t) for t in texts) and [d.index for d in out.data] == [0, 1, 2]
    vectors = [torch.tensor(d.embedding) for d in out.data]
    direct = [direct_embedding(loaded.model, loaded.tokenizer, t, "last") for t in texts]
    cosine = float(vectors[0] @ vectors[1])
    assert abs(cosine - float(direct[0] @ direct[1])) < 1e-5
    for v, d in zip(vectors, direct):
        assert torch.allclose(v, d, atol=1e-5) and abs(float(v.norm()) - 1) < 1e-5
    # mean pooling (a request's extra field), float encoding through raw HTTP
    raw = httpx.post(
        server.url + "/v1/embeddings",
        json={"model": "tiny", "input": texts[:2], "pooling": "mean", "encoding_format": "float"},
        timeout=30,
    ).json()
    means = [torch.tensor(d["embedding"]) for d in raw["data"]]
    for v, t in zip(means, texts[:2]):
        assert torch.allclose(v, direct_embedding(loaded.model, loaded.tokenizer, t, "mean"), atol=1e-5)
    assert not torch.allclose(means[1], vectors[1], atol=1e-2)  # mean and last differ
    # padding independence: alone or in a batch of other lengths, the same vector; token ids as input
    alone = c.embeddings.create(model="tiny", input=texts[0]).data[0].embedding
    ids = c.embeddings.create(model="tiny", input=[loaded.tokenizer.encode(texts[0])]).data[0].embedding
    assert torch.allclose(torch.tensor(alone), vectors[0], atol=1e-5)
    assert torch.allclose(torch.tensor(ids), vectors[0], atol=1e-5)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": "x" * (CONTEXT + 1)}, "input"),
        ({"input": [[1, 2, 10_000]]}, "input"),
        ({"input": ["x"] * 2049}, "input"),
        ({"input": [3.5]}, "input"),
        ({"input": "x", "pooling": "max"}, "pooling"),
        ({"input": "x", "encoding_format": "hex"}, "encoding_format"),
        ({"input": "x", "dimensions": 3}, "dimensions"),
    ],
)
def test_bad_embedding_requests_are_400(server, body, param):
    answer = httpx.post(server.url + "/v1/embeddings", json=body, timeout=30)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == param


def test_side_jobs_run_on_the_scheduler_thread(server):
    """Embedding forwards run where the model's owner runs them, between the steps of running requests, and
    an error reaches the caller only."""
    import threading

    from lmforge.infer.generate import SamplingConfig
    from lmforge.serve.scheduler import Request

    scheduler = server.scheduler
    records = {"type": "array", "items": SCHEMA, "minItems": 20}  # no end-of-text within 100 tokens
    grammars = server.server.config.app.state.grammars
    finished = threading.Event()
    request = Request(
        [5, 6, 7],
        SamplingConfig(max_new_tokens=100, temperature=1.0, seed=0),
        lambda delta, final: final is not None and finished.set(),
        constraint=grammars.constraint(grammars.compile(records)),
    )
    scheduler.submit(request)
    while not request.generated:
        time.sleep(0.001)
    name, running = scheduler.call(lambda: (threading.current_thread().name, not finished.is_set())).result(
        10
    )
    assert name == "lmforge-scheduler" and running  # served while the request decodes
    with pytest.raises(ZeroDivisionError):
        scheduler.call(lambda: 1 / 0).result(10)
    assert finished.wait(30) and len(request.generated) == 100  # the request went on to its budget


def test_tool_call_parsing_and_streamed_holdback():
    from lmforge.serve.app import _shown_until
    from lmforge.serve.protocol import parse_tool_calls

    text = 'Let me look.\n<tool_call>\n{"name": "f", "arguments": {"x": [1, 2]}}\n</tool_call>'
    content, calls = parse_tool_calls(text, ("f", "g"))
    assert content == "Let me look." and len(calls) == 1 and calls[0]["type"] == "function"
    assert calls[0]["function"] == {"name": "f", "arguments": '{"x": [1, 2]}'}
    two = '<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{"name": "g", "arguments": {}}</tool_call>'
    content, calls = parse_tool_calls(two, ("f", "g"))
    assert content is None and [c["function"]["name"] for c in calls] == ["f", "g"]
    assert len({c["id"] for c in calls}) == 2
    for bad in (
        '<tool_call>{"name": "h", "arguments": {}}</tool_call>',
        "<tool_call>{nope</tool_call>",
        "plain",
    ):
        assert parse_tool_calls(bad, ("f",)) == (bad, [])  # not a call of a listed function: all text
    # streamed content stops before a tag, and holds back what may be its beginning
    assert _shown_until("Hello <tool") == len("Hello ")
    assert _shown_until("Hello <tool_call>{") == len("Hello ")
    assert _shown_until("a < b") == len("a < b") and _shown_until("x<") == 1


def test_token_bytes_of_lmforge_tokenizers():
    """What the grammar engine is told each token is: the bytes the tokenizer's own decoding gives."""
    from lmforge.data.tokenizer import train_bpe, train_char
    from lmforge.serve.grammar import token_bytes

    corpus = [
        'Caf\u00e9 au lait, na\u00efve {"json": [1, 2]} \u65e5\u672c ' * 20,
        "plain words and more words " * 20,
    ]
    text = 'Caf\u00e9 {"json": [12]} \u65e5\u672c\u8a9e \u00fcber \n\t end'
    for tokenizer in (train_bpe(corpus, 300), train_char(corpus, 280)):
        tokens = token_bytes(tokenizer)
        assert tokens[tokenizer.eot_id] is None and tokens[tokenizer.pad_id] is None
        ids = tokenizer.encode(text)
        assert (
            b"".join(tokens[i] for i in ids) == text.encode("utf-8") == tokenizer.decode(ids).encode("utf-8")
        )
        assert any(len(tokens[i]) == 1 and tokens[i][0] >= 0x80 for i in ids)  # part of a character: a byte


def test_without_a_grammar_engine_response_format_is_400():
    from lmforge.serve.protocol import ApiError, parse_request
    from tests.serve.conftest import ascii_tokenizer

    tokenizer = ascii_tokenizer()
    body = {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}
    settings = dict(model_name="tiny", tokenizer=tokenizer, specials={}, template_stops=(), context=64)
    with pytest.raises(ApiError) as exc:
        parse_request(body, chat=True, template=default_template(tokenizer), grammars=None, **settings)
    assert (
        exc.value.status == 400 and exc.value.param == "response_format" and "llguidance" in exc.value.message
    )
    plain = parse_request({"prompt": "x"}, chat=False, template=None, grammars=None, **settings)
    assert plain.grammar is None and plain.tools == ()
