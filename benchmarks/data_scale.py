"""Data preparation at scale: one partitioned pipeline run locally, on Ray and as array tasks (issue 18).

Claims checked:
- the same job runs with ``data.executor=local`` (2 processes), ``data.executor=ray`` (a local Ray with 2
  CPUs) and as 2 array tasks (``task=Task(i, 2)``, run at the same time) plus the merge, and all three write
  byte-identical shards; wall time and the peak RSS of the busiest worker per configuration;
- peak memory per worker stays flat from a 0.1 GB to a 1 GB corpus (goal: within 25%) at the same
  ``data.worker_memory_mb``, because the partition count grows with the input instead;
- near-duplicate recall and precision on planted pairs (goal >= 99% both), and, on the small corpus, the
  agreement of the partitioned decisions with an in-memory index built with datasketch's ``MinHashLSH``
  (the same rule: a document is removed when it shares a band with an earlier one), and with the
  ``stream`` executor (same documents, same tokens per document).

The corpora are synthetic documents composed of random lines of ../shared/data (English books and
Shakespeare, Chinese poetry; about half the bytes each; lines of at most 120 characters, since a few
classical Chinese paragraphs of 500-800 characters made unrelated documents that drew the same one real
near duplicates at Jaccard ~0.65), so unrelated documents share almost no 5-grams;
0.5% of documents are planted exact copies of an earlier one and 1% planted near copies (0.5% of the
characters substituted, inserted or deleted). Files of about 32 MB.

    python benchmarks/data_scale.py [--sizes 0.1 1.0] [--work /tmp/lmforge-data-scale] [--configs local ray tasks]

Writes benchmarks/results/data_scale.json. The machine is shared with other jobs: times are indicative.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results" / "data_scale.json"
FILE_BYTES = 32 * 2**20
EXACT_RATE, NEAR_RATE, EDIT_RATE = 0.005, 0.01, 0.005
WORKER_MEMORY_MB = 256

RUN = """
import json, sys, time
from lmforge.config import DataConfig
from lmforge.data.partitioned import peak_rss_mb
from lmforge.data.prepare import prepare_data
from lmforge.data.job import Task
tokenizer, corpus, out, executor, workers, task = sys.argv[1:7]
cfg = DataConfig(tokenizer=tokenizer, executor=executor, workers=int(workers), near_dedup=True,
                 worker_memory_mb=WORKER_MEMORY_MB, val_fraction=0.01)
start = time.perf_counter()
index, count = (int(x) for x in task.split("/")) if task != "-" else (None, None)
result = prepare_data(cfg, [corpus], out, progress=False,
                      task=Task(index=index, count=count) if task != "-" else None)
print(json.dumps({"seconds": time.perf_counter() - start,
                  "driver_peak_rss_mb": peak_rss_mb(),
                  "documents": result.get("documents"), "tokens": result.get("tokens")}))
