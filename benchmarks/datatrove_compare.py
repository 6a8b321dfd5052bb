"""Claim: what lmforge's cleaning filters and MinHash dedup remove, how fast and in how much memory, next to
datatrove's Gopher, C4 and FineWeb quality filters and its MinHash dedup, on one corpus (issue 27, item 9).

Setup: a JSONL corpus of --mb megabytes built from the shared corpora (benchmarks/language_quality.py's
documents: ~2,000-character pieces of the 8 Gutenberg books and the English and Chinese JSONL sets). Each
"clean" document joins 2-4 random pool documents of one language (so documents are distinct); 5% of the
documents are near-duplicates of an earlier clean one (2% of its words, or Chinese characters, replaced) and 5%
are junk (``spoil``: shuffled, spam, markup, boilerplate, link lists), both at known ids. Each filter runs in a
fresh process over the same file (JSON parsing included), one core, at most two processes at once:
documents removed, removed junk (recall), clean English / Chinese documents removed, MB/s, peak RSS (VmHWM);
for the dedups, precision and recall of the removed documents against the injected near-duplicates (a
removed document that is no injected copy counts against precision), recall per language.
Two passes: the FULL corpus runs our filters (each stops after --max-seconds, --max-seconds-slow for the
quality and language filters, and reports the prefix it read);
a deterministic SAMPLE (every k-th document, plus the original of every sampled near-duplicate so the pairs
survive, ~--sample-mb) runs every filter, ours and datatrove's, and the overlap (Jaccard) of the removed sets
is measured there. datatrove's MinHash needs a shim: datatrove 0.10.1 hashes shingles with
``xxhash.xxh64_intdigest(str)``, which xxhash >= 4 refuses ("Strings must be encoded before hashing";
datatrove[processing] asks for xxhash<4); the shim encodes to UTF-8 first, which is what xxhash 3 did, and
keeps datatrove's default MinhashConfig (5-grams, 14 buckets x 8 hashes, 64-bit xxhash, English tokenizer).
Our quality model is trained first on language_quality.py's TRAINING sources. datatrove's language filter
needs a fastText model download and is not run. Before the runs the script waits (polling every 60 s, at most
--wait-max seconds) for the 1-minute load average to drop below --wait-load; each row records the load when
it started. Results: benchmarks/results/datatrove_compare.json.
Run: python benchmarks/datatrove_compare.py [--mb 1000] [--sample-mb 10] [--dir /work/tmp-dt]
(needs datatrove and spacy; not lmforge dependencies)
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
mode, path, model, work, max_seconds = sys.argv[1:6]
max_seconds = float(max_seconds)
state = {"docs": 0, "bytes": 0}
started = time.perf_counter()  # seconds count imports and model loading; the cap starts at the first document
def docs():
    first = time.perf_counter()
    with open(path, "rb") as f:
        for line in f:
            if max_seconds and time.perf_counter() - first > max_seconds:
                break
            state["docs"] += 1
            state["bytes"] += len(line)
            r = json.loads(line)
            yield r["id"], r["text"]
removed = []
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
    import os
    import xxhash
    from datatrove.utils.hashes import xxhash as dt_xxhash
    # datatrove 0.10.1 passes str; xxhash >= 4 takes bytes only (xxhash 3 encoded str as UTF-8 itself)
    dt_xxhash.xxhash32 = lambda data: xxhash.xxh32_intdigest(data.encode("utf-8") if isinstance(data, str) else data)
    dt_xxhash.xxhash64 = lambda data: xxhash.xxh64_intdigest(data.encode("utf-8") if isinstance(data, str) else data)
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
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
    max_seconds = 0
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
print(json.dumps({"seconds": seconds, "removed": removed, "peak_rss_mb": rss, **state}))
"""

FULL_MODES = ("ours_heuristics", "ours_minhash", "ours_quality", "ours_language")
SLOW_MODES = ("ours_quality", "ours_language")  # capped at --max-seconds-slow on the full corpus
MODES = (
    "dt_minhash", "dt_gopher_quality", "dt_gopher_repetition", "dt_c4", "dt_fineweb", "ours_heuristics",
    "ours_quality", "ours_language", "ours_minhash",
)  # fmt: skip


