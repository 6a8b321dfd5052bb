"""Measure a model: perplexity and bits per byte on text, and multiple-choice accuracy by log-likelihood.

Shape legend: B batch, T tokens, C d_model, V vocabulary, N tokens of a whole text.

Multiple choice follows EleutherAI's lm-evaluation-harness: each ending is scored by the summed
log-probability of its tokens after the context (the continuation is ``" " + ending``); ``acc`` picks the
ending with the highest sum, ``acc_norm`` the highest sum divided by the ending's length in characters.
The HellaSwag text cleanup is the harness's (``" [title]"`` -> ``". "``, bracketed markers removed).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.errors import DataError
from lmforge.files import jsonl_records
from lmforge.infer.generate import Tokenizer
from lmforge.model.transformer import Transformer

# -- perplexity and bits per byte -------------------------------------------------------------------------


@dataclass
class TextScore:
    """Summed negative log-likelihood (nats) of ``tokens`` predicted tokens that spell ``bytes`` bytes
    (None when the byte count is unknown; ``note`` then says why)."""

    nll: float
    tokens: int
    bytes: int | None
    note: str = ""

    @property
    def loss(self) -> float:
        return self.nll / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    @property
    def bits_per_byte(self) -> float | None:
        if self.bytes is None:
            return None
        return self.nll / (max(self.bytes, 1) * math.log(2))

    def to_dict(self) -> dict:
        out = {
            "loss": self.loss,
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
            "tokens": self.tokens,
            "bytes": self.bytes,
        }
        if self.note:
            out["note"] = self.note
        return out


def sequence_nll(
    model: Transformer, tokens: torch.Tensor, *, seq_len: int, batch_size: int, device: torch.device
) -> float:
    """Summed NLL (nats) of tokens[1:] given what precedes them (see ``windowed_nll``)."""
    return windowed_nll(
        model,
        lambda start, length: tokens[start : start + length],
        tokens.numel(),
        seq_len=seq_len,
        batch_size=batch_size,
        device=device,
    )


@torch.no_grad()
def windowed_nll(
    model: Transformer,
    read: Callable[[int, int], torch.Tensor],
    n: int,
    *,
    seq_len: int,
    batch_size: int,
    device: torch.device,
) -> float:
    """Summed NLL (nats) of tokens 1..n-1 of a sequence of ``n`` tokens given what precedes them, over
    windows of ``seq_len`` predictions that overlap by one token, so every token after the first is
    predicted exactly once. ``read(start, length)`` returns tokens [start, start+length) (a memory map
    needs only one batch of windows in memory)."""
    starts = list(range(0, n - 1, seq_len))
    total = 0.0
    was_training = model.training
    model.eval()
    for first in range(0, len(starts), batch_size):
        group = starts[first : first + batch_size]
        width = min(seq_len, n - 1 - group[0])
        inputs = torch.zeros(len(group), width, dtype=torch.long)
        targets = torch.full((len(group), width), -100, dtype=torch.long)
        for row, start in enumerate(group):
            piece = torch.as_tensor(read(start, min(seq_len + 1, n - start)))  # (<= seq_len + 1,)
            inputs[row, : piece.numel() - 1] = piece[:-1]
            targets[row, : piece.numel() - 1] = piece[1:]
        logits = model(inputs.to(device)).float()  # (B, T, V); right padding cannot leak into causal rows
        total += F.cross_entropy(
            logits.flatten(0, 1), targets.to(device).flatten(), ignore_index=-100, reduction="sum"
        ).item()
    model.train(was_training)
    return total


def score_text(
    model: Transformer,
    tokenizer: Tokenizer,
    text: str,
    *,
    device: torch.device,
    seq_len: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
) -> TextScore:
    """Perplexity and bits per byte of ``text``. With an end-of-text token the text is scored after it, as
    a new document, so every byte is predicted; ``max_tokens`` caps the work (and the bytes counted)."""
    if not text:
        raise DataError("cannot score an empty text")
    ids = tokenizer.encode(text)
    if max_tokens is not None and len(ids) > max_tokens:
        ids = ids[:max_tokens]
        text = tokenizer.decode(ids)
    if tokenizer.eot_id is not None:
        ids = [tokenizer.eot_id] + ids
        n_bytes = len(text.encode("utf-8"))
    else:
        n_bytes = len(tokenizer.decode(ids[1:]).encode("utf-8"))
    if len(ids) < 2:
        raise DataError("the text is a single token; nothing to predict")
    seq_len = min(seq_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
    tokens = torch.tensor(ids, dtype=torch.long)
    nll = sequence_nll(model, tokens, seq_len=seq_len, batch_size=batch_size, device=device)
    return TextScore(nll=nll, tokens=len(ids) - 1, bytes=n_bytes)


def score_file(model: Transformer, tokenizer: Tokenizer, path: str | Path, **kwargs) -> TextScore:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such text file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read as UTF-8 text ({exc})") from None
    return score_text(model, tokenizer, text, **kwargs)


# -- prepared validation shards ---------------------------------------------------------------------------

DECODE_CHUNK = 1 << 20  # tokens decoded at a time when counting the bytes of a split


def check_same_tokenizer(folder: str | Path, fingerprint: str, tokenizer: Tokenizer) -> None:
    """Refuse shards written by another tokenizer than the model's: their ids would mean other text."""
    own = getattr(tokenizer, "fingerprint", None)
    if own != fingerprint:
        raise DataError(
            f"{folder} was prepared with tokenizer {fingerprint}, but the model's tokenizer is {own}: "
            f"its token ids would be read as other text. Prepare the data again with the model's tokenizer "
            f"(data.tokenizer=<the model folder>/tokenizer.json) or evaluate on a text file with --text"
        )


