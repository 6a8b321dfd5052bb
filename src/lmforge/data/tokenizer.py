"""Tokenizers: train a byte-level BPE or a character-level vocabulary, or load an existing one.

Both kinds are real Hugging Face ``tokenizers.Tokenizer`` objects saved as ``tokenizer.json``, so a model
exported to Hugging Face ships the very tokenizer it was trained with. Both are lossless for any UTF-8 text:
the BPE works on bytes, and the char tokenizer falls back to byte tokens (``<0x41>``) for characters it has
not seen. Text that happens to spell a special token (``<|endoftext|>``) is encoded as ordinary text, so a
document can never inject a separator into the token stream.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from lmforge.errors import DataError
from lmforge.files import write_text_atomic

EOT = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [EOT, PAD]
# Names other tokenizers use for end-of-text and padding, tried in order when loading one.
EOT_NAMES = [EOT, "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]", "<|im_end|>"]
PAD_NAMES = [PAD, "<pad>", "[PAD]", "<|padding|>", "<unk>"]
N_BYTES = 256


class Tokenizer:
    """A thin typed face over ``tokenizers.Tokenizer`` with the ids lmforge needs (end-of-text, pad)."""

    def __init__(self, hf: HFTokenizer, *, eot_id: int | None = None, pad_id: int | None = None):
        self.hf = hf
        self.eot_id = eot_id if eot_id is not None else _find_id(hf, EOT_NAMES)
        if self.eot_id is None:
            raise DataError(
                f"the tokenizer has no end-of-text token (looked for {', '.join(EOT_NAMES)}); "
                f"add one as a special token"
            )
        found_pad = _find_id(hf, PAD_NAMES)
        self.pad_id = pad_id if pad_id is not None else (found_pad if found_pad is not None else self.eot_id)
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        canonical = json.dumps(json.loads(hf.to_str()), sort_keys=True, ensure_ascii=False)
        self.fingerprint = hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
        # Documents are data: a literal "<|endoftext|>" in a text is encoded as text, not as the separator.
        self.hf.encode_special_tokens = True

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def token(self, token_id: int) -> str | None:
        return self.hf.id_to_token(token_id)

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` (``path`` may be the file or a folder), atomically."""
        path = Path(path)
        if path.suffix != ".json":
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_text_atomic(path, self.hf.to_str(pretty=True))

    @property
    def cuts_safely(self) -> bool:
        """True when encoding ``text_pieces(text)`` one after another gives exactly the ids of encoding ``text``
        whole (see ``text_pieces``): a byte-level BPE with GPT-2's split pattern, or a vocabulary without
        merges or pre-tokenizer (the char tokenizer), with no normalizer and only special added tokens (which
        documents never produce). Other tokenizers (a Metaspace prefix, a custom split) encode whole."""
        config = json.loads(self.hf.to_str())
        model, pre = config.get("model") or {}, config.get("pre_tokenizer")
        if config.get("normalizer") is not None or model.get("type") != "BPE":
            return False
        if any(not token.get("special") for token in config.get("added_tokens") or []):
            return False
        if pre is None:
            return not model.get("merges")
        return (
            pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")
        )

    def tiktoken_encoder(self, sample: list[str]):
        """This tokenizer as a ``tiktoken.Encoding`` (several times faster), or None when it cannot be
        expressed exactly: only a byte-level BPE with the GPT-2 split pattern qualifies, and the ids must
        equal ours on every text of ``sample`` (checked here, at run time)."""
        return tiktoken_encoding(self, sample)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, eot_id={self.eot_id}, fingerprint={self.fingerprint})"
        )


def _find_id(hf: HFTokenizer, names: list[str]) -> int | None:
    for name in names:
        token_id = hf.token_to_id(name)
        if token_id is not None:
            return token_id
    return None


def _special(content: str) -> AddedToken:
    return AddedToken(content, special=True, normalized=False)


