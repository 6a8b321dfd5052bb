"""Object storage against a real S3-compatible server (moto in server mode on 127.0.0.1): preparing into and
from ``s3://``, streaming shards with a bounded cache and read-ahead (the very batches of a local copy, across
a resume), surviving the server going away mid-run, clear errors, and a SIGKILLed ``lmforge train`` reading
from ``s3://`` that resumes to the same weights as an uninterrupted run."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.config import DataConfig
from lmforge.data.loader import TokenLoader, eval_batches
from lmforge.data.prepare import prepare_data
from lmforge.errors import DataError
from tests.conftest import require_module

require_module("s3fs", "s3")
moto_server = require_module("moto.server")

BUCKET = "lmforge-test"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# A char tokenizer and small shards: several shards per split, so windows cross shard boundaries.
DATA = dict(tokenizer="char", val_fraction=0.2, seed=3, shard_tokens=3000, workers=1)
WORDS = ["the", "river", "stone", "light", "over", "quiet", "north", "and", "of", "glass", "moves", "slowly"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A moto S3 server on 127.0.0.1 that a test can stop and start again on the same port (moto keeps the
    buckets in this process, so they survive the restart)."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None

    def start(self) -> None:
        self.server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="module")
def s3():
    server = Server()
    server.start()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in CREDENTIALS.items():
            mp.setenv(key, value)
        mp.setenv("AWS_ENDPOINT_URL", server.endpoint)  # the standard variable; subprocesses inherit it
        import boto3

        boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket=BUCKET)
        yield server
    server.stop()


def write_corpus(root: Path) -> Path:
    """Plain text, JSONL and Parquet documents of random words (seeded)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(7)

    def doc() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 160))) + "."

    (root / "txt").mkdir(parents=True)
    for i in range(6):
        (root / "txt" / f"part{i}.txt").write_text("\n\n".join(doc() for _ in range(4)), encoding="utf-8")
    with open(root / "records.jsonl", "w", encoding="utf-8") as f:
        for _ in range(30):
            f.write(json.dumps({"text": doc()}) + "\n")
    pq.write_table(pa.table({"text": [doc() for _ in range(30)]}), root / "table.parquet")
    return root


def upload_tree(local: Path, url: str) -> None:
    from lmforge.data.storage import Storage

    Storage().upload_folder(local, url)


@pytest.fixture(scope="module")
def datasets(s3, tmp_path_factory):
    """The corpus prepared locally and, with the same settings, into s3:// (from the same local files)."""
    root = tmp_path_factory.mktemp("s3data")
    corpus = write_corpus(root / "corpus")
    cfg = DataConfig(**DATA, cache_dir=str(root / "cache"))
    local = root / "local"
    prepare_data(cfg, [str(corpus)], local, progress=False)
    url = f"s3://{BUCKET}/prepared/demo"
    prepare_data(cfg, [str(corpus)], url, progress=False)
    return {"root": root, "corpus": corpus, "local": local, "url": url, "cfg": cfg}


def stream_settings(cfg: DataConfig, **overrides):
    from lmforge.data.stream import StreamSettings

    return StreamSettings.from_config(dataclasses.replace(cfg, **overrides))


def batches(loader: TokenLoader, n: int) -> list[torch.Tensor]:
    return [loader.next_batch().inputs for _ in range(n)]


