"""Object storage without a server: ``Storage``'s retries, checks and listings, and the streaming reader's
shard cache (LRU bound, read-ahead, checksums), against fsspec's in-memory file system and hand-computed
expectations. (``test_object_storage.py`` runs the same code against a real S3-compatible server.)"""

from __future__ import annotations

import hashlib
import time
import uuid

import fsspec
import numpy as np
import pytest

from lmforge.config import DataConfig
from lmforge.data import storage as storage_module
from lmforge.data import stream as stream_module
from lmforge.data.storage import IncompleteRead, Storage, is_remote, is_transient, join, url_key
from lmforge.data.stream import ShardCache, StreamSettings
from lmforge.errors import DataError

MEMORY = fsspec.filesystem("memory")


@pytest.fixture
def bucket() -> str:
    """A fresh prefix in fsspec's (process-wide) in-memory store, removed afterwards."""
    name = f"/lmforge-{uuid.uuid4().hex[:8]}"
    yield f"memory://{name.lstrip('/')}"
    if MEMORY.exists(name):
        MEMORY.rm(name, recursive=True)


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """The backoff delays ``Storage.call`` asks for (recorded, not slept)."""
    delays: list[float] = []
    monkeypatch.setattr(storage_module.time, "sleep", delays.append)
    return delays


def put(url: str, data: bytes) -> None:
    MEMORY.pipe(url.split("://", 1)[1], data)


# -- names ----------------------------------------------------------------------------------------------------


def test_urls_are_told_from_local_paths_and_joined_with_single_slashes():
    assert is_remote("s3://bucket/key") and is_remote("memory://x/y") and is_remote("gs://b")
    assert not is_remote("file:///tmp/data") and not is_remote("/tmp/data") and not is_remote("data/x.txt")
    assert join("s3://b/prepared/", "/train_00000.bin") == "s3://b/prepared/train_00000.bin"
    assert join("s3://b/p", "sub/", "/meta.json") == "s3://b/p/sub/meta.json"


def test_cache_names_of_urls_with_the_same_last_part_differ():
    a, b = url_key("s3://team-a/data"), url_key("s3://team-b/data")
    assert a != b and a.startswith("data-") and b.startswith("data-")
    assert a == f"data-{hashlib.sha256(b's3://team-a/data').hexdigest()[:12]}"  # stable across runs


# -- retries --------------------------------------------------------------------------------------------------


def failing(times: int, exc: BaseException, calls: list[int]):
    def fn():
        calls.append(1)
        if len(calls) <= times:
            raise exc
        return "ok"

    return fn


def test_transient_errors_are_retried_with_doubling_capped_backoff(sleeps):
    calls: list[int] = []
    storage = Storage(retries=8, backoff_s=0.5)
    assert storage.call("reading x", failing(8, ConnectionResetError("reset"), calls)) == "ok"
    assert len(calls) == 9 and storage.retried == 8
    assert sleeps == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]  # 0.5 * 2^k, at most MAX_BACKOFF_S


def test_retries_counts_the_tries_after_the_first(sleeps):
    calls: list[int] = []
    with pytest.raises(DataError, match="still failing after 0 retries"):
        Storage(retries=0).call("reading x", failing(5, TimeoutError("slow"), calls))
    assert len(calls) == 1 and sleeps == []
    calls.clear()
    with pytest.raises(DataError, match="still failing after 2 retries"):
        Storage(retries=2, backoff_s=1.0).call("reading x", failing(5, TimeoutError("slow"), calls))
    assert len(calls) == 3 and sleeps == [1.0, 2.0]


class NoCredentialsError(Exception):
    """Stands for botocore's (same name and module): an error of a network package, yet permanent."""


NoCredentialsError.__module__ = "botocore.exceptions"


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (FileNotFoundError("no such key"), "no such object"),
        (FileNotFoundError("The specified bucket does not exist"), "no such bucket"),
        (PermissionError("denied"), "access denied"),
        (NoCredentialsError("Unable to locate credentials"), "no credentials"),
    ],
)
def test_permanent_errors_fail_at_once_saying_which(sleeps, exc, expected):
    calls: list[int] = []
    with pytest.raises(DataError, match=expected):
        Storage(retries=5).call("reading s3://b/k", failing(5, exc, calls))
    assert len(calls) == 1 and sleeps == []
    assert not is_transient(exc)