""".replace("WORKER_MEMORY_MB", str(WORKER_MEMORY_MB))


def line_pools() -> dict[str, list[str]]:
    en, zh = set(), set()
    for path in sorted((SHARED / "en").iterdir()) + [SHARED / "tinyshakespeare.txt"]:
        en.update(
            line.strip() for line in path.read_text(encoding="utf-8").split("\n") if len(line.strip()) >= 30
        )
    for path in sorted((SHARED / "zh").glob("*.jsonl")):
        for record in path.read_text(encoding="utf-8").split("\n"):
            if record:
                zh.update(
                    x.strip() for x in json.loads(record)["text"].split("\n") if 8 <= len(x.strip()) <= 120
                )
    return {"en": sorted(en), "zh": sorted(zh)}


def compose(rng: random.Random, pool: list[str], chars: int) -> str:
    lines, n = [], 0
    while n < chars:
        lines.append(rng.choice(pool))
        n += len(lines[-1]) + 1
    return "\n".join(lines)


def edit(rng: random.Random, text: str, alphabet: str) -> str:
    chars = list(text)
    for _ in range(max(1, round(EDIT_RATE * len(chars)))):
        i, op = rng.randrange(len(chars)), rng.random()
        if op < 0.6:
            chars[i] = rng.choice(alphabet)
        elif op < 0.8:
            chars.insert(i, rng.choice(alphabet))
        else:
            del chars[i]
    return "".join(chars)


def build_corpus(folder: Path, gigabytes: float, seed: int = 0) -> dict:
    """JSONL files of ~32 MB; returns the planted copies as document ids (file << 40 | position)."""
    planted_file = folder.with_name(folder.name + ".planted.json")
    if planted_file.exists():
        return json.loads(planted_file.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    pools = line_pools()
    alphabets = {"en": "abcdefghijklmnopqrstuvwxyz ", "zh": "".join(sorted(set("".join(pools["zh"][:2000]))))}
    target, total, f = int(gigabytes * 1e9), 0, 0
    exact, near = [], []
    while total < target:
        fresh: list[tuple[int, str, str]] = []  # (position, language, text) of unplanted originals
        with open(folder / f"part-{f:04d}.jsonl", "w", encoding="utf-8") as out:
            size = position = 0
            while size < FILE_BYTES and total + size < target:
                roll = rng.random()
                if roll < EXACT_RATE + NEAR_RATE and len(fresh) > 10:
                    orig_pos, lang, orig = fresh.pop(rng.randrange(len(fresh)))
                    text = orig if roll < EXACT_RATE else edit(rng, orig, alphabets[lang])
                    (exact if roll < EXACT_RATE else near).append([f << 40 | orig_pos, f << 40 | position])
                else:
                    lang = "en" if rng.random() < 0.5 else "zh"
                    text = compose(rng, pools[lang], 3000 if lang == "en" else 1000)
                    fresh.append((position, lang, text))
                line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
                out.write(line)
                size += len(line.encode("utf-8"))
                position += 1
        total += size
        f += 1
    planted = {"bytes": total, "files": f, "exact": exact, "near": near}
    planted_file.write_text(json.dumps(planted))
    return planted


def tokenizer_for(work: Path) -> Path:
    from lmforge.data.tokenizer import train_bpe

    path = work / "tokenizer.json"
    if not path.exists():
        rng = random.Random(1)
        pools = line_pools()
        texts = [compose(rng, pools[lang], 3000) for lang in ("en", "zh") for _ in range(800)]
        train_bpe(texts, 8192).save(path)
    return path


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def launch(
    tokenizer: Path, corpus: Path, out: Path, executor: str, workers: int, task: str
) -> subprocess.Popen:
    args = [sys.executable, "-c", RUN, str(tokenizer), str(corpus), str(out), executor, str(workers), task]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())


def finish(proc: subprocess.Popen) -> dict:
    stdout, stderr = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"run failed:\n{stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def shards_digest(out: Path) -> str:
    meta = json.loads((out / "meta.json").read_text())
    h = hashlib.sha256()
    for split in ("train", "val"):
        for shard in meta["splits"][split]["shards"]:
            h.update(shard["file"].encode())
            with open(out / shard["file"], "rb") as f:
                while block := f.read(1 << 24):
                    h.update(block)
    return h.hexdigest()


def run_config(config: str, tokenizer: Path, corpus: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    if config == "tasks":
        procs = [launch(tokenizer, corpus, out, "local", 1, f"{i}/2") for i in range(2)]
        tasks = [finish(p) for p in procs]
        tasks_wall = time.perf_counter() - start
        merge = finish(launch(tokenizer, corpus, out, "local", 2, "-"))
        result = {"tasks_seconds": round(tasks_wall, 1), "merge_seconds": round(merge["seconds"], 1)}
        result["task_peak_rss_mb"] = [round(t["driver_peak_rss_mb"], 1) for t in tasks]
        result["driver_peak_rss_mb"] = round(merge["driver_peak_rss_mb"], 1)
    else:
        run = finish(launch(tokenizer, corpus, out, config, 2, "-"))
        result = {"driver_peak_rss_mb": round(run["driver_peak_rss_mb"], 1)}
    result["seconds"] = round(time.perf_counter() - start, 1)
    job = json.loads((out / "job.json").read_text())
    result["partitions"] = job["partitions"]
    result["stages"] = job["stages"]
    worker_peaks = [s["peak_rss_mb"] for s in job["stages"].values()] + result.get("task_peak_rss_mb", [])
    result["worker_peak_rss_mb"] = max(worker_peaks)
    result["shards_sha256"] = shards_digest(out)
    return result


def planted_scores(out: Path, planted: dict) -> dict:
    removed = set(np.load(out / "near_duplicates.npy").tolist())
    copies = {later for _, later in planted["near"]}
    found = removed & copies
    report = json.loads((out / "report.json").read_text())
    return {
        "planted_near": len(copies),
        "planted_exact": len(planted["exact"]),
        "near_removed": len(removed),
        "near_recall": len(found) / max(1, len(copies)),
        "near_precision": len(found) / max(1, len(removed)),
        "exact_removed": report["stages"]["exact_dedup"]["docs_in"]
        - report["stages"]["exact_dedup"]["docs_out"],
        "clusters": report["near_dedup"]["clusters"],
    }


def in_memory_agreement(corpus: Path, out: Path, planted: dict, threshold: float = 0.8) -> dict:
    """Decisions of datasketch's MinHashLSH (query, then insert every document) on the same documents and
    signatures, against the partitioned removal list; and the signature Jaccard of the planted pairs."""
    from datasketch import MinHash, MinHashLSH

    from lmforge.data.clean import digest, normalize
    from lmforge.data.dedup import MinHasher

    hasher, lsh, seen = MinHasher(), MinHashLSH(threshold=threshold, num_perm=128), set()
    removed, signatures = set(), {}
    wanted = {i for pair in planted["near"] for i in pair}
    for f, path in enumerate(sorted(corpus.glob("*.jsonl"))):
        with open(path, encoding="utf-8") as lines:
            for position, line in enumerate(lines):
                text = normalize(json.loads(line)["text"])
                key = digest(text)
                if key in seen:
                    continue
                seen.add(key)
                doc_id = f << 40 | position
                sig = hasher.signature(text)
                if doc_id in wanted:
                    signatures[doc_id] = sig
                minhash = MinHash(num_perm=128, seed=1, hashvalues=sig, scheme="affine32")
                if lsh.query(minhash):
                    removed.add(doc_id)
                lsh.insert(str(doc_id), minhash, check_duplication=False)
    partitioned = set(np.load(out / "near_duplicates.npy").tolist())
    estimates = [float(np.mean(signatures[a] == signatures[b])) for a, b in planted["near"]]
    above = [(a, b) for (a, b), j in zip(planted["near"], estimates) if j >= threshold]
    return {
        "datasketch_removed": len(removed),
        "partitioned_removed": len(partitioned),
        "agreement": len(removed & partitioned) / max(1, len(removed | partitioned)),
        "planted_pairs_estimate_above_threshold": len(above),
        "of_those_removed_by_partitioned": sum(b in partitioned for _, b in above),
        "planted_pair_jaccard_estimate": {"min": min(estimates), "median": float(np.median(estimates))},
    }


def stream_agreement(tokenizer: Path, corpus: Path, work: Path, local_out: Path) -> dict:
    """The stream executor (one process, the in-memory index) against the partitioned output: the same
    multiset of documents as token sequences."""
    out = work / "stream"
    shutil.rmtree(out, ignore_errors=True)
    run = finish(launch(tokenizer, corpus, out, "stream", 2, "-"))

    def documents(folder: Path) -> list[str]:
        meta = json.loads((folder / "meta.json").read_text())
        hashes = []
        for split in ("train", "val"):
            for shard in meta["splits"][split]["shards"]:
                ids = np.fromfile(folder / shard["file"], dtype=meta["dtype"])
                cuts = np.flatnonzero(ids == meta["eot_id"]) + 1
                hashes += [
                    hashlib.blake2b(d.tobytes(), digest_size=8).hexdigest() for d in np.split(ids, cuts)[:-1]
                ]
        return sorted(hashes)

    same = documents(out) == documents(local_out)
    shutil.rmtree(out, ignore_errors=True)
    return {
        "seconds": round(run["seconds"], 1),
        "peak_rss_mb": round(run["driver_peak_rss_mb"], 1),
        "same_documents_and_tokens": same,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.1, 1.0], help="corpus sizes in GB")
    parser.add_argument("--configs", nargs="+", default=["local", "ray", "tasks"])
    parser.add_argument("--work", default="/tmp/lmforge-data-scale")
    parser.add_argument("--keep-corpus", action="store_true")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer_for(work)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results.update(
        {
            "machine": "2 CPU cores shared with other jobs (load from other helpers during the runs)",
            "worker_memory_mb": WORKER_MEMORY_MB,
            "command": "python benchmarks/data_scale.py " + " ".join(sys.argv[1:]),
        }
    )
    for size in args.sizes:
        key = f"{size:g}GB"
        corpus = work / f"corpus-{key}"
        started = time.perf_counter()
        planted = build_corpus(corpus, size)
        entry = results.setdefault("sizes", {}).setdefault(key, {})
        entry["corpus"] = {
            "bytes": planted["bytes"], "files": planted["files"], "build_seconds": round(time.perf_counter() - started, 1),
            "generator": "lines of 8-120 characters",
        }  # fmt: skip
        for config in args.configs:
            out = work / f"out-{key}-{config}"
            entry[config] = run_config(config, tokenizer, corpus, out)
            entry[config].update(planted_scores(out, planted))
            print(
                key, config, json.dumps({k: v for k, v in entry[config].items() if k != "stages"}), flush=True
            )
            RESULTS.write_text(json.dumps(results, indent=2))
        digests = {entry[c]["shards_sha256"] for c in args.configs}
        entry["identical_shards_across_configs"] = len(digests) == 1
        if size <= 0.2 and "local" in args.configs:
            entry["in_memory_agreement"] = in_memory_agreement(corpus, work / f"out-{key}-local", planted)
            entry["stream"] = stream_agreement(tokenizer, corpus, work, work / f"out-{key}-local")
            print(key, json.dumps(entry["in_memory_agreement"]), json.dumps(entry["stream"]), flush=True)
        for config in args.configs:
            shutil.rmtree(work / f"out-{key}-{config}", ignore_errors=True)
        if not args.keep_corpus:
            shutil.rmtree(corpus, ignore_errors=True)
            corpus.with_name(corpus.name + ".planted.json").unlink(missing_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2))
    sizes = results.get("sizes", {})
    if "0.1GB" in sizes and "1GB" in sizes:
        results["memory_growth_0.1_to_1GB"] = {
            c: round(sizes["1GB"][c]["worker_peak_rss_mb"] / sizes["0.1GB"][c]["worker_peak_rss_mb"] - 1, 3)
            for c in args.configs
            if c in sizes["1GB"] and c in sizes["0.1GB"]
        }
    RESULTS.write_text(json.dumps(results, indent=2))
    print(json.dumps(results.get("memory_growth_0.1_to_1GB"), indent=2))


if __name__ == "__main__":
    main()