def test_prepare_to_s3_uploads_the_same_shards_with_checksums_and_meta_last(datasets):
    from lmforge.data.remote import is_prepared_url, read_meta
    from lmforge.data.storage import Storage

    storage, url, local = Storage(), datasets["url"], datasets["local"]
    meta = read_meta(url, storage)
    local_meta = json.loads((local / "meta.json").read_text())
    assert meta["splits"].keys() == {"train", "val"} and len(meta["splits"]["train"]["shards"]) >= 3
    for split, info in meta["splits"].items():
        assert [s["file"] for s in info["shards"]] == [
            s["file"] for s in local_meta["splits"][split]["shards"]
        ]
        for shard in info["shards"]:
            data = storage.read_bytes(f"{url}/{shard['file']}")
            assert data == (local / shard["file"]).read_bytes()  # byte-identical to a local preparation
            import hashlib

            assert shard["sha256"] == hashlib.sha256(data).hexdigest()
    assert meta["sources"] == [str(datasets["corpus"])] and is_prepared_url(url, storage)
    # nothing of the staging folder is left, and preparing again is a no-op
    assert not list((datasets["root"] / "cache" / "staging").glob("*"))
    assert prepare_data(datasets["cfg"], [str(datasets["corpus"])], url, progress=False) == meta
    # a half-uploaded folder (no meta.json) is not a dataset
    half = f"s3://{BUCKET}/prepared/half"
    storage.upload(local / "train_00000.bin", f"{half}/train_00000.bin")
    assert not is_prepared_url(half, storage)


def test_streamed_batches_equal_the_local_ones_with_a_tiny_cache_and_across_a_resume(datasets):
    cfg, url, local = datasets["cfg"], datasets["url"], datasets["local"]
    shard_bytes = 3000 * 2  # uint16 shards of ~3000 tokens
    # a cache of 2.5 shards and no read-ahead: every few batches evict, so shards are downloaded again
    small = stream_settings(
        cfg, cache_dir=str(datasets["root"] / "cache-small"), cache_gb=2.5 * shard_bytes / 2**30
    )
    kw = dict(seq_len=48, batch_size=6, seed=11)
    reference = batches(TokenLoader(str(local), **kw), 30)
    streamed = TokenLoader(url, stream=dataclasses.replace(small, read_ahead=0), **kw)
    assert all(torch.equal(a, b) for a, b in zip(batches(streamed, 12), reference[:12]))
    state = streamed.state_dict()
    rest = batches(streamed, 18)
    assert all(torch.equal(a, b) for a, b in zip(rest, reference[12:]))
    cache = streamed.splits[0].shards
    assert cache.downloads > len(cache)  # evicted and fetched again
    cached = list((datasets["root"] / "cache-small").rglob("train_*.bin"))
    assert sum(p.stat().st_size for p in cached) <= 2.5 * shard_bytes + max(cache.sizes)  # the bound held
    # resumed from the saved state (through JSON, as a checkpoint keeps it), with read-ahead this time
    resumed = TokenLoader(url, stream=small, **kw)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert all(torch.equal(a, b) for a, b in zip(batches(resumed, 18), reference[12:]))
    # validation reads the same windows as from the local folder
    val = [b.inputs for b in eval_batches(url, seq_len=48, batch_size=4, max_batches=3, stream=small)]
    val_local = [b.inputs for b in eval_batches(str(local), seq_len=48, batch_size=4, max_batches=3)]
    assert len(val) == len(val_local) and all(torch.equal(a, b) for a, b in zip(val, val_local))


