"""Throughput and memory of ``lmforge data prepare`` against the tokenizer's own ceiling.

Claims checked (issue 3):
- MB/s of ``prepare`` (read, clean, dedup, split, tokenize, write shards) with 1 and 2 workers, encoding
  through ``tokenizers``, is >= 80% of calling ``tokenizers``' ``encode_batch`` directly on the same text with
  the same number of threads (the ceiling);
- the default encoder (``tiktoken`` where it gives the very same ids) and its speed-up;
- peak RSS (all processes of the run together) grows by < 25% from a 10 MB to a 100 MB corpus.

Each measurement runs in a fresh subprocess; prepare and the ceiling are interleaved (A B A B) and the
medians are reported. The corpora are built from ../shared/data (English books, Shakespeare, Chinese poetry),
cut into documents of about 8 KB and repeated with a distinct first line per copy (so exact dedup keeps them).

    python benchmarks/data_throughput.py [--reps 2] [--work /tmp/lmforge-data-bench]

Writes benchmarks/results/data_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results" / "data_throughput.json"

PREPARE = """
import json, sys, time
from lmforge.config import DataConfig
from lmforge.data.prepare import prepare_data
tokenizer, corpus, out, workers, encoder = sys.argv[1:6]
cfg = DataConfig(tokenizer=tokenizer, workers=int(workers), encoder=encoder, val_fraction=0.01)
start = time.perf_counter()
meta = prepare_data(cfg, [corpus], out, progress=False)
print(json.dumps({"seconds": time.perf_counter() - start, "tokens": meta["tokens"], "encoder": meta["encoder"]}))
"""

CEILING = """
import json, sys, time
from tokenizers import Tokenizer
tokenizer, corpus = sys.argv[1:3]
texts = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
hf = Tokenizer.from_file(tokenizer)
start = time.perf_counter()
tokens = sum(len(e.ids) for e in hf.encode_batch(texts, add_special_tokens=False))
print(json.dumps({"seconds": time.perf_counter() - start, "tokens": tokens}))
"""


def base_documents() -> list[str]:
    from lmforge.data.sources import SourceStats, expand_sources, read_documents

    sources = [str(SHARED / "en"), str(SHARED / "tinyshakespeare.txt"), str(SHARED / "zh")]
    docs = read_documents(expand_sources(sources), text_field="text", chunk_chars=8192, stats=SourceStats())
    return [d.text for d in docs if d.text.strip()]


def build_corpus(path: Path, docs: list[str], target_bytes: int) -> int:
    """Write a JSONL corpus of about ``target_bytes`` of text; returns the exact UTF-8 bytes of text."""
    total = 0
    with open(path, "w", encoding="utf-8") as f:
        copy = 0
        while total < target_bytes:
            for doc in docs:
                text = f"copy {copy}\n{doc}"
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                total += len(text.encode("utf-8"))
                if total >= target_bytes:
                    break
            copy += 1
    return total


def run(code: str, args: list[str], env: dict | None = None) -> dict:
    """Run ``code`` in a fresh interpreter; its JSON result plus the peak RSS of its process tree."""
    proc = psutil.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, env=env)
    peak = peak_main = 0
    while proc.poll() is None:
        try:
            rss_main = proc.memory_info().rss
            rss = rss_main + sum(c.memory_info().rss for c in proc.children(recursive=True))
        except psutil.Error:
            rss = rss_main = 0
        peak, peak_main = max(peak, rss), max(peak_main, rss_main)
        time.sleep(0.02)
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"benchmark subprocess failed ({proc.returncode})")
    result = json.loads(out.decode().strip().splitlines()[-1])
    result.update(peak_rss_mb=peak / 2**20, peak_rss_main_mb=peak_main / 2**20)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--work", default="/tmp/lmforge-data-bench")
    parser.add_argument("--small-mb", type=float, default=10)
    parser.add_argument("--large-mb", type=float, default=100)
    args = parser.parse_args()
    if not SHARED.is_dir():
        raise SystemExit(f"needs the shared corpora at {SHARED}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()

    from lmforge.data.tokenizer import iter_sample, train_bpe

    docs = base_documents()
    tokenizer = work / "tokenizer.json"
    if not tokenizer.exists():
        train_bpe(iter_sample(docs, 5_000_000), 8192).save(tokenizer)
    small, large = work / "corpus_small.jsonl", work / "corpus_large.jsonl"
    small_bytes = build_corpus(small, docs, int(args.small_mb * 1e6))
    large_bytes = build_corpus(large, docs, int(args.large_mb * 1e6))

    runs: list[dict] = []

    def prepare(corpus: Path, text_bytes: int, workers: int, encoder: str) -> dict:
        out = work / "out"
        shutil.rmtree(out, ignore_errors=True)
        result = run(PREPARE, [str(tokenizer), str(corpus), str(out), str(workers), encoder])
        result.update(kind="prepare", workers=workers, encoder=encoder, corpus_mb=text_bytes / 1e6)
        result["mb_per_s"] = text_bytes / 1e6 / result["seconds"]
        runs.append(result)
        print(json.dumps(result), flush=True)
        return result

    def ceiling(workers: int) -> dict:
        env = {**os.environ, "RAYON_NUM_THREADS": str(workers), "TOKENIZERS_PARALLELISM": "true"}
        result = run(CEILING, [str(tokenizer), str(small)], env=env)
        result.update(kind="ceiling", workers=workers, corpus_mb=small_bytes / 1e6)
        result["mb_per_s"] = small_bytes / 1e6 / result["seconds"]
        runs.append(result)
        print(json.dumps(result), flush=True)
        return result

    summary: dict = {}
    for workers in (1, 2):
        series: dict[str, list[float]] = {"tokenizers": [], "ceiling": [], "tiktoken": []}
        for _ in range(args.reps):  # interleaved: A B C A B C
            series["tokenizers"].append(prepare(small, small_bytes, workers, "tokenizers")["mb_per_s"])
            series["ceiling"].append(ceiling(workers)["mb_per_s"])
            series["tiktoken"].append(prepare(small, small_bytes, workers, "auto")["mb_per_s"])
        med = {k: statistics.median(v) for k, v in series.items()}
        summary[f"workers_{workers}"] = {
            "prepare_tokenizers_mb_per_s": med["tokenizers"],
            "ceiling_encode_batch_mb_per_s": med["ceiling"],
            "ratio_to_ceiling": med["tokenizers"] / med["ceiling"],
            "prepare_tiktoken_mb_per_s": med["tiktoken"],
            "tiktoken_speedup_over_prepare_tokenizers": med["tiktoken"] / med["tokenizers"],
            "tiktoken_speedup_over_ceiling": med["tiktoken"] / med["ceiling"],
        }
    rss_small = prepare(small, small_bytes, 2, "auto")
    rss_large = prepare(large, large_bytes, 2, "auto")
    summary["peak_rss"] = {
        "workers": 2,
        "encoder": "auto",
        "small_corpus_mb": small_bytes / 1e6,
        "large_corpus_mb": large_bytes / 1e6,
        "small_peak_rss_mb": rss_small["peak_rss_mb"],
        "large_peak_rss_mb": rss_large["peak_rss_mb"],
        "growth": rss_large["peak_rss_mb"] / rss_small["peak_rss_mb"] - 1,
        "small_main_process_mb": rss_small["peak_rss_main_mb"],
        "large_main_process_mb": rss_large["peak_rss_main_mb"],
        "large_mb_per_s": rss_large["mb_per_s"],
    }
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "python": sys.version.split()[0],
        },
        "tokenizer": "byte-level BPE, vocab 8192, trained on the same shared text",
        "reps": args.reps,
        "summary": summary,
        "runs": runs,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, RESULTS)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