def test_a_short_read_is_network_trouble():
    assert isinstance(IncompleteRead("got 3 bytes"), OSError) and is_transient(IncompleteRead("got 3 bytes"))
    assert is_transient(ConnectionRefusedError()) and not is_transient(ValueError("a bug"))


# -- downloads and listings -----------------------------------------------------------------------------------


def test_a_download_is_checked_against_size_and_checksum(bucket, tmp_path, sleeps):
    data = bytes(range(256)) * 3
    put(f"{bucket}/blob.bin", data)
    good = hashlib.sha256(data).hexdigest()
    storage = Storage(retries=2, backoff_s=0.01)
    dest = storage.download(f"{bucket}/blob.bin", tmp_path / "a" / "blob.bin", size=len(data), sha256=good)
    assert dest.read_bytes() == data and storage.retried == 0
    for kwargs in (
        {"size": len(data) - 1},
        {"size": len(data) + 1},
        {"sha256": hashlib.sha256(b"x").hexdigest()},
    ):
        storage = Storage(retries=2, backoff_s=0.01)
        with pytest.raises(DataError, match="still failing after 2 retries"):  # retried, then given up
            storage.download(f"{bucket}/blob.bin", tmp_path / "b" / "blob.bin", **kwargs)
        assert storage.retried == 2 and not (tmp_path / "b" / "blob.bin").exists()  # never under its name
    assert list((tmp_path / "b").iterdir()) == []  # no temporary file left behind


def test_expanding_a_prefix_skips_hidden_objects_and_sorts(bucket):
    put(f"{bucket}/raw/b.txt", b"bb")
    put(f"{bucket}/raw/a.jsonl", b"a")
    put(f"{bucket}/raw/.keep", b"")
    put(f"{bucket}/raw/sub/.DS_Store", b"xx")
    put(f"{bucket}/raw/sub/c.txt", b"ccc")
    found = Storage().expand(f"{bucket}/raw")
    names = {url.rsplit("/raw/", 1)[1]: size for url, size in found.items()}
    assert names == {"a.jsonl": 1, "b.txt": 2, "sub/c.txt": 3}
    assert list(found) == sorted(found)


def test_upload_folder_leaves_out_the_excluded_files(bucket, tmp_path):
    (tmp_path / "sub").mkdir()
    for name, text in (("a.bin", "a"), ("sub/b.bin", "bb"), ("meta.json", "{}")):
        (tmp_path / name).write_text(text)
    Storage().upload_folder(tmp_path, f"{bucket}/up", exclude=("meta.json",))
    root = bucket.split("://", 1)[1]
    assert sorted(MEMORY.find(f"/{root}/up")) == [f"/{root}/up/a.bin", f"/{root}/up/sub/b.bin"]
    assert MEMORY.cat_file(f"/{root}/up/sub/b.bin") == b"bb"


# -- the streaming reader's shard cache -----------------------------------------------------------------------

TOKENS = 100  # per shard; uint16, so 200 bytes a shard


def shard_values(i: int) -> np.ndarray:
    return (np.arange(TOKENS, dtype=np.uint16) * 7 + 1000 * i).astype(np.uint16)


@pytest.fixture
def shards(bucket) -> tuple[str, list[dict]]:
    """Four shards at ``bucket/ds`` and their meta.json entries (with SHA-256)."""
    entries = []
    for i in range(4):
        data = shard_values(i).tobytes()
        put(f"{bucket}/ds/train_{i:05d}.bin", data)
        entries.append(
            {"file": f"train_{i:05d}.bin", "tokens": TOKENS, "sha256": hashlib.sha256(data).hexdigest()}
        )
    return f"{bucket}/ds", entries