def test_read_ahead_fetches_the_coming_shards_before_they_are_read(datasets):
    import time

    cfg, url = datasets["cfg"], datasets["url"]
    stream = stream_settings(cfg, cache_dir=str(datasets["root"] / "cache-ahead"), read_ahead=8)
    loader = TokenLoader(url, stream=stream, seq_len=48, batch_size=2, seed=5)
    loader.next_batch()
    cache = loader.splits[0].shards
    deadline = time.monotonic() + 10
    while cache.downloads < len(cache) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cache.downloads == len(cache)  # the thread fetched what 8 batches ahead need: every train shard
    hits = cache.hits
    got = batches(loader, 8)
    assert cache.downloads == len(cache) and cache.hits > hits  # read from the cache, nothing fetched again
    loader.skip(3)  # the look-ahead starts again from the new position
    got += batches(loader, 4)
    local = TokenLoader(str(datasets["local"]), seq_len=48, batch_size=2, seed=5)
    expected = batches(local, 9)[1:]
    local.skip(3)
    expected += batches(local, 4)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_a_server_outage_mid_run_is_retried_and_the_batches_stay_exact(s3, datasets):
    cfg, url, local = datasets["cfg"], datasets["url"], datasets["local"]
    # botocore's own retries off, so the outage reaches lmforge's retry loop
    options = {"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}
    stream = stream_settings(
        cfg,
        cache_dir=str(datasets["root"] / "cache-outage"),
        cache_gb=1e-9,
        storage_options=options,
        read_ahead=0,
    )  # a cache of nothing and no read-ahead: every batch downloads when it is drawn, after the outage began
    kw = dict(seq_len=48, batch_size=4, seed=2)
    reference = batches(TokenLoader(str(local), **kw), 10)
    loader = TokenLoader(url, stream=stream, **kw)
    got = batches(loader, 4)
    s3.stop()
    restart = threading.Timer(1.5, s3.start)
    restart.start()
    try:
        got += batches(loader, 6)  # blocks in retries until the server is back
    finally:
        restart.join()
    assert stream.storage.retried > 0
    assert all(torch.equal(a, b) for a, b in zip(got, reference))


def test_remote_sources_prepare_like_their_local_copies(datasets, tmp_path):
    corpus, cfg = datasets["corpus"], datasets["cfg"]
    upload_tree(corpus, f"s3://{BUCKET}/raw")
    from_s3 = tmp_path / "from-s3"
    meta = prepare_data(cfg, [f"s3://{BUCKET}/raw"], from_s3, progress=False)
    local = datasets["local"]
    local_meta = json.loads((local / "meta.json").read_text())
    assert meta["tokens"] == local_meta["tokens"] and meta["documents"] == local_meta["documents"]
    for shard in meta["splits"]["train"]["shards"] + meta["splits"]["val"]["shards"]:
        assert (from_s3 / shard["file"]).read_bytes() == (local / shard["file"]).read_bytes()
    # a glob of one kind only: the parquet table's 30 documents
    only = prepare_data(cfg, [f"s3://{BUCKET}/raw/*.parquet"], tmp_path / "parquet", progress=False)
    assert only["documents"] == 30


def test_the_data_verb_prepares_from_s3_into_s3(datasets, capsys):
    from lmforge.cli import main
    from lmforge.data.remote import read_meta
    from lmforge.data.storage import Storage

    upload_tree(datasets["corpus"], f"s3://{BUCKET}/raw-cli")
    out = f"s3://{BUCKET}/prepared/cli"
    sources = f"s3://{BUCKET}/raw-cli/*.jsonl"
    items = [
        sources,
        "data.tokenizer=char",
        "data.val_fraction=0.2",
        f"data.cache_dir={datasets['root'] / 'c'}",
    ]
    assert main(["data", "prepare", *items, "--out", out, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "exact_dedup" in printed  # the cleaning report, read back from S3
    meta = read_meta(out, Storage())
    assert meta["documents"] == 30 and meta["sources"] == [sources]
    assert Storage().exists(f"{out}/report.json") and Storage().exists(f"{out}/tokenizer.json")


def test_fetched_sources_keep_their_layout_and_a_truncated_copy_is_fetched_again(s3, tmp_path):
    from lmforge.data.storage import Storage, fetch_sources

    storage = Storage()
    texts = {"raw-fetch/a.txt": b"alpha " * 50, "raw-fetch/sub/b.jsonl": b'{"text": "beta"}\n' * 9}
    for key, data in texts.items():
        (tmp_path / "up" / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "up" / key).write_bytes(data)
        storage.upload(tmp_path / "up" / key, f"s3://{BUCKET}/{key}")
    [root] = fetch_sources(storage, [f"s3://{BUCKET}/raw-fetch"], tmp_path / "cache")
    local = {p.relative_to(root).as_posix(): p.read_bytes() for p in Path(root).rglob("*") if p.is_file()}
    assert local == {f"{BUCKET}/{key}": data for key, data in texts.items()}
    copy = Path(root) / BUCKET / "raw-fetch" / "a.txt"
    copy.write_bytes(texts["raw-fetch/a.txt"][:17])  # a download cut short by a killed run
    assert fetch_sources(storage, [f"s3://{BUCKET}/raw-fetch", "/local/x.txt"], tmp_path / "cache") == [
        root,
        "/local/x.txt",
    ]
    assert copy.read_bytes() == texts["raw-fetch/a.txt"]


def test_a_source_written_again_at_the_same_size_is_fetched_again(s3, tmp_path):
    """Issue 27: an object uploaded again at the same size with 1,445 edits was read stale from the cache."""
    from lmforge.data.storage import Storage, fetch_sources

    storage = Storage()
    rng = random.Random(5)
    first = "".join(rng.choice("abcdefgh \n") for _ in range(20_000))
    edited = list(first)
    for i in rng.sample(range(len(first)), 1445):
        edited[i] = "XYZ"[i % 3]
    second = "".join(edited)
    assert len(second) == len(first) and sum(a != b for a, b in zip(first, second)) == 1445
    key = f"s3://{BUCKET}/raw-etag/a.txt"
    downloads = []
    download = storage.download
    storage.download = lambda url, dest, **kw: downloads.append(url) or download(url, dest, **kw)
    (tmp_path / "a.txt").write_text(first, encoding="utf-8")
    storage.upload(tmp_path / "a.txt", key)
    [root] = fetch_sources(storage, [f"s3://{BUCKET}/raw-etag"], tmp_path / "cache")
    copy = Path(root) / BUCKET / "raw-etag" / "a.txt"
    assert copy.read_text(encoding="utf-8") == first and downloads == [key]
    fetch_sources(storage, [f"s3://{BUCKET}/raw-etag"], tmp_path / "cache")
    assert downloads == [key]  # unchanged: read from the cache
    (tmp_path / "a.txt").write_text(second, encoding="utf-8")
    storage.upload(tmp_path / "a.txt", key)
    fetch_sources(storage, [f"s3://{BUCKET}/raw-etag"], tmp_path / "cache")
    assert downloads == [key, key] and copy.read_text(encoding="utf-8") == second


def test_a_missing_output_bucket_fails_before_any_work(s3, datasets, tmp_path):
    """Issue 27: ``--out s3://missing-bucket/`` failed only after the whole preparation."""
    from lmforge.data.storage import Storage

    Storage().upload_folder(datasets["corpus"] / "txt", f"s3://{BUCKET}/raw-out-check")
    cfg = dataclasses.replace(datasets["cfg"], cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="writing to s3://no-such-out-bucket/prepared.*no such bucket"):
        prepare_data(
            cfg, [f"s3://{BUCKET}/raw-out-check"], "s3://no-such-out-bucket/prepared", progress=False
        )
    assert not (tmp_path / "cache").exists()  # no source fetched, nothing staged
    prepare_data(cfg, [f"s3://{BUCKET}/raw-out-check"], f"s3://{BUCKET}/prepared/out-check", progress=False)
    assert not Storage().exists(f"s3://{BUCKET}/prepared/out-check/.lmforge-write-check")


def test_an_unreachable_endpoint_is_reported_within_seconds_with_each_retry(s3, caplog):
    """Issue 27: with no server at the endpoint the error came after 80 s with nothing printed (s3fs's and
    botocore's retries nested under lmforge's)."""
    import time

    from lmforge.data.storage import Storage

    storage = Storage({"endpoint_url": f"http://127.0.0.1:{free_port()}"}, retries=2, backoff_s=0.05)
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="lmforge.data.storage"):
        with pytest.raises(DataError, match="still failing after 2 retries.*EndpointConnectionError"):
            storage.read_bytes(f"s3://{BUCKET}/anything")
    assert time.monotonic() - started < 5
    retries = [r.getMessage() for r in caplog.records if r.name == "lmforge.data.storage"]
    assert len(retries) == 2 and "retry 1 of 2" in retries[0] and "retry 2 of 2" in retries[1]
    assert all(f"reading s3://{BUCKET}/anything" in m and "Could not connect" in m for m in retries)


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("s3://no-such-bucket-here/data", "no such bucket"),
        (f"s3://{BUCKET}/absent/prefix", "matches no object"),
    ],
)
def test_missing_bucket_or_key_is_a_clear_error(datasets, tmp_path, where, expected):
    with pytest.raises(DataError, match=expected):
        prepare_data(datasets["cfg"], [where], tmp_path / "out", progress=False)


