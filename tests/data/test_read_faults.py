"""Issue 27: data preparation never drops text silently (each test reproduces one reported fault)."""

import json

import pytest

from lmforge.config import DataConfig, load_config
from lmforge.data import sources
from lmforge.data.prepare import prepare_data
from lmforge.data.sources import SourceStats, read_documents
from lmforge.errors import ConfigError, DataError


def read(paths, **options):
    stats = SourceStats()
    options = {"text_field": "text", "chunk_chars": 8192, **options}
    return list(read_documents(paths, stats=stats, **options)), stats


class CountingPattern:
    """BLANK_LINES with a count of the characters each search may scan (from its start to the buffer end)."""

    def __init__(self, pattern):
        self.pattern, self.scanned = pattern, 0

    def search(self, text, pos=0):
        self.scanned += len(text) - pos
        return self.pattern.search(text, pos)


def test_reading_a_file_without_blank_lines_is_linear_in_its_size(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "BLOCK_BYTES", 4096)  # many blocks: the old re-search over the buffer shows
    line = "one sentence per line, the commonest corpus layout\n"
    scanned = {}
    for size in (200_000, 800_000):
        path = tmp_path / f"{size}.txt"
        text = line * (size // len(line))
        path.write_text(text, encoding="utf-8")
        counter = CountingPattern(sources.BLANK_LINES)
        monkeypatch.setattr(sources, "BLANK_LINES", counter)
        docs, _ = read([path])
        monkeypatch.setattr(sources, "BLANK_LINES", counter.pattern)
        assert "".join(d.text for d in docs) == text
        scanned[size] = counter.scanned
        assert counter.scanned <= 2 * len(text)  # each character searched about once, not once per block
    assert scanned[800_000] < 5 * scanned[200_000]


def test_a_document_over_max_chars_is_cut_at_lines_never_dropped(tmp_path):
    lines = [f"record {i:04d} " + "x" * (i % 37) + "\n" for i in range(400)]
    text = "".join(lines)
    (tmp_path / "lines.txt").write_text(text, encoding="utf-8")
    docs, stats = read([tmp_path / "lines.txt"], max_chars=1000)
    assert "".join(d.text for d in docs) == text
    assert all(0 < len(d.text) <= 1000 for d in docs)
    assert all(d.text.endswith("\n") for d in docs)  # cut after a line, never inside one
    assert len(docs) in (-(-len(text) // 1000), -(-len(text) // 1000) + 1)  # pieces nearly full
    assert stats.cut_documents == 1 and stats.cut_pieces == len(docs)
    # a single line longer than max_chars is cut at max_chars
    (tmp_path / "one.txt").write_text("y" * 2500, encoding="utf-8")
    docs, stats = read([tmp_path / "one.txt"], max_chars=1000)
    assert [len(d.text) for d in docs] == [1000, 1000, 500]
    assert stats.cut_documents == 1 and stats.cut_pieces == 3


def test_split_choices_lines_file_and_blank(tmp_path):
    text = "alpha one\nalpha two\n\n  \nbeta\n\ngamma\n"
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    docs, _ = read([tmp_path / "a.txt"], split="lines")
    assert [d.text for d in docs] == ["alpha one", "alpha two", "beta", "gamma"]
    docs, _ = read([tmp_path / "a.txt"], split="file")
    assert [d.text for d in docs] == [text]
    (tmp_path / "cut.txt").write_bytes("end of file: ü".encode()[:-1])  # the last character cut short
    for split in ("blank", "lines", "file"):
        docs, stats = read([tmp_path / "cut.txt"], split=split)
        assert [d.text for d in docs] == ["end of file: \ufffd"] and stats.invalid_utf8_chars == 1
    docs, _ = read([tmp_path / "a.txt"], split="blank", chunk_chars=1)
    assert [d.text for d in docs] == ["alpha one\nalpha two\n\n  \n", "beta\n\n", "gamma\n"]
    with pytest.raises(ConfigError, match="data.split='paragraphs' must be one of 'blank', 'lines', 'file'"):
        load_config(None, ["data.split=paragraphs"])


def test_prepare_keeps_a_file_without_blank_lines_whole_in_pieces(tmp_path):
    lines = [f"line {i} of a corpus with one record per line\n" for i in range(3000)]
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "c.txt").write_text("".join(lines), encoding="utf-8")
    cfg = DataConfig(tokenizer="char", max_chars=20_000, val_fraction=0.0, workers=1, dedup=False)
    meta = prepare_data(cfg, [str(tmp_path / "src")], tmp_path / "out", progress=False)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["sources"]["cut_documents"] == 1
    assert report["filter_reasons"].get("too_long", 0) == 0
    chars = sum(len(line) for line in lines)
    pieces = report["sources"]["cut_pieces"]
    assert meta["documents"] == pieces and pieces in (-(-chars // 20_000), -(-chars // 20_000) + 1)
    assert meta["tokens"] == chars + pieces  # every character kept, plus one end-of-text per piece


def _records(first: int, count: int) -> bytes:
    return "".join(
        json.dumps({"text": f"record {i} of the corpus"}) + "\n" for i in range(first, first + count)
    ).encode()


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_a_truncated_compressed_file_is_skipped_named_and_counted(tmp_path, capsys, suffix):
    import gzip

    import zstandard

    from lmforge.cli import main

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_bytes(_records(0, 300))
    (src / "c.jsonl").write_bytes(_records(50_000, 300))
    body = _records(1000, 12000)  # over one 128 KiB zstd block: some records come before the damage
    packed = gzip.compress(body) if suffix == ".jsonl.gz" else zstandard.ZstdCompressor().compress(body)
    (src / f"b{suffix}").write_bytes(packed[: len(packed) // 2])
    rc = main(["data", "prepare", str(src), "data.tokenizer=char", "data.workers=1", "--out", str(tmp_path / "out"),
               "--no-progress"])  # fmt: skip
    assert rc == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())["sources"]
    assert report["damaged_skipped"] == 1
    [damaged] = report["damaged_files"]
    assert damaged.startswith(str(src / f"b{suffix}")) and "truncated" in damaged
    assert "damaged" in capsys.readouterr().out
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    kept_before = int(damaged.split("; ")[-1].split()[0])  # "...; N records before the damage kept"
    assert 0 < kept_before < 12000
    assert meta["documents"] == 600 + kept_before  # every record of the good files, and those before damage


def test_an_unreadable_parquet_file_is_skipped_and_nothing_left_is_an_error(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not a parquet file at all")
    cfg = DataConfig(tokenizer="char", workers=1)
    with pytest.raises(DataError, match=r"damaged.*bad.parquet"):
        prepare_data(cfg, [str(tmp_path / "bad.parquet")], tmp_path / "out", progress=False)


TEXT = "Füße und Öl, 你好世界 😀\nsecond line\n\nnext paragraph\n"


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-be", "utf-32", "utf-32-be"])
def test_utf16_and_utf32_files_with_a_bom_are_decoded_not_skipped_as_binary(tmp_path, codec):
    bom = {"utf-16-be": "\ufeff", "utf-32-be": "\ufeff"}.get(codec, "")  # utf-16/utf-32 write their own
    (tmp_path / "a.txt").write_bytes((bom + TEXT).encode(codec))
    records = "".join(json.dumps({"text": line}, ensure_ascii=False) + "\n" for line in TEXT.splitlines())
    (tmp_path / "b.jsonl").write_bytes((bom + records).encode(codec))
    docs, stats = read([tmp_path / "a.txt"], split="file")
    assert [d.text for d in docs] == [TEXT] and stats.binary_skipped == []
    docs, stats = read([tmp_path / "b.jsonl"])
    assert [d.text for d in docs] == TEXT.splitlines() and stats.malformed_records == 0


@pytest.mark.parametrize("codec", ["latin-1", "gb18030"])
def test_data_encoding_names_a_legacy_encoding(tmp_path, codec):
    text = "Füße und Öl\n" if codec == "latin-1" else "你好世界，简体中文\n"
    (tmp_path / "a.txt").write_bytes(text.encode(codec))
    docs, stats = read([tmp_path / "a.txt"], split="file", encoding=codec)
    assert [d.text for d in docs] == [text] and stats.invalid_utf8_chars == 0
    docs, stats = read([tmp_path / "a.txt"], split="file")  # read as UTF-8: replaced and counted
    assert docs[0].text != text and stats.invalid_utf8_files == 1


def test_an_unknown_encoding_is_a_config_error():
    with pytest.raises(ConfigError, match="data.encoding='latin-9x'"):
        load_config(None, ["data.encoding=latin-9x"])


def _corpus(root):
    corpus = root / "corpus"
    corpus.mkdir()
    for f in range(4):
        paragraphs = [
            f"File {f}, paragraph {i}: the array tasks each read a share of the files." for i in range(60)
        ]
        (corpus / f"part{f}.txt").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")


def _shards(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.bin"))}


def test_the_documented_array_merge_merges_the_tasks_work(tmp_path, monkeypatch):
    """docs/data.md: `--task-index i --tasks N` per task, then "the same command without --task-index"."""
    from lmforge.cli import main

    monkeypatch.chdir(tmp_path)
    _corpus(tmp_path)
    common = ["data.text_chunk_chars=500", "data.vocab_size=300", "--no-progress"]
    assert main(["data", "prepare", "corpus/", *common, "--out", "data/ref", "data.executor=local"]) == 0
    for i in range(2):
        assert main(["data", "prepare", "corpus/", *common, "--out", "data/big", "--task-index", str(i),
                     "--tasks", "2"]) == 0  # fmt: skip
    maps = sorted(p.parent.name for p in (tmp_path / "data/big/work").rglob("done.json"))
    assert main(["data", "prepare", "corpus/", *common, "--out", "data/big"]) == 0  # the merge
    assert maps and not (tmp_path / "data/big/work").exists()
    assert _shards(tmp_path / "data/big") == _shards(tmp_path / "data/ref") != {}
    meta = json.loads((tmp_path / "data/big/meta.json").read_text())
    assert meta["splits"]["train"]["shards"][0]["file"].startswith(
        "train_p"
    )  # partitioned shards, not stream


def test_the_slurm_scripts_merge_line_merges(tmp_path, monkeypatch):
    import shlex

    from lmforge.cli import main

    monkeypatch.chdir(tmp_path)
    _corpus(tmp_path)
    items = ["corpus/", "data.text_chunk_chars=500", "data.vocab_size=300"]
    assert main(["data", "prepare", *items, "--out", "data/ref", "data.executor=local", "--no-progress"]) == 0
    assert (
        main(["data", "prepare", *items, "--out", "data/big", "--tasks", "2", "--slurm", "prep.sbatch"]) == 0
    )
    script = (tmp_path / "prep.sbatch").read_text()
    commands = [row.strip().removeprefix("exec ").removesuffix(" ;;") for row in script.splitlines()
                if row.strip().startswith("exec lmforge")]  # fmt: skip
    task_line, merge_line = commands
    for i in range(2):
        argv = shlex.split(task_line.replace('"$SLURM_ARRAY_TASK_ID"', str(i)))
        assert main(argv[1:]) == 0
    assert main(shlex.split(merge_line)[1:]) == 0
    assert _shards(tmp_path / "data/big") == _shards(tmp_path / "data/ref") != {}


@pytest.fixture()
def prepared(tmp_path):
    (tmp_path / "t.txt").write_text(
        "".join(f"line {i} of a small corpus\n\n" for i in range(400)), encoding="utf-8"
    )
    cfg = DataConfig(tokenizer="char", val_fraction=0.1, workers=1, text_chunk_chars=200)
    meta = prepare_data(cfg, [str(tmp_path / "t.txt")], tmp_path / "out", progress=False)
    return tmp_path / "out", meta


def test_a_shard_with_ids_past_the_vocabulary_is_named_not_a_traceback(prepared):
    import numpy as np

    from lmforge.data.loader import TokenLoader

    out, meta = prepared
    shard = meta["splits"]["train"]["shards"][0]
    ids = np.fromfile(out / shard["file"], dtype=meta["dtype"])
    assert shard["max_id"] == int(ids.max()) < meta["vocab_size"]  # recorded when the shard was written
    ids[len(ids) // 2] = meta["vocab_size"] + 7  # a damaged shard: same size, one id out of range
    ids.tofile(out / shard["file"])
    loader = TokenLoader(str(out), seq_len=16, batch_size=len(ids) // 17, seed=0)
    with pytest.raises(
        DataError, match=rf"{shard['file']}.*id {meta['vocab_size'] + 7}.*vocab_size={meta['vocab_size']}"
    ):
        loader.next_batch()
    # a meta.json whose recorded maximum is past the vocabulary is refused when the split opens
    meta["splits"]["train"]["shards"][0]["max_id"] = meta["vocab_size"]
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=rf"{shard['file']}.*ids up to {meta['vocab_size']}"):
        TokenLoader(str(out), seq_len=16, batch_size=2, seed=0)


def test_a_truncated_shard_is_named_as_truncated_not_as_a_missing_meta_json(prepared, tmp_path):
    from lmforge.config import Config
    from lmforge.train.data import prepared_datasets

    out, meta = prepared
    shard = meta["splits"]["train"]["shards"][0]
    path = out / shard["file"]
    path.write_bytes(path.read_bytes()[:-10])
    cfg = load_config(None, [f"data.prepared={out}"])
    assert isinstance(cfg, Config)

    class World:
        is_main, distributed = True, False

    with pytest.raises(DataError) as info:
        prepared_datasets(cfg, world=World(), cache_dir=None, progress=False)
    message = str(info.value)
    assert "no meta.json" not in message and shard["file"] in message and "truncated" in message
    cfg = load_config(None, [f"data.mixture={{{str(out)!r}: 1.0}}"])
    with pytest.raises(DataError, match=rf"{shard['file']}.*truncated"):
        prepared_datasets(cfg, world=World(), cache_dir=None, progress=False)


@pytest.mark.parametrize("executor", ["stream", "local"])
def test_local_shards_carry_their_sha256_and_verify_names_a_shard_changed_in_place(
    tmp_path, executor, capsys
):
    import hashlib

    from lmforge.cli import main

    (tmp_path / "t.txt").write_text("".join(f"line {i} here\n\n" for i in range(300)), encoding="utf-8")
    cfg = DataConfig(
        tokenizer="char",
        val_fraction=0.1,
        workers=1,
        text_chunk_chars=200,
        executor=executor,
        shard_tokens=1000,
    )
    out = tmp_path / "out"
    meta = prepare_data(cfg, [str(tmp_path / "t.txt")], out, progress=False)
    shards = [shard for split in meta["splits"].values() for shard in split["shards"]]
    assert len(meta["splits"]["train"]["shards"]) >= 3  # a writer's later shards hash only their own bytes
    assert json.loads((out / "meta.json").read_text())["splits"] == meta["splits"]
    for shard in shards:  # recorded as written, equal to an independent hash of the file
        assert shard["sha256"] == hashlib.sha256((out / shard["file"]).read_bytes()).hexdigest()
    assert main(["data", "verify", str(out)]) == 0
    path = out / shards[-1]["file"]
    data = bytearray(path.read_bytes())
    data[2] ^= 1  # same size, ids still inside the vocabulary: only the checksum sees it
    path.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["data", "verify", str(out)]) == 2
    err = capsys.readouterr().err
    assert shards[-1]["file"] in err and "damaged" in err and "SHA-256" in err


def _reference_cuts(text: str, chunk: int, max_chars: int) -> list[str]:
    """The documents of ``text`` held whole in memory: cut after the first blank line past ``chunk``
    characters; a document over ``max_chars`` cut after its last line end within max_chars, else at it."""
    docs, pos = [], 0
    while pos < len(text):
        match = sources.BLANK_LINES.search(text, pos + chunk)
        end = match.end() if match is not None and match.end() < len(text) else len(text)
        while end - pos > max_chars:
            newline = text.rfind("\n", pos, pos + max_chars)
            cut = newline + 1 if newline >= 0 else pos + max_chars
            docs.append(text[pos:cut])
            pos = cut
            match = sources.BLANK_LINES.search(text, pos + chunk)
            end = match.end() if match is not None and match.end() < len(text) else len(text)
        docs.append(text[pos:end])
        pos = end
    return docs


@pytest.mark.parametrize("block", [5, 64, 1 << 20])
def test_blank_line_cuts_equal_a_whole_text_reference_whatever_the_blocks(tmp_path, monkeypatch, block):
    import random

    monkeypatch.setattr(sources, "BLOCK_BYTES", block)
    rng = random.Random(block)
    for trial in range(40):
        text = "".join(
            rng.choice(["ab", "c ", "\n", "\n\n", " \t", "\r\n", "xyz\n\n  \n"]) for _ in range(300)
        )
        chunk, max_chars = rng.choice([1, 10, 50]), rng.choice([40, 100, 10_000])
        path = tmp_path / f"{trial}.txt"
        path.write_bytes(text.encode())
        docs, _ = read([path], chunk_chars=chunk, max_chars=max_chars)
        assert [d.text for d in docs] == _reference_cuts(text, chunk, max_chars), (trial, chunk, max_chars)
