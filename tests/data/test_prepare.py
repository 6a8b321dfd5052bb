import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmforge.config import DataConfig
from lmforge.data.clean import normalize
from lmforge.data.prepare import is_prepared, prepare_data
from lmforge.data.sources import SourceStats, expand_sources, read_documents
from lmforge.data.tokenizer import load_tokenizer
from lmforge.errors import DataError


def expected_documents(sources, cfg):
    """The kept documents by the documented rules, computed independently of Cleaner: NFC + line ends +
    no controls, empty documents dropped, first copy of each exact duplicate kept."""
    docs, seen = [], set()
    stream = read_documents(
        expand_sources(sources), text_field="text", chunk_chars=cfg.text_chunk_chars, stats=SourceStats()
    )
    for doc in stream:
        text = normalize(doc.text)
        if text.strip() and text not in seen:
            seen.add(text)
            docs.append(text)
    return docs


def shard_documents(out: Path, split: str) -> list[str]:
    meta = json.loads((out / "meta.json").read_text())
    tok = load_tokenizer(out)
    ids = np.concatenate(
        [np.fromfile(out / s["file"], dtype=meta["dtype"]) for s in meta["splits"][split]["shards"]]
    )
    assert len(ids) == meta["splits"][split]["tokens"]
    assert len(ids) == 0 or ids[-1] == tok.eot_id
    cuts = np.flatnonzero(ids == tok.eot_id)
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [tok.decode(ids[a:b]) for a, b in zip(starts, cuts)]


@pytest.mark.parametrize("kind", ["bpe-file", "char"])
def test_nothing_lost_and_splits_disjoint(tmp_path, corpus, bpe_path, kind):
    cfg = DataConfig(
        tokenizer=str(bpe_path) if kind == "bpe-file" else "char", val_fraction=0.2, workers=1,
        text_chunk_chars=3000, shard_tokens=5000,
    )  # fmt: skip
    meta = prepare_data(cfg, [str(corpus)], tmp_path / "out", progress=False)
    out = tmp_path / "out"
    kept = expected_documents([str(corpus)], cfg)
    train, val = shard_documents(out, "train"), shard_documents(out, "val")
    assert sorted(train + val) == sorted(kept)  # decoding the shards reproduces the kept documents
    assert [d for d in kept if d in set(val)] == val  # each split keeps the source order
    assert not set(train) & set(val)
    assert 0.1 < len(val) / len(kept) < 0.3
    tok = load_tokenizer(out)
    assert meta["tokens"] == sum(len(tok.encode(d)) + 1 for d in kept)  # documents + one separator each
    assert meta["splits"]["train"]["docs"] == len(train) and meta["documents"] == len(kept)
    assert len(meta["splits"]["train"]["shards"]) > 2 and meta["dtype"] == "uint16"
    assert meta["tokenizer_fingerprint"] == tok.fingerprint and meta["eot_id"] == tok.eot_id
    report = json.loads((out / "report.json").read_text())
    assert report["stages"]["near_dedup"]["docs_out"] == len(kept)
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".bin")) == [
        "meta.json", "report.json", "tokenizer.json",
    ]  # fmt: skip
    assert is_prepared(out)


def test_trained_bpe_two_workers_and_tiktoken_give_the_same_shards_and_rerun_is_a_noop(tmp_path, corpus):
    base = dict(tokenizer="bpe", vocab_size=600, val_fraction=0.1, shard_tokens=20_000)
    one = DataConfig(**base, workers=1)
    meta1 = prepare_data(one, [str(corpus)], tmp_path / "a", progress=False)
    meta2 = prepare_data(DataConfig(**base, workers=2), [str(corpus)], tmp_path / "b", progress=False)
    meta3 = prepare_data(
        DataConfig(**base, encoder="tokenizers"), [str(corpus)], tmp_path / "c", progress=False
    )
    assert meta1 == meta2 and meta1["encoder"] == "tiktoken" and meta3["encoder"] == "tokenizers"
    assert meta1 == {**meta3, "encoder": "tiktoken"}
    for shard in meta1["splits"]["train"]["shards"] + meta1["splits"]["val"]["shards"]:
        expected = (tmp_path / "c" / shard["file"]).read_bytes()
        assert (tmp_path / "a" / shard["file"]).read_bytes() == expected
        assert (tmp_path / "b" / shard["file"]).read_bytes() == expected
    stamp = (tmp_path / "a" / "meta.json").stat().st_mtime_ns
    assert prepare_data(one, [str(corpus)], tmp_path / "a", progress=False) == meta1
    assert (tmp_path / "a" / "meta.json").stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="different tokenizer"):
        prepare_data(
            DataConfig(tokenizer="char", val_fraction=0.1, shard_tokens=20_000), [str(corpus)], tmp_path / "a"
        )
    kept = expected_documents([str(corpus)], one)
    assert sorted(
        shard_documents(tmp_path / "a", "train") + shard_documents(tmp_path / "a", "val")
    ) == sorted(kept)


def test_a_folder_with_another_tokenizer_file_is_refused(tmp_path, corpus, bpe_path):
    cfg = DataConfig(tokenizer="char", val_fraction=0.1)
    prepare_data(cfg, [str(corpus / "synthetic.jsonl")], tmp_path, progress=False)
    with pytest.raises(DataError, match="different tokenizer"):
        prepare_data(
            DataConfig(tokenizer=str(bpe_path), val_fraction=0.1), [str(corpus / "synthetic.jsonl")], tmp_path
        )