def train_bpe(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> Tokenizer:
    """Train a GPT-2 style byte-level BPE: 256 byte symbols, merges up to ``vocab_size``, then specials."""
    if vocab_size < N_BYTES + len(SPECIAL_TOKENS):
        raise DataError(
            f"data.vocab_size={vocab_size} is too small for a byte-level BPE "
            f"(needs >= {N_BYTES + len(SPECIAL_TOKENS)}: 256 bytes + special tokens); use data.tokenizer=char "
            f"for tiny vocabularies"
        )
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[_special(t) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf)


def train_char(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A character vocabulary: the most frequent characters, plus 256 byte tokens for everything else.

    Ids: 0 end-of-text, 1 pad, 2..257 the bytes ``<0x00>``..``<0xFF>``, then characters by code point.
    """
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(text)
    room = vocab_size - len(SPECIAL_TOKENS) - N_BYTES
    if room < 0:
        raise DataError(
            f"data.vocab_size={vocab_size} is too small for the char tokenizer "
            f"(needs >= {len(SPECIAL_TOKENS) + N_BYTES}: 2 special tokens + 256 byte fallbacks)"
        )
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:room]
    return char_tokenizer(sorted(ch for ch, _ in ranked))


def char_tokenizer(chars: Iterable[str]) -> Tokenizer:
    """Build the char tokenizer for a given character set (no merges; unseen characters become bytes)."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for b in range(N_BYTES):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in chars:
        if ch not in vocab:
            vocab[ch] = len(vocab)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    hf.add_special_tokens([_special(t) for t in SPECIAL_TOKENS])
    return Tokenizer(hf)


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """``kind`` is "bpe" or "char"."""
    if kind == "bpe":
        return train_bpe(texts, vocab_size)
    if kind == "char":
        return train_char(texts, vocab_size)
    raise DataError(f"data.tokenizer={kind!r}: expected 'bpe', 'char' or a path to a tokenizer")


def is_trained_kind(spec: str) -> bool:
    return spec in ("bpe", "char")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json``, a folder holding one (an lmforge dataset or run, a Hugging Face tokenizer
    folder), or a GPT-2 style folder with ``vocab.json`` + ``merges.txt``."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such tokenizer file or folder")
    eot_id = pad_id = None
    if path.is_dir():
        eot_id, pad_id = _ids_from_hf_config(path)
        if (path / "tokenizer.json").is_file():
            path = path / "tokenizer.json"
        elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            hf = _from_vocab_merges(path / "vocab.json", path / "merges.txt")
            return Tokenizer(hf, eot_id=eot_id, pad_id=pad_id)
        else:
            found = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
            raise DataError(
                f"{path}: no tokenizer.json (or vocab.json + merges.txt) in this folder (found: {found})"
            )
    try:
        hf = HFTokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        raise DataError(f"{path}: not a readable tokenizer.json ({exc})") from None
    return Tokenizer(hf, eot_id=eot_id, pad_id=pad_id)


def _from_vocab_merges(vocab: Path, merges: Path) -> HFTokenizer:
    hf = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    specials = [name for name in EOT_NAMES + PAD_NAMES if hf.token_to_id(name) is not None]
    hf.add_special_tokens([_special(t) for t in specials])
    return hf


def _ids_from_hf_config(folder: Path) -> tuple[int | None, int | None]:
    """The eos/pad ids named in a Hugging Face ``tokenizer_config.json``, when there is one."""
    config_path = folder / "tokenizer_config.json"
    tokenizer_path = folder / "tokenizer.json"
    if not config_path.is_file() or not tokenizer_path.is_file():
        return None, None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        hf = HFTokenizer.from_file(str(tokenizer_path))
    except Exception:  # a malformed side file: fall back to the known names
        return None, None

    def token_id(key: str) -> int | None:
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        return hf.token_to_id(value) if isinstance(value, str) else None

    return token_id("eos_token"), token_id("pad_token")


def iter_sample(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """The texts until ``max_chars`` characters have been yielded (the tokenizer's training sample)."""
    seen = 0
    for text in texts:
        if seen >= max_chars:
            return
        yield text
        seen += len(text)


# -- tiktoken: the same byte-level BPE through a faster engine --------------------------------------------

# The split pattern of Hugging Face's ByteLevel pre-tokenizer (use_regex=True), which is GPT-2's.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's map from the printable stand-in character of each byte back to the byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\xa1"), ord("\xac") + 1),
        *range(ord("\xae"), 256),
    ]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {ch: b for b, ch in chars.items()}


# A cut before a space, newline or tab that follows a character other than whitespace: no match of the GPT-2
# pattern holds a non-space followed by whitespace (a leading space only comes before letters, numbers or
# punctuation, whitespace runs hold only whitespace), and the pattern looks ahead only inside whitespace runs,
# so the pieces on either side split, and encode, exactly as they do inside the whole text.
_CUT_AT = re.compile(r"[^\s](?=[ \n\t])")  # a cut at the match's end
_CUT_AT_REVERSED = re.compile(r"[ \n\t](?=[^\s])")  # the same place searched in the reversed text


def text_pieces(text: str, size: int) -> Iterator[str]:
    """``text`` in consecutive pieces of at most ``size`` characters, each cut where a tokenizer with
    ``cuts_safely`` splits anyway (see ``_CUT_AT``): the last such place in the second half of the
    ``size`` window, else the first one after it (a piece is longer than ``size`` only when a whole window
    has no such place; without any, the rest of the text is one piece)."""
    start = 0
    while len(text) - start > size:
        lo, hi = start + size // 2, start + size
        back = _CUT_AT_REVERSED.search(text[hi - 1 : lo : -1])  # from hi - 1 back to lo + 1
        if back is not None:
            cut = hi - 1 - back.start()
        else:
            ahead = _CUT_AT.search(text, hi)
            if ahead is None:
                break
            cut = ahead.end()
        yield text[start:cut]
        start = cut
    yield text[start:]


def tiktoken_encoding(tok: Tokenizer, sample: list[str]):
    config = json.loads(tok.hf.to_str())
    model, pre = config.get("model") or {}, config.get("pre_tokenizer") or {}
    expressible = (
        model.get("type") == "BPE"
        and not model.get("byte_fallback")
        and not model.get("continuing_subword_prefix")
        and not model.get("end_of_word_suffix")
        and model.get("dropout") is None
        and config.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space")
    )
    if not expressible:
        return None
    try:
        import tiktoken
    except ImportError:
        return None
    to_byte = byte_level_alphabet()
    ranks: dict[bytes, int] = {}
    for token, token_id in tok.hf.get_vocab(with_added_tokens=False).items():
        if any(ch not in to_byte for ch in token):
            return None
        ranks[bytes(to_byte[ch] for ch in token)] = token_id
    specials = {t.content: i for i, t in tok.hf.get_added_tokens_decoder().items()}
    specials = {content: i for content, i in specials.items() if i not in set(ranks.values())}
    try:
        encoding = tiktoken.Encoding(
            f"lmforge-{tok.fingerprint}", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=specials
        )
    except ValueError:
        return None
    for text in sample:
        if encoding.encode_ordinary(text) != tok.encode(text):
            return None
    return encoding
