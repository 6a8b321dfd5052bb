"""Chat: a model's chat template, the turns of a conversation, and a chat session that streams replies.

A model's chat template is one Jinja template, stored as Hugging Face stores it (``chat_template`` in
``tokenizer_config.json``, or a ``chat_template.jinja`` file beside it) and rendered the way transformers'
``apply_chat_template`` renders it: a sandboxed jinja2 environment with ``trim_blocks`` and ``lstrip_blocks``,
``raise_exception``, ``tojson``, and the variables ``messages``, ``add_generation_prompt``, ``bos_token`` and
``eos_token``. The rendered text is the prompt, byte for byte, in lmforge (fine-tuning, ``chat``,
``generate --chat``) and in transformers.

The default lmforge template gives each message a plain-text role header and ends every turn with the
tokenizer's end-of-text token (``<|endoftext|>`` for lmforge's tokenizers)::

    <|system|>\\nBe brief.<|endoftext|><|user|>\\nHi<|endoftext|><|assistant|>\\nHello!<|endoftext|>

Why end-of-text as the end-of-turn token: it is one token that every lmforge tokenizer already has (no new
embedding row, the vocabulary is unchanged), generation already stops at it, and the exported ``config.json``
names it as ``eos_token_id``, so ``transformers``' ``generate`` stops at the end of a turn as well. The role
headers are ordinary text. In a rendered prompt the template's special tokens (``eos_token`` and the
tokenizer's other special tokens) are encoded as those tokens, as transformers does; message text between
them is encoded as text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from lmforge.errors import DataError
from lmforge.infer.fast import FastDecoder
from lmforge.infer.generate import SamplingConfig, TextTracker, Tokenizer, check_sampling, generate_ids

CHAT_ROLES = ("system", "user", "assistant")
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where newer transformers versions save a template

# One line on purpose: no whitespace for trim_blocks/lstrip_blocks to change; "\\n" is a newline in Jinja.
# Without ``tools`` and tool messages it renders exactly as it always has. With ``tools`` (the Hugging Face
# convention: a list of {"type": "function", "function": {name, description, parameters}}) a system block
# lists them and asks for calls as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (the
# Hermes/Qwen convention); an assistant message's ``tool_calls`` render in that form after its content, and a
# ``tool`` message (a function's result) gets its own ``<|tool|>`` turn.
DEFAULT_CHAT_TEMPLATE = (
    "{% if tools %}"
    "{{ '<|system|>\\nYou may call these functions. To call one, answer with <tool_call>' }}"
    '{{ \'{"name": NAME, "arguments": {...}}</tool_call>. The functions:\' }}'
    "{% for tool in tools %}{{ '\\n' + (tool | tojson) }}{% endfor %}"
    "{{ eos_token }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('unknown role ' + message['role'] + ' (the roles are system, user, assistant, tool)') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + (message['content'] or '') }}"
    "{% for call in message['tool_calls'] or [] %}"
    "{% set function = call['function'] if call['function'] is defined else call %}"
    "{{ '<tool_call>' + ({'name': function['name'], 'arguments': function['arguments']} | tojson) }}"
    "{{ '</tool_call>' }}"
    "{% endfor %}"
    "{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
DEFAULT_ORIGIN = "the default lmforge template"


@dataclass(frozen=True)
class Segment:
    """A piece of an example's text; ``train``: the model learns to produce it (the loss falls on it)."""

    text: str
    train: bool


# -- the template ---------------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def _compile(source: str):
    """The template compiled as transformers compiles it (sandboxed, trim_blocks, lstrip_blocks)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(
        Extension
    ):  # ``{% generation %}`` marks assistant text for transformers; render its body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(format):
        from datetime import datetime

        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template and the special-token texts it is rendered with."""

    source: str
    eos_token: str | None = None
    bos_token: str | None = None
    origin: str = DEFAULT_ORIGIN  # where it came from: a file, or the default

    @property
    def is_default(self) -> bool:
        return self.source == DEFAULT_CHAT_TEMPLATE

    def check(self) -> None:
        """Compile the template now, so a syntax error is reported before any work starts."""
        import jinja2

        try:
            _compile(self.source)
        except jinja2.TemplateError as exc:
            raise DataError(f"{self.origin}: the chat template does not compile ({exc})") from None

    def render(
        self,
        messages: Sequence[dict],
        *,
        add_generation_prompt: bool = False,
        where: str = "",
        tools: Sequence[dict] | None = None,
    ) -> str:
        """The conversation as text; a template error names ``where`` (the record) and the template.
        ``tools``: function descriptions, passed to the template as ``tools`` (as transformers does)."""
        self.check()
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token, "tools": tools}
        try:
            return _compile(self.source).render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                **{k: v for k, v in variables.items() if v is not None},
            )
        except Exception as exc:  # a template is code from the model's folder: any failure is the template's
            where = f"{where}: " if where else ""
            raise DataError(f"{where}the chat template ({self.origin}) failed to render: {exc}") from None


