"""Chat templates render as transformers renders them; a conversation's turns; the chat session and verb."""

from __future__ import annotations

import io
import json

import pytest
import torch

from lmforge.cli import main
from lmforge.config import Config
from lmforge.errors import DataError
from lmforge.infer.chat import (
    DEFAULT_CHAT_TEMPLATE,
    ChatSession,
    ChatTemplate,
    conversation_segments,
    default_template,
    encode_chat,
    read_chat_template,
    special_token_ids,
)
from lmforge.infer.generate import SamplingConfig
from lmforge.tune.sft import load_examples
from tests.conftest import require_transformers
from tests.infer.conftest import tiny_model

CPU = torch.device("cpu")
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Two\nlines"},
]
# A multi-line template with block tags, so trim_blocks/lstrip_blocks and raise_exception matter.
CHATML = """{% for message in messages %}
    {% if message['role'] == 'tool' %}
        {{ raise_exception('no tools') }}
    {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""


def text_model(tokenizer, **overrides):
    """A random tiny model that never picks the char tokenizer's byte-fallback ids 2..257 (their logits are
    0, below the best of the other ids), so every reply is whole characters."""
    model = tiny_model(vocab_size=tokenizer.vocab_size, **overrides)
    with torch.no_grad():
        model.lm_head.weight[2:258] = 0.0
    return model


def char_tok():
    from lmforge.data.tokenizer import char_tokenizer

    return char_tokenizer([chr(c) for c in range(32, 127)] + ["\n"])


def hf_tokenizer(tokenizer, template: str, tmp_path):
    """A transformers tokenizer over the same tokenizer.json, with ``template`` as its chat template."""
    transformers = require_transformers()
    path = tokenizer.save(tmp_path / "tok" / "tokenizer.json")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(path), eos_token="<|endoftext|>", chat_template=template
    )


@pytest.mark.parametrize("template", [DEFAULT_CHAT_TEMPLATE, CHATML])
def test_templates_render_byte_for_byte_as_transformers(template, tmp_path):
    tokenizer = char_tok()
    hf = hf_tokenizer(tokenizer, template, tmp_path)
    ours = ChatTemplate(template, eos_token="<|endoftext|>")
    for generation_prompt in (False, True):
        expected = hf.apply_chat_template(
            CONVERSATION, tokenize=False, add_generation_prompt=generation_prompt
        )
        assert ours.render(CONVERSATION, add_generation_prompt=generation_prompt) == expected
    prompt = ours.render(CONVERSATION, add_generation_prompt=True)
    ids = encode_chat(tokenizer, prompt, special_token_ids(tokenizer, ours))
    assert ids == hf(prompt, add_special_tokens=False)["input_ids"]  # end-of-text is one special token
    if template == DEFAULT_CHAT_TEMPLATE:
        assert prompt == (
            "<|system|>\nBe brief.<|endoftext|><|user|>\nHi there<|endoftext|><|assistant|>\nHello!"
            "<|endoftext|><|user|>\nTwo\nlines<|endoftext|><|assistant|>\n"
        )


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
        ],
    },
    {"role": "tool", "content": "21 C"},
]
# a model's own template that reads ``tools`` the Hugging Face way (Hermes/Qwen style, shortened)
HERMES = """{% if tools %}<tools>{% for tool in tools %}{{ tool['function']['name'] }};{% endfor %}</tools>
{% endif %}{% for message in messages %}<|im_start|>{{ message['role'] }}
{{ message['content'] }}{% for call in message.tool_calls or [] %}<tool_call>{{ call.function | tojson }}</tool_call>\
{% endfor %}<|im_end|>
{% endfor %}"""


@pytest.mark.parametrize("template", [DEFAULT_CHAT_TEMPLATE, HERMES])
def test_tools_render_as_transformers(template, tmp_path):
    """``tools`` reach the template as transformers passes them; the default template lists the functions,
    renders an assistant's calls in the <tool_call> form it asks for, and the tool's result as its own turn."""
    hf = hf_tokenizer(char_tok(), template, tmp_path)
    ours = ChatTemplate(template, eos_token="<|endoftext|>")
    rendered = ours.render(TOOL_CONVERSATION, add_generation_prompt=True, tools=TOOLS)
    assert rendered == hf.apply_chat_template(
        TOOL_CONVERSATION, tools=TOOLS, tokenize=False, add_generation_prompt=True
    )
    if template == DEFAULT_CHAT_TEMPLATE:
        assert rendered.startswith("<|system|>\nYou may call these functions.")
        assert json.dumps(TOOLS[0]) + "<|endoftext|><|user|>\nWeather in Paris?" in rendered
        call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
        assert f"<|assistant|>\n{call}<|endoftext|><|tool|>\n21 C<|endoftext|><|assistant|>\n" in rendered
        assert ours.render(CONVERSATION) == ours.render(CONVERSATION, tools=None)  # no tools: as before
    else:
        assert rendered.startswith("<tools>get_weather;</tools>\n")


def test_segments_cover_the_conversation_and_train_each_assistant_turn():
    template = ChatTemplate(CHATML)
    messages = CONVERSATION + [{"role": "assistant", "content": "Ok."}]
    segments = conversation_segments(template, messages, "x:1")
    assert "".join(s.text for s in segments) == template.render(messages)
    assert [s.text for s in segments if s.train] == ["Hello!<|im_end|>\n", "Ok.<|im_end|>\n"]
    header = segments[[s.train for s in segments].index(True) - 1]
    assert header.text == "<|im_start|>assistant\n" and not header.train


def test_bad_messages_and_failing_templates_name_the_record(tmp_path):
    data = tmp_path / "chat.jsonl"
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    bad_role = {"messages": [{"role": "robot", "content": "x"}]}
    data.write_text(json.dumps(good) + "\n" + json.dumps(bad_role) + "\n")
    with pytest.raises(DataError, match=r"chat.jsonl:2: messages\[0\] has role 'robot'"):
        load_examples(data)
    bad_content = {"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}]}
    data.write_text(json.dumps(bad_content) + "\n")
    with pytest.raises(DataError, match=r"chat.jsonl:1: messages\[0\] content must be a string, got list"):
        load_examples(data)
    strict = ChatTemplate(
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('start with a system message') }}"
        "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}",
        origin="my_template.jinja",
    )
    data.write_text(json.dumps(good) + "\n")
    with pytest.raises(
        DataError, match=r"chat.jsonl:1: the chat template \(my_template.jinja\) failed.*system"
    ):
        load_examples(data, template=strict)
    with pytest.raises(DataError, match=r"broken.jinja: the chat template does not compile"):
        ChatTemplate("{% for m in messages %}", origin="broken.jinja").check()


def test_template_is_read_from_tokenizer_config_and_chat_template_jinja(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": CHATML, "eos_token": {"content": "</s>"}, "bos_token": "<s>"})
    )
    template = read_chat_template(tmp_path)
    assert template.source == CHATML and template.eos_token == "</s>" and template.bos_token == "<s>"
    (tmp_path / "chat_template.jinja").write_text(DEFAULT_CHAT_TEMPLATE)
    assert read_chat_template(tmp_path).is_default
    assert read_chat_template(tmp_path / "missing") is None


def reference_greedy(model, ids: list[int], eos: int, max_new: int) -> list[int]:
    """Greedy decoding by full recomputation, no cache: the reference for a session's reply."""
    out = []
    with torch.no_grad():
        for _ in range(max_new):
            token = int(model(torch.tensor([ids + out]))[0, -1].argmax())
            if token == eos:
                break
            out.append(token)
    return out


