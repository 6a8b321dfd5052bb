"""Text generation with a pre-allocated KV cache: greedy, temperature, top-k, top-p, repetition penalty,
stop strings, streaming, and batches of prompts of different lengths (left padding).

Shape legend: B batch (prompts), T tokens fed this step, L longest prompt, V vocabulary.

Two layers: ``generate_ids`` works on token ids and is what the tests compare with ``transformers``;
``generate`` takes strings and a tokenizer, and adds stop strings and streaming of text.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from lmforge.errors import ConfigError, DataError
from lmforge.infer.fast import FastDecoder, cache_length
from lmforge.model.transformer import KVCache, Transformer


class Tokenizer(Protocol):
    """What generation and evaluation need from a tokenizer (``lmforge.data.tokenizer`` provides it)."""

    eot_id: int | None
    pad_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How the next token is chosen. ``temperature=0`` is greedy decoding."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter
    repetition_penalty: float = 1.0  # 1: none; >1 discourages tokens already in the prompt or output
    stop: tuple[str, ...] = ()  # generation of a row ends at the first of these strings (not included)
    seed: int | None = None

    def problems(self) -> list[str]:
        out = []
        if self.max_new_tokens < 1:
            out.append(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            out.append(f"temperature={self.temperature} must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            out.append(f"top_k={self.top_k} must be >= 0 (0 disables it)")
        if not 0.0 < self.top_p <= 1.0:
            out.append(f"top_p={self.top_p} must be in (0, 1]")
        if self.repetition_penalty <= 0:
            out.append(f"repetition_penalty={self.repetition_penalty} must be > 0 (1 disables it)")
        if any(not s for s in self.stop):
            out.append("stop strings must not be empty")
        return out

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def check_sampling(sampling: SamplingConfig) -> None:
    problems = sampling.problems()
    if problems:
        raise ConfigError("invalid sampling settings:\n  " + "\n  ".join(problems))


# -- choosing the next token ------------------------------------------------------------------------------


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019), as transformers applies it: a seen token's logit is divided by
    ``penalty`` when positive and multiplied when negative. ``seen`` (B, V) is True for tokens already used."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k and outside the smallest set whose probability reaches top-p to -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first token always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop_sorted[..., 0] = False  # even when top_p rounds to 0 in the logits' dtype (1e-300 in float32)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_tokens(
    logits: torch.Tensor,
    seen: torch.Tensor | None,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The next token (B,) from last-position logits (B, V): penalty, then temperature, top-k, top-p, sample."""
    if seen is not None and sampling.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits.float(), seen, sampling.repetition_penalty)
    if sampling.greedy:
        return logits.argmax(dim=-1)  # the float cast cannot change the argmax of finite logits
    logits = logits.float()
    logits = filter_top_k_top_p(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# -- the decoding loop on token ids ----------------------------------------------------------------------


@dataclass
class IdsResult:
    """Generated ids (prompt excluded) per row and why each row stopped: eos, stop, length or context."""

    tokens: list[list[int]]
    finish_reasons: list[str]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device):
    """(ids, attention_mask, position_ids), each (B, L): prompts right-aligned, positions from 0 per row."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, longest - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, longest - len(prompt) :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def check_prompts(prompts: Sequence[Sequence[int]], max_seq_len: int) -> None:
    """Reject empty prompts and prompts that leave no room in the context, naming each one."""
    if not prompts:
        raise DataError("no prompts to generate from")
    problems = []
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            problems.append(f"prompt {i} is empty (give at least one token of text)")
        elif len(prompt) >= max_seq_len:
            problems.append(
                f"prompt {i} is {len(prompt)} tokens, but the model's context is {max_seq_len} tokens "
                f"(model.max_seq_len): shorten it to at most {max_seq_len - 1} tokens"
            )
    if problems:
        raise DataError("cannot generate:\n  " + "\n  ".join(problems))


@torch.inference_mode()
def generate_ids(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    *,
    device: torch.device,
    eos_id: int | None = None,
    pad_id: int = 0,
    use_cache: bool = True,
    on_token: Callable[[int, list[int]], bool] | None = None,
    decoder: FastDecoder | None = None,
) -> IdsResult:
    """Continue each prompt (a list of token ids) by up to ``sampling.max_new_tokens`` tokens.
    (Long by choice: the decoding loop reads best as one piece, prefill, step, sample, stop, in order.)

    ``on_token(row, generated_so_far)`` is called after every new token of an unfinished row; returning True
    ends that row (stop strings, streaming). ``use_cache=False`` recomputes the whole sequence every step (the
    reference the cache is tested against). The context limit ``model.cfg.max_seq_len`` ends rows early.
    ``decoder`` (a ``FastDecoder`` of this model, with the cache) takes the steps after the prompt: the fast
    path; without it every step goes through ``model.hidden_states`` (the eager path, the reference).
    """
    check_sampling(sampling)
    max_seq_len = model.cfg.max_seq_len
    check_prompts(prompts, max_seq_len)
    was_training = model.training
    model.eval()
    batch = len(prompts)
    ids, mask, positions = left_pad(prompts, pad_id, device)  # (B, L) each
    longest = ids.shape[1]
    budget = min(sampling.max_new_tokens, max_seq_len - max(len(p) for p in prompts))
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    seen = None
    if sampling.repetition_penalty != 1.0:
        seen = torch.zeros(batch, model.cfg.vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, ids, mask.bool())

    cache = None
    if use_cache:
        dtype = next(model.parameters()).dtype
        size = cache_length(longest + budget, compiled=decoder is not None and decoder.compiled)
        cache = KVCache.empty(model.cfg, batch, size, device=device, dtype=dtype)
        hidden = model.hidden_states(ids, attention_mask=mask, position_ids=positions, cache=cache)
    else:
        hidden = model.hidden_states(ids, attention_mask=mask, position_ids=positions)
    logits = model.lm_head(hidden[:, -1])  # (B, V): only the last position's logits are needed

    generated: list[list[int]] = [[] for _ in range(batch)]
    reasons: list[str | None] = [None] * batch
    unfinished = batch
    # positions of every token still to feed, computed once: (B, budget)
    step_positions = positions[:, -1:] + torch.arange(1, budget + 1, device=device)
    fast = decoder is not None and cache is not None
    index = torch.tensor([longest], device=device)  # (1,) the fast step's cache slot, advanced in place
    if not use_cache:  # the reference path grows full-length buffers instead of concatenating every step
        ids = torch.cat([ids, ids.new_zeros(batch, budget)], dim=1)  # (B, L + budget)
        mask = torch.cat([mask, mask.new_ones(batch, budget)], dim=1)
        positions = torch.cat([positions, step_positions], dim=1)
    for step in range(budget):
        token = next_tokens(logits, seen, sampling, generator)  # (B,)
        token_list = token.tolist()  # the one device -> host transfer per step: stopping needs the ids
        for row in range(batch):
            if reasons[row] is not None:
                continue
            if eos_id is not None and token_list[row] == eos_id:
                reasons[row] = "eos"
                unfinished -= 1
                continue
            generated[row].append(token_list[row])
            if on_token is not None and on_token(row, generated[row]):
                reasons[row] = "stop"
                unfinished -= 1
        if unfinished == 0 or step == budget - 1:
            break
        if seen is not None:
            seen.scatter_(1, token.unsqueeze(1), True)
        step_ids = token.unsqueeze(1)  # (B, 1)
        if fast:
            logits = decoder.step(cache, step_ids, step_positions[:, step : step + 1], index)
            index += 1
            continue
        if cache is not None:
            hidden = model.hidden_states(
                step_ids, position_ids=step_positions[:, step : step + 1], cache=cache
            )
        else:
            end = longest + step + 1
            ids[:, end - 1 : end] = step_ids
            hidden = model.hidden_states(
                ids[:, :end], attention_mask=mask[:, :end], position_ids=positions[:, :end]
            )
        logits = model.lm_head(hidden[:, -1])
    for row in range(batch):
        if reasons[row] is None:
            at_context = len(prompts[row]) + len(generated[row]) >= max_seq_len
            reasons[row] = "context" if at_context and budget < sampling.max_new_tokens else "length"
    model.train(was_training)
    return IdsResult(tokens=generated, finish_reasons=[str(r) for r in reasons])


# -- text in, text out -----------------------------------------------------------------------------------


@dataclass
class Generation:
    prompt: str
    text: str  # the continuation, cut before a stop string
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"

    def to_dict(self) -> dict:
        """The generation as printed by ``lmforge generate --json`` (the token count, not the ids)."""
        return {
            "prompt": self.prompt,
            "text": self.text,
            "tokens": len(self.tokens),
            "finish_reason": self.finish_reason,
        }


class TextTracker:
    """Turns one row's growing token list into text: finds stop strings and yields the text that is safe to
    show (no half UTF-8 character, nothing that could still become a stop string)."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.shown = 0
        self.text = ""
        self.stopped = False

    def update(self, tokens: list[int]) -> str:
        """New text to show after ``tokens`` grew; sets ``stopped`` when a stop string appeared."""
        text = self.tokenizer.decode(tokens)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
            safe = cut
        else:
            self.text = text
            safe = len(text.rstrip("\ufffd"))  # a multi-byte character may still be incomplete
            for s in self.stop:  # hold back a tail that may be the start of a stop string
                for k in range(min(len(s) - 1, safe), 0, -1):
                    if text[safe - k : safe] == s[:k]:
                        safe -= k
                        break
        delta = text[self.shown : max(safe, self.shown)]
        self.shown = max(safe, self.shown)
        return delta

    def flush(self) -> str:
        delta = self.text[self.shown :]
        self.shown = len(self.text)
        return delta