class Recorder(Storage):
    """A ``Storage`` that records which files it downloads, in order."""

    def __init__(self):
        super().__init__(retries=0)
        self.log: list[str] = []

    def download(self, url, dest, **kwargs):
        self.log.append(url.rsplit("/", 1)[1])
        return super().download(url, dest, **kwargs)


def cache_of(shards, folder, cache_bytes, storage=None) -> ShardCache:
    url, entries = shards
    settings = StreamSettings(
        storage=storage or Recorder(), cache_dir=folder, cache_bytes=cache_bytes, read_ahead=0
    )
    return ShardCache(url, folder, entries, 2, np.uint16, settings)


def on_disk(folder) -> set[int]:
    return {int(p.stem.split("_")[1]) for p in folder.glob("train_*.bin")}


def test_the_cache_keeps_the_most_recently_used_shards_within_its_bound(shards, tmp_path):
    cache = cache_of(shards, tmp_path, cache_bytes=2 * 2 * TOKENS)  # exactly two shards
    for i in (0, 1):
        assert np.array_equal(cache[i], shard_values(i))
    assert (cache.downloads, cache.hits) == (2, 0)  # fetched on demand: not hits
    assert on_disk(tmp_path) == {0, 1}  # at the bound, nothing evicted
    assert np.array_equal(cache[0], shard_values(0))  # shard 0 is now the most recently used
    assert (cache.downloads, cache.hits) == (2, 1)
    assert np.array_equal(cache[2], shard_values(2))
    assert on_disk(tmp_path) == {0, 2}  # the least recently used (1) went, file and all
    assert np.array_equal(cache[0], shard_values(0)) and (cache.downloads, cache.hits) == (3, 2)
    assert np.array_equal(cache[1], shard_values(1)) and cache.downloads == 4
    assert cache.storage.log == ["train_00000.bin", "train_00001.bin", "train_00002.bin", "train_00001.bin"]


def test_a_truncated_shard_left_in_the_cache_is_downloaded_again(shards, tmp_path):
    (tmp_path / "train_00000.bin").write_bytes(shard_values(0).tobytes()[:50])  # a killed run's leftover
    (tmp_path / "train_00001.bin").write_bytes(shard_values(1).tobytes())  # a complete one
    cache = cache_of(shards, tmp_path, cache_bytes=10**6)
    assert np.array_equal(cache[0], shard_values(0)) and np.array_equal(cache[1], shard_values(1))
    assert cache.storage.log == ["train_00000.bin"] and cache.hits == 1


def test_a_shard_that_does_not_match_its_checksum_is_refused(shards, tmp_path):
    url, entries = shards
    put(f"{url}/train_00002.bin", shard_values(3).tobytes())  # same size, other bytes
    cache = cache_of(shards, tmp_path, cache_bytes=10**6)
    with pytest.raises(DataError, match="SHA-256"):
        cache[2]
    assert not (tmp_path / "train_00002.bin").exists()


def test_read_ahead_fetches_in_order_of_need_and_keeps_the_coming_shards(shards, tmp_path, monkeypatch):
    monkeypatch.setattr(stream_module, "DOWNLOAD_THREADS", 1)  # one thread: the order is observable
    cache = cache_of(shards, tmp_path, cache_bytes=2 * TOKENS)  # room for one shard only
    cache.prefetch([2, 0, 3])
    deadline = time.monotonic() + 10
    while cache.downloads < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cache.storage.log == ["train_00002.bin", "train_00000.bin", "train_00003.bin"]
    assert on_disk(tmp_path) == {0, 2, 3}  # over the bound, but none of them may go before it is read
    for i in (2, 0, 3):
        assert np.array_equal(cache[i], shard_values(i))
    assert cache.downloads == 3 and cache.hits == 3


def test_stream_settings_read_the_cache_bound_in_gib_and_the_read_ahead(tmp_path):
    cfg = DataConfig(cache_gb=1.5, read_ahead=3, retries=7, cache_dir=str(tmp_path))
    settings = StreamSettings.from_config(cfg)
    assert settings.cache_bytes == 1.5 * 2**30 and settings.read_ahead == 3
    assert settings.storage.retries == 7 and settings.cache_dir == tmp_path