def default_template(tokenizer: Tokenizer) -> ChatTemplate:
    """The default template with the tokenizer's end-of-text token as end of turn."""
    return ChatTemplate(DEFAULT_CHAT_TEMPLATE, eos_token=_token_text(tokenizer, tokenizer.eot_id))


def _token_text(tokenizer: Tokenizer, token_id: int | None) -> str:
    text = tokenizer.token(token_id) if token_id is not None and hasattr(tokenizer, "token") else None
    return text if text is not None else "<|endoftext|>"


def _special_text(value) -> str | None:
    """A special token as tokenizer_config.json spells it: a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_tokenizer_config(folder: str | Path) -> dict:
    """``tokenizer_config.json`` of a folder ({} when absent), with the text of ``chat_template.jinja`` as
    ``chat_template`` when that file is there (it wins, as in transformers)."""
    folder = Path(folder)
    path = folder / TOKENIZER_CONFIG
    config: dict = {}
    if path.is_file():
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: malformed JSON ({exc})") from None
        if not isinstance(config, dict):
            raise DataError(f"{path}: must hold a JSON object")
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        config = {**config, "chat_template": (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")}
    return config


def read_chat_template(folder: str | Path) -> ChatTemplate | None:
    """The chat template a model folder carries, or None. A list of named templates gives "default"."""
    folder = Path(folder)
    config = read_tokenizer_config(folder)
    source = config.get("chat_template")
    if isinstance(source, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default", next(iter(named.values()), None))
    if source is None:
        return None
    origin = folder / (CHAT_TEMPLATE_FILE if (folder / CHAT_TEMPLATE_FILE).is_file() else TOKENIZER_CONFIG)
    if not isinstance(source, str):
        raise DataError(f"{origin}: chat_template must be a string, got {type(source).__name__}")
    return ChatTemplate(
        source,
        eos_token=_special_text(config.get("eos_token")),
        bos_token=_special_text(config.get("bos_token")),
        origin=str(origin),
    )


# -- conversations --------------------------------------------------------------------------------------


def check_messages(messages, where: str, roles: Sequence[str] = CHAT_ROLES) -> list[dict]:
    """``messages`` as a list of {role, content} dicts, or a DataError naming ``where`` and the message."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in roles:
            role = m.get("role") if isinstance(m, dict) else None
            raise DataError(
                f"{where}: messages[{i}] has role {role!r}; the roles are {', '.join(roles)} (got {m!r})"
            )
        if not isinstance(m.get("content"), str):
            raise DataError(
                f"{where}: messages[{i}] content must be a string, got {type(m.get('content')).__name__}"
            )
    return messages


def conversation_segments(template: ChatTemplate, messages: list[dict], where: str) -> list[Segment]:
    """The rendered conversation cut into segments: each message's text, and before each assistant message
    the generation prompt (its header). Assistant segments (with their end-of-turn token) are trained.

    The pieces are found by rendering growing prefixes of the conversation, so any template works that
    renders a conversation as the continuation of its first messages (every common template does)."""
    check_messages(messages, where)
    segments: list[Segment] = []
    done = ""

    def extend(text: str, train: bool, i: int) -> None:
        nonlocal done
        if not text.startswith(done):
            raise DataError(
                f"{where}: the chat template ({template.origin}) renders messages[{i}] by changing the text "
                "of the messages before it, so the assistant turns cannot be located; use a template that "
                "appends each message"
            )
        if len(text) > len(done):
            segments.append(Segment(text[len(done) :], train))
        done = text

    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            extend(template.render(messages[:i], add_generation_prompt=True, where=where), False, i)
        extend(template.render(messages[: i + 1], where=where), message["role"] == "assistant", i)
    if not any(s.train for s in segments):
        raise DataError(f"{where}: no assistant message to learn from")
    return segments


def special_token_ids(tokenizer: Tokenizer, template: ChatTemplate | None = None) -> dict[str, int]:
    """Text -> id of the tokenizer's special tokens, which a rendered template may contain."""
    out: dict[str, int] = {}
    hf = getattr(tokenizer, "hf", None)
    if hf is not None:
        out = {t.content: i for i, t in hf.get_added_tokens_decoder().items() if t.special}
    if template is not None and template.eos_token and template.eos_token not in out:
        if tokenizer.eot_id is not None and _token_text(tokenizer, tokenizer.eot_id) == template.eos_token:
            out[template.eos_token] = tokenizer.eot_id
    return out