def sample(corpus: Path, labels: dict, out: Path, megabytes: float) -> dict:
    """Every k-th document, plus the original of each sampled near-duplicate, in corpus order."""
    ids = list(labels)
    k = max(1, round(corpus.stat().st_size / 1e6 / megabytes))
    chosen = set(ids[::k])
    chosen |= {labels[i]["of"] for i in chosen if labels[i]["kind"] == "near_dup"}
    with open(corpus, "rb") as f, open(out, "wb") as g:
        for doc_id, line in zip(ids, f):
            if doc_id in chosen:
                g.write(line)
    return {i: labels[i] for i in ids if i in chosen}


def wait_for_load(limit: float, max_seconds: float) -> float:
    waited = 0.0
    while os.getloadavg()[0] >= limit and waited < max_seconds:
        print(f"load {os.getloadavg()[0]:.2f} >= {limit}: waiting 60 s", flush=True)
        time.sleep(60)
        waited += 60
    return waited


def run_modes(modes, corpus: Path, model: str, root: Path, caps: dict, parallel: int) -> dict:
    """Each mode in a fresh process, at most ``parallel`` at once; {mode: output (with load_average)}."""
    todo, running, results = list(modes), [], {}
    while todo or running:
        while todo and len(running) < parallel:
            mode = todo.pop(0)
            work = root / f"work-{corpus.stem}-{mode}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            load = os.getloadavg()[0]
            proc = subprocess.Popen(
                [sys.executable, "-c", RUN, mode, str(corpus), model, str(work), str(caps.get(mode, 0))],
                stdout=open(work / "stdout.txt", "w"), stderr=open(work / "stderr.txt", "w"),
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )  # fmt: skip
            running.append((mode, proc, load, work))
        time.sleep(1)
        for item in list(running):
            mode, proc, load, work = item
            if proc.poll() is None:
                continue
            running.remove(item)
            stdout = (work / "stdout.txt").read_text()  # a file: a pipe would fill and block the child
            if proc.returncode != 0:
                print(f"{mode} failed:\n{(work / 'stderr.txt').read_text()[-3000:]}", flush=True)
                continue
            results[mode] = {**json.loads(stdout.strip().splitlines()[-1]), "load_average": round(load, 2)}
            print(f"{corpus.stem} {mode}: {results[mode]['seconds']:.0f} s (load {load:.2f})", flush=True)
    return results


def rows_for(results: dict, labels: dict) -> tuple[dict, dict]:
    ids = list(labels)
    rows, removed_sets = {}, {}
    for mode, out in results.items():
        seen = ids[: out["docs"]]  # the prefix the run read
        junk = {i for i in seen if labels[i]["kind"] == "junk"}
        near = {i for i in seen if labels[i]["kind"] == "near_dup"}
        near_lang = {
            lang: {i for i in near if labels[labels[i]["of"]]["lang"] == lang} for lang in ("en", "zh")
        }  # fmt: skip
        clean = {
            lang: {i for i in seen if labels[i]["kind"] == "clean" and labels[i]["lang"] == lang}
            for lang in ("en", "zh")
        }
        removed = set(out["removed"])
        removed_sets[mode] = removed
        row = {
            "documents_read": out["docs"],
            "mb_read": round(out["bytes"] / 1e6, 1),
            "removed": len(removed),
            "junk_removed": round(len(removed & junk) / max(1, len(junk)), 4),
            "near_dups_removed": round(len(removed & near) / max(1, len(near)), 4),
            "clean_en_removed": round(len(removed & clean["en"]) / max(1, len(clean["en"])), 4),
            "clean_zh_removed": round(len(removed & clean["zh"]) / max(1, len(clean["zh"])), 4),
            "mb_per_s": round(out["bytes"] / 1e6 / out["seconds"], 3),
            "seconds": round(out["seconds"], 1),
            "peak_rss_mb": round(out["peak_rss_mb"], 1),
            "load_average": out["load_average"],
        }
        if mode.endswith("minhash"):
            row["dedup_precision"] = round(len(removed & near) / max(1, len(removed)), 4)
            row["dedup_recall"] = row["near_dups_removed"]
            for lang in ("en", "zh"):
                row[f"dedup_recall_{lang}"] = round(
                    len(removed & near_lang[lang]) / max(1, len(near_lang[lang])), 4
                )
        rows[mode] = row
        print(mode, row, flush=True)
    return rows, removed_sets


