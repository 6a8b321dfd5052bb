import json

import pytest

from lmforge.data.tokenizer import char_tokenizer, load_tokenizer, train_bpe, train_char
from lmforge.errors import DataError

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


# GPT-2's pre-tokenization pattern (the byte-level BPE contract), written here rather than imported.
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def gpt2_byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map: printable Latin-1 bytes stand for themselves, the
    other 68 bytes take the characters from U+0100 on, in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def reference_bpe_encode(tokenizer_json, text: str) -> list[int]:
    """Byte-level BPE by the textbook algorithm: split with GPT-2's pattern, map each piece's UTF-8 bytes to
    the byte alphabet, then merge the adjacent pair of lowest merge rank until none applies."""
    import regex

    model = json.loads(tokenizer_json.read_text(encoding="utf-8"))["model"]
    vocab = model["vocab"]
    ranks = {tuple(m.split(" ") if isinstance(m, str) else m): r for r, m in enumerate(model["merges"])}
    alphabet = gpt2_byte_alphabet()
    ids = []
    for piece in regex.findall(GPT2_SPLIT, text):
        word = [alphabet[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            rank, at = min((ranks.get((word[i], word[i + 1]), float("inf")), i) for i in range(len(word) - 1))
            if rank == float("inf"):
                break
            first, second = word[at], word[at + 1]
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids += [vocab[token] for token in word]
    return ids


def test_bpe_ids_match_a_reference_byte_level_bpe(bpe_path, shared):
    """Against the byte-level BPE algorithm written out in this file (not the same tokenizer.json in the
    same engine), on emoji, code, CRLF, odd whitespace, Chinese and English."""
    ours = load_tokenizer(bpe_path)
    en = (shared / "en" / "pg2701_moby_dick.txt").read_text(encoding="utf-8")[:5_000]
    texts = SYNTHETIC + zh_texts(shared, 20) + [en, "  two  spaces\t\ttabs \n\n", "it's we'll I'D 123,456"]
    merged = 0
    for text in texts:
        expected = reference_bpe_encode(bpe_path, text)
        assert ours.encode(text) == expected, text[:60]
        merged += len(text.encode("utf-8")) - len(expected)
    assert merged > 1000  # the merges did most of the work, so their order was checked


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
