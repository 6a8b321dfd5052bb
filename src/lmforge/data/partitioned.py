"""Documents -> token shards as stages over partitions on disk, each a list of units that any executor
(``data/executors.py``) runs; ``data/job.py`` drives them.

Every stage is a list of independent units; a unit writes its files under ``work/{stage}/{unit:05d}/`` and
then, atomically, its ``done.json`` (its counts). A rerun skips units whose marker exists, so a killed job
continues from the finished units, and N array tasks that ran the ``map`` units of their share leave a
folder that one final run (the merge) completes. Stages, in order:

1. ``map`` (one unit per input file): read, normalize, scrub PII, filter; the document id is
   ``file index << 40 | position in file`` (input order); each kept document goes to partition
   ``hash prefix % P`` (its text to ``part-{p}.txt``, its index record: id, content hash, length, split
   score, LSH band keys, to ``part-{p}.idx``). Exact copies share a hash, so they share a partition.
2. ``exact`` (one unit per partition): the smallest id of every content hash is kept; the band keys of the
   kept documents are scattered by key to band partitions (``bands-{q}.npy``).
3. ``near`` (one unit per band partition): the band records sorted by (key, id); every later member of a
   bucket is an edge (first id, later id) (``data/dedup.py``'s rule).
4. ``decide`` (once): the removal list (the later ids), the duplicate clusters (union-find) for the report,
   and the split counts (the lowest-scoring document goes to val when none did).
5. the tokenizer (once): the configured one, or trained on kept text in partition order.
6. ``tokenize`` (one unit per partition): the partition's documents in id order, each followed by
   end-of-text, into ``{split}_p{p:04d}_{k:05d}.bin`` shards.
7. ``finish`` (once): shards moved into the folder, ``report.json``, ``job.json`` (per stage: units,
   documents, bytes, seconds, MB/s, the busiest worker's peak RSS), ``near_duplicates.npy`` (the ids near
   dedup removed) and ``meta.json``.

Peak memory per unit is one input file's reading state, or one partition's index (about 130 bytes per
document): the partition count P comes from ``data.worker_memory_mb`` and the input size, so it grows with
the corpus and the per-worker peak does not. Only the edges (one per near duplicate) are held whole.
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from lmforge.config import DataConfig, build
from lmforge.data.clean import STAGES, Cleaner, digest
from lmforge.data.dedup import MinHasher, band_keys, bucket_edges, clusters, lsh_params
from lmforge.data.shards import (
    DocumentEncoder,
    ShardWriter,
    read_json,
    split_score,
    write_json,
)
from lmforge.data.sources import SourceStats, read_documents
from lmforge.errors import DataError

PLAN = "plan.json"
ID_SHIFT = 40  # document id = file index << ID_SHIFT | position in the file
FLUSH_BYTES = 16 * 2**20  # text and index records a map unit buffers before it appends them to disk
INPUT_SHARE = 4  # a partition holds at most 1/INPUT_SHARE of the worker memory bound in input bytes


def partitions_for(input_bytes: int, worker_memory_mb: int) -> int:
    """The partition count that keeps one partition's input (and so its index) within the memory bound."""
    per_partition = worker_memory_mb * 2**20 // INPUT_SHARE
    return max(1, math.ceil(input_bytes / per_partition))


def input_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def make_plan(cfg: DataConfig, paths: list[Path], *, strict: bool) -> dict:
    sizes = [input_bytes(p) for p in paths]
    bands, rows = lsh_params(cfg.near_dedup_threshold) if cfg.near_dedup else (0, 0)
    return {
        "cfg": dataclasses.asdict(cfg),
        "files": [str(p) for p in paths],
        "bytes": sizes,
        "partitions": partitions_for(sum(sizes), cfg.worker_memory_mb),
        "bands": bands,
        "rows": rows,
        "strict": strict,
    }


def load_plan(work: Path) -> dict:
    plan = read_json(work / PLAN)
    plan["cfg"] = build(DataConfig, plan["cfg"], "data")
    return plan


def index_dtype(bands: int) -> np.dtype:
    fields = [("id", "<u8"), ("h0", "<u8"), ("h1", "<u8"), ("chars", "<u4"), ("nbytes", "<u4")]
    fields += [("offset", "<u8"), ("score", "<f8")]
    return np.dtype(fields + ([("bands", "<u8", (bands,))] if bands else []))


BAND_DTYPE = np.dtype([("key", "<u8"), ("id", "<u8")])


def unit_dir(work: Path, stage: str, unit: int) -> Path:
    return work / stage / f"{unit:05d}"


def marker(work: Path, stage: str, unit: int) -> Path:
    return unit_dir(work, stage, unit) / "done.json"


def fresh_dir(path: Path) -> Path:
    """An empty folder for a unit that (re)starts: whatever a killed attempt left there goes."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: VmHWM on Linux (ru_maxrss would also count the parent's
    memory at the fork that preceded this process's exec), ru_maxrss elsewhere."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 2**20)


def finish_unit(work: Path, stage: str, unit: int, started: float, counts: dict) -> dict:
    counts = {**counts, "unit": unit, "seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()}
    write_json(marker(work, stage, unit), counts)
    return counts


# -- 1. map: one input file -> per-partition text and index ---------------------------------------------------


def map_file(work: Path, f: int, *, flush_bytes: int = FLUSH_BYTES) -> dict:
    started = time.perf_counter()
    plan = load_plan(work)
    cfg, n_parts = plan["cfg"], plan["partitions"]
    out = fresh_dir(unit_dir(work, "map", f))
    dtype = index_dtype(plan["bands"])
    hasher = MinHasher() if plan["bands"] else None
    cleaner, stats = Cleaner(cfg), SourceStats()
    texts = [bytearray() for _ in range(n_parts)]  # buffered, then appended: no file stays open, so P
    records: list[list[tuple]] = [[] for _ in range(n_parts)]  # is not limited by the open-file limit
    written = [0] * n_parts  # bytes of each partition's text file so far: the next record's offset
    buffered = 0

    def flush() -> None:
        for p in range(n_parts):
            if records[p]:
                with open(out / f"part-{p:04d}.txt", "ab") as handle:
                    handle.write(texts[p])
                with open(out / f"part-{p:04d}.idx", "ab") as handle:
                    handle.write(np.array(records[p], dtype=dtype).tobytes())
                texts[p].clear()
                records[p].clear()

    position = -1
    docs = read_documents(
        [Path(plan["files"][f])],
        text_field=cfg.text_field,
        chunk_chars=cfg.text_chunk_chars,
        stats=stats,
        strict=plan["strict"],
        split=cfg.split,
        max_chars=cfg.max_chars,
        encoding=cfg.encoding,
    )
    for position, doc in enumerate(docs):
        text = cleaner.clean(doc.text)
        if text is None:
            continue
        key = digest(text)
        h0, h1 = int.from_bytes(key[:8], "little"), int.from_bytes(key[8:], "little")
        p = h0 % n_parts
        data = text.encode("utf-8")
        record = (
            f << ID_SHIFT | position,
            h0,
            h1,
            len(text),
            len(data),
            written[p],
            split_score(key, cfg.seed),
        )
        if hasher is not None:
            record += (band_keys(hasher.signature(text), plan["bands"], plan["rows"]),)
        texts[p] += data
        written[p] += len(data)
        records[p].append(record)
        buffered += len(data) + dtype.itemsize
        if buffered >= flush_bytes:
            flush()
            buffered = 0
    flush()
    for p in range(n_parts):  # every partition has its (maybe empty) files
        (out / f"part-{p:04d}.txt").touch()
        (out / f"part-{p:04d}.idx").touch()
    if position >= 1 << ID_SHIFT:
        raise DataError(f"{plan['files'][f]}: more than 2^{ID_SHIFT} documents in one file")
    report = cleaner.report.as_dict()
    counts = {"docs": position + 1, "bytes": plan["bytes"][f], "report": report, "sources": stats.as_dict()}
    return finish_unit(work, "map", f, started, counts)


def read_index(work: Path, plan: dict, p: int) -> np.ndarray:
    """Partition ``p``'s index records from every input file, in id order (files in order, each in order)."""
    dtype = index_dtype(plan["bands"])
    parts = [
        np.fromfile(unit_dir(work, "map", f) / f"part-{p:04d}.idx", dtype=dtype)
        for f in range(len(plan["files"]))
    ]
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)


# -- 2. exact: one partition -> kept index + band records ---------------------------------------------------


def exact_partition(work: Path, p: int) -> dict:
    started = time.perf_counter()
    plan = load_plan(work)
    out = fresh_dir(unit_dir(work, "exact", p))
    index = read_index(work, plan, p)
    keep = np.ones(len(index), dtype=bool)
    if plan["cfg"].dedup and len(index):
        order = np.lexsort((index["id"], index["h1"], index["h0"]))
        h0, h1 = index["h0"][order], index["h1"][order]
        repeat = np.concatenate([[False], (h0[1:] == h0[:-1]) & (h1[1:] == h1[:-1])])
        keep[order[repeat]] = False
    kept = index[keep]
    np.save(out / "kept.npy", kept)
    if plan["bands"]:
        records = np.empty(len(kept) * plan["bands"], dtype=BAND_DTYPE)
        records["key"] = kept["bands"].ravel()
        records["id"] = np.repeat(kept["id"], plan["bands"])
        target = records["key"] % np.uint64(plan["partitions"])
        for q in range(plan["partitions"]):
            np.save(out / f"bands-{q:04d}.npy", records[target == q])
    counts = {
        "docs_in": len(index),
        "docs_out": len(kept),
        "chars_in": int(index["chars"].sum()),
        "chars_out": int(kept["chars"].sum()),
        "bytes": int(index["nbytes"].sum()),
    }
    return finish_unit(work, "exact", p, started, counts)


# -- 3. near: one band partition -> edges ---------------------------------------------------------------------


def near_partition(work: Path, q: int) -> dict:
    started = time.perf_counter()
    plan = load_plan(work)
    out = fresh_dir(unit_dir(work, "near", q))
    records = np.concatenate(
        [np.load(unit_dir(work, "exact", p) / f"bands-{q:04d}.npy") for p in range(plan["partitions"])]
    )
    edges = bucket_edges(records["key"], records["id"])
    np.save(out / "edges.npy", edges)
    return finish_unit(work, "near", q, started, {"docs": len(records), "edges": len(edges)})


# -- 4. decide: the removal list, clusters and split counts (once) ------------------------------------------


def decide(work: Path) -> dict:
    plan = load_plan(work)
    cfg = plan["cfg"]
    if plan["bands"]:
        edges = np.concatenate(
            [np.load(unit_dir(work, "near", q) / "edges.npy") for q in range(plan["partitions"])]
        )
    else:
        edges = np.empty((0, 2), dtype=np.uint64)
    removed = np.unique(edges[:, 1])
    np.save(work / "removed.npy", removed)
    groups = clusters(edges)
    counts = {"train": 0, "val": 0}
    lowest = (2.0, -1)
    for p in range(plan["partitions"]):
        kept = np.load(unit_dir(work, "exact", p) / "kept.npy")
        kept = kept[~np.isin(kept["id"], removed)]
        val = kept["score"] < cfg.val_fraction
        counts["val"] += int(val.sum())
        counts["train"] += int((~val).sum())
        if len(kept):
            i = int(np.lexsort((kept["id"], kept["score"]))[0])
            lowest = min(lowest, (float(kept["score"][i]), int(kept["id"][i])))
    kept_docs = counts["train"] + counts["val"]
    forced_val = lowest[1] if cfg.val_fraction > 0 and counts["val"] == 0 and kept_docs >= 2 else None
    decision = {
        "counts": counts,
        "forced_val": forced_val,
        "removed": len(removed),
        "clusters": len(groups),
        "largest_cluster": max((len(g) for g in groups), default=0),
    }
    write_json(work / "decide.json", decision)
    return decision


# -- 6. tokenize: one partition -> shards -----------------------------------------------------------------------


def kept_documents(work: Path, plan: dict, p: int, removed: np.ndarray):
    """(record, text) of partition ``p``'s final documents in id order."""
    kept = np.load(unit_dir(work, "exact", p) / "kept.npy")
    gone = np.isin(kept["id"], removed)
    files: dict[int, object] = {}
    try:
        for record, is_gone in zip(kept, gone):
            f = int(record["id"]) >> ID_SHIFT
            if f not in files:
                files[f] = open(unit_dir(work, "map", f) / f"part-{p:04d}.txt", "rb")
            if is_gone:
                yield record, None
                continue
            handle = files[f]
            handle.seek(int(record["offset"]))
            yield record, handle.read(int(record["nbytes"])).decode("utf-8")
    finally:
        for handle in files.values():
            handle.close()


def tokenize_partition(work: Path, p: int) -> dict:
    started = time.perf_counter()
    plan = load_plan(work)
    cfg = plan["cfg"]
    out = fresh_dir(unit_dir(work, "tokenize", p))
    decision = read_json(work / "decide.json")
    removed = np.load(work / "removed.npy")
    meta = read_json(work / "tokenizer.json.meta")
    encoder = DocumentEncoder(str(work / "tokenizer.json"), meta["use_tiktoken"])
    done: dict[str, list[dict]] = {"train": [], "val": []}
    writers = {s: ShardWriter(out, s, meta["dtype"], cfg.shard_tokens, done[s]) for s in done}
    near = {"docs_in": 0, "docs_out": 0, "chars_in": 0, "chars_out": 0}
    nbytes = 0
    for record, text in kept_documents(work, plan, p, removed):
        chars = int(record["chars"])
        near["docs_in"] += 1
        near["chars_in"] += chars
        if text is None:
            continue
        near["docs_out"] += 1
        near["chars_out"] += chars
        nbytes += int(record["nbytes"])
        is_val = record["score"] < cfg.val_fraction or int(record["id"]) == decision["forced_val"]
        writers["val" if is_val else "train"].add(encoder([text])[0])
    for writer in writers.values():
        writer.close()
    counts = {"near_dedup": near, "shards": done, "docs": near["docs_out"], "bytes": nbytes}
    return finish_unit(work, "tokenize", p, started, counts)


def iter_texts(work: Path, plan: dict):
    """Final kept texts in partition order (for training a tokenizer and choosing the encoder)."""
    removed = np.load(work / "removed.npy")
    for p in range(plan["partitions"]):
        for _, text in kept_documents(work, plan, p, removed):
            if text is not None:
                yield text


# -- 7. finish: shards into place, report.json, job.json --------------------------------------------------------


def merge_sources(parts: list[dict]) -> dict:
    out = SourceStats().as_dict()
    for part in parts:
        for key in ("files", "bytes", "binary_skipped", "invalid_utf8_files", "invalid_utf8_chars"):
            out[key] += part[key]
        for key in ("cut_documents", "cut_pieces", "damaged_skipped"):
            out[key] += part.get(key, 0)
        out["damaged_files"] = (out["damaged_files"] + part.get("damaged_files", []))[:20]
        out["malformed_records"] += part["malformed_records"]
        out["binary_files"] = (out["binary_files"] + part["binary_files"])[:20]
        out["malformed_examples"] = (out["malformed_examples"] + part["malformed_examples"])[:20]
    return out


def merged_report(work: Path, plan: dict) -> dict:
    """The cleaning report of the whole job, in ``Cleaner``'s format, summed over the units' markers."""
    maps = [read_json(marker(work, "map", f)) for f in range(len(plan["files"]))]
    stages = {name: {"docs_in": 0, "docs_out": 0, "chars_in": 0, "chars_out": 0} for name in STAGES}
    reasons: dict[str, int] = {}
    pii: dict[str, int] = {}
    languages: dict[str, dict[str, int]] | None = None
    quality: dict | None = None
    for m in maps:
        for name in ("read", "normalize", "pii", "filter", "language", "quality"):
            for key, value in m["report"]["stages"].get(name, {}).items():
                stages[name][key] += value
        for key, value in m["report"]["filter_reasons"].items():
            reasons[key] = reasons.get(key, 0) + value
        for key, value in m["report"]["pii_replaced"].items():
            pii[key] = pii.get(key, 0) + value
        if "languages" in m["report"]:
            languages = {} if languages is None else languages
            for code, count in m["report"]["languages"].items():
                total = languages.setdefault(code, {"docs": 0, "chars": 0})
                for key, value in count.items():
                    total[key] += value
        if "quality" in m["report"]:
            part = m["report"]["quality"]
            if quality is None:
                quality = {**part, "histogram": list(part["histogram"])}
            else:
                quality["scored"] += part["scored"]
                quality["score_sum"] += part["score_sum"]
                quality["histogram"] = [a + b for a, b in zip(quality["histogram"], part["histogram"])]
    for p in range(plan["partitions"]):
        exact = read_json(marker(work, "exact", p))
        for key in stages["exact_dedup"]:
            stages["exact_dedup"][key] += exact[key]
    out = {
        "sources": merge_sources([m["sources"] for m in maps]),
        "stages": stages,
        "filter_reasons": reasons,
        "pii_replaced": pii,
    }
    if languages is not None:
        out["languages"] = dict(sorted(languages.items()))
    if quality is not None:
        out["quality"] = quality
    return out


def finish(work: Path, out: Path) -> tuple[dict, dict]:
    """Move the shards into ``out`` and return (splits, report)."""
    plan = load_plan(work)
    report = merged_report(work, plan)
    near = report["stages"]["near_dedup"]
    splits = {"train": [], "val": []}
    for p in range(plan["partitions"]):
        done = read_json(marker(work, "tokenize", p))
        for key in near:
            near[key] += done["near_dedup"][key]
        for split, shards in done["shards"].items():
            for k, shard in enumerate(shards):
                name = f"{split}_p{p:04d}_{k:05d}.bin"
                source = unit_dir(work, "tokenize", p) / shard["file"]
                if source.exists():
                    os.replace(source, out / name)
                splits[split].append({**shard, "file": name})
    report["near_dedup"] = read_json(work / "decide.json")
    splits = {
        split: {
            "docs": sum(s["docs"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
            "shards": shards,
        }
        for split, shards in splits.items()
    }
    return splits, report
