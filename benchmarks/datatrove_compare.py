"""Claim: what lmforge's cleaning filters and MinHash dedup remove, how fast and in how much memory, next to
datatrove's Gopher, C4 and FineWeb quality filters and its MinHash dedup, on one corpus (issue 27, item 9).

Setup: a JSONL corpus of --mb megabytes built from the shared corpora (benchmarks/language_quality.py's
documents: ~2,000-character pieces of the 8 Gutenberg books and the English and Chinese JSONL sets). Each
"clean" document joins 2-4 random pool documents of one language (so documents are distinct); 5% of the
documents are near-duplicates of an earlier one (2% of its words, or Chinese characters, replaced) and 5% are
junk (``spoil``: shuffled, spam, markup, boilerplate, link lists), both at known ids. Each filter runs in a fresh
process over the same file (JSON parsing included), one core: documents removed, removed junk (recall), clean
English / Chinese documents removed, MB/s, peak RSS; Jaccard overlap of the removed sets. Our quality model is
trained first on language_quality.py's TRAINING sources (the corpus draws from all sources, so it has seen
some of the text; its junk kinds include link lists, which it never saw). Dedup: duplicates found among the
injected near-duplicates, and other documents removed. datatrove's language filter needs a fastText model
download and is not run. Results: benchmarks/results/datatrove_compare.json.
Run: python benchmarks/datatrove_compare.py [--mb 50] [--dir /work/tmp-lang] (needs datatrove and spacy)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from language_quality import TEST_KINDS, book_docs, jsonl_docs, quality_sets, spoil  # noqa: E402

JSONL_SOURCES = {
    "en": [("eval/squad_v1.1_dev_500.jsonl", "context"), ("eval/scitldr_test_500.jsonl", "document"),
           ("sft/alpaca_5000.jsonl", "output"), ("eval/hellaswag_val.jsonl", "ctx")],
    "zh": [("zh/tang_poems.jsonl", "text"), ("zh/song_ci.jsonl", "text"), ("zh/classics.jsonl", "text"),
           ("eval/cmrc2018_dev_500.jsonl", "context"), ("eval/csl_title_test_500.jsonl", "document"),
           ("sft/alpaca_zh_demo.jsonl", "output"), ("eval/flores200_devtest_zh_en.jsonl", "zh")],
}  # fmt: skip


def pool() -> dict[str, list[str]]:
    from language_quality import SHARED

    out = {"en": [], "zh": []}
    for name in sorted(os.listdir(SHARED / "en")):
        out["en"] += book_docs(name, 100_000)
    for lang, sources in JSONL_SOURCES.items():
        for path, field in sources:
            out[lang] += jsonl_docs(path, field, 100_000, min_chars=20)
    return out


def near_copy(text: str, rng: random.Random, rate: float = 0.02) -> str:
    words = text.split(" ")
    if len(words) < len(text) / 20:  # Chinese: replace characters
        chars = list(text)
        for i in rng.sample(range(len(chars)), max(1, int(rate * len(chars)))):
            chars[i] = chr(0x4E00 + rng.randrange(20_000))
        return "".join(chars)
    for i in rng.sample(range(len(words)), max(1, int(rate * len(words)))):
        words[i] = rng.choice(["alpha", "omega", "changed", "other", "new"])
    return " ".join(words)


def build(path: Path, megabytes: float, seed: int = 0) -> dict:
    rng = random.Random(seed)
    docs = pool()
    labels: dict[str, dict] = {}
    kept: list[tuple[str, str]] = []
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        n = 0
        while written < megabytes * 1e6:
            r = rng.random()
            if r < 0.05 and kept:
                original_id, original = rng.choice(kept)
                text, label = near_copy(original, rng), {"kind": "near_dup", "of": original_id}
            elif r < 0.10:
                lang = rng.choice(["en", "zh"])
                kind = rng.choice(TEST_KINDS)
                text, label = (
                    spoil(rng.choice(docs[lang]), kind, rng),
                    {"kind": "junk", "junk": kind, "lang": lang},
                )
            else:
                lang = "en" if rng.random() < 0.6 else "zh"
                text = "\n\n".join(rng.choice(docs[lang]) for _ in range(rng.randint(2, 4)))
                label = {"kind": "clean", "lang": lang}
            doc_id = f"d{n}"
            n += 1
            if label["kind"] == "clean":
                kept.append((doc_id, text))
                if len(kept) > 20_000:
                    kept.pop(rng.randrange(len(kept)))
            labels[doc_id] = label
            line = json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
    return labels


RUN = r"""
import json, sys, time
mode, path, model, work = sys.argv[1:5]
def docs():
    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            yield r["id"], r["text"]
removed = []
started = time.perf_counter()
if mode.startswith("dt_") and mode != "dt_minhash":
    from datatrove.data import Document
    from datatrove.pipeline import filters
    name = {"dt_gopher_quality": "GopherQualityFilter", "dt_gopher_repetition": "GopherRepetitionFilter",
            "dt_c4": "C4QualityFilter", "dt_fineweb": "FineWebQualityFilter"}[mode]
    flt = getattr(filters, name)()
    for i, text in docs():
        result = flt.filter(Document(text=text, id=i))
        if not (result if isinstance(result, bool) else result[0]):
            removed.append(i)
