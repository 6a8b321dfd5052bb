"""Training from a prepared dataset in object storage: shards are downloaded to a local cache as the sampler
needs them, background threads fetching those of the coming batches, and memory-mapped from there.

The split reads the same bytes as a local copy would, so the batches (and a resume) are exactly those of
``TokenLoader`` on a local folder. Downloads are checked against ``meta.json`` (size, and the SHA-256 that
publishing added) and renamed into place when complete; a shard already in the cache at full size is used as
it is. The cache holds at most ``cache_bytes`` of shards: the least recently used go first, never one the
current or the coming batches read (when those alone need more than the bound, it is exceeded, not stalled).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.config import DataConfig
from lmforge.data.loader import TokenSplit
from lmforge.data.remote import cache_root, local_copy, storage_for
from lmforge.data.storage import Storage, is_remote, join

log = logging.getLogger(__name__)
DOWNLOAD_THREADS = 4  # read-ahead downloads in flight at once (object stores answer each with some latency)


@dataclass(frozen=True, kw_only=True)
class StreamSettings:
    """How to stream prepared datasets named by URL: the storage (options, retries), the local cache folder,
    its bound, and how many coming batches the read-ahead covers."""

    storage: Storage
    cache_dir: Path
    cache_bytes: int
    read_ahead: int

    @classmethod
    def from_config(cls, cfg: DataConfig, fallback_cache: str | Path | None = None) -> StreamSettings:
        return cls(
            storage=storage_for(cfg),
            cache_dir=cache_root(cfg, fallback_cache),
            cache_bytes=int(cfg.cache_gb * 2**30),
            read_ahead=cfg.read_ahead,
        )

    def open_split(self, name: str, split: str) -> TokenSplit:
        """A split of a local prepared folder, or of one at a URL (streamed through the cache)."""
        return StreamingSplit(name, split, self) if is_remote(name) else TokenSplit(name, split)


class ShardCache:
    """The shards of one remote split on local disk, fetched on demand or ahead of need by a few threads."""

    def __init__(
        self, url: str, folder: Path, entries: list[dict], itemsize: int, dtype, stream: StreamSettings
    ):
        self.url, self.folder, self.entries, self.dtype = url, folder, entries, dtype
        self.sizes = [entry["tokens"] * itemsize for entry in entries]
        self.storage, self.cache_bytes = stream.storage, stream.cache_bytes
        self.downloads = self.hits = 0
        self._cond = threading.Condition()
        self._on_disk: OrderedDict[int, np.memmap | None] = OrderedDict()  # least recently used first
        self._busy: set[int] = set()  # being downloaded
        self._wanted: list[int] = []  # the read-ahead's queue, in order of need
        self._needed: set[int] = set()  # every shard of the last read-ahead request: not evicted
        self._threads: list[threading.Thread] = []
        for i, size in enumerate(self.sizes):  # shards left by an earlier run (complete by construction)
            path = self._path(i)
            if path.is_file() and path.stat().st_size == size:
                self._on_disk[i] = None

    def _path(self, i: int) -> Path:
        return self.folder / self.entries[i]["file"]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> np.memmap:
        """Shard ``i``, memory-mapped: from the cache, from a read-ahead download, or fetched now."""
        fetched = False
        while True:
            with self._cond:
                while i not in self._on_disk and i in self._busy:
                    self._cond.wait()  # a read-ahead thread is downloading it
                if i in self._on_disk:
                    shard = self._map(i)
                    if shard is not None:
                        self.hits += not fetched
                        return shard
                self._busy.add(i)
            self._fetch(i)
            fetched = True

    def prefetch(self, shards: list[int]) -> None:
        """Download ``shards`` (in this order) in the background; they are kept from eviction until used."""
        with self._cond:
            self._wanted = [i for i in dict.fromkeys(shards) if i not in self._on_disk]
            self._needed = set(shards)
            if self._wanted and not self._threads:
                for n in range(DOWNLOAD_THREADS):
                    thread = threading.Thread(target=self._run, name=f"lmforge-read-ahead-{n}", daemon=True)
                    thread.start()
                    self._threads.append(thread)
            self._cond.notify_all()

    def _map(self, i: int) -> np.memmap | None:
        """(Lock held.) The memory map of a cached shard, marked most recently used; None when its file was
        removed behind our back (another process evicting from a shared cache)."""
        self._on_disk.move_to_end(i)
        if self._on_disk[i] is None:
            try:
                self._on_disk[i] = np.memmap(self._path(i), dtype=self.dtype, mode="r")
            except FileNotFoundError:
                del self._on_disk[i]
                return None
        return self._on_disk[i]

    def _fetch(self, i: int) -> None:
        """Download shard ``i`` (``i`` marked busy by the caller), then evict down to the bound."""
        try:
            entry = self.entries[i]
            self.storage.download(
                join(self.url, entry["file"]), self._path(i), size=self.sizes[i], sha256=entry.get("sha256")
            )
            with self._cond:
                self.downloads += 1
                self._on_disk[i] = None
                self._evict(keep=i)
        finally:
            with self._cond:
                self._busy.discard(i)
                self._cond.notify_all()

    def _evict(self, keep: int) -> None:
        """(Lock held.) Remove least recently used shards while the cache is over its bound."""
        total = sum(self.sizes[i] for i in self._on_disk)
        protected = {keep, *self._needed}
        for i in list(self._on_disk):
            if total <= self.cache_bytes:
                break
            if i in protected:
                continue
            del self._on_disk[i]  # a map still in use stays valid: the file's pages live until it is closed
            self._path(i).unlink(missing_ok=True)
            total -= self.sizes[i]

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._wanted:
                    self._cond.wait()
                i = self._wanted.pop(0)
                if i in self._on_disk or i in self._busy:
                    continue
                self._busy.add(i)
            try:
                self._fetch(i)
            except Exception as exc:  # the reader fetches it itself (with its own retries) when it needs it
                log.warning("read-ahead of %s failed: %s", self.entries[i]["file"], exc)


class StreamingSplit(TokenSplit):
    """A split of the prepared dataset at a URL, read through a ``ShardCache`` (see the module docstring)."""

    streams = True

    def __init__(self, url: str, split: str, stream: StreamSettings):
        self.url = url.rstrip("/")
        folder = local_copy(self.url, stream.storage, stream.cache_dir)
        super().__init__(folder, split, open_shards=False)
        dtype = np.dtype(self.meta["dtype"])
        self.shards = ShardCache(self.url, folder, self.entries, dtype.itemsize, dtype, stream)

    def prefetch(self, shards: list[int]) -> None:
        self.shards.prefetch(shards)
