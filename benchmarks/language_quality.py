"""Claim: language identification (data/language.py) labels the shared English and Chinese corpora correctly,
and mixed documents by their larger part; the learned quality filter (data/quality.py) keeps held-out good
documents and removes held-out bad ones, from sources (and one kind of bad text) it never saw in training.

Setup, language identification: English = paragraphs of >= 200 characters of the 8 Gutenberg books, SQuAD
contexts, SciTLDR abstracts; Chinese = Tang poems, Song ci, classics (Traditional), FLORES-200 zh, CMRC 2018
contexts, CSL abstracts, Alpaca-zh outputs (Simplified), at most 400 documents per source. Mixed = an English
part and a Chinese part joined by a newline, English share of the characters 0.2 ... 0.8 (300 each), its
"expected" label that of the larger share. Throughput: MB (UTF-8) per second over those documents, one core.

Setup, quality filter: documents of the shared corpora (cut as prepare cuts them: ~2,000 characters at blank
lines for books, one record for JSONL), split BY SOURCE: training positives from P&P, Wealth of Nations,
Federalist, Art of War, Complete Angler, Tang poems, classics, SQuAD, Alpaca-zh; held-out positives from Moby
Dick, Infantry Drill, Intro to Mathematics (LaTeX), Song ci, FLORES zh, CMRC, CSL, SciTLDR. Negatives are made
from the same side's positives by ``spoil`` (kinds: shuffled words/characters, keyword spam, markup soup,
boilerplate, and ``link_list`` which is only in the held-out set), one negative per positive, seeded. Reported:
held-out precision/recall of "kept" at 0.5, the rejection rate per kind and per language, scoring MB/s.
Results: benchmarks/results/language_quality.json.
Run: python benchmarks/language_quality.py [--per-source 400]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
if not SHARED.exists():
    SHARED = Path("/work/shared/data")

BOILERPLATE = [
    "Home | About us | Contact | Privacy policy | Terms of use | Sitemap",
    "We use cookies to improve your experience. By continuing you accept our cookie policy. Accept all",
    "Copyright (c) 2024 All rights reserved. Powered by WordPress. Theme by Example.",
    "Subscribe to our newsletter! Enter your e-mail address below. Share on Facebook Twitter LinkedIn",
    "Click here to read more >> Next page >> Previous page << Back to top",
    "首页 | 关于我们 | 联系我们 | 隐私政策 | 网站地图 版权所有 © 2024 保留所有权利 点击这里 下一页",
]


def book_docs(name: str, limit: int) -> list[str]:
    """~2,000-character documents cut at blank lines, as data.text_chunk_chars would, past the PG header."""
    text = (SHARED / "en" / name).read_text(encoding="utf-8")
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if len(p.strip()) > 0]
    docs, cur = [], ""
    for p in paragraphs[40:]:
        cur = f"{cur}\n\n{p}" if cur else p
        if len(cur) >= 2000:
            docs.append(cur)
            cur = ""
    return docs[:limit]


def jsonl_docs(path: str, field: str, limit: int, min_chars: int = 40) -> list[str]:
    out = []
    with open(SHARED / path, encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)[field]
            if len(text) >= min_chars:
                out.append(text)
            if len(out) >= limit:
                break
    return out


def paragraphs(name: str, limit: int) -> list[str]:
    text = (SHARED / "en" / name).read_text(encoding="utf-8")[20_000:]
    return [p.replace("\n", " ") for p in text.split("\n\n") if len(p) >= 200][:limit]


def spoil(doc: str, kind: str, rng: random.Random) -> str:
    """A low-quality document made from ``doc``."""
    words = doc.split()
    chinese = len(words) < len(doc) / 20  # few spaces: shuffle characters, not words
    if kind == "shuffled":
        units = list(doc.replace("\n", "")) if chinese else words
        rng.shuffle(units)
        return ("" if chinese else " ").join(units)
    units = list(doc.replace("\n", "")) if chinese else words
    if kind == "spam":
        keys = [doc[i : i + 2] for i in rng.sample(range(max(1, len(doc) - 2)), 4)] if chinese else None
        keys = keys or rng.sample(words, min(4, len(words)))
        return " ".join(rng.choice(keys) for _ in range(max(30, len(units) // (2 if chinese else 1))))
    if kind == "markup":
        chosen = units[: 60 if not chinese else 120]
        step = 1 if not chinese else 4
        pieces = ["".join(chosen[i : i + step]) for i in range(0, len(chosen), step)]
        return "".join(
            f'<div class="c{rng.randint(1, 99)}"><a href="/p/{rng.randint(1, 9999)}">{w}</a></div>'
            for w in pieces
        )
    if kind == "boilerplate":
        lines = [rng.choice(BOILERPLATE) for _ in range(rng.randint(4, 10))]
        lines.insert(rng.randint(0, len(lines)), doc[: rng.randint(40, 120)])
        return "\n".join(lines)
    if kind == "link_list":  # held out: never in training
        stems = [w.strip(".,;:!?\"'()").lower() for w in units[:40] if w.strip(".,;:!?\"'()")] or ["page"]
        return "\n".join(
            f"https://www.example.com/{rng.choice(stems)}/{rng.randint(100, 99999)}.html" for _ in range(25)
        )
    raise ValueError(kind)


TRAIN_KINDS = ("shuffled", "spam", "markup", "boilerplate")
TEST_KINDS = TRAIN_KINDS + ("link_list",)


def quality_sets(per_source: int) -> dict:
    train_sources = {
        "en": [book_docs(n, per_source) for n in (
            "pg1342_pride_and_prejudice.txt", "pg3300_wealth_of_nations.txt", "pg1404_federalist_papers.txt",
            "pg132_art_of_war.txt", "pg9198_complete_angler_1653.txt")]
        + [jsonl_docs("eval/squad_v1.1_dev_500.jsonl", "context", per_source)],
        "zh": [jsonl_docs("zh/tang_poems.jsonl", "text", per_source), jsonl_docs("zh/classics.jsonl", "text", per_source),
               jsonl_docs("sft/alpaca_zh_demo.jsonl", "output", per_source)],
    }  # fmt: skip
    test_sources = {
        "en": [book_docs(n, per_source) for n in (
            "pg2701_moby_dick.txt", "pg20866_infantry_drill_regulations_1911.txt", "pg41568_intro_to_mathematics.tex")]
        + [jsonl_docs("eval/scitldr_test_500.jsonl", "document", per_source)],
        "zh": [jsonl_docs("zh/song_ci.jsonl", "text", per_source), jsonl_docs("eval/flores200_devtest_zh_en.jsonl", "zh", per_source),
               jsonl_docs("eval/cmrc2018_dev_500.jsonl", "context", per_source),
               jsonl_docs("eval/csl_title_test_500.jsonl", "document", per_source)],
    }  # fmt: skip
    out = {}
    for side, sources, kinds, seed in (
        ("train", train_sources, TRAIN_KINDS, 1),
        ("test", test_sources, TEST_KINDS, 2),
    ):
        rng = random.Random(seed)
        pos, neg = [], []
        for lang, groups in sources.items():
            for docs in groups:
                for i, d in enumerate(docs):
                    pos.append((lang, d))
                    kind = kinds[i % len(kinds)]
                    neg.append((lang, kind, spoil(d, kind, rng)))
        out[side] = {"pos": pos, "neg": neg}
    return out


def language_sets(per_source: int) -> dict:
    en = []
    for name in sorted(os.listdir(SHARED / "en")):
        en += paragraphs(name, per_source // 4)
    en += jsonl_docs("eval/squad_v1.1_dev_500.jsonl", "context", per_source)
    en += jsonl_docs("eval/scitldr_test_500.jsonl", "document", per_source)
    zh = []
    for path, field in (("zh/tang_poems.jsonl", "text"), ("zh/song_ci.jsonl", "text"), ("zh/classics.jsonl", "text"),
                        ("eval/flores200_devtest_zh_en.jsonl", "zh"), ("eval/cmrc2018_dev_500.jsonl", "context"),
                        ("eval/csl_title_test_500.jsonl", "document"), ("sft/alpaca_zh_demo.jsonl", "output")):  # fmt: skip
        zh += jsonl_docs(path, field, per_source, min_chars=20)
    rng = random.Random(0)
    mixed = {}
    for share in (0.2, 0.35, 0.5, 0.65, 0.8):
        docs = []
        for _ in range(300):
            e, z = rng.choice(en), rng.choice(zh)
            total = min(len(e) / share, len(z) / (1 - share), 1500)
            docs.append(e[: int(total * share)] + "\n" + z[: int(total * (1 - share))])
        mixed[share] = docs
    return {"en": en, "zh": zh, "mixed": mixed}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-source", type=int, default=400)
    args = ap.parse_args()
    from lmforge.data.language import LanguageIdentifier
    from lmforge.data.quality import fit_quality_model, precision_recall

    result: dict = {"load_average": os.getloadavg()[0]}
    ident = LanguageIdentifier()
    sets = language_sets(args.per_source)
    lang: dict = {}
    for name in ("en", "zh"):
        docs = sets[name]
        started = time.perf_counter()
        labels = [ident.identify(d)[0] for d in docs]
        seconds = time.perf_counter() - started
        wrong: dict[str, int] = {}
        for label in labels:
            if label != name:
                wrong[label] = wrong.get(label, 0) + 1
        lang[name] = {
            "documents": len(docs),
            "accuracy": round(labels.count(name) / len(docs), 4),
            "confused_with": wrong,
            "mb_per_s": round(sum(len(d.encode()) for d in docs) / 1e6 / seconds, 3),
        }
    lang["mixed"] = {}
    for share, docs in sets["mixed"].items():
        labels = [ident.identify(d)[0] for d in docs]
        lang["mixed"][str(share)] = {
            "documents": len(docs),
            "labelled_en": round(labels.count("en") / len(docs), 4),
            "labelled_zh": round(labels.count("zh") / len(docs), 4),
        }
    expected = [(s, "en" if s > 0.5 else "zh") for s in sets["mixed"] if s != 0.5]
    right = sum(lang["mixed"][str(s)][f"labelled_{e}"] * 300 for s, e in expected)
    lang["mixed_accuracy_by_larger_character_share"] = round(right / (300 * len(expected)), 4)
    result["language_id"] = lang
    print(json.dumps(lang, indent=1))

    q = quality_sets(args.per_source)
    train, test = q["train"], q["test"]
    started = time.perf_counter()
    model = fit_quality_model([d for _, d in train["pos"]], [d for _, _, d in train["neg"]])
    fit_seconds = time.perf_counter() - started
    started = time.perf_counter()
    pos_scores = [model.score(d) for _, d in test["pos"]]
    neg_scores = [model.score(d) for _, _, d in test["neg"]]
    seconds = time.perf_counter() - started
    mb = (
        sum(len(d.encode()) for _, d in test["pos"]) + sum(len(d.encode()) for _, _, d in test["neg"])
    ) / 1e6
    quality = {
        "train_documents": {"positive": len(train["pos"]), "negative": len(train["neg"])},
        "fit_seconds": round(fit_seconds, 1),
        "held_out": precision_recall(pos_scores, neg_scores, 0.5),
        "score_mb_per_s": round(mb / seconds, 3),
        "rejected_by_kind": {},
        "by_language": {},
    }
    for kind in TEST_KINDS:
        s = [x for (_, k, _), x in zip(test["neg"], neg_scores) if k == kind]
        quality["rejected_by_kind"][kind] = round(sum(v < 0.5 for v in s) / len(s), 4)
    for code in ("en", "zh"):
        p = [x for (lg, _), x in zip(test["pos"], pos_scores) if lg == code]
        n = [x for (lg, _, _), x in zip(test["neg"], neg_scores) if lg == code]
        quality["by_language"][code] = precision_recall(p, n, 0.5)
    for threshold in (0.2, 0.8):
        quality[f"held_out_at_{threshold}"] = precision_recall(pos_scores, neg_scores, threshold)
    result["quality"] = quality
    print(json.dumps(quality, indent=1))
    out = Path(__file__).parent / "results" / "language_quality.json"
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