elif mode == "dt_minhash":
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    import os
    cfg = MinhashConfig()
    base = os.path.dirname(path)
    reader = lambda: JsonlReader(base, glob_pattern=os.path.basename(path), id_key="id")
    for i, steps in enumerate([
        [reader(), MinhashDedupSignature(output_folder=f"{work}/sigs", config=cfg)],
        [MinhashDedupBuckets(input_folder=f"{work}/sigs", output_folder=f"{work}/buckets", config=cfg)],
        [MinhashDedupCluster(input_folder=f"{work}/buckets", output_folder=f"{work}/remove_ids", config=cfg)],
        [reader(), MinhashDedupFilter(input_folder=f"{work}/remove_ids"), JsonlWriter(f"{work}/out", compression=None)],
    ]):
        LocalPipelineExecutor(pipeline=steps, tasks=cfg.num_buckets if i == 1 else 1, workers=1,
                              logging_dir=f"{work}/logs{i}").run()
    kept = set()
    for name in os.listdir(f"{work}/out"):
        with open(f"{work}/out/{name}", encoding="utf-8") as f:
            kept.update(json.loads(line)["id"] for line in f)
    removed = [i for i, _ in docs() if i not in kept]
else:
    from lmforge.config import DataConfig
    from lmforge.data.clean import Cleaner, NearDuplicates, filter_reason, normalize
    if mode == "ours_heuristics":
        cfg = DataConfig(min_chars=200, max_repeated_line_fraction=0.3)
        removed = [i for i, t in docs() if filter_reason(normalize(t), cfg)]
    elif mode == "ours_quality":
        cleaner = Cleaner(DataConfig(quality_model=model))
        removed = [i for i, t in docs() if not cleaner._quality_keeps(normalize(t))]
    elif mode == "ours_language":
        cleaner = Cleaner(DataConfig(languages=["en"]))
        removed = [i for i, t in docs() if not cleaner._language_keeps(normalize(t))]
    elif mode == "ours_minhash":
        near = NearDuplicates(0.8)
        removed = [i for i, t in docs() if near.seen(normalize(t))]
seconds = time.perf_counter() - started
# VmHWM: this process's own peak (ru_maxrss would carry the parent's peak across fork and exec)
rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
print(json.dumps({"seconds": seconds, "removed": removed, "peak_rss_mb": rss}))
"""

MODES = (
    "ours_heuristics", "ours_quality", "ours_language", "dt_gopher_quality", "dt_gopher_repetition", "dt_c4",
    "dt_fineweb", "ours_minhash", "dt_minhash",
)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=50)
    ap.add_argument("--dir", default="/work/tmp-lang")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--keep", action="store_true", help="keep the corpus and work folders")
    args = ap.parse_args()
    from lmforge.data.quality import fit_quality_model

    root = Path(args.dir) / f"dt-{args.mb:g}mb"
    shutil.rmtree(root, ignore_errors=True)
    (root / "corpus").mkdir(parents=True)
    corpus = root / "corpus" / "corpus.jsonl"
    started = time.perf_counter()
    labels = build(corpus, args.mb)
    print(f"built {corpus}: {len(labels):,} documents in {time.perf_counter() - started:.0f} s", flush=True)
    train = quality_sets(400)["train"]
    model = fit_quality_model([d for _, d in train["pos"]], [d for _, _, d in train["neg"]])
    model_path = str(model.save(root / "quality.safetensors"))
    size_mb = corpus.stat().st_size / 1e6
    junk = {i for i, v in labels.items() if v["kind"] == "junk"}
    near = {i for i, v in labels.items() if v["kind"] == "near_dup"}
    clean = {
        lang: {i for i, v in labels.items() if v["kind"] == "clean" and v["lang"] == lang}
        for lang in ("en", "zh")
    }
    rows, removed_sets = {}, {}
    for mode in args.modes.split(","):
        work = root / f"work-{mode}"
        work.mkdir()
        proc = subprocess.run(
            [sys.executable, "-c", RUN, mode, str(corpus), model_path, str(work)],
            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        if proc.returncode != 0:
            print(f"{mode} failed:\n{proc.stderr[-3000:]}", flush=True)
            continue
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        removed = set(out["removed"])
        removed_sets[mode] = removed
        rows[mode] = {
            "removed": len(removed),
            "junk_removed": round(len(removed & junk) / len(junk), 4),
            "near_dups_removed": round(len(removed & near) / len(near), 4),
            "clean_en_removed": round(len(removed & clean["en"]) / len(clean["en"]), 4),
            "clean_zh_removed": round(len(removed & clean["zh"]) / len(clean["zh"]), 4),
            "mb_per_s": round(size_mb / out["seconds"], 3),
            "seconds": round(out["seconds"], 1),
            "peak_rss_mb": round(out["peak_rss_mb"], 1),
        }
        print(mode, rows[mode], flush=True)
    overlap = {}
    names = list(removed_sets)
    for a in names:
        for b in names:
            if a < b and removed_sets[a] | removed_sets[b]:
                inter = len(removed_sets[a] & removed_sets[b])
                overlap[f"{a} ~ {b}"] = round(inter / len(removed_sets[a] | removed_sets[b]), 4)
    result = {
        "corpus_mb": round(size_mb, 1),
        "documents": len(labels),
        "junk": len(junk),
        "near_duplicates_injected": len(near),
        "clean_en": len(clean["en"]),
        "clean_zh": len(clean["zh"]),
        "load_average": os.getloadavg()[0],
        "filters": rows,
        "jaccard_of_removed_sets": overlap,
    }
    out_path = Path(__file__).parent / "results" / f"datatrove_compare_{args.mb:g}mb.json"
    if out_path.exists() and set(args.modes.split(",")) != set(MODES):  # a rerun of some modes: merge
        old = json.loads(out_path.read_text(encoding="utf-8"))
        result["filters"] = {**old["filters"], **rows}
        result["jaccard_of_removed_sets"] = {**old["jaccard_of_removed_sets"], **overlap}
    out_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if k != "jaccard_of_removed_sets"}, indent=1))
    print(f"wrote {out_path}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