def test_duplicates_land_in_one_split_and_uint32_for_big_vocabularies(tmp_path):
    docs = [f"document number {i % 20}" for i in range(200)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = DataConfig(tokenizer="char", vocab_size=70_000, val_fraction=0.3, dedup=False)
    meta = prepare_data(cfg, [str(tmp_path / "d.jsonl")], tmp_path / "out", progress=False)
    assert meta["dtype"] == "uint16"  # the char vocabulary stays small whatever data.vocab_size allows
    train, val = shard_documents(tmp_path / "out", "train"), shard_documents(tmp_path / "out", "val")
    assert len(train) + len(val) == 200 and not set(train) & set(val) and val


@pytest.mark.parametrize("kind", ["char", "bpe-file"])
def test_a_tiny_corpus_still_gets_one_validation_document(tmp_path, bpe_path, kind):
    (tmp_path / "t.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three"}\n')
    tokenizer = "char" if kind == "char" else str(bpe_path)
    meta = prepare_data(
        DataConfig(tokenizer=tokenizer, val_fraction=0.001), [str(tmp_path / "t.jsonl")], tmp_path / "o"
    )
    assert meta["splits"]["val"]["docs"] == 1 and meta["splits"]["train"]["docs"] == 2
    assert sorted(shard_documents(tmp_path / "o", "train") + shard_documents(tmp_path / "o", "val")) == [
        "one", "three", "two",
    ]  # fmt: skip


def test_empty_results_name_the_stage(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"text": "short"}\n{"text": "tiny"}\n')
    with pytest.raises(DataError, match=r"'filter' stage removed all 2 documents \(too_short: 2\)"):
        prepare_data(DataConfig(tokenizer="char", min_chars=100), [str(tmp_path / "t.jsonl")], tmp_path / "o")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.dat").write_bytes(b"\x00\x01\x02")
    with pytest.raises(DataError, match="no documents were read.*1 binary files skipped"):
        prepare_data(DataConfig(tokenizer="char"), [str(tmp_path / "bin")], tmp_path / "o2")


def test_cli_data_prepare(tmp_path, corpus, capsys):
    from lmforge.cli import main

    out = tmp_path / "cli"
    code = main(
        [
            "data",
            "prepare",
            str(corpus / "tang.jsonl"),
            "data.tokenizer=char",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0 and is_prepared(out)
    printed = capsys.readouterr().out
    assert "exact_dedup" in printed and "train" in printed and "uint16" in printed
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  sources: [{corpus / 'synthetic.jsonl'}]\n  tokenizer: char\n")
    code = main(
        ["data", "prepare", str(config), "data.val_fraction=0.2", "--out", str(tmp_path / "y"), "--json"]
    )
    meta = json.loads(capsys.readouterr().out)
    assert (
        code == 0
        and meta["recipe"]["val_fraction"] == 0.2
        and meta["sources"] == [str(corpus / "synthetic.jsonl")]
    )
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{broken\n')
    code = main(["data", "prepare", str(tmp_path / "bad.jsonl"), "--strict", "--out", str(tmp_path / "x")])
    assert code == 2 and f"{tmp_path / 'bad.jsonl'}:2: malformed JSON" in capsys.readouterr().err


# argv: tokenizer, out, K, sources... K > 0: SIGKILL this process right after prepare announces its K-th
# progress.json (renamed into place), at its very next file operation. K = 0: run to the end and print how
# many progress.json it wrote. An audit hook sees the renames without touching lmforge's code.
PREPARE = """
import os, signal, sys
from lmforge.config import DataConfig
from lmforge.data.prepare import prepare_data
kill_at, announced = int(sys.argv[3]), 0
def hook(event, args):
    global announced
    if kill_at and announced == kill_at and event in ("open", "os.rename", "os.remove"):
        os.kill(os.getpid(), signal.SIGKILL)
    if event == "os.rename" and os.fspath(args[1]).endswith("progress.json"):
        announced += 1
sys.addaudithook(hook)
cfg = DataConfig(tokenizer=sys.argv[1], val_fraction=0.05, workers=1, shard_tokens=10_000)
prepare_data(cfg, sys.argv[4:], sys.argv[2], progress=False)
print(announced)
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bpe-file", "char"])  # one pass (a given tokenizer) or staged (trained)
def test_killed_prepare_resumes_to_the_same_result(tmp_path, shared, bpe_path, kind):
    sources = [str(shared / "tinyshakespeare.txt"), str(shared / "en" / "pg2701_moby_dick.txt")]
    tokenizer = str(bpe_path) if kind == "bpe-file" else "char"
    args = [sys.executable, "-c", PREPARE, tokenizer]
    whole = subprocess.run(args + [str(tmp_path / "whole"), "0", *sources], check=True, capture_output=True)
    announced = int(whole.stdout.split()[-1])
    assert announced >= 2  # so that the kill can land between two announcements
    kill_at = random.Random(f"{kind}-kill").randint(1, announced)  # seeded: a failure names its step
    killed = tmp_path / "killed"
    proc = subprocess.run(args + [str(killed), str(kill_at), *sources], timeout=300)
    assert proc.returncode == -signal.SIGKILL, f"prepare was not killed after progress.json #{kill_at}"
    assert not (killed / "meta.json").exists() and not is_prepared(killed)
    meta = prepare_data(
        DataConfig(tokenizer=tokenizer, val_fraction=0.05, workers=1, shard_tokens=10_000), sources, killed,
        progress=False,
    )  # fmt: skip
    assert meta == json.loads((tmp_path / "whole" / "meta.json").read_text())
    assert sorted(p.name for p in killed.iterdir()) == sorted(p.name for p in (tmp_path / "whole").iterdir())
    for path in (tmp_path / "whole").iterdir():
        assert (killed / path.name).read_bytes() == path.read_bytes(), f"{path.name} (killed at #{kill_at})"
