"""A long document is encoded in pieces (issue 27, item 2): a worker's memory follows the piece, not the
document, and the ids equal those of the whole text, checked exactly at the pieces' boundaries."""

from __future__ import annotations

import random

import numpy as np
import pytest

from lmforge.data.shards import PIECE_CHARS, DocumentEncoder
from lmforge.data.tokenizer import char_tokenizer, load_tokenizer, text_pieces, train_bpe

from .conftest import SYNTHETIC

# What the GPT-2 pattern treats specially around whitespace: runs of spaces, newlines and tabs before a word,
# a space before letters / digits / punctuation, contractions, NBSP and ideographic space (whitespace that is
# not a cut place), CRLF, emoji and CJK, a space run at the very end.
FRAGMENTS = [
    "word", "it's", "they'll", " ", "  ", "   ", "\n", "\n\n", "\n\n\n", "\t", "\t\t", " \n", "\n ", "\r\n",
    "123", " 45", "!?", " ...", "\u00a0", "\u3000x", "中文", "👍🏽", "Café", "x" * 70, " " * 40, "\n" * 9,
]  # fmt: skip


def tricky_text(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(FRAGMENTS) for _ in range(n)) + "".join(SYNTHETIC) + " end  "


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A byte-level BPE trained on the tricky text itself, so whitespace runs ("\\n\\n", "   ") are tokens."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe([tricky_text(4000, seed) for seed in range(5)], 600).save(path)
    return path


def test_a_wrong_cut_would_change_the_ids(bpe):
    """The reference is sensitive: a cut inside a whitespace run (before a word) changes the pre-tokens."""
    tok = load_tokenizer(bpe)
    assert tok.token(tok.encode("\n\n")[0]) == "ĊĊ"  # one token
    assert tok.encode("x\n\n") + tok.encode("y") != tok.encode("x\n\ny")
    assert tok.encode("x  ") + tok.encode("y") != tok.encode("x  y")


@pytest.mark.parametrize("size", [8, 13, 40, 97, 300])
def test_pieces_cut_where_the_tokenizer_splits_and_give_the_whole_texts_ids(bpe, size):
    tok = load_tokenizer(bpe)
    fast = tok.tiktoken_encoder([])
    assert tok.cuts_safely and fast is not None
    for seed in range(4):
        text = tricky_text(300, seed)
        pieces = list(text_pieces(text, size))
        assert "".join(pieces) == text and len(pieces) > 6
        whole = tok.encode(text)
        assert fast.encode_ordinary(text) == whole
        cuts = np.cumsum([len(p) for p in pieces])[:-1]
        for cut in cuts:  # every boundary: the two sides encode to the whole text's ids
            left, right = text[:cut], text[cut:]
            assert left[-1] not in " \n\t\u00a0" and right[0] in " \n\t", (left[-5:], right[:5])
            assert tok.encode(left) + tok.encode(right) == whole, (cut, left[-10:], right[:10])
        assert [i for p in pieces for i in tok.encode(p)] == whole
        assert [i for p in pieces for i in fast.encode_ordinary(p)] == whole


def test_pieces_of_texts_without_a_cut_place():
    assert list(text_pieces("", 4)) == [""]
    assert list(text_pieces("abc", 4)) == ["abc"]
    # no whitespace after a non-space inside the window: the first cut place after it
    assert list(text_pieces("x" * 10 + " y" + "z" * 3, 4)) == ["x" * 10, " y" + "z" * 3]
    assert list(text_pieces("x" * 10, 4)) == ["x" * 10]
    assert list(text_pieces(" " * 10, 4)) == [" " * 10]  # whitespace only: never cut


class Recording:
    """Wraps an encoding function and records the length of every text it encodes."""

    def __init__(self, fn):
        self.fn, self.lengths = fn, []

    def __call__(self, text):
        self.lengths.append(len(text))
        return self.fn(text)


@pytest.mark.parametrize("engine", ["tokenizers", "tiktoken"])
def test_a_long_document_is_encoded_in_pieces_with_the_whole_documents_ids(bpe, engine):
    encoder = DocumentEncoder(str(bpe), use_tiktoken=engine == "tiktoken")
    assert (encoder.fast is not None) == (engine == "tiktoken")
    text = tricky_text(40_000, 7)
    assert len(text) > 3 * PIECE_CHARS
    whole = load_tokenizer(bpe).encode(text)
    seen = Recording(encoder.tokenizer.encode)
    encoder.tokenizer.encode = seen
    if encoder.fast is not None:
        fast = Recording(encoder.fast.encode_ordinary)
        encoder.fast = type("Fast", (), {"encode_ordinary": staticmethod(fast)})()
        seen = fast
    row = encoder([text, "short"])
    assert row[0].tolist() == whole + [encoder.tokenizer.eot_id]
    assert row[1].tolist() == load_tokenizer(bpe).encode("short") + [encoder.tokenizer.eot_id]
    assert len(seen.lengths) > 3 and max(seen.lengths) <= PIECE_CHARS  # never the whole document at once


def test_the_char_tokenizer_cuts_anywhere_and_others_encode_whole(bpe, tmp_path):
    text = tricky_text(3000, 3)
    char = char_tokenizer(sorted(set(text[:500])))
    char.save(tmp_path / "char")
    encoder = DocumentEncoder(str(tmp_path / "char"), use_tiktoken=False, piece_chars=64)
    assert char.cuts_safely and encoder.piece_chars == 64
    assert encoder([text])[0].tolist() == char.encode(text) + [char.eot_id]
    # a prefix space added to every piece would change the ids: such a tokenizer encodes whole
    from tokenizers import pre_tokenizers

    spaced = load_tokenizer(bpe)
    spaced.hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
    spaced.save(tmp_path / "spaced")
    assert not spaced.cuts_safely
    assert sum(map(len, (spaced.encode(p) for p in text_pieces(text, 64)))) != len(spaced.encode(text))
    encoder = DocumentEncoder(str(tmp_path / "spaced"), use_tiktoken=False, piece_chars=64)
    assert encoder.piece_chars == 0
    assert encoder([text])[0].tolist() == spaced.encode(text) + [spaced.eot_id]
