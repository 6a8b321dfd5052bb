import json

import pytest

from lmforge.data.tokenizer import char_tokenizer, load_tokenizer, train_bpe, train_char
from lmforge.errors import DataError
from tests.conftest import require_transformers

from .conftest import SYNTHETIC


def zh_texts(shared, n=200):
    with open(shared / "zh" / "tang_poems.jsonl", encoding="utf-8") as f:
        return [json.loads(next(f))["text"] for _ in range(n)]


def test_bpe_round_trip_is_lossless_on_any_utf8(bpe_path, shared):
    tok = load_tokenizer(bpe_path)
    en = (shared / "en" / "pg2701_moby_dick.txt").read_text(encoding="utf-8")[:20_000]  # BOM, CRLF
    for text in SYNTHETIC + zh_texts(shared) + [en, "", " ", "\n\n"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    assert tok.encode_batch(SYNTHETIC) == [tok.encode(t) for t in SYNTHETIC]
    assert (
        tok.vocab_size == 800
        and tok.token(tok.eot_id) == "<|endoftext|>"
        and tok.token(tok.pad_id) == "<|pad|>"
    )


def test_bpe_ids_match_transformers(bpe_path, shared):
    transformers = require_transformers()
    ours = load_tokenizer(bpe_path)
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(bpe_path))
    for text in SYNTHETIC[:4] + zh_texts(shared, 20):
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)


def test_special_token_text_is_encoded_as_text(bpe_path):
    tok = load_tokenizer(bpe_path)
    ids = tok.encode("x <|endoftext|> y")
    assert tok.eot_id not in ids and tok.decode(ids) == "x <|endoftext|> y"


def test_char_tokenizer_ids_are_the_characters_and_bytes_for_unseen(shared):
    text = (shared / "tinyshakespeare.txt").read_text(encoding="utf-8")[:50_000]
    tok = train_char([text], 4096)
    chars = sorted(set(text))
    assert tok.vocab_size == 2 + 256 + len(chars)
    assert tok.encode("First") == [2 + 256 + chars.index(c) for c in "First"]
    # "é" is unseen: its two UTF-8 bytes become byte tokens 2 + byte
    assert tok.encode("é") == [2 + b for b in "é".encode()]
    for t in SYNTHETIC + zh_texts(shared, 50):
        assert tok.decode(tok.encode(t)) == t


def test_char_vocab_keeps_the_most_frequent_characters():
    tok = train_char(["aaaabbbc"], 2 + 256 + 2)
    assert tok.encode("ab") == [258, 259] and len(tok.encode("c")) == 1 and tok.encode("c") == [2 + ord("c")]


def test_save_load_keeps_fingerprint_and_ids(tmp_path, bpe_path):
    tok = load_tokenizer(bpe_path)
    tok.save(tmp_path)  # a folder
    again = load_tokenizer(tmp_path)
    assert again.fingerprint == tok.fingerprint and again.encode(SYNTHETIC[0]) == tok.encode(SYNTHETIC[0])
    other = char_tokenizer("abc")
    assert other.fingerprint != tok.fingerprint


def test_hf_folder_with_tokenizer_config(tmp_path, bpe_path):
    (tmp_path / "tokenizer.json").write_bytes(bpe_path.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|pad|>", "pad_token": None}))
    tok = load_tokenizer(tmp_path)
    assert tok.eot_id == 1  # the config's eos wins over the default name


def test_gpt2_style_vocab_and_merges_folder(tmp_path, bpe_path):
    tok = load_tokenizer(bpe_path)
    tok.hf.model.save(str(tmp_path))  # writes vocab.json + merges.txt
    loaded = load_tokenizer(tmp_path)
    text = "To be, or not to be: that is the question."
    assert loaded.encode(text) == tok.encode(text) and loaded.eot_id == tok.eot_id


def test_bad_tokenizer_inputs(tmp_path):
    with pytest.raises(DataError, match="no such tokenizer"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(DataError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="not a readable tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(DataError, match="too small"):
        train_bpe(["abc"], 100)


def test_tiktoken_expresses_a_byte_level_bpe_exactly(bpe_path, shared, synthetic):
    tok = load_tokenizer(bpe_path)
    texts = (
        synthetic + zh_texts(shared, 300) + [(shared / "en" / "pg132_art_of_war.txt").read_text()[:50_000]]
    )
    encoding = tok.tiktoken_encoder(texts[:5])
    assert encoding is not None
    for text in texts:
        assert encoding.encode_ordinary(text) == tok.encode(text)
    assert char_tokenizer("abc").tiktoken_encoder(["abc"]) is None  # byte fallback: not expressible
