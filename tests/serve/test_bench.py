"""The load benchmark's core (benchmarks/serve_bench.py) on a tiny workload against the test server, so the
script cannot rot: Poisson arrivals, the openai client's streams, the figures and the /metrics deltas."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest

from tests.conftest import require_module

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_bench.py"


@pytest.fixture(scope="module")
def bench():
    require_module("openai", "dev")
    spec = importlib.util.spec_from_file_location("serve_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_arrivals_are_a_seeded_poisson_process(bench):
    a = bench.arrival_times(2000, rate=4.0, seed=3)
    assert a == bench.arrival_times(2000, rate=4.0, seed=3) and a[0] == 0.0
    gaps = [y - x for x, y in zip(a, a[1:])]
    assert abs(statistics.fmean(gaps) - 0.25) < 0.02  # exponential gaps of mean 1/rate
    assert abs(statistics.pstdev(gaps) - 0.25) < 0.03  # whose deviation equals the mean
    assert bench.percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5 and bench.percentile([1.0, 2.0], 0.99) == 1.99


def test_the_benchmark_core_measures_a_tiny_run(bench, server):
    system = {"role": "system", "content": "Qb9 shared system prompt of the benchmark test, long enough."}
    conversations = [[system, {"role": "user", "content": f"question {i}"}] for i in range(3)]
    report = bench.measured(server.url, "tiny", conversations, [0.0, 0.3, 0.6], max_tokens=6)
    assert report["completed"] == 3 and report["failed"] == 0
    assert 3 <= report["output_tokens"] <= 18  # a random model may end a reply early
    ttft = report["ttft_s"]
    assert 0 < ttft["p50"] <= ttft["p99"] and ttft["mean"] <= report["duration_s"]
    assert report["request_throughput"] == pytest.approx(3 / report["duration_s"], rel=0.02)
    assert report["goodput_requests"] <= 3
    metrics = report["server_metrics"]
    assert metrics["prefix_cache_hits"] + metrics["prefix_cache_misses"] == 3
    assert metrics["prefix_cache_hits"] >= 1 and metrics["prefix_cache_hit_tokens"] >= 16
    assert 1 <= metrics["prefill_forwards"] <= 3