def counts(labels: dict, path: Path) -> dict:
    return {
        "mb": round(path.stat().st_size / 1e6, 1),
        "documents": len(labels),
        "junk": sum(v["kind"] == "junk" for v in labels.values()),
        "near_duplicates_injected": sum(v["kind"] == "near_dup" for v in labels.values()),
        "clean_en": sum(v["kind"] == "clean" and v["lang"] == "en" for v in labels.values()),
        "clean_zh": sum(v["kind"] == "clean" and v["lang"] == "zh" for v in labels.values()),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=1000)
    ap.add_argument("--sample-mb", type=float, default=10)
    ap.add_argument("--dir", default="/work/tmp-dt")
    ap.add_argument("--max-seconds", type=float, default=540, help="per filter on the full corpus")
    ap.add_argument("--max-seconds-slow", type=float, default=180, help="for ours_quality and ours_language")
    ap.add_argument("--full-modes", default=",".join(FULL_MODES))
    ap.add_argument("--modes", default=",".join(MODES), help="run on the sample")
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--wait-load", type=float, default=5.0)
    ap.add_argument("--wait-max", type=float, default=900)
    ap.add_argument("--keep", action="store_true", help="keep the corpus and work folders")
    args = ap.parse_args()
    from lmforge.data.quality import fit_quality_model

    root = Path(args.dir) / f"dt-{args.mb:g}mb"
    shutil.rmtree(root, ignore_errors=True)
    (root / "corpus").mkdir(parents=True)
    (root / "sample").mkdir()
    corpus = root / "corpus" / "corpus.jsonl"
    started = time.perf_counter()
    labels = build(corpus, args.mb)
    print(f"built {corpus}: {len(labels):,} documents in {time.perf_counter() - started:.0f} s", flush=True)
    sample_path = root / "sample" / "sample.jsonl"
    sample_labels = sample(corpus, labels, sample_path, args.sample_mb)
    train = quality_sets(400)["train"]
    model = fit_quality_model([d for _, d in train["pos"]], [d for _, _, d in train["neg"]])
    model_path = str(model.save(root / "quality.safetensors"))
    waited = wait_for_load(args.wait_load, args.wait_max)
    modes = [m for m in args.full_modes.split(",") if m]
    caps = {m: args.max_seconds_slow if m in SLOW_MODES else args.max_seconds for m in modes}
    full = run_modes(modes, corpus, model_path, root, caps, args.parallel)
    full_rows, _ = rows_for(full, labels)
    part = run_modes(
        [m for m in args.modes.split(",") if m], sample_path, model_path, root, {}, args.parallel
    )
    sample_rows, removed_sets = rows_for(part, sample_labels)
    overlap = {}
    names = sorted(removed_sets)
    for a in names:
        for b in names:
            if a < b and removed_sets[a] | removed_sets[b]:
                inter = len(removed_sets[a] & removed_sets[b])
                overlap[f"{a} ~ {b}"] = round(inter / len(removed_sets[a] | removed_sets[b]), 4)
    result = {
        "corpus": counts(labels, corpus),
        "sample": {
            **counts(sample_labels, sample_path),
            "every_kth": max(1, round(corpus.stat().st_size / 1e6 / args.sample_mb)),
        },
        "max_seconds_per_filter_on_full": caps,
        "parallel_processes": args.parallel,
        "waited_for_load_s": waited,
        "cpu_cores": os.cpu_count(),
        "full": full_rows,
        "on_sample": sample_rows,
        "jaccard_of_removed_sets_on_sample": overlap,
    }
    out_path = Path(__file__).parent / "results" / "datatrove_compare.json"
    out_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("jaccard")}, indent=1))
    print(f"wrote {out_path}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
