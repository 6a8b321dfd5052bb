"""Who runs the units of a partitioned stage (``data/partitioned.py``): this process, a local process pool,
or Ray. Each ``map(fn, stage, work, units)`` yields the units' results as they finish; a unit is a plain
function call on paths, so every executor runs exactly the same code."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

from lmforge.errors import ConfigError


class InlineExecutor:
    """Units one after another in this process (``data.workers=1``, array tasks)."""

    def map(self, fn: Callable, stage: str, work: str, units: list[int]) -> Iterator[dict]:
        for unit in units:
            yield fn(stage, work, unit)

    def close(self) -> None:
        pass


class LocalExecutor:
    """Units on ``workers`` spawned processes (fresh interpreters: no fork of a process with threads), each
    reused for unit after unit: starting an interpreter and importing the pipeline costs about as much as a
    small file's unit, so a process per unit made this executor 4-10x slower than ``stream`` on many small
    files. A worker's memory stays bounded by the largest unit it ran: a unit holds one file's reading
    state or one partition's index, and long documents are encoded in pieces (``shards.DocumentEncoder``)."""

    def __init__(self, workers: int):
        import multiprocessing

        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))

    def map(self, fn: Callable, stage: str, work: str, units: list[int]) -> Iterator[dict]:
        pending = {self.pool.submit(fn, stage, work, unit) for unit in units}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


class RayExecutor:
    """Units as Ray tasks of one CPU each: ``ray.init(address=...)`` joins a cluster (the work folder must
    then be on storage every node sees); without an address a local Ray with ``workers`` CPUs starts."""

    def __init__(self, address: str | None, workers: int):
        try:
            import ray
        except ImportError:
            raise ConfigError(
                "data.executor=ray needs Ray: pip install 'lmforge[ray]' (or use data.executor=local)"
            ) from None
        self.ray = ray
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)

    def map(self, fn: Callable, stage: str, work: str, units: list[int]) -> Iterator[dict]:
        remote = self.ray.remote(num_cpus=1, max_calls=1)(fn)  # a fresh worker per unit
        pending = [remote.remote(stage, work, unit) for unit in units]
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1)
            yield self.ray.get(done[0])

    def close(self) -> None:
        pass  # a Ray started here stays up for the next prepare; ray.shutdown() is the caller's choice


def make_executor(kind: str, workers: int, address: str | None = None):
    if kind == "ray":
        return RayExecutor(address, workers)
    return LocalExecutor(workers) if workers > 1 else InlineExecutor()
