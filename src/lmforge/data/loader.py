"""Training windows from prepared shards: memory-mapped, mixed by weight, deterministic and resumable.

The stream is a sequence of global batches 0, 1, 2, ...; rank ``r`` of ``W`` takes global batches
``i*W + r``, so the ranks' batches are disjoint and together are exactly the single-process stream. Each
global sample first picks a dataset (deterministically: the one furthest below its share of the weights),
then takes that dataset's next window: windows are ``seq_len + 1`` tokens at multiples of ``seq_len`` from
an offset, in an order shuffled per epoch with ``(seed, dataset, epoch)``. The state is a handful of ints.

A dataset named by a URL (``s3://bucket/prefix``) is streamed through a local cache (``data.stream``); the
loader then looks ``read_ahead`` batches ahead on a copy of its own state and hands the shards those batches
will read to the cache's download thread. The batches are the same as from a local copy.

Shapes: B batch size, T sequence length.
"""

from __future__ import annotations

import copy
import json
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from lmforge.data.batch import Batch
from lmforge.errors import DataError

STATE_VERSION = 1


class TokenSplit:
    """One split of a prepared dataset as a virtual concatenation of memory-mapped shards. ``open_shards``
    False leaves ``shards`` to a subclass (``data.stream.StreamingSplit`` fills it with a download cache)."""

    streams = False  # True where shards are downloaded as they are needed (then ``prefetch`` matters)

    def __init__(self, folder: str | Path, split: str, *, open_shards: bool = True):
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        if not meta_path.is_file():
            raise DataError(
                f"{self.folder}: not a prepared dataset (no meta.json); run `lmforge data prepare`"
            )
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if split not in self.meta["splits"]:
            raise DataError(f"{self.folder}: no split {split!r} (found: {', '.join(self.meta['splits'])})")
        self.split = split
        self.eot_id = int(self.meta["eot_id"])
        self.vocab_size = int(self.meta["vocab_size"])
        self.fingerprint = self.meta["tokenizer_fingerprint"]
        dtype = np.dtype(self.meta["dtype"])
        self.entries = list(self.meta["splits"][split]["shards"])
        self.shards: list = []
        for shard in self.entries if open_shards else ():
            path = self.folder / shard["file"]
            if not path.is_file() or path.stat().st_size != shard["tokens"] * dtype.itemsize:
                raise DataError(f"{path}: shard missing or truncated; prepare {self.folder} again")
            if shard.get("max_id", -1) >= self.vocab_size:
                raise DataError(
                    f"{path}: meta.json records ids up to {shard['max_id']} in this shard, but the vocabulary "
                    f"has {self.vocab_size} (vocab_size={self.vocab_size}); prepare {self.folder} again"
                )
            self.shards.append(np.memmap(path, dtype=dtype, mode="r"))
        self.ends = np.cumsum([int(s["tokens"]) for s in self.entries], dtype=np.int64)
        self.n_tokens = int(self.ends[-1]) if len(self.ends) else 0

    def shards_of(self, starts: list[int], length: int) -> list[int]:
        """The shards that windows [start, start+length) read, window by window (a shard once per window)."""
        first = np.searchsorted(self.ends, starts, side="right").tolist()
        last = np.searchsorted(self.ends, np.asarray(starts) + length - 1, side="right").tolist()
        return [i for lo, hi in zip(first, last) for i in range(lo, hi + 1)]

    def prefetch(self, shards: list[int]) -> None:
        """A hint that ``shards`` will be read soon, in this order (local shards are all mapped already)."""

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) as int64, across shard boundaries. (length,)"""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        shard = int(np.searchsorted(self.ends, start, side="right"))
        while filled < length:
            shard_start = int(self.ends[shard - 1]) if shard else 0
            lo = start + filled - shard_start
            tokens = self.shards[shard]
            take = min(length - filled, len(tokens) - lo)
            out[filled : filled + take] = tokens[lo : lo + take]
            if take and out[filled : filled + take].max() >= self.vocab_size:  # a damaged shard
                self._bad_id(shard, lo, out[filled : filled + take])
            filled += take
            shard += 1
        return out

    def _bad_id(self, shard: int, lo: int, tokens: np.ndarray) -> None:
        at = int(np.argmax(tokens >= self.vocab_size))
        name = self.entries[shard]["file"]
        raise DataError(
            f"{self.folder}/{name}: token {lo + at} of the shard is id {int(tokens[at])}, outside the vocabulary "
            f"(vocab_size={self.vocab_size}); the shard is damaged: prepare {self.folder} again"
        )

    def n_windows(self, seq_len: int, offset: int = 0) -> int:
        return max(0, (self.n_tokens - 1 - offset) // seq_len)


def _windows_to_batch(windows: np.ndarray, eot_id: int, with_doc_ids: bool) -> Batch:
    """(B, T+1) token windows -> inputs, targets and optionally document ids."""
    tensor = torch.from_numpy(windows)
    inputs, targets = tensor[:, :-1].contiguous(), tensor[:, 1:].contiguous()  # (B, T) each
    doc_ids = None
    if with_doc_ids:
        is_eot = inputs == eot_id  # (B, T)
        doc_ids = (
            torch.cumsum(is_eot, dim=1) - is_eot.long()
        )  # an end-of-text belongs to the document it ends
    return Batch(inputs=inputs, targets=targets, doc_ids=doc_ids)


class TokenLoader:
    """An infinite, resumable stream of training batches from one or more prepared datasets.

    ``datasets``: a dict ``{folder: weight}``, or a list of folders weighted by their token counts. A folder
    may be a URL; ``stream`` (``data.stream.StreamSettings``) then says how to reach and cache it.
    """

    def __init__(
        self,
        datasets: dict[str, float] | list[str] | str | Path,
        *,
        split: str = "train",
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        with_doc_ids: bool = False,
        stream=None,
    ):
        if seq_len < 1 or batch_size < 1:
            raise DataError(f"seq_len={seq_len} and batch_size={batch_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise DataError(f"rank={rank} must be in [0, world_size={world_size})")
        if isinstance(datasets, str | Path):
            datasets = [str(datasets)]
        if not datasets:
            raise DataError("no prepared dataset given (set data.prepared or data.mixture)")
        names = list(datasets)
        self.splits = [_open_split(name, split, stream) for name in names]
        if isinstance(datasets, dict):
            weights = [float(datasets[name]) for name in names]
        else:
            weights = [float(s.n_tokens) for s in self.splits]
        if any(w <= 0 for w in weights):
            raise DataError(f"dataset weights must be > 0, got {dict(zip(names, weights))}")
        fingerprints = {s.fingerprint for s in self.splits}
        if len(fingerprints) > 1:
            found = ", ".join(f"{n}: {s.fingerprint}" for n, s in zip(names, self.splits))
            raise DataError(f"datasets in a mixture must share one tokenizer, found {found}")
        for name, s in zip(names, self.splits):
            if s.n_windows(seq_len) < 1:
                raise DataError(
                    f"{name} split {split!r} has {s.n_tokens} tokens, too few for one window of "
                    f"seq_len+1={seq_len + 1} tokens; use a smaller seq_len or more data"
                )
        self.names = names
        self.weights = np.array(weights) / sum(weights)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.with_doc_ids = with_doc_ids
        self.vocab_size = self.splits[0].vocab_size
        self.eot_id = self.splits[0].eot_id
        self.tokenizer_path = str(self.splits[0].folder / "tokenizer.json")
        self.global_batches = 0
        self.counts = [0] * len(self.splits)  # samples drawn from each dataset so far
        self.epochs = [0] * len(self.splits)
        self.positions = [0] * len(self.splits)  # the next window within the current epoch
        self._orders: dict[tuple[int, int], tuple[int, np.ndarray]] = {}  # (dataset, epoch) -> offset, order
        self.read_ahead = stream.read_ahead if stream is not None else 0
        self._ahead: TokenLoader | None = None  # the read-ahead's copy, ``len(_coming)`` batches ahead
        self._coming: deque[tuple[list, dict]] = (
            deque()
        )  # the batches it drew (windows, shards), not yet read

    # -- the stream ----------------------------------------------------------------------------------------

    def _order(self, d: int) -> tuple[int, np.ndarray]:
        """The offset and shuffled window order of dataset ``d``'s current epoch."""
        key = (d, self.epochs[d])
        if key not in self._orders:
            rng = np.random.default_rng([self.seed, *key])
            # a new window grid each epoch, kept small enough that at least one window fits
            offset = int(rng.integers(min(self.seq_len, self.splits[d].n_tokens - self.seq_len)))
            self._orders[key] = (offset, rng.permutation(self.splits[d].n_windows(self.seq_len, offset)))
            for old in [k for k in self._orders if k[0] == d and k[1] < key[1] - 1]:
                del self._orders[old]  # the read-ahead's copy shares this dict: keep the epoch before too
        return self._orders[key]

    def _choose(self) -> int:
        """The dataset furthest below its share: argmin (count + 1) / weight, ties to the first."""
        if len(self.counts) == 1:
            return 0
        scores = (np.array(self.counts) + 1) / self.weights
        return int(np.argmin(scores))

    def _next_start(self) -> tuple[int, int]:
        """Advance one global sample: (dataset, start token of its window)."""
        d = self._choose()
        offset, order = self._order(d)
        start = offset + int(order[self.positions[d]]) * self.seq_len
        self.counts[d] += 1
        self.positions[d] += 1
        if self.positions[d] == len(order):
            self.epochs[d] += 1
            self.positions[d] = 0
        return d, start

    def _my_starts(self) -> list[tuple[int, int]]:
        """Advance one round of ``world_size`` global batches; this rank's windows as (dataset, start)."""
        mine: list[tuple[int, int]] = []
        for _ in range(self.world_size):
            owner = self.global_batches % self.world_size
            starts = [self._next_start() for _ in range(self.batch_size)]
            if owner == self.rank:
                mine = starts
            self.global_batches += 1
        return mine

    def _prefetch(self, mine: list[tuple[int, int]]) -> None:
        """Tell streaming datasets which shards this batch and the next ``read_ahead`` batches will read, in
        order. The coming batches come from a look-ahead copy of the sampler (this loader's state is
        untouched), kept from call to call and started afresh after a resume or a skip."""
        if not self._coming or self._coming[0][0] != mine:
            self._ahead = copy.copy(self)  # shares the splits and the shuffled orders; copies the counters
            self._ahead.counts, self._ahead.epochs = list(self.counts), list(self.epochs)
            self._ahead.positions = list(self.positions)
            self._coming = deque([(mine, self._shards_of(mine))])
        while len(self._coming) < self.read_ahead + 1:
            windows = self._ahead._my_starts()
            self._coming.append((windows, self._shards_of(windows)))
        needed: dict[int, list[int]] = {}
        for _, shards in self._coming:
            for d, indices in shards.items():
                needed.setdefault(d, []).extend(indices)
        self._coming.popleft()
        for d, indices in needed.items():
            self.splits[d].prefetch(indices)

    def _shards_of(self, windows: list[tuple[int, int]]) -> dict[int, list[int]]:
        """Dataset -> the shards one batch's windows read, in order."""
        out = {}
        for d in dict.fromkeys(d for d, _ in windows):
            starts = [start for dd, start in windows if dd == d]
            out[d] = self.splits[d].shards_of(starts, self.seq_len + 1)
        return out

    def next_batch(self) -> Batch:
        """This rank's next batch: global batch ``step * world_size + rank``."""
        mine = self._my_starts()
        if self.read_ahead and any(s.streams for s in self.splits):
            self._prefetch(mine)
        windows = np.stack([self.splits[d].read(start, self.seq_len + 1) for d, start in mine])  # (B, T+1)
        return _windows_to_batch(windows, self.eot_id, self.with_doc_ids)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def skip(self, n_batches: int) -> None:
        """Advance past ``n_batches`` of this rank's batches without reading them (e.g. a bad data window)."""
        for _ in range(n_batches * self.world_size * self.batch_size):
            self._next_start()
        self.global_batches += n_batches * self.world_size
        self._coming.clear()

    # -- resumable state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "datasets": list(self.names),
            "fingerprint": self.splits[0].fingerprint,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "global_batches": self.global_batches,
            "counts": list(self.counts),
            "epochs": list(self.epochs),
            "positions": list(self.positions),
        }

    def load_state_dict(self, state: dict) -> None:
        problems = [
            f"{key}: saved {state.get(key)!r}, now {now!r}"
            for key, now in (
                ("fingerprint", self.splits[0].fingerprint),
                ("seed", self.seed),
                ("seq_len", self.seq_len),
                ("batch_size", self.batch_size),
            )
            if state.get(key) != now
        ]
        if len(state.get("counts", [])) != len(self.splits):
            problems.append(f"datasets: saved {state.get('datasets')}, now {self.names}")
        if state.get("global_batches", 0) % self.world_size:
            problems.append(
                f"global_batches={state.get('global_batches')} is not a multiple of world_size={self.world_size}"
            )
        if problems:
            raise DataError("the data loader state does not match this run: " + "; ".join(problems))
        self.global_batches = int(state["global_batches"])
        self.counts = [int(c) for c in state["counts"]]
        self.epochs = [int(e) for e in state["epochs"]]
        self.positions = [int(p) for p in state["positions"]]
        self._coming.clear()


