"""Request checking without a server: each OpenAI field's bounds, defaults and errors, and the prompt ids a
chat body becomes (against the rendered text encoded by hand)."""

from __future__ import annotations

import json

import pytest

from lmforge.infer.chat import DEFAULT_CHAT_TEMPLATE, ChatTemplate
from lmforge.serve.protocol import ApiError, parse_json, parse_request
from tests.infer.conftest import ByteTokenizer

EOT = "<|endoftext|>"
TEMPLATE = ChatTemplate(DEFAULT_CHAT_TEMPLATE, eos_token=EOT)
SPECIALS = {EOT: ByteTokenizer.eot_id}


def parse(body: dict, *, chat: bool = False, context: int = 64, template_stops: tuple[str, ...] = ()):
    return parse_request(
        body,
        chat=chat,
        model_name="tiny",
        tokenizer=ByteTokenizer(),
        template=TEMPLATE,
        specials=SPECIALS,
        template_stops=template_stops,
        context=context,
    )


def refused(body: dict, **kw) -> ApiError:
    with pytest.raises(ApiError) as exc:
        parse(body, **kw)
    assert exc.value.status == 400, exc.value.body()
    return exc.value


def test_body_size_limit_is_inclusive():
    body = json.dumps({"prompt": "x" * 100}).encode()
    assert parse_json(body, len(body)) == {"prompt": "x" * 100}  # exactly the limit: accepted
    with pytest.raises(ApiError) as exc:
        parse_json(body, len(body) - 1)
    assert exc.value.status == 413 and exc.value.code == "request_too_large"


def test_defaults_of_a_minimal_completion_body():
    parsed = parse({"prompt": "hello"})
    assert parsed.model == "tiny"  # no 'model': the served one
    assert parsed.prompt == list(b"hello")
    s = parsed.sampling
    assert (s.max_new_tokens, s.temperature, s.top_p, s.stop, s.seed) == (16, 1.0, 1.0, (), None)
    assert parsed.stream is False and parsed.include_usage is False


def test_booleans_are_not_integers():
    assert refused({"prompt": "x", "max_tokens": True}).param == "max_tokens"
    assert refused({"prompt": "x", "seed": False}).param == "seed"
    assert refused({"prompt": "x", "n": True}).param == "n"
    assert parse({"prompt": "x", "seed": 7}).sampling.seed == 7


def test_choice_count_bounds():
    from lmforge.serve.protocol import MAX_CHOICES

    for n in (0, -1, MAX_CHOICES + 1):
        assert refused({"prompt": "x", "n": n}).param == "n"
    for n in (1, 2, MAX_CHOICES):
        assert parse({"prompt": "x", "n": n}).n == n


def test_stop_strings():
    assert parse({"prompt": "x", "stop": "ab"}).sampling.stop == ("ab",)  # one string, not 'a' and 'b'
    four = ["a", "bb", "ccc", "d"]
    assert parse({"prompt": "x", "stop": four}).sampling.stop == tuple(four)
    assert refused({"prompt": "x", "stop": [*four, "e"]}).param == "stop"
    assert refused({"prompt": "x", "stop": ["a", ""]}).param == "stop"


def test_temperature_and_top_p_bounds():
    assert parse({"prompt": "x", "temperature": 2}).sampling.temperature == 2.0
    assert parse({"prompt": "x", "temperature": 0}).sampling.temperature == 0.0
    assert refused({"prompt": "x", "temperature": 2.5}).param == "temperature"
    assert refused({"prompt": "x", "temperature": -0.1}).param == "temperature"
    assert parse({"prompt": "x", "top_p": 1}).sampling.top_p == 1.0
    assert refused({"prompt": "x", "top_p": 0}).param == "top_p"
    assert refused({"prompt": "x", "top_p": 1.01}).param == "top_p"


def test_prompt_plus_max_tokens_may_fill_the_context_exactly():
    prompt = "abcd"  # 4 tokens of a context of 10: room for 6
    assert parse({"prompt": prompt, "max_tokens": 6}, context=10).sampling.max_new_tokens == 6
    error = refused({"prompt": prompt, "max_tokens": 7}, context=10)
    assert error.code == "context_length_exceeded" and "ask for at most 6 tokens" in error.message
    # the default of 16 is cut to the room left
    assert parse({"prompt": prompt}, context=10).sampling.max_new_tokens == 6


def test_include_usage_follows_its_value():
    assert parse({"prompt": "x", "stream": True, "stream_options": {"include_usage": True}}).include_usage
    assert not parse(
        {"prompt": "x", "stream": True, "stream_options": {"include_usage": False}}
    ).include_usage
    assert not parse({"prompt": "x", "stream": True, "stream_options": {}}).include_usage


def test_chat_body_prompt_stops_and_length():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    parsed = parse({"messages": messages}, chat=True, context=64, template_stops=("<|end|>",))
    # the rendered template, encoded by hand: text as bytes, the end-of-text string as its one token
    expected = list(b"<|system|>\nS") + [256] + list(b"<|user|>\nhi") + [256] + list(b"<|assistant|>\n")
    assert parsed.prompt == expected
    # a chat reply may use all the room left (completions default to 16), and stops at the template's end
    assert parsed.sampling.max_new_tokens == 64 - len(expected)
    assert parsed.sampling.stop == ("<|end|>",)
    with_stop = parse({"messages": messages, "stop": "X"}, chat=True, template_stops=("<|end|>",))
    assert with_stop.sampling.stop == ("X", "<|end|>")
    # max_completion_tokens (the newer name) wins over max_tokens in chat
    both = {"messages": messages, "max_tokens": 3, "max_completion_tokens": 5}
    assert parse(both, chat=True).sampling.max_new_tokens == 5
    assert parse({"messages": messages, "max_tokens": 3}, chat=True).sampling.max_new_tokens == 3
    assert refused({"messages": []}, chat=True).param == "messages"
