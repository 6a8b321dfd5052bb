"""Find the largest micro-batch that trains without running out of memory, by trial.

The planner's memory model gives a starting point; on CUDA the real limit depends on the allocator,
kernels and fragmentation, so ``lmforge train`` refines it by running a step at growing sizes and
recovering from out-of-memory errors.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch

from lmforge.errors import ConfigError


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or a RuntimeError that says it ran out of memory (CPU, MPS)."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def release_memory() -> None:
    """Drop what a failed step left behind: Python references first, then the CUDA cache."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def find_max_micro_batch(try_step: Callable[[int], None], start: int, limit: int) -> int:
    """The largest micro-batch in [1, limit] for which ``try_step(micro_batch)`` does not run out of memory.

    Starts at ``start`` (clamped to [1, limit]); doubles while steps succeed, halves while they fail, then
    bisects between the last success and the first failure. Errors other than out-of-memory propagate.
    Assumes memory grows with the micro-batch (a size that fails means every larger one fails).
    """
    if limit < 1:
        raise ConfigError(f"micro-batch search needs limit >= 1, got {limit}")

    def fits(micro_batch: int) -> bool:
        failed = False
        try:
            try_step(micro_batch)
        except Exception as exc:  # noqa: BLE001 - re-raised below unless it is an out-of-memory error
            if not is_out_of_memory(exc):
                raise
            failed = True  # leave the except block first so the traceback's tensors can be freed
        if failed:
            release_memory()
        return not failed

    size = min(max(1, start), limit)
    if fits(size):
        good, bad = size, None
        while good < limit:
            trial = min(2 * good, limit)
            if fits(trial):
                good = trial
            else:
                bad = trial
                break
        if bad is None:
            return good
    else:
        bad, good = size, 0
        while bad > 1:
            trial = bad // 2
            if fits(trial):
                good = trial
                break
            bad = trial
        if good == 0:
            raise ConfigError(
                "not even micro-batch 1 fits in memory: shorten train.seq_len or shard the model"
            )
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good
