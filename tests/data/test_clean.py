import json
import re
import unicodedata

from lmforge.config import DataConfig
from lmforge.data.clean import Cleaner, format_report, normalize, repeated_line_fraction, scrub_pii


def test_normalize_nfc_line_ends_and_controls():
    raw = "\ufeffCafe\u0301\r\nline\rx\x00\x07\x1b[0m\ttab\u200d\u200b\x85end"
    assert normalize(raw) == "Caf\u00e9\nline\nx[0m\ttab\u200d\u200bend"
    assert unicodedata.is_normalized("NFC", normalize("e\u0301"))


def test_exact_dedup_removes_exact_copies_and_nothing_else():
    cleaner = Cleaner(DataConfig())
    docs = ["alpha beta", "alpha beta", "alpha beta ", "Alpha beta", "alpha beta", "gamma"]
    kept = [cleaner(d) for d in docs]
    assert [k[0] if k else None for k in kept] == [
        "alpha beta",
        None,
        "alpha beta ",
        "Alpha beta",
        None,
        "gamma",
    ]
    stage = cleaner.report.stages["exact_dedup"]
    assert (stage.docs_in, stage.docs_out) == (6, 4)
    # exact after normalisation: a CRLF copy and an NFD copy are the same document
    assert cleaner("alpha\r\nbeta") is not None and cleaner("alpha\nbeta") is None
    assert cleaner("Cafe\u0301") is not None and cleaner("Caf\u00e9") is None


def test_near_dedup_removes_a_near_copy_and_keeps_distinct_documents(shared):
    text = (shared / "en" / "pg1404_federalist_papers.txt").read_text(encoding="utf-8")
    essays = re.split(r"\nFEDERALIST No\. ", text)[1:9]
    assert len(essays) == 8 and all(len(e) > 5000 for e in essays)
    words = essays[0].split(" ")
    for i in (50, 300, 700, 900):
        words[i] = "CHANGED"
    near_copy = " ".join(words)
    cleaner = Cleaner(DataConfig(near_dedup=True, near_dedup_threshold=0.8))
    results = [cleaner(e) is not None for e in essays + [near_copy]]
    assert results == [True] * 8 + [False]  # distinct essays (with shared boilerplate) all kept
    with open(shared / "zh" / "song_ci.jsonl", encoding="utf-8") as f:
        poems = [json.loads(next(f))["text"] for _ in range(40)]
    poems = [p for p in poems if len(p) > 60][:10]
    zh_cleaner = Cleaner(DataConfig(near_dedup=True))
    assert all(zh_cleaner(p) is not None for p in poems)
    assert zh_cleaner(poems[0][:-3] + "风雨。") is None  # a Chinese near-copy without spaces is caught


def test_filters_measure_characters_and_treat_chinese_fairly():
    cfg = DataConfig(min_chars=20, max_chars=200, max_repeated_line_fraction=0.3)
    cleaner = Cleaner(cfg)
    chinese = "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"  # 25 characters, no spaces
    english = "It was the best of times, it was the worst."
    assert cleaner(chinese) is not None and cleaner(english) is not None
    assert cleaner("short") is None and cleaner("   \n\t ") is None and cleaner("y" * 201) is None
    assert cleaner("spam line\nspam line\nspam line\nreal line") is None
    assert cleaner.report.removed == {"too_short": 1, "empty": 1, "too_long": 1, "repeated_lines": 1}
    assert repeated_line_fraction("a\nb\na\n\n a ") == 0.5


def test_pii_scrubbing():
    counts = {}
    text = (
        "Mail jane.doe+x@example.co.uk or call +1 555-123-4567 / (020) 7946 0958; 手机13812345678; "
        "server 192.168.0.1 and fe80:0:0:0:202:b3ff:fe1e:8329. Version 1.2.3 of 1776, 3.14159 (1303-1870), 2023-01-15."
    )
    assert scrub_pii(text, counts) == (
        "Mail <EMAIL> or call <PHONE> / <PHONE>; 手机<PHONE>; "
        "server <IP_ADDRESS> and <IP_ADDRESS>. Version 1.2.3 of 1776, 3.14159 (1303-1870), 2023-01-15."
    )
    assert counts == {"<EMAIL>": 1, "<PHONE>": 3, "<IP_ADDRESS>": 2}


def test_report_counts_documents_and_characters_per_stage():
    cleaner = Cleaner(DataConfig(min_chars=3, scrub_pii=True))
    for text in ["ab", "hello\r\nworld", "hello\nworld", "mail a@b.io"]:
        cleaner(text)
    report = cleaner.report.as_dict()
    s = report["stages"]
    assert s["read"] == {"docs_in": 4, "docs_out": 4, "chars_in": 36, "chars_out": 36}
    assert s["normalize"]["chars_out"] == 35  # one \r removed
    assert s["pii"]["chars_out"] == 35 - len("a@b.io") + len("<EMAIL>")
    assert (s["filter"]["docs_out"], s["exact_dedup"]["docs_out"], s["near_dedup"]["docs_out"]) == (3, 2, 2)
    table = format_report(report)
    assert "exact_dedup" in table and "removed (too_short)" in table
