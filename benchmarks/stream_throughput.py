"""Claim: training from an S3-compatible store streams at the speed of local disk at the demo shape: the
shards are downloaded ahead of need into a local cache, so the training step does not wait for the network.

Setup: a moto S3 server on 127.0.0.1 in this process; the demo corpus (the Python standard library's
top-level modules, BPE 2048) prepared once with ``data.shard_tokens`` small enough to give several shards,
then published to ``s3://bench/demo``. Two measurements, local (A) and S3 (B) interleaved A B A B:

1. the loader alone: batches of the demo shape (16 x 129 tokens) from ``TokenLoader`` on the local folder,
   streamed from S3 with a cold cache (every shard downloaded during the run), and again from S3 with the
   cache that pass filled (``s3-warm``);
2. ``lmforge train`` at the demo shape (``tiny`` preset, seq_len 128, micro-batch 16) for ``--steps`` steps in
   a fresh process, ``data.prepared`` local or ``s3://`` (cold cache each run): the median of the logged
   per-step tokens/s (steps 3 on) and the wall time of the process.

3. the stall (``--parts stall``): on a copy cut into many small shards (``--stall-shard-tokens``, the same
   tokenizer), the time ``next_batch`` blocks per batch while a simulated training step (a ``--step-ms``
   sleep) runs between batches, cold cache: local disk, S3 with ``data.read_ahead=4`` (the default) and S3
   with ``data.read_ahead=0``. This is the figure the load of a shared machine disturbs least.

Medians over ``--rounds``; ratios S3 / local. Results: benchmarks/results/stream_throughput.json (a run of
some ``--parts`` updates only those parts of the file).
Run: python benchmarks/stream_throughput.py [--rounds 3] [--steps 40] [--parts throughput,stall]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from lmforge.config import DataConfig
from lmforge.data.loader import TokenLoader
from lmforge.data.prepare import prepare_data
from lmforge.data.remote import publish
from lmforge.data.storage import Storage
from lmforge.data.stream import StreamSettings

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "stream_throughput.json"
SEQ_LEN, MICRO_BATCH = 128, 16  # the demo's shape (lmforge.train.demo.DEMO)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loader_rate(dataset: str, stream: StreamSettings | None, n_batches: int) -> dict:
    start = time.perf_counter()
    loader = TokenLoader(dataset, seq_len=SEQ_LEN, batch_size=MICRO_BATCH, seed=1, stream=stream)
    for _ in range(n_batches):
        loader.next_batch()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens_per_s": n_batches * MICRO_BATCH * SEQ_LEN / seconds}


def stall(dataset: str, stream: StreamSettings | None, n_batches: int, step_s: float) -> dict:
    """Milliseconds ``next_batch`` blocks, with ``step_s`` of simulated training between batches."""
    loader = TokenLoader(dataset, seq_len=SEQ_LEN, batch_size=MICRO_BATCH, seed=1, stream=stream)
    waits = []
    for _ in range(n_batches):
        start = time.perf_counter()
        loader.next_batch()
        waits.append(time.perf_counter() - start)
        time.sleep(step_s)  # the step; the read-ahead thread downloads meanwhile
    return {
        "wait_ms_first_batch": 1e3 * waits[0],
        "wait_ms_per_batch_after_first": 1e3 * statistics.mean(waits[1:]),
        "wait_ms_max_after_first": 1e3 * max(waits[1:]),
    }


def train_rate(dataset: str, run: Path, cache: Path, steps: int, env: dict) -> dict:
    shutil.rmtree(run, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    command = [
        sys.executable, "-m", "lmforge.cli", "train", f"data.prepared={dataset}", f"data.cache_dir={cache}",
        f"train.out_dir={run}", f"train.steps={steps}", "train.log_every=1", "train.sample_prompts=[]",
        "train.device=cpu", "--no-progress",
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"train failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r and r["step"] >= 3]
    return {"tokens_per_s": statistics.median(rates), "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--loader-batches", type=int, default=400)
    parser.add_argument("--shard-tokens", type=int, default=200_000)
    parser.add_argument("--work", default="/tmp/lmforge-stream-bench")
    parser.add_argument("--parts", default="throughput,stall")
    parser.add_argument("--stall-shard-tokens", type=int, default=20_000)
    parser.add_argument("--stall-batches", type=int, default=60)
    parser.add_argument("--step-ms", type=float, default=100.0)
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    from moto.server import ThreadedMotoServer

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    os.environ.update(env)
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    load_before = os.getloadavg()

    data = DataConfig(
        tokenizer="bpe", vocab_size=2048, val_fraction=0.03, shard_tokens=args.shard_tokens, workers=2
    )  # the demo's data settings (lmforge.train.demo.DEMO), smaller shards
    local = work / "demo-prepared"
    meta = prepare_data(data, [sysconfig.get_paths()["stdlib"] + "/*.py"], local, progress=False)
    url = "s3://bench/demo"
    publish(local, url, Storage())
    shards = len(meta["splits"]["train"]["shards"])
    print(f"prepared {meta['tokens']:,} tokens, {shards} train shards; published to {url}", flush=True)

    previous = json.loads(RESULT.read_text()) if RESULT.is_file() else {}
    result = dict(previous)
    if "stall" in parts:
        result["stall"] = measure_stall(args, work, local / "tokenizer.json", load_before)
        print(json.dumps(result["stall"]["summary"], indent=2), flush=True)
    if "throughput" in parts:
        result.update(measure_throughput(args, work, local, url, meta, env, load_before))
        print(json.dumps(result["summary"], indent=2), flush=True)
    server.stop()
    RESULT.write_text(json.dumps(result, indent=2) + "\n")


def measure_stall(args, work: Path, tokenizer: Path, load_before) -> dict:
    data = DataConfig(
        tokenizer=str(tokenizer), val_fraction=0.03, shard_tokens=args.stall_shard_tokens, workers=2
    )
    fine = work / "demo-fine"
    meta = prepare_data(data, [sysconfig.get_paths()["stdlib"] + "/*.py"], fine, progress=False)
    url = "s3://bench/demo-fine"
    publish(fine, url, Storage())
    shards = len(meta["splits"]["train"]["shards"])
    print(f"stall: {shards} train shards of about {args.stall_shard_tokens:,} tokens at {url}", flush=True)
    runs = []
    for round_ in range(args.rounds):
        for where, dataset, read_ahead in (
            ("local", str(fine), 0),
            ("s3", url, 4),
            ("s3-no-read-ahead", url, 0),
        ):
            cache = work / "cache-stall"
            shutil.rmtree(cache, ignore_errors=True)
            stream = None
            if where != "local":
                stream = StreamSettings.from_config(DataConfig(cache_dir=str(cache), read_ahead=read_ahead))
            run = {
                "round": round_,
                "where": where,
                **stall(dataset, stream, args.stall_batches, args.step_ms / 1e3),
            }
            runs.append(run)
            print(json.dumps(run), flush=True)
    wheres = ("local", "s3", "s3-no-read-ahead")
    keys = ("wait_ms_first_batch", "wait_ms_per_batch_after_first", "wait_ms_max_after_first")
    summary = {
        key: {w: statistics.median(r[key] for r in runs if r["where"] == w) for w in wheres} for key in keys
    }
    return {
        "command": (
            f"python benchmarks/stream_throughput.py --parts stall --rounds {args.rounds} "
            f"--stall-batches {args.stall_batches} --step-ms {args.step_ms}"
        ),
        "train_shards": shards,
        "shard_tokens": args.stall_shard_tokens,
        "batches": args.stall_batches,
        "simulated_step_ms": args.step_ms,
        "summary": summary,
        "runs": runs,
        "machine": "shared with other jobs (2 CPU cores, up to 8 helpers); the three interleaved per round",
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }


def measure_throughput(args, work: Path, local: Path, url: str, meta: dict, env: dict, load_before) -> dict:
    shards = len(meta["splits"]["train"]["shards"])
    runs: list[dict] = []
    for round_ in range(args.rounds):
        for where, dataset in (("local", str(local)), ("s3", url)):
            cache = work / f"cache-{where}"
            shutil.rmtree(cache, ignore_errors=True)
            stream = StreamSettings.from_config(DataConfig(cache_dir=str(cache))) if where == "s3" else None
            result = {"round": round_, "where": where, "kind": "loader"}
            result.update(loader_rate(dataset, stream, args.loader_batches))
            runs.append(result)
            print(json.dumps(result), flush=True)
            if stream is not None:  # again, from the cache the first pass filled
                result = {"round": round_, "where": "s3-warm", "kind": "loader"}
                result.update(loader_rate(dataset, stream, args.loader_batches))
                runs.append(result)
                print(json.dumps(result), flush=True)
            result = {"round": round_, "where": where, "kind": "train"}
            result.update(train_rate(dataset, work / f"run-{where}", cache, args.steps, env))
            runs.append(result)
            print(json.dumps(result), flush=True)

    def median(kind: str, where: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["kind"] == kind and r["where"] == where)

    summary = {
        "loader_tokens_per_s": {w: median("loader", w, "tokens_per_s") for w in ("local", "s3", "s3-warm")},
        "train_tokens_per_s": {w: median("train", w, "tokens_per_s") for w in ("local", "s3")},
        "train_wall_s": {w: median("train", w, "wall_s") for w in ("local", "s3")},
    }
    summary["loader_ratio_s3_over_local"] = (
        summary["loader_tokens_per_s"]["s3"] / summary["loader_tokens_per_s"]["local"]
    )
    summary["train_ratio_s3_over_local"] = (
        summary["train_tokens_per_s"]["s3"] / summary["train_tokens_per_s"]["local"]
    )
    paired = [  # each round's S3 run over the local run just before it
        next(r for r in runs if r["kind"] == "train" and r["where"] == "s3" and r["round"] == n)[
            "tokens_per_s"
        ]
        / next(r for r in runs if r["kind"] == "train" and r["where"] == "local" and r["round"] == n)[
            "tokens_per_s"
        ]
        for n in range(args.rounds)
    ]
    summary["train_ratio_per_round"] = paired
    summary["train_ratio_median_of_rounds"] = statistics.median(paired)
    summary["train_wall_ratio_s3_over_local"] = (
        summary["train_wall_s"]["s3"] / summary["train_wall_s"]["local"]
    )
    return {
        "claim": __doc__.splitlines()[0],
        "command": f"python benchmarks/stream_throughput.py --rounds {args.rounds} --steps {args.steps}",
        "shape": {"preset": "tiny", "seq_len": SEQ_LEN, "micro_batch": MICRO_BATCH, "vocab": 2048},
        "data": {"tokens": meta["tokens"], "train_shards": shards, "shard_tokens": args.shard_tokens},
        "store": "moto S3 server on 127.0.0.1 (in the benchmark process); cold cache each S3 run",
        "steps": args.steps,
        "loader_batches": args.loader_batches,
        "rounds": args.rounds,
        "summary": summary,
        "runs": runs,
        "machine": "shared with other jobs (2 CPU cores, up to 8 helpers); local and S3 interleaved A B A B",
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }


if __name__ == "__main__":
    main()