def split_bytes(
    read: Callable[[int, int], np.ndarray], n: int, eot_id: int, tokenizer: Tokenizer
) -> int | None:
    """UTF-8 bytes of the documents in tokens [0, n) of a split (each document ends with end-of-text),
    by decoding them (lmforge tokenizers are lossless); None when [0, n) ends inside a document."""
    total, carry = 0, np.empty(0, dtype=np.int64)
    for start in range(0, n, DECODE_CHUNK):
        chunk = np.concatenate([carry, read(start, min(DECODE_CHUNK, n - start))])
        ends = np.flatnonzero(chunk == eot_id)
        first = 0
        for end in ends:
            total += len(tokenizer.decode(chunk[first:end].tolist()).encode("utf-8"))
            first = int(end) + 1
        carry = chunk[first:]
    return total if carry.size == 0 else None


def score_prepared(
    model: Transformer,
    tokenizer: Tokenizer,
    folder: str | Path,
    *,
    device: torch.device,
    split: str = "val",
    seq_len: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
) -> TextScore:
    """Perplexity and bits per byte of a split of a folder written by ``lmforge data prepare``, read from
    its memory-mapped shards in windows of the model's context.

    The split is scored as the stream the model trained on, after one end-of-text token (so its first
    document is predicted as a new one): every token, the end-of-text after each document included, is
    predicted once. Bytes are those of the documents' text (end-of-text spells none): ``bytes`` recorded
    for the split in meta.json when the whole split is scored, else counted by decoding the documents.
    ``max_tokens`` keeps the whole documents within the first ``max_tokens`` tokens."""
    from lmforge.data.loader import TokenSplit

    data = TokenSplit(folder, split)
    check_same_tokenizer(folder, data.fingerprint, tokenizer)
    if data.vocab_size > model.cfg.vocab_size:
        raise DataError(
            f"{folder}: its vocabulary has {data.vocab_size} tokens, the model's {model.cfg.vocab_size}"
        )
    n, note = data.n_tokens, ""
    if n == 0:
        raise DataError(
            f"{folder}: the {split!r} split holds no tokens; prepare it with data.val_fraction > 0"
        )
    if max_tokens is not None and max_tokens < n:
        head = data.read(0, max_tokens)
        ends = np.flatnonzero(head == data.eot_id)
        if ends.size:
            n = int(ends[-1]) + 1
        else:
            n = max_tokens
            note = f"the first {max_tokens} tokens end inside a document, so its bytes are unknown"
    recorded = data.meta["splits"][split].get("bytes")
    if note:
        n_bytes = None
    elif n == data.n_tokens and isinstance(recorded, int):
        n_bytes = recorded
    else:
        n_bytes = split_bytes(data.read, n, data.eot_id, tokenizer)
        if n_bytes is None:
            note = (
                f"the {split!r} split does not end with end-of-text, so its last document's bytes are unknown"
            )

    def read(start: int, length: int) -> np.ndarray:  # the split after one end-of-text token
        if start == 0:
            return np.concatenate([[data.eot_id], data.read(0, length - 1)])
        return data.read(start - 1, length)

    seq_len = min(seq_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
    nll = windowed_nll(model, read, n + 1, seq_len=seq_len, batch_size=batch_size, device=device)
    return TextScore(nll=nll, tokens=n, bytes=n_bytes, note=note)


# -- multiple choice --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice question: a context, its candidate endings, the index of the right one."""

    context: str
    choices: tuple[str, ...]
    gold: int
    where: str  # file:line, for messages


def hellaswag_clean(text: str) -> str:
    """The harness's HellaSwag cleanup: WikiHow markers removed, double spaces collapsed."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _item_from_record(obj: dict, where: str) -> ChoiceItem:
    """HellaSwag records (``ctx`` or ``ctx_a``/``ctx_b``, ``endings``, ``label``, ``activity_label``) and
    llm-foundry records (``query``, ``choices``, ``gold``) become one ChoiceItem."""
    if "endings" in obj:
        missing = [k for k in ("activity_label", "endings", "label") if k not in obj]
        if "ctx" not in obj and not ("ctx_a" in obj and "ctx_b" in obj):
            missing.append("ctx (or ctx_a and ctx_b)")
        if missing:
            raise DataError(
                f"{where}: HellaSwag record without {', '.join(missing)} (found: {', '.join(sorted(obj))})"
            )
        ctx = obj["ctx"] if "ctx" in obj else obj["ctx_a"] + " " + obj["ctx_b"].capitalize()
        context = hellaswag_clean(f"{obj['activity_label']}: {ctx}")
        choices = tuple(hellaswag_clean(e) for e in obj["endings"])
        gold = obj["label"]
    elif "choices" in obj:
        missing = [k for k in ("query", "gold") if k not in obj]
        if missing:
            raise DataError(
                f"{where}: multiple-choice record without {', '.join(missing)} (found: {', '.join(sorted(obj))})"
            )
        context, choices, gold = obj["query"], tuple(obj["choices"]), obj["gold"]
    else:
        raise DataError(
            f"{where}: not a multiple-choice record: expected HellaSwag fields (ctx, endings, label) or "
            f"query/choices/gold (found: {', '.join(sorted(obj))})"
        )
    try:
        gold = int(gold)
    except (TypeError, ValueError):
        raise DataError(f"{where}: the gold label {gold!r} is not an integer") from None
    if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise DataError(f"{where}: needs at least two non-empty string choices, got {list(choices)!r}")
    if not 0 <= gold < len(choices):
        raise DataError(f"{where}: gold label {gold} is not an index into its {len(choices)} choices")
    return ChoiceItem(context=str(context), choices=choices, gold=gold, where=where)


def load_choice_task(path: str | Path, limit: int | None = None) -> list[ChoiceItem]:
    """Read a multiple-choice JSONL file (first ``limit`` items); every problem names its file:line."""
    items = []
    for obj, where in jsonl_records(path, "task file"):
        if limit is not None and len(items) >= limit:
            break
        items.append(_item_from_record(obj, where))
    if not items:
        raise DataError(f"{path}: no items")
    return items


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids the harness's way: trailing spaces of the context move to the
    continuation, the pair is encoded whole, and the continuation is what follows the context's ids."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        if tokenizer.eot_id is None:
            raise DataError("an empty context needs a tokenizer with an end-of-text token")
        return [tokenizer.eot_id], tokenizer.encode(continuation)
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids) :]


@torch.no_grad()
def continuation_logprobs(
    model: Transformer,
    pairs: Sequence[tuple[list[int], list[int]]],
    *,
    device: torch.device,
    batch_size: int = 16,
) -> list[float]:
    """Summed log P(continuation | context) for each (context ids, continuation ids) pair. Sequences longer
    than the context window lose tokens from the left, as in the harness."""
    max_len = model.cfg.max_seq_len
    was_training = model.training
    model.eval()
    out = [0.0] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    for first in range(0, len(order), batch_size):
        group = order[first : first + batch_size]
        rows = []
        for i in group:
            context, continuation = pairs[i]
            if not continuation:
                raise DataError(f"request {i}: the continuation has no tokens")
            sequence = (context + continuation)[-(max_len + 1) :]
            rows.append((sequence[:-1], sequence[-len(continuation) :]))
        width = max(len(inp) for inp, _ in rows)
        inputs = torch.zeros(len(rows), width, dtype=torch.long)
        for r, (inp, _) in enumerate(rows):
            inputs[r, : len(inp)] = torch.tensor(inp)
        hidden = model.hidden_states(
            inputs.to(device)
        )  # (B, T, C); right padding is invisible to causal rows
        for r, (inp, target) in enumerate(rows):
            positions = slice(len(inp) - len(target), len(inp))
            logprobs = model.lm_head(hidden[r, positions]).float().log_softmax(dim=-1)  # (n, V)
            picked = logprobs.gather(1, torch.tensor(target, device=device).unsqueeze(1))
            out[group[r]] = picked.sum().item()
    model.train(was_training)
    return out


def choice_loglikelihoods(
    model: Transformer,
    tokenizer: Tokenizer,
    items: Sequence[ChoiceItem],
    *,
    device: torch.device,
    batch_size: int = 16,
) -> list[list[float]]:
    """The log-likelihood of every ending of every item, in item order."""
    pairs = [encode_pair(tokenizer, item.context, " " + choice) for item in items for choice in item.choices]
    flat = continuation_logprobs(model, pairs, device=device, batch_size=batch_size)
    out, at = [], 0
    for item in items:
        out.append(flat[at : at + len(item.choices)])
        at += len(item.choices)
    return out


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # the first of equal maxima, as numpy


def _mean_stderr(values: Sequence[float]) -> float:
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def accuracy(items: Sequence[ChoiceItem], loglikelihoods: Sequence[Sequence[float]]) -> dict:
    """acc, acc_norm (log-likelihood per character of the ending) and their standard errors."""
    hits, hits_norm = [], []
    for item, lls in zip(items, loglikelihoods):
        hits.append(float(_argmax(lls) == item.gold))
        normed = [ll / len(choice) for ll, choice in zip(lls, item.choices)]
        hits_norm.append(float(_argmax(normed) == item.gold))
    n = len(hits)
    return {
        "acc": sum(hits) / n,
        "acc_stderr": _mean_stderr(hits),
        "acc_norm": sum(hits_norm) / n,
        "acc_norm_stderr": _mean_stderr(hits_norm),
        "n": n,
    }


def evaluate_choice_task(
    model: Transformer,
    tokenizer: Tokenizer,
    path: str | Path,
    *,
    device: torch.device,
    limit: int | None = None,
    batch_size: int = 16,
) -> dict:
    items = load_choice_task(path, limit)
    lls = choice_loglikelihoods(model, tokenizer, items, device=device, batch_size=batch_size)
    return accuracy(items, lls)


def task_name(path: str | Path) -> str:
    """'hellaswag' for '.../hellaswag_val.jsonl': the file stem up to its split suffix."""
    stem = Path(path).stem
    return re.sub(r"_(val|validation|test|train|dev)$", "", stem)
