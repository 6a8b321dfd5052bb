"""data.executor=local reuses its worker processes (issue 27, item 7): a fresh interpreter per unit made it
4-10x slower than the stream executor on many small files (benchmarks/data_executors.py)."""

from __future__ import annotations

import os

from lmforge.data.executors import LocalExecutor


def unit_pid(stage: str, work: str, unit: int) -> dict:
    return {"unit": unit, "stage": stage, "work": work, "pid": os.getpid()}


def test_the_local_executor_runs_many_units_on_its_few_reused_processes():
    executor = LocalExecutor(2)
    try:
        results = list(executor.map(unit_pid, "map", "w", list(range(12))))
        again = list(executor.map(unit_pid, "tokenize", "w", [0, 1, 2]))  # the next stage: the same pool
    finally:
        executor.close()
    assert sorted(r["unit"] for r in results) == list(range(12))
    assert all(r["stage"] == "map" and r["work"] == "w" for r in results)
    pids = {r["pid"] for r in results + again}
    assert 1 <= len(pids) <= 2 and os.getpid() not in pids  # before: 15 processes, one per unit
