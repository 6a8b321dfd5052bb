"""This machine: the measured CPU matmul peak (cached as the best seen) and the peak used for MFU."""

import json
import os

import pytest
import torch

from lmforge.plan.hardware import (
    CPU_MAX_FLOPS_PER_THREAD,
    cpu_name,
    cpu_peak_flops,
    hardware_summary,
    measure_matmul_flops,
    model_flops_utilisation,
    peak_flops,
)


def _key(precision: str) -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{cpu_name()}|cores={cores}|threads={torch.get_num_threads()}|torch={torch.__version__}|{precision}"
    )


def _ceiling() -> float:  # the highest cached peak believed for this process's thread count
    return torch.get_num_threads() * CPU_MAX_FLOPS_PER_THREAD


def test_cpu_peak_keeps_the_best_measurement(tmp_path):
    # A peak cached while other jobs shared the cores is too low: the next measurement replaces it.
    cache = tmp_path / "cpu_peak.json"
    cache.write_text(json.dumps({_key("fp32"): 1.0, "other|key": 5.0}))
    peak = cpu_peak_flops("fp32", tmp_path)
    assert peak > 1e9  # any CPU of the last decade does a 1024-square fp32 matmul at over 1 GFLOP/s
    table = json.loads(cache.read_text())
    assert table[_key("fp32")] == peak and table["other|key"] == 5.0
    # A higher cached peak stands (a measurement can only be lowered by load) and the file is left alone.
    cache.write_text(json.dumps({_key("fp32"): 0.9 * _ceiling()}))
    before = cache.stat().st_mtime_ns
    assert cpu_peak_flops("fp32", tmp_path) == 0.9 * _ceiling()
    assert cache.stat().st_mtime_ns == before
    # An unreadable cache is measured over, not an error.
    cache.write_text("{not json")
    assert cpu_peak_flops("fp32", tmp_path) > 1e9


def test_matmul_measurement_leaves_the_global_rng_alone():
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    measure_matmul_flops("fp32", size=64, repeats=2)
    assert torch.equal(torch.rand(4), expected)


def test_peak_flops_of_the_cpu_is_the_cached_best_and_the_summary_names_it(tmp_path):
    (tmp_path / "cpu_peak.json").write_text(json.dumps({_key("bf16"): 0.5 * _ceiling()}))
    assert peak_flops(torch.device("cpu"), "bf16", tmp_path) == 0.5 * _ceiling()
    assert peak_flops(torch.device("meta"), "bf16", tmp_path) is None  # no peak known: no MFU
    assert hardware_summary(torch.device("cpu")) == f"CPU: {cpu_name()}, {torch.get_num_threads()} threads"


@pytest.mark.parametrize("bad", [1e18, -5.0, 0, "fast", None])
def test_an_implausible_cached_peak_is_measured_over(tmp_path, bad):
    # A peak no CPU thread reaches (written by another machine sharing the home folder, or by hand) made
    # every MFU tiny (1.6% where 10% was true); a negative or non-number one is no peak at all.
    cache = tmp_path / "cpu_peak.json"
    cache.write_text(json.dumps({_key("fp32"): bad}))
    peak = cpu_peak_flops("fp32", tmp_path)
    assert 1e9 < peak <= _ceiling()
    assert json.loads(cache.read_text())[_key("fp32")] == peak  # the bad value is replaced in the cache
    cache.write_text(json.dumps([1, 2]))  # not a table at all
    assert 1e9 < cpu_peak_flops("fp32", tmp_path) <= _ceiling()


def test_the_cache_key_separates_thread_counts(tmp_path):
    # One file serves every process on the machine: a peak measured with 2 threads is not a 1-thread peak.
    cache = tmp_path / "cpu_peak.json"
    threads = torch.get_num_threads()
    other = _key("fp32").replace(f"|threads={threads}|", f"|threads={threads + 1}|")
    cache.write_text(json.dumps({other: 0.9 * _ceiling()}))
    assert cpu_peak_flops("fp32", tmp_path) < 0.9 * _ceiling()
    assert json.loads(cache.read_text())[other] == 0.9 * _ceiling()


def test_mfu_is_achieved_over_peak_and_never_above_one():
    assert model_flops_utilisation(2.5e9, 1e10) == pytest.approx(0.25)
    assert model_flops_utilisation(1e10, 1e10) == pytest.approx(1.0)
    assert model_flops_utilisation(1.6e10, 1e10) is None  # the peak was measured too low: no 160% MFU
    assert model_flops_utilisation(1e9, None) is None
    assert model_flops_utilisation(1e9, 0.0) is None