def test_training_from_a_prefix_without_meta_names_it(s3, tmp_path, capsys):
    from lmforge.cli import main

    code = main(
        ["train", f"data.prepared=s3://{BUCKET}/absent", "train.steps=1", f"train.out_dir={tmp_path}"]
    )
    err = capsys.readouterr().err
    assert code == 2 and f"s3://{BUCKET}/absent" in err and "meta.json" in err, err


def run_python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)


def test_no_credentials_and_no_s3fs_are_clear_errors(s3, datasets):
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    base.update(
        AWS_ENDPOINT_URL=s3.endpoint,
        AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
        AWS_CONFIG_FILE="/nonexistent",
    )
    read = f"from lmforge.data.storage import Storage; Storage(retries=0).read_bytes('{datasets['url']}/meta.json')"
    proc = run_python(read, base)
    assert "no credentials" in proc.stderr and "AWS_ACCESS_KEY_ID" in proc.stderr, proc.stderr[-2000:]
    blocked = "import sys; sys.modules['s3fs'] = None; " + read  # as if s3fs were not installed
    proc = run_python(blocked, {**base, **CREDENTIALS})
    assert "pip install lmforge[s3]" in proc.stderr, proc.stderr[-2000:]


def test_the_base_install_imports_no_storage_library():
    code = (
        "import sys; import lmforge.data.loader, lmforge.data.prepare, lmforge.train.data, lmforge.cli; "
        "print(sorted(m for m in ('fsspec', 's3fs', 'boto3', 'botocore', 'moto') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def train_args(prepared: str, run: Path, *extra: str) -> list[str]:
    return [
        "train", f"data.prepared={prepared}", "model.preset=tiny", "model.n_layers=1", "model.d_model=32",
        "model.n_heads=2", "model.n_kv_heads=2", "model.ffn_hidden=64", f"train.out_dir={run}", "train.steps=8",
        "train.seq_len=32", "train.micro_batch=4", "train.warmup_steps=2", "train.log_every=1",
        "train.eval_every=4", "train.eval_batches=1", "train.ckpt_every=3", "train.sample_prompts=[]",
        "train.device=cpu", "model.dropout=0.1", *extra, "--no-progress",
    ]  # fmt: skip


@pytest.mark.slow
def test_sigkilled_training_from_s3_resumes_to_the_uninterrupted_weights(datasets, tmp_path):
    from safetensors.torch import load_file

    from lmforge.cli import main

    url, cache = datasets["url"], f"data.cache_dir={tmp_path / 'cache'}"
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main(train_args(url, whole, cache)) == 0
    kill_after = 5  # after the checkpoint at step 3
    killer = Path(__file__).resolve().parents[1] / "train" / "kill_at_step.py"
    command = train_args(url, killed, cache, "data.cache_gb=0.00001")  # a small cache: shards fetched again
    proc = subprocess.run(
        [sys.executable, str(killer), str(kill_after), *command], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    resumed = subprocess.run(
        [sys.executable, "-m", "lmforge.cli", *command, "--resume=auto"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-2000:]
    final = "checkpoints/step_00000008/model.safetensors"
    a, b = (load_file(run / final) for run in (whole, killed))
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name}: the resumed run differs"
    losses = [
        [json.loads(line).get("loss") for line in (run / "metrics.jsonl").read_text().splitlines()]
        for run in (whole, killed)
    ]
    assert [x for x in losses[0] if x is not None][-1] == [x for x in losses[1] if x is not None][-1]
    assert np.isfinite([x for x in losses[0] if x is not None]).all()
