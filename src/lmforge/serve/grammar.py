"""Constrained decoding for ``lmforge serve``: JSON schemas (``response_format``, forced tool calls) compiled by
llguidance into a matcher that masks each step's logits, so the output always parses and validates.

Why llguidance: ``benchmarks/grammar_engines.py`` measured it against xgrammar and outlines-core on lmforge's
tokenizers (docs/using.md has the figures). It and xgrammar compile a schema in 1-2 ms (outlines-core takes
15 s for ``json_object``); xgrammar's mask is ~1.5x faster on bounded schemas, llguidance's on ``json_object``,
and either is ~2% of a decoding step. llguidance's wheel depends on nothing; xgrammar's requires torch,
transformers and triton.

The engine sees the tokenizer as the bytes of each token (``token_bytes``): a byte-level BPE token's
stand-in characters become their bytes, a char tokenizer's ``<0xAB>`` fallback tokens become that byte, and
special tokens (end-of-text, pad) are no text at all; end-of-text is the grammar's end-of-sequence token, so
a request may end only where its grammar accepts.

A ``Constraint`` belongs to one request and lives on the scheduler thread: ``allowed()`` is the boolean mask
(V,) of the tokens the grammar admits next, ``accept(token)`` advances it, and ``complete`` says the grammar
admits nothing more (the request ends with "stop").
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

ENGINE = "llguidance"
# Compact JSON (no free whitespace between tokens): a sampled model could otherwise fill its whole budget
# with spaces and newlines that every schema allows.
COMPILE_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
JSON_OBJECT_SCHEMA = {"type": "object"}  # response_format json_object: any JSON object
CACHE_SIZE = 64  # compiled grammars kept, by schema text
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"  # the Hermes/Qwen tool-call convention


class GrammarError(ValueError):
    """A schema the engine cannot compile (unsupported keyword, invalid schema): the message says why."""


def token_bytes(tokenizer) -> list[bytes | None]:
    """The bytes each token id stands for; None for special tokens (no text). Reads the Hugging Face
    tokenizer's decoder to know how token strings map to bytes (byte-level BPE, byte fallback, Metaspace)."""
    from lmforge.data.tokenizer import byte_level_alphabet

    hf = tokenizer.hf
    spec = json.loads(hf.to_str()).get("decoder") or {}
    kinds = {spec.get("type")} | {d.get("type") for d in spec.get("decoders", [])}
    byte_level = "ByteLevel" in kinds
    fallback = "ByteFallback" in kinds
    metaspace = "Metaspace" in kinds or any(
        d.get("type") == "Replace" and d.get("pattern", {}).get("String") == "\u2581"
        for d in spec.get("decoders", [])
    )
    alphabet = byte_level_alphabet() if byte_level else {}
    specials = {i for i, t in hf.get_added_tokens_decoder().items() if t.special}
    out: list[bytes | None] = []
    for i in range(tokenizer.vocab_size):
        text = hf.id_to_token(i)
        if text is None or i in specials:
            out.append(None)
        elif byte_level and all(ch in alphabet for ch in text):
            out.append(bytes(alphabet[ch] for ch in text))
        elif fallback and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            out.append(bytes([int(text[3:5], 16)]))
        else:
            out.append((text.replace("\u2581", " ") if metaspace else text).encode("utf-8"))
    return out


class _Wrapped:
    """The tokenizer as llguidance's ``TokenizerWrapper`` takes it: token bytes, end-of-sequence, specials,
    and an encoder of bytes (used only to re-tokenize forced text, which lmforge does not ask for)."""

    def __init__(self, tokenizer, tokens: list[bytes | None]):
        self.eos_token_id = tokenizer.eot_id
        self.bos_token_id = None
        specials = [i for i, b in enumerate(tokens) if b is None]
        # a special token gets a name llguidance recognises as special (\xff then its text)
        self.tokens = [
            b if b is not None else b"\xff" + (tokenizer.token(i) or f"<|{i}|>").encode()
            for i, b in enumerate(tokens)
        ]
        self.special_token_ids = specials
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text)


class Grammars:
    """Compiles schemas for one tokenizer and caches them by schema text (thread-safe: the server compiles on
    worker threads; matchers are made on the scheduler thread)."""

    def __init__(self, tokenizer, vocab_size: int):
        import llguidance

        self.vocab_size = vocab_size  # the model's (may exceed the tokenizer's: extra rows are never allowed)
        wrapped = llguidance.TokenizerWrapper(_Wrapped(tokenizer, token_bytes(tokenizer)))
        self.tokenizer = llguidance.LLTokenizer(wrapped, n_vocab=tokenizer.vocab_size)
        self.eos = tokenizer.eot_id
        self.cache: OrderedDict[str, object] = OrderedDict()  # schema -> a matcher that has seen nothing
        self.lock = threading.Lock()

    def compile(self, schema: dict, *, tool_call: bool = False) -> object:
        """The compiled grammar of ``schema`` (a fresh llguidance matcher, copied for each request), or a
        ``GrammarError``. ``tool_call``: the JSON sits in the tool-call tags, ``<tool_call>{...}</tool_call>``.
        Compiling takes milliseconds (a large schema more): call it off the event loop."""
        import llguidance

        key = json.dumps([schema, tool_call], sort_keys=True)
        with self.lock:
            if key in self.cache:
                self.cache.move_to_end(key)
                return self.cache[key]
        try:
            if tool_call:
                options = {**schema, "x-guidance": COMPILE_OPTIONS}
                lark = (
                    f'start: "{TOOL_CALL_OPEN}" call "{TOOL_CALL_CLOSE}"\ncall: %json {json.dumps(options)}'
                )
                grammar = llguidance.LLMatcher.grammar_from_lark(lark)
            else:
                grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=COMPILE_OPTIONS)
        except ValueError as exc:
            raise GrammarError(str(exc)) from None
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        with self.lock:
            self.cache[key] = matcher
            while len(self.cache) > CACHE_SIZE:
                self.cache.popitem(last=False)
        return matcher

    def constraint(self, compiled) -> Constraint:
        """A new request's state of a grammar from ``compile``."""
        return Constraint(compiled.deep_copy(), self.vocab_size)


@dataclass(eq=False)
class Constraint:
    """One request's grammar state: the tokens allowed next, advanced by each accepted token."""

    matcher: object  # llguidance.LLMatcher
    vocab_size: int  # the model's V

    def allowed(self) -> torch.Tensor:
        """The boolean mask (V,) of the tokens the grammar admits next (end-of-text only where it accepts)."""
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), np.uint8), bitorder="little")
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)  # ids past the tokenizer's are never allowed
        n = min(self.vocab_size, bits.size)
        mask[:n] = torch.from_numpy(bits[:n].view(np.bool_))
        return mask  # (V,)

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self.matcher.get_error()}")

    @property
    def complete(self) -> bool:
        """The grammar admits nothing more but the end: the output is whole."""
        return bool(self.matcher.is_stopped())