def test_session_replies_greedily_and_trims_the_oldest_turns_keeping_the_system_prompt():
    tokenizer = char_tok()
    model = text_model(tokenizer, max_seq_len=96)
    sampling = SamplingConfig(max_new_tokens=6, temperature=0.0)
    template = default_template(tokenizer)
    session = ChatSession(model, tokenizer, template, sampling, CPU, system="S")
    specials = special_token_ids(tokenizer, template)
    for turn in range(6):
        history = list(session.messages)
        prompt = template.render(
            [*history, {"role": "user", "content": f"q{turn}"}], add_generation_prompt=True
        )
        pieces: list[str] = []
        reply = session.send(f"q{turn}", on_text=pieces.append)
        assert "".join(pieces) == reply.text
        if not session.notices:  # nothing dropped: the reply answers the whole history
            ids = encode_chat(tokenizer, prompt, specials)
            assert reply.tokens == reference_greedy(model, ids, tokenizer.eot_id, 6)
        assert reply.prompt_tokens + 6 <= 96
    assert (
        session.notices
        and "dropped the oldest" in session.notices[0]
        and "system prompt" in session.notices[0]
    )
    assert session.messages[0] == {"role": "system", "content": "S"}
    assert session.messages[1]["role"] == "user" and session.messages[1]["content"] != "q0"
    session.reset()
    assert session.messages == [{"role": "system", "content": "S"}]
    with pytest.raises(DataError, match="does not fit the model's context of 96 tokens"):
        session.send("x" * 200)