def encode_chat(tokenizer: Tokenizer, text: str, specials: dict[str, int]) -> list[int]:
    """Token ids of rendered chat text: special-token strings become their ids, the text between them is
    encoded as text (what transformers' tokenizer does with added special tokens)."""
    if not specials:
        return tokenizer.encode(text)
    pattern = "(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
    ids: list[int] = []
    for k, piece in enumerate(re.split(pattern, text)):
        if k % 2:
            ids.append(specials[piece])
        elif piece:
            ids += tokenizer.encode(piece)
    return ids


# -- a chat session ---------------------------------------------------------------------------------------


@dataclass
class Reply:
    """The last reply of a session: its text, token ids, why it stopped, and the prompt it answered."""

    text: str
    tokens: list[int]
    finish_reason: str  # eos (end of turn), stop, length or context
    prompt_tokens: int


@dataclass
class ChatSession:
    """A conversation with a model through its chat template. ``send(text, on_text)`` streams the reply in
    pieces as it is generated and records it; the history is trimmed to the context (oldest turns first, the
    system prompt kept), with a line in ``notices`` each time."""

    model: torch.nn.Module
    tokenizer: Tokenizer
    template: ChatTemplate
    sampling: SamplingConfig
    device: torch.device
    system: str | None = None
    use_cache: bool = True
    decoder: FastDecoder | None = None  # the fast decoding step (``infer.fast``); None: the eager path
    messages: list[dict] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    last: Reply | None = None

    def __post_init__(self):
        check_sampling(self.sampling)
        self.template.check()
        self.specials = special_token_ids(self.tokenizer, self.template)
        end = self.template.eos_token
        # a template whose end-of-turn text is not the end-of-text token also stops at that text
        self.stops = tuple(self.sampling.stop) + (
            (end,) if end and self.specials.get(end) != self.tokenizer.eot_id else ()
        )
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.last = None

    def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
        text = self.template.render(messages, add_generation_prompt=True, where="chat")
        return encode_chat(self.tokenizer, text, self.specials)

    def _fit(self, messages: list[dict]) -> list[int]:
        """The prompt ids of ``messages``, dropping the oldest turns until the prompt leaves room for a reply
        (``max_new_tokens``, at most half the context). Changes ``messages`` in place."""
        context = self.model.cfg.max_seq_len
        room = min(self.sampling.max_new_tokens, context // 2)
        ids = self.prompt_ids(messages)
        dropped = 0
        while len(ids) + room > context:
            first = 1 if messages and messages[0]["role"] == "system" else 0
            last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
            if first >= last_user:  # only the system prompt and the new message are left
                raise DataError(
                    f"the message is {len(ids)} tokens with the system prompt; with {room} tokens kept for "
                    f"the reply it does not fit the model's context of {context} tokens: shorten it"
                )
            del messages[first]  # a turn is a user message and the replies that follow it
            last_user -= 1
            while first < last_user and messages[first]["role"] != "user":
                del messages[first]
                last_user -= 1
            dropped += 1
            ids = self.prompt_ids(messages)
        if dropped:
            self.notices.append(
                f"(the conversation is longer than the context of {context} tokens: dropped the oldest "
                f"{dropped} turn{'s' if dropped > 1 else ''}{', kept the system prompt' if self.system else ''})"
            )
        return ids

    def send(self, text: str, on_text: Callable[[str], None] | None = None) -> Reply:
        """Add the user's message and generate the reply; ``on_text(piece)`` streams it as it comes. The
        reply ends at the end-of-turn token (``finish_reason`` "eos") unless it runs out of tokens first."""
        messages = [*self.messages, {"role": "user", "content": text}]
        check_messages(messages, "chat")
        ids = self._fit(messages)
        tracker = TextTracker(self.tokenizer, self.stops)

        def on_token(row: int, tokens: list[int]) -> bool:
            delta = tracker.update(tokens)
            if delta and on_text is not None:
                on_text(delta)
            return tracker.stopped

        result = generate_ids(
            self.model,
            [ids],
            self.sampling,
            device=self.device,
            eos_id=self.tokenizer.eot_id,
            pad_id=self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0,
            use_cache=self.use_cache,
            on_token=on_token,
            decoder=self.decoder,
        )
        tail = tracker.flush()
        if tail and on_text is not None:
            on_text(tail)
        self.messages = [*messages, {"role": "assistant", "content": tracker.text}]
        self.last = Reply(tracker.text, result.tokens[0], result.finish_reasons[0], len(ids))
        return self.last
