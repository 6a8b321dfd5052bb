"""This machine: the measured CPU matmul peak (cached as the best seen) and the peak used for MFU."""

import json

import torch

from lmforge.plan.hardware import cpu_name, cpu_peak_flops, hardware_summary, measure_matmul_flops, peak_flops


def _key(precision: str) -> str:
    return f"{cpu_name()}|threads={torch.get_num_threads()}|torch={torch.__version__}|{precision}"


def test_cpu_peak_keeps_the_best_measurement(tmp_path):
    # A peak cached while other jobs shared the cores is too low: the next measurement replaces it.
    cache = tmp_path / "cpu_peak.json"
    cache.write_text(json.dumps({_key("fp32"): 1.0, "other|key": 5.0}))
    peak = cpu_peak_flops("fp32", tmp_path)
    assert peak > 1e9  # any CPU of the last decade does a 1024-square fp32 matmul at over 1 GFLOP/s
    table = json.loads(cache.read_text())
    assert table[_key("fp32")] == peak and table["other|key"] == 5.0
    # A higher cached peak stands (a measurement can only be lowered by load) and the file is left alone.
    cache.write_text(json.dumps({_key("fp32"): 1e18}))
    before = cache.stat().st_mtime_ns
    assert cpu_peak_flops("fp32", tmp_path) == 1e18
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
    (tmp_path / "cpu_peak.json").write_text(json.dumps({_key("bf16"): 1e18}))
    assert peak_flops(torch.device("cpu"), "bf16", tmp_path) == 1e18
    assert peak_flops(torch.device("meta"), "bf16", tmp_path) is None  # no peak known: no MFU
    assert hardware_summary(torch.device("cpu")) == f"CPU: {cpu_name()}, {torch.get_num_threads()} threads"