def test_chat_verb_reads_multiline_input_resets_and_exits(tmp_path, monkeypatch, capsys):
    from lmforge.checkpoint import save_checkpoint

    tokenizer = char_tok()
    model = text_model(tokenizer, max_seq_len=128)
    ckpt = save_checkpoint(
        tmp_path / "m",
        model_state=model.state_dict(),
        config=Config(model=model.cfg),
        tokenizer_file=tokenizer.save(tmp_path / "tok"),
    )
    stdin = 'hello \\\nworld\n"""\na\n\nb\n"""\n/reset\nx\n/exit\nnever sent\n'
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    argv = ["chat", str(ckpt), "--system", "S", "--temperature", "0", "--max-new-tokens", "5"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "has no chat template" in err and "using the default lmforge template" in err
    session = ChatSession(
        model,
        tokenizer,
        default_template(tokenizer),
        SamplingConfig(max_new_tokens=5, temperature=0.0),
        CPU,
        system="S",
    )
    first, second = session.send("hello \nworld").text, session.send("a\n\nb").text
    session.reset()
    third = session.send("x").text
    assert out.split("\n")[:4] == [first, second, "(conversation reset)", third]


def test_import_keeps_a_template_and_generate_chat_uses_it(tmp_path, capsys):
    """An HF folder whose template lives in chat_template.jinja: `lmforge import` keeps it, and
    `generate --chat` renders the prompt with it (the reply equals a session's on the same model)."""
    from lmforge.checkpoint import save_checkpoint
    from lmforge.convert import export_model, import_model

    tokenizer = char_tok()
    model = text_model(tokenizer, max_seq_len=128)
    ckpt = save_checkpoint(
        tmp_path / "m",
        model_state=model.state_dict(),
        config=Config(model=model.cfg),
        tokenizer_file=tokenizer.save(tmp_path / "tok"),
    )
    hf = export_model(ckpt, tmp_path / "hf", verify=False).out_dir
    assert read_chat_template(hf) is None  # a model never fine-tuned on a template gets none
    (hf / "chat_template.jinja").write_text(CHATML)
    imported = import_model(hf, tmp_path / "imported")
    assert imported.chat_template and read_chat_template(imported.checkpoint).source == CHATML
    argv = ["generate", str(imported.checkpoint), "--chat", "--prompt", "hi", "--temperature", "0"]
    assert main([*argv, "--max-new-tokens", "6", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    session = ChatSession(
        model, tokenizer, ChatTemplate(CHATML), SamplingConfig(max_new_tokens=6, temperature=0.0), CPU
    )
    assert printed["text"] == session.send("hi").text and printed["tokens"] == len(session.last.tokens)


# -- edges of the template, the encoding and the session, each against a hand computation or a reference ----


def test_bos_token_reaches_the_template_and_named_templates_pick_default(tmp_path):
    template = ChatTemplate(
        "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}", bos_token="<s>"
    )
    assert template.render([{"role": "user", "content": "hi"}]) == "<s>hi"
    named = [{"name": "tool_use", "template": CHATML}, {"name": "default", "template": DEFAULT_CHAT_TEMPLATE}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert read_chat_template(tmp_path).is_default  # "default", wherever it is in the list
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named[:1]}))
    assert read_chat_template(tmp_path).source == CHATML  # no "default": the first


def test_an_empty_conversation_is_refused():
    from lmforge.infer.chat import check_messages

    with pytest.raises(DataError, match="x.jsonl:3: 'messages' must be a non-empty list"):
        check_messages([], "x.jsonl:3")


def test_special_tokens_match_longest_first():
    from tests.infer.conftest import ByteTokenizer

    specials = {"<x>": 300, "<x>y": 301}  # one is a prefix of the other
    ids = encode_chat(ByteTokenizer(), "a<x>yb<x>", specials)
    assert ids == [ord("a"), 301, ord("b"), 300]


def test_a_template_end_text_that_is_no_token_is_encoded_as_text_like_transformers(tmp_path):
    """CHATML's <|im_end|> is not in the char tokenizer's vocabulary: it is text, not end-of-text."""
    tokenizer = char_tok()
    ours = ChatTemplate(CHATML, eos_token="<|im_end|>")
    specials = special_token_ids(tokenizer, ours)
    assert "<|im_end|>" not in specials and specials["<|endoftext|>"] == tokenizer.eot_id
    prompt = ours.render(CONVERSATION, add_generation_prompt=True)
    hf = hf_tokenizer(tokenizer, CHATML, tmp_path)
    assert encode_chat(tokenizer, prompt, specials) == hf(prompt, add_special_tokens=False)["input_ids"]


# A template that never renders its end-of-turn text, so a session's prompt is the same whatever it is.
PLAIN = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def test_a_template_end_of_turn_text_stops_the_reply():
    tokenizer = char_tok()
    model = text_model(tokenizer, max_seq_len=96)
    sampling = SamplingConfig(max_new_tokens=12, temperature=0.0)
    free = ChatSession(model, tokenizer, ChatTemplate(PLAIN), sampling, CPU).send("hi")
    assert free.finish_reason == "length" and len(free.text) == 12
    end = free.text[6]  # the end-of-turn "text" of this template: a character the reply contains
    cut = ChatSession(model, tokenizer, ChatTemplate(PLAIN, eos_token=end), sampling, CPU).send("hi")
    assert cut.text == free.text[: free.text.index(end)] and cut.finish_reason == "stop"


def test_the_reply_room_is_capped_at_half_the_context():
    """max_new_tokens past half the context: the prompt is kept whole and the reply runs to the context."""
    tokenizer = char_tok()
    model = text_model(tokenizer, max_seq_len=96)
    template = default_template(tokenizer)
    session = ChatSession(model, tokenizer, template, SamplingConfig(max_new_tokens=80, temperature=0.0), CPU)
    reply = session.send("hi")
    ids = encode_chat(
        tokenizer,
        template.render([{"role": "user", "content": "hi"}], add_generation_prompt=True),
        special_token_ids(tokenizer, template),
    )
    assert reply.prompt_tokens == len(ids) and not session.notices
    assert reply.tokens == reference_greedy(model, ids, tokenizer.eot_id, 96 - len(ids))


def test_a_prompt_that_exactly_leaves_room_for_the_reply_is_not_trimmed():
    tokenizer = char_tok()
    model = text_model(tokenizer, max_seq_len=96)
    sampling = SamplingConfig(max_new_tokens=6, temperature=0.0)
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    sessions = []
    for extra in (0, 1):  # prompt + room == context, then one token more
        session = ChatSession(model, tokenizer, default_template(tokenizer), sampling, CPU)
        session.messages = list(history)
        base = len(session.prompt_ids([*history, {"role": "user", "content": ""}]))
        reply = session.send("x" * (96 - 6 - base + extra))  # one character is one token
        sessions.append((session, reply))
    (fits, reply), (over, trimmed) = sessions
    assert reply.prompt_tokens == 90 and not fits.notices and fits.messages[:2] == history
    assert over.notices and over.messages[0]["content"].startswith("x") and trimmed.prompt_tokens < 90


def test_the_reply_ends_at_end_of_text():
    """The model's first greedy token made end-of-text (its lm_head row swapped with that token's): the
    reply is empty and ends as eos."""
    tokenizer = char_tok()
    model = text_model(tokenizer, max_seq_len=96)
    template = default_template(tokenizer)
    ids = encode_chat(
        tokenizer,
        template.render([{"role": "user", "content": "hi"}], add_generation_prompt=True),
        special_token_ids(tokenizer, template),
    )
    first = reference_greedy(model, ids, -1, 1)[0]
    eot = tokenizer.eot_id
    with torch.no_grad():
        w = model.lm_head.weight
        w[[first, eot]] = w[[eot, first]]
    reply = ChatSession(
        model, tokenizer, template, SamplingConfig(max_new_tokens=6, temperature=0.0), CPU
    ).send("hi")
    assert reply.tokens == [] and reply.text == "" and reply.finish_reason == "eos"


def test_trimming_drops_a_whole_turn_the_user_message_and_its_reply():
    tokenizer = char_tok()
    model = text_model(tokenizer, max_seq_len=128)  # room for the reply: 6 tokens; the prompt may take 122
    sampling = SamplingConfig(max_new_tokens=6, temperature=0.0)
    session = ChatSession(model, tokenizer, default_template(tokenizer), sampling, CPU, system="S")
    history = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "a" * 20},  # the first turn: a long question, a short answer
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    session.messages = list(history)
    base = len(session.prompt_ids([*history, {"role": "user", "content": ""}]))
    new = "e" * (123 - base)  # one token over: dropping the first question alone would be enough to fit
    session.send(new)
    assert session.messages[:4] == [history[0], history[3], history[4], {"role": "user", "content": new}]
    assert (
        len(session.notices) == 1
        and "dropped the oldest 1 turn, kept the system prompt" in session.notices[0]
    )
