"""The data verb's arguments: which item is the config, which are sources and which are overrides; and the
prepared folder they lead to equals a direct ``prepare_data`` call."""

import json

from lmforge.config import DataConfig
from lmforge.data.prepare import prepare_data, prepare_from_arguments, split_arguments


def test_config_sources_and_overrides_are_told_apart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a=b.txt").write_text("a file whose name holds '='\n")
    items = ["recipe.yaml", "books/*.txt", "a=b.txt", "data.vocab_size=300", "web.jsonl", "data.seed=3"]
    assert split_arguments(items) == (
        "recipe.yaml",
        ["books/*.txt", "a=b.txt", "web.jsonl"],
        ["data.vocab_size=300", "data.seed=3"],
    )
    assert split_arguments(["data.x=1.yaml", "s.txt"]) == (None, ["s.txt"], ["data.x=1.yaml"])
    # only a first item is the config
    assert split_arguments(["s.txt", "later.yaml"]) == (None, ["s.txt", "later.yaml"], [])
    assert split_arguments([]) == (None, [], [])


def test_prepare_from_arguments_equals_prepare_data(tmp_path):
    source = tmp_path / "docs.jsonl"
    texts = [f"document number {i}: " + "some words to tokenize " * (i % 5 + 1) for i in range(40)]
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    overrides = ["data.tokenizer=char", "data.val_fraction=0.25", "data.seed=7", "data.workers=1"]
    prepared = prepare_from_arguments([str(source), *overrides], tmp_path / "a", progress=False)
    cfg = DataConfig(tokenizer="char", val_fraction=0.25, seed=7, workers=1)
    direct = prepare_data(cfg, [str(source)], tmp_path / "b", progress=False)
    assert prepared.out == tmp_path / "a"
    assert prepared.meta == direct
    assert prepared.report == json.loads((tmp_path / "a" / "report.json").read_text(encoding="utf-8"))
    assert prepared.report["sources"]["files"] == 1
    assert prepared.meta["documents"] == len(texts)