def generate(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    sampling: SamplingConfig,
    *,
    device: torch.device,
    use_cache: bool = True,
    on_text: Callable[[int, str], None] | None = None,
    decoder: FastDecoder | None = None,
) -> list[Generation]:
    """Continue each prompt string. ``on_text(row, delta)`` streams each row's new text as it is produced."""
    check_sampling(sampling)
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:
        raise DataError(f"prompt {empty[0]} is empty: give some text to continue (for example a newline)")
    encoded = [tokenizer.encode(p) for p in prompts]
    trackers = [TextTracker(tokenizer, sampling.stop) for _ in prompts]

    def on_token(row: int, tokens: list[int]) -> bool:
        tracker = trackers[row]
        delta = tracker.update(tokens)
        if on_text is not None and delta:
            on_text(row, delta)
        return tracker.stopped

    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    needs_text = bool(sampling.stop) or on_text is not None
    result = generate_ids(
        model,
        encoded,
        sampling,
        device=device,
        eos_id=tokenizer.eot_id,
        pad_id=pad_id,
        use_cache=use_cache,
        on_token=on_token if needs_text else None,
        decoder=decoder,
    )
    out = []
    for row, tokens in enumerate(result.tokens):
        tracker = trackers[row]
        if needs_text:
            tail = tracker.flush()
            if on_text is not None and tail:
                on_text(row, tail)
            text = tracker.text
        else:
            text = tokenizer.decode(tokens)
        out.append(Generation(prompts[row], text, tokens, result.finish_reasons[row]))
    return out


@dataclass(frozen=True)
class TextGenerator:
    """A model and its tokenizer, opened once, continuing prompts with one sampling setup: a batch of
    prompts, then any number more (an interactive session)."""

    model: Transformer
    tokenizer: Tokenizer
    sampling: SamplingConfig
    device: torch.device
    use_cache: bool = True
    decoder: FastDecoder | None = None  # the fast decoding step; None: the eager path

    def __call__(
        self, prompts: Sequence[str], on_text: Callable[[int, str], None] | None = None
    ) -> list[Generation]:
        return generate(
            self.model,
            self.tokenizer,
            prompts,
            self.sampling,
            device=self.device,
            use_cache=self.use_cache,
            on_text=on_text,
            decoder=self.decoder,
        )


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: JSONL with a ``prompt`` field per line, or plain text with one prompt per line
    (``\\n`` inside a line stands for a newline)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: no such prompts file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read prompts ({exc})") from None
    prompts = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                found = ", ".join(sorted(obj)) if isinstance(obj, dict) else type(obj).__name__
                raise DataError(f"{path}:{lineno}: no string field 'prompt' (found: {found})")
            prompts.append(obj["prompt"])
        else:
            prompts.append(line.replace("\\n", "\n"))
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts
