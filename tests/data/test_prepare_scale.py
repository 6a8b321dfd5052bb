"""The partitioned pipeline (data/partitioned.py): N array tasks + merge == one local run == the stream;
partitioned near dedup == an in-memory datasketch index; a killed job continues from its finished units;
the partition count follows the memory bound."""

import json
import math
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from datasketch import MinHash, MinHashLSH

from lmforge.config import DataConfig
from lmforge.data.clean import digest, normalize
from lmforge.data.dedup import MinHasher
from lmforge.data.job import Task
from lmforge.data.partitioned import ID_SHIFT, PLAN, make_plan, map_file, partitions_for
from lmforge.data.prepare import input_paths, prepare_data
from lmforge.data.shards import split_score, write_json
from lmforge.data.sources import SourceStats, read_documents

MEMORY_MB = 1  # a partition takes at most 256 KB of input: the ~0.9 MB corpus gets 4 partitions


@pytest.fixture(scope="module")
def planted(tmp_path_factory, shared) -> tuple[Path, list[tuple[int, int]]]:
    """8 JSONL files of English and Chinese documents with exact and near copies (0.5% of the characters
    changed) planted in later files; returns the folder and the (original id, copy id) near pairs."""
    rng = random.Random(0)
    english = (shared / "en" / "pg1404_federalist_papers.txt").read_text(encoding="utf-8")[:600_000]
    docs = [english[i : i + 3000] for i in range(0, len(english), 3000)]
    with open(shared / "zh" / "tang_poems.jsonl", encoding="utf-8") as f:
        docs += [json.loads(next(f))["text"] for _ in range(400)]
    rng.shuffle(docs)
    files: list[list[str]] = [docs[k::8] for k in range(8)]
    near = []
    originals = [(f, pos) for f in range(7) for pos, text in enumerate(files[f]) if len(text) >= 1000]
    for f, pos in rng.sample(originals, 30):
        chars = list(files[f][pos])
        for _ in range(max(1, len(chars) // 200)):
            chars[rng.randrange(len(chars))] = rng.choice("xyz的了")
        g = rng.randrange(f + 1, 8)
        files[g].append("".join(chars))
        near.append((f << ID_SHIFT | pos, g << ID_SHIFT | len(files[g]) - 1))
    for _ in range(20):
        f, g = rng.randrange(8), rng.randrange(8)
        files[g].append(rng.choice(files[f]))
    root = tmp_path_factory.mktemp("planted")
    for k, texts in enumerate(files):
        with open(root / f"part-{k}.jsonl", "w", encoding="utf-8") as out:
            out.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
    return root, near


def config(tokenizer, **overrides) -> DataConfig:
    base = dict(tokenizer=str(tokenizer), near_dedup=True, val_fraction=0.1, shard_tokens=50_000, workers=1)
    return DataConfig(**{**base, "worker_memory_mb": MEMORY_MB, **overrides})


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, planted, bpe_path) -> Path:
    out = tmp_path_factory.mktemp("local") / "out"
    prepare_data(config(bpe_path, executor="local", workers=2), [str(planted[0])], out, progress=False)
    return out


def documents(out: Path) -> dict[str, list[tuple[int, ...]]]:
    """Each split's documents as sorted token sequences."""
    meta = json.loads((out / "meta.json").read_text())
    result = {}
    for split, info in meta["splits"].items():
        ids = np.concatenate(
            [np.empty(0, dtype=meta["dtype"])]
            + [np.fromfile(out / s["file"], dtype=meta["dtype"]) for s in info["shards"]]
        )
        cuts = np.flatnonzero(ids == meta["eot_id"]) + 1
        result[split] = sorted(tuple(d.tolist()) for d in np.split(ids, cuts)[:-1])
    return result


def shards(out: Path) -> dict[str, bytes]:
    meta = json.loads((out / "meta.json").read_text())
    return {s["file"]: (out / s["file"]).read_bytes() for i in meta["splits"].values() for s in i["shards"]}


def test_array_tasks_and_merge_equal_one_local_run_and_the_stream(tmp_path, planted, bpe_path, local_run):
    folder, _ = planted
    out = tmp_path / "tasks"
    cfg = config(bpe_path, executor="local")
    counts = [
        prepare_data(cfg, [str(folder)], out, progress=False, task=Task(index=i, count=3)) for i in range(3)
    ]
    assert [c["files"] for c in counts] == [3, 3, 2] and not (out / "meta.json").exists()
    status = json.loads((out / "work" / "status-task2.json").read_text())  # progress of task 2's share
    assert status["stage"] == "map" and status["units_done"] == status["units"] == 2 and status["eta_s"] == 0
    assert status["docs"] == counts[2]["docs"] and status["bytes"] == counts[2]["bytes"] > 0
    merged = prepare_data(cfg, [str(folder)], out, progress=False)
    assert json.loads((out / "job.json").read_text())["stages"]["map"]["units_run"] == 0  # the tasks did it
    local_meta = json.loads((local_run / "meta.json").read_text())
    assert merged == local_meta and shards(out) == shards(local_run)  # the same shards, byte for byte
    local_report = json.loads((local_run / "report.json").read_text())
    assert json.loads((out / "report.json").read_text()) == local_report

    stream = tmp_path / "stream"
    stream_meta = prepare_data(config(bpe_path, executor="stream"), [str(folder)], stream, progress=False)
    assert documents(stream) == documents(local_run)  # the same documents and tokens, order aside
    assert stream_meta["documents"] == merged["documents"] and stream_meta["tokens"] == merged["tokens"]
    stream_report = json.loads((stream / "report.json").read_text())
    assert stream_report["stages"] == local_report["stages"]
    near = local_report["stages"]["near_dedup"]
    exact = local_report["stages"]["exact_dedup"]
    assert near["docs_in"] - near["docs_out"] >= 30 and exact["docs_in"] - exact["docs_out"] >= 15


def test_partitioned_near_dedup_equals_an_in_memory_index(planted, local_run):
    """The reference: datasketch's MinHashLSH over the documents in input order after exact dedup, each
    queried and then inserted (a document goes when it shares a band with any earlier one)."""
    folder, near = planted
    hasher, lsh, seen, removed = MinHasher(), MinHashLSH(threshold=0.8, num_perm=128), set(), set()
    for f, path in enumerate(input_paths([str(folder)], Path("/nonexistent"))):
        stream = read_documents([path], text_field="text", chunk_chars=8192, stats=SourceStats())
        for position, doc in enumerate(stream):
            text = normalize(doc.text)
            if digest(text) in seen:
                continue
            seen.add(digest(text))
            minhash = MinHash(num_perm=128, seed=1, hashvalues=hasher.signature(text), scheme="affine32")
            if lsh.query(minhash):
                removed.add(f << ID_SHIFT | position)
            lsh.insert(str(len(seen)), minhash)
    partitioned = set(np.load(local_run / "near_duplicates.npy").tolist())
    assert partitioned == removed
    assert {copy for _, copy in near} <= partitioned  # every planted near copy found
    assert json.loads((local_run / "job.json").read_text())["partitions"] == 4  # so several partitions


# argv: tokenizer, out, K, memory, source. SIGKILL this process at its first file operation after the K-th
# unit marker (done.json) is renamed into place (an audit hook: lmforge's code is untouched).
PREPARE = """
import os, signal, sys
from lmforge.config import DataConfig
from lmforge.data.prepare import prepare_data
kill_at, done = int(sys.argv[3]), 0
def hook(event, args):
    global done
    if done == kill_at and event in ("open", "os.rename", "os.remove"):
        os.kill(os.getpid(), signal.SIGKILL)
    if event == "os.rename" and os.fspath(args[1]).endswith("done.json"):
        done += 1
sys.addaudithook(hook)
cfg = DataConfig(tokenizer=sys.argv[1], near_dedup=True, val_fraction=0.1, shard_tokens=50_000, workers=1,
                 executor="local", worker_memory_mb=int(sys.argv[4]))
prepare_data(cfg, [sys.argv[5]], sys.argv[2], progress=False)
"""


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [3, 12])  # inside the map stage; inside the exact/near stages
def test_a_killed_job_continues_from_its_finished_units(tmp_path, planted, bpe_path, local_run, kill_at):
    folder, _ = planted
    out = tmp_path / "killed"
    args = [sys.executable, "-c", PREPARE, str(bpe_path), str(out), str(kill_at), str(MEMORY_MB), str(folder)]
    proc = subprocess.run(args, timeout=300, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    finished = {p.parent.parent.name: 0 for p in (out / "work").glob("*/*/done.json")}
    for p in (out / "work").glob("*/*/done.json"):
        finished[p.parent.parent.name] += 1
    assert sum(finished.values()) == kill_at
    prepare_data(config(bpe_path, executor="local"), [str(folder)], out, progress=False)
    job = json.loads((out / "job.json").read_text())
    for stage, done_before in finished.items():  # the rerun ran only the units that had no marker
        assert job["stages"][stage]["units_run"] == job["stages"][stage]["units"] - done_before, stage
    assert shards(out) == shards(local_run)
    assert (out / "meta.json").read_text() == (local_run / "meta.json").read_text()
    assert not (out / "work").exists()


def test_the_partition_count_follows_the_memory_bound(planted, bpe_path):
    folder, _ = planted
    paths = input_paths([str(folder)], Path("/nonexistent"))
    total = sum(p.stat().st_size for p in paths)
    for memory_mb in (1, 2, 1024):
        plan = make_plan(config(bpe_path, worker_memory_mb=memory_mb), paths, strict=False)
        assert (
            plan["partitions"]
            == math.ceil(total / (memory_mb * 2**20 / 4))
            == partitions_for(total, memory_mb)
        )
    assert partitions_for(10 * 2**30, 1024) == 40 and partitions_for(1, 1024) == 1


def test_cli_array_tasks_merge_and_slurm_script(tmp_path, planted, bpe_path, local_run, capsys):
    from lmforge.cli import main

    folder, _ = planted
    items = [str(folder), f"data.tokenizer={bpe_path}", "data.near_dedup=true", "data.val_fraction=0.1"]
    items += ["data.shard_tokens=50000", "data.executor=local", f"data.worker_memory_mb={MEMORY_MB}"]
    out = tmp_path / "cli"
    for i in range(2):
        assert (
            main(["data", "prepare", *items, "--out", str(out), "--task-index", str(i), "--tasks", "2"]) == 0
        )
        assert f"task {i} of 2: 4 inputs" in capsys.readouterr().out
    assert main(["data", "prepare", *items, "--out", str(out), "--no-progress"]) == 0
    assert shards(out) == shards(local_run)
    script = tmp_path / "prepare.sbatch"
    assert main(["data", "prepare", *items, "--out", str(out), "--tasks", "4", "--slurm", str(script)]) == 0
    text = script.read_text()
    assert "--array=0-3" in text and '--task-index "$SLURM_ARRAY_TASK_ID" --tasks 4' in text
    assert "--dependency=afterok" in text
    bash = subprocess.run(["bash", "-n", str(script)], capture_output=True)
    assert bash.returncode == 0, bash.stderr
    assert main(["data", "prepare", *items, "--out", str(out), "--task-index", "2", "--tasks", "2"]) == 2


def test_a_map_unit_writes_the_same_files_however_often_it_flushes(tmp_path, planted, bpe_path):
    folder, _ = planted
    paths = input_paths([str(folder)], tmp_path)
    files = {}
    for flush_bytes in (2000, 2**24):
        work = tmp_path / str(flush_bytes)
        work.mkdir()
        write_json(work / PLAN, make_plan(config(bpe_path), paths, strict=False))
        map_file(work, 0, flush_bytes=flush_bytes)
        unit = work / "map" / "00000"
        files[flush_bytes] = {p.name: p.read_bytes() for p in unit.iterdir() if p.name != "done.json"}
    assert files[2000] == files[2**24] and len(files[2000]) == 2 * 4


def prepare_both(tmp_path, docs: list[list[str]], **overrides) -> tuple[Path, Path]:
    """``docs`` (one list per JSONL file) prepared by the partitioned job and by the stream (the reference)."""
    folder = tmp_path / "in"
    folder.mkdir()
    for k, texts in enumerate(docs):
        with open(folder / f"f{k}.jsonl", "w", encoding="utf-8") as out:
            out.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    outs = []
    for executor in ("local", "stream"):
        cfg = config("char", executor=executor, near_dedup=False, **overrides)
        prepare_data(cfg, [str(folder)], tmp_path / executor, progress=False)
        outs.append(tmp_path / executor)
    return outs[0], outs[1]


def test_with_no_document_drawn_for_val_the_lowest_scoring_one_is_forced_there(tmp_path):
    rng = random.Random(4)
    texts = [
        " ".join(rng.choice(["sun", "moon", "rain", "wind"]) for _ in range(30)) + f" {i}" for i in range(12)
    ]
    local, stream = prepare_both(tmp_path, [texts[:7], texts[7:]], val_fraction=1e-4)
    ours, reference = documents(local), documents(stream)
    assert len(ours["val"]) == 1 and len(ours["train"]) == 11
    assert ours == reference
    # by hand: the document whose split score is lowest
    seed = config("char").seed
    lowest = min(texts, key=lambda t: split_score(digest(normalize(t)), seed))
    meta = json.loads((local / "meta.json").read_text())
    assert (
        meta["splits"]["val"]["docs"] == 1 and len(ours["val"][0]) == len(lowest) + 1
    )  # chars + end of text


def test_a_single_document_stays_in_train(tmp_path):
    local, stream = prepare_both(
        tmp_path, [["only one document here, long enough to keep " * 3]], val_fraction=1e-4
    )
    assert documents(local) == documents(stream)
    assert [len(documents(local).get(s, [])) for s in ("train", "val")] == [1, 0]


def test_without_dedup_exact_copies_are_kept(tmp_path):
    texts = [f"document number {i} says something about the weather today" for i in range(6)]
    local, stream = prepare_both(tmp_path, [texts, texts[:3]], dedup=False, val_fraction=0.2)
    ours = documents(local)
    assert sum(len(v) for v in ours.values()) == 9 and ours == documents(stream)
    report = json.loads((local / "report.json").read_text())["stages"]["exact_dedup"]
    assert report["docs_in"] == report["docs_out"] == 9
