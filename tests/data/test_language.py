"""Language identification (data/language.py) in the cleaning stage and the prepare report."""

from __future__ import annotations

import json

import pytest

from lmforge.config import DataConfig, load_config
from lmforge.data.clean import Cleaner
from lmforge.errors import ConfigError, DataError
from tests.conftest import require_module


@pytest.fixture(scope="module")
def identifier():
    require_module("py3langid", "filters")
    from lmforge.data.language import LanguageIdentifier

    return LanguageIdentifier()


def english_docs(shared, n: int) -> list[str]:
    """Paragraphs of at least 200 characters from two Gutenberg books (their source language: English)."""
    docs = []
    for name in ("pg1342_pride_and_prejudice.txt", "pg2701_moby_dick.txt"):
        text = (shared / "en" / name).read_text(encoding="utf-8")[20_000:200_000]
        docs += [p for p in text.split("\n\n") if len(p) >= 200][: n // 2]
    return docs


def chinese_docs(shared, n: int) -> list[str]:
    """Song ci (Traditional script) and FLORES Chinese sentences (Simplified), at least 40 characters."""
    docs = []
    with open(shared / "zh" / "song_ci.jsonl", encoding="utf-8") as f:
        docs += [t for t in (json.loads(line)["text"] for line in f) if len(t) >= 40][: n // 2]
    with open(shared / "eval" / "flores200_devtest_zh_en.jsonl", encoding="utf-8") as f:
        docs += [t for t in (json.loads(line)["zh"] for line in f) if len(t) >= 40][: n // 2]
    return docs


def test_identifies_english_and_chinese_documents_of_the_shared_corpora(identifier, shared):
    english, chinese = english_docs(shared, 60), chinese_docs(shared, 60)
    assert len(english) == 60 and len(chinese) == 60
    en = [identifier.identify(t)[0] for t in english]
    zh = [identifier.identify(t)[0] for t in chinese]
    assert en.count("en") >= 59 and zh.count("zh") >= 59, (en, zh)
    assert identifier.identify("")[0] == "und" and identifier.identify("... 123 !!! ---")[0] != "en"
    # a mixed document gets the language of its larger part
    mixed_en = "\n".join(english[:3]) + "\n" + chinese[0][:40]
    mixed_zh = "\n".join(chinese[30:36]) + "\n" + english[0][:60]
    assert identifier.identify(mixed_en)[0] == "en" and identifier.identify(mixed_zh)[0] == "zh"
    # 60% English characters, 40% Chinese: one naive Bayes score over the whole would say zh (bytes of Han
    # characters weigh most); pieces cut at line ends, weighted by characters, say en
    english_part = "\n".join(english[10:14])[:600]
    chinese_part = "\n".join(chinese[40:50])[:400]
    assert identifier.model.classify(english_part + "\n" + chinese_part)[0] == "zh"
    assert identifier.identify(english_part + "\n" + chinese_part)[0] == "en"


def test_a_long_document_is_judged_on_its_start_middle_and_end(identifier):
    from lmforge.data.language import SAMPLE_CHARS, language_sample

    short = "x" * SAMPLE_CHARS
    assert language_sample(short) is short
    text = "".join(chr(0x4E00 + i % 500) for i in range(10_000))
    part = SAMPLE_CHARS // 3
    assert language_sample(text) == "\n".join((text[:part], text[4750 : 4750 + part], text[-part:]))
    # English only in the middle third is outvoted by the two Chinese windows at the ends
    middle = "the quick brown fox jumps over the lazy dog and runs away. " * 20
    doc = "床前明月光，疑是地上霜。举头望明月，低头思故乡。" * 60
    assert identifier.identify(doc + middle + doc)[0] == "zh"


def test_cleaner_keeps_the_listed_languages_and_counts_every_language(identifier, shared):
    english, chinese = english_docs(shared, 10), chinese_docs(shared, 10)
    cleaner = Cleaner(DataConfig(languages=["zh"]))
    kept = [cleaner(t) is not None for t in english + chinese]
    assert kept == [False] * 10 + [True] * 10
    report = cleaner.report.as_dict()
    assert report["languages"] == {
        "en": {"docs": 10, "chars": sum(map(len, english))},
        "zh": {"docs": 10, "chars": sum(map(len, chinese))},
    }
    assert report["filter_reasons"] == {"language": 10}
    stage = report["stages"]["language"]
    assert (stage["docs_in"], stage["docs_out"], stage["chars_out"]) == (20, 10, sum(map(len, chinese)))
    # language_id alone counts and removes nothing; without either option there is no language table
    counting = Cleaner(DataConfig(language_id=True))
    assert all(counting(t) is not None for t in english[:3] + chinese[:2])
    assert {k: v["docs"] for k, v in counting.report.as_dict()["languages"].items()} == {"en": 3, "zh": 2}
    assert "languages" not in Cleaner(DataConfig()).report.as_dict()
    # a threshold above every probability makes all undetermined
    strict = Cleaner(DataConfig(languages=["en"], language_threshold=0.999999))
    assert strict("Hi there, you.") is None and "und" in strict.report.languages


def test_language_codes_are_checked_with_a_suggestion(identifier):
    with pytest.raises(ConfigError, match=r"unknown language code 'zhh' \(did you mean 'zh'\?\)"):
        Cleaner(DataConfig(languages=["zhh"]))
    with pytest.raises(ConfigError, match="data.languages: 'EN' is not a lower-case ISO 639 code"):
        load_config(None, ["data.languages=[EN]"])
    with pytest.raises(ConfigError, match="did you mean 'languages'"):
        load_config(None, ["data.language=[en]"])
    assert load_config(None, ["data.languages=[en,zh]"]).data.languages == ["en", "zh"]


def test_prepare_reports_documents_and_tokens_per_language(identifier, corpus, tmp_path):
    """With the char tokenizer a document of n characters is n + 1 tokens (end-of-text): the reference."""
    from lmforge.data.prepare import prepare_data

    cfg = DataConfig(tokenizer="char", language_id=True, val_fraction=0.2, min_chars=50)
    meta = prepare_data(cfg, [str(corpus)], tmp_path / "all", progress=False)
    report = json.loads((tmp_path / "all" / "report.json").read_text())
    kept = Cleaner(cfg)
    expected: dict[str, dict[str, int]] = {}
    from lmforge.data.sources import SourceStats, expand_sources, read_documents

    docs = read_documents(
        expand_sources([str(corpus)]), text_field="text", chunk_chars=8192, stats=SourceStats()
    )
    for doc in docs:
        result = kept(doc.text)
        if result is not None:
            total = expected.setdefault(kept.language, {"docs": 0, "tokens": 0})
            total["docs"] += 1
            total["tokens"] += len(result[0]) + 1
    assert set(expected) >= {"en", "zh"}
    assert report["language_tokens"] == dict(sorted(expected.items()))
    assert sum(v["tokens"] for v in report["language_tokens"].values()) == meta["tokens"]
    assert not (tmp_path / "all" / "languages.bin").exists()
    # keeping only Chinese: the shards hold the Chinese documents' tokens and nothing else
    only = prepare_data(
        DataConfig(tokenizer="char", languages=["zh"], val_fraction=0.2, min_chars=50),
        [str(corpus)],
        tmp_path / "zh",
        progress=False,
    )
    assert only["tokens"] == expected["zh"]["tokens"] and only["documents"] == expected["zh"]["docs"]
    with pytest.raises(
        DataError, match=r"'language' stage removed all .*languages found: en: \d+, zh: \d+.*data.languages"
    ):
        prepare_data(
            DataConfig(tokenizer="char", languages=["fr"]), [str(corpus)], tmp_path / "fr", progress=False
        )


def test_partitioned_prepare_merges_the_language_counts(identifier, corpus, tmp_path):
    from lmforge.data.prepare import prepare_data

    common = {"tokenizer": "char", "languages": ["en", "zh"], "min_chars": 50}
    prepare_data(DataConfig(**common), [str(corpus)], tmp_path / "stream", progress=False)
    prepare_data(
        DataConfig(**common, executor="local", workers=1), [str(corpus)], tmp_path / "local", progress=False
    )
    stream = json.loads((tmp_path / "stream" / "report.json").read_text())
    local = json.loads((tmp_path / "local" / "report.json").read_text())
    assert (
        local["languages"] == stream["languages"]
        and local["stages"]["language"] == stream["stages"]["language"]
    )
    assert local["filter_reasons"] == stream["filter_reasons"]