def _open_split(name: str | Path, split: str, stream) -> TokenSplit:
    """A local split, or through ``stream`` (``data.stream.StreamSettings``), which also opens URLs."""
    return TokenSplit(name, split) if stream is None else stream.open_split(str(name), split)


def eval_batches(
    dataset_dir: str | Path,
    *,
    seq_len: int,
    batch_size: int,
    max_batches: int | None,
    split: str = "val",
    with_doc_ids: bool = False,
    stream=None,
) -> Iterator[Batch]:
    """A deterministic pass over ``split``: non-overlapping windows, evenly spread when ``max_batches`` caps
    them, in order; the last batch may be smaller. The same batches on every call. A split shorter than one
    window gives one shorter window; an empty split gives no batch. ``with_doc_ids`` and ``stream`` as in
    ``TokenLoader`` (validation masks documents only when training does, so it measures the model as it
    trained)."""
    data = _open_split(dataset_dir, split, stream)
    n_windows = data.n_windows(seq_len)
    if n_windows < 1:
        # a split shorter than one window (a tiny validation set): all of it as one shorter window, or nothing
        if data.n_tokens >= 2 and max_batches != 0:
            yield _windows_to_batch(data.read(0, data.n_tokens)[None], data.eot_id, with_doc_ids)
        return
    wanted = n_windows if max_batches is None else min(n_windows, max_batches * batch_size)
    picks = (np.arange(wanted, dtype=np.int64) * n_windows) // wanted
    for lo in range(0, wanted, batch_size):
        windows = np.stack([data.read(int(k) * seq_len, seq_len + 1) for k in picks[lo : lo + batch_size]])
        yield _windows_to_batch(windows, data.eot_id, with_doc_ids)
