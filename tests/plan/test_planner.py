"""The planner: hardware, candidate layouts, plan_training for the loop, micro-batch search, bad input."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from lmforge.cli import main
from lmforge.config import PRESETS, Config, ParallelConfig, TrainConfig
from lmforge.errors import ConfigError
from lmforge.plan.hardware import (
    GIB,
    INTERCONNECTS,
    KNOWN_HARDWARE,
    detect_hardware,
    hardware_from_device_name,
    load_hardware_file,
    lookup_hardware,
)
from lmforge.plan.memory import Layout
from lmforge.plan.microbatch import find_max_micro_batch
from lmforge.plan.planner import Cluster, Workload, plan_cluster, step_timing
from lmforge.plan.training import plan_training

H100 = KNOWN_HARDWARE["H100-80GB"]


# -- micro-batch search with out-of-memory recovery --------------------------------------------------------


def oom_above(threshold: int, calls: list[int], error=torch.OutOfMemoryError):
    def try_step(micro_batch: int) -> None:
        calls.append(micro_batch)
        if micro_batch > threshold:
            held = torch.empty(micro_batch * 1000)  # something the failed step was holding
            raise error(f"CUDA out of memory. Tried to allocate {held.numel() * 4} bytes")

    return try_step


@pytest.mark.parametrize("threshold", [1, 8, 13, 1000])
@pytest.mark.parametrize("start", [1, 50])
def test_find_max_micro_batch_finds_the_largest_that_fits(threshold, start):
    calls: list[int] = []
    limit = 128
    assert find_max_micro_batch(oom_above(threshold, calls), start, limit) == min(threshold, limit)
    assert len(calls) <= 2 * math.ceil(math.log2(limit)) + 2  # doubling/halving, then bisection


def test_find_max_micro_batch_accepts_runtime_out_of_memory_and_respects_the_limit():
    calls: list[int] = []
    assert find_max_micro_batch(oom_above(5, calls, RuntimeError), 4, 64) == 5
    assert find_max_micro_batch(oom_above(10**6, [], RuntimeError), 3, 40) == 40


def test_find_max_micro_batch_propagates_other_errors_and_reports_when_nothing_fits():
    def broken(micro_batch: int) -> None:
        raise ValueError("shape mismatch")

    with pytest.raises(ValueError, match="shape mismatch"):
        find_max_micro_batch(broken, 4, 16)
    with pytest.raises(ConfigError, match="micro-batch 1"):
        find_max_micro_batch(oom_above(0, []), 4, 16)


# -- plan_training (what `parallel.strategy: auto` uses) ---------------------------------------------------


def config(**train) -> Config:
    return Config(model=PRESETS["tiny"], train=TrainConfig(seq_len=128, **train))


def test_plan_training_single_process_without_a_memory_limit_keeps_the_config():
    plan = plan_training(config(micro_batch=8), device_kind="cpu", world_size=1, device_memory_bytes=None)
    assert (plan.strategy, plan.micro_batch, plan.grad_accum) == ("single", 8, 1)
    assert not plan.activation_checkpointing and not plan.cpu_offload and plan.precision == "fp32"
    assert plan.predicted_peak_bytes > 0 and plan.predicted_step_seconds > 0
    assert "single" in plan.describe() and "micro-batch 8" in plan.describe()


def test_plan_training_shrinks_the_micro_batch_and_keeps_the_tokens_per_step():
    roomy = plan_training(config(micro_batch=64), device_kind="cpu", world_size=1, device_memory_bytes=None)
    budget = roomy.predicted_peak_bytes // 3
    plan = plan_training(config(micro_batch=64), device_kind="cpu", world_size=1, device_memory_bytes=budget)
    assert plan.predicted_peak_bytes <= budget
    assert plan.micro_batch < 64 or plan.activation_checkpointing
    assert plan.micro_batch * plan.grad_accum >= 64
    assert plan.micro_batch * (plan.grad_accum - 1) < 64  # no more accumulation than needed


def test_plan_training_global_batch_tokens_sets_the_accumulation():
    cfg = config(micro_batch=4, global_batch_tokens=128 * 4 * 2 * 6)
    plan = plan_training(cfg, device_kind="cpu", world_size=2, device_memory_bytes=None)
    assert plan.strategy == "ddp" and plan.micro_batch == 4 and plan.grad_accum == 6
    assert plan.tokens_per_step == cfg.train.global_batch_tokens


def test_plan_training_picks_fsdp_when_the_state_does_not_fit_one_device():
    cfg = Config(model=PRESETS["7b"], train=TrainConfig(seq_len=4096, micro_batch=1, precision="bf16"))
    plan = plan_training(cfg, device_kind="cuda", world_size=8, device_memory_bytes=H100.memory_bytes)
    assert plan.strategy == "fsdp" and plan.predicted_peak_bytes <= H100.memory_bytes
    small = Config(
        model=PRESETS["gpt2-124m"], train=TrainConfig(seq_len=1024, micro_batch=4, precision="bf16")
    )
    assert (
        plan_training(small, device_kind="cuda", world_size=8, device_memory_bytes=H100.memory_bytes).strategy
        == "ddp"
    )


def test_plan_training_honours_an_explicit_strategy_and_says_by_how_much_it_is_over():
    cfg = Config(
        model=PRESETS["7b"],
        train=TrainConfig(seq_len=4096, micro_batch=1, precision="bf16"),
        parallel=ParallelConfig(strategy="ddp"),
    )
    with pytest.raises(ConfigError, match=r"over by \d+\.\d+ GiB"):
        plan_training(cfg, device_kind="cuda", world_size=8, device_memory_bytes=H100.memory_bytes)
    fsdp = dataclasses.replace(cfg, parallel=ParallelConfig(strategy="fsdp"))
    assert (
        plan_training(fsdp, device_kind="cuda", world_size=8, device_memory_bytes=H100.memory_bytes).strategy
        == "fsdp"
    )


# -- the cluster plan --------------------------------------------------------------------------------------


def test_plan_cluster_totals_are_consistent():
    workload = Workload(seq_len=4096, global_batch_tokens=4_000_000, total_tokens=10**12)
    report = plan_cluster(PRESETS["7b"], Cluster(hardware=H100, gpus=64, price_per_gpu_hour=2.0), workload)
    chosen = report.chosen
    lay, t = chosen.layout, chosen.timing
    assert lay.micro_batch * lay.grad_accum * lay.dp == report.sequences_per_step
    assert abs(report.sequences_per_step * 4096 - 4_000_000) / 4_000_000 < 0.1
    assert report.steps == math.ceil(10**12 / (report.sequences_per_step * 4096))
    assert report.wall_seconds == pytest.approx(report.steps * t.step_s)
    assert report.gpu_hours == pytest.approx(report.wall_seconds * 64 / 3600)
    assert report.cost == pytest.approx(2.0 * report.gpu_hours)
    assert t.tokens_per_s == pytest.approx(report.sequences_per_step * 4096 / t.step_s)
    assert t.mfu == pytest.approx(report.flops_per_token * t.tokens_per_s_per_gpu / H100.peak_flops)
    assert 0.05 < t.mfu < 0.7
    assert chosen.predicted_bytes <= H100.memory_bytes


def test_ddp_all_reduce_follows_the_ring_formula_between_nodes():
    cfg = PRESETS["1b"]
    slow = dataclasses.replace(H100, peak_tflops=1e6, memory_bandwidth_gbs=1e9)  # make compute vanish
    eth = INTERCONNECTS["ethernet"]
    layout = Layout(strategy="ddp", world_size=16, micro_batch=1, seq_len=2048)
    t = step_timing(cfg, layout, Cluster(hardware=slow, gpus=16, interconnect=eth))
    n, nbytes = 16, 4 * 1_100_048_384
    ring = 2 * (n - 1) / n * nbytes / (eth.gbs_per_gpu * 1e9 * 0.8)
    assert t.communication_s == pytest.approx(ring, rel=0.01)
    ib = step_timing(cfg, layout, Cluster(hardware=slow, gpus=16, interconnect=INTERCONNECTS["infiniband"]))
    assert ib.communication_s < t.communication_s / 10


def test_an_impossible_request_says_by_how_much_it_is_over():
    huge = dataclasses.replace(PRESETS["7b"], n_layers=80, d_model=8192, n_heads=64, ffn_hidden=28672)
    workload = Workload(seq_len=8192, global_batch_tokens=1_000_000)
    report = plan_cluster(huge, Cluster(hardware=KNOWN_HARDWARE["L4"], gpus=1), workload)
    assert report.chosen is None
    leanest = min(report.candidates, key=lambda c: c.predicted_bytes)
    over_gib = (leanest.predicted_bytes - KNOWN_HARDWARE["L4"].memory_bytes) / GIB
    assert over_gib > 0
    assert f"over by {over_gib:.1f} GiB" in report.shortfall()
    assert "FSDP + AC + offload" in report.shortfall()


# -- hardware ----------------------------------------------------------------------------------------------


def test_hardware_lookup_and_unknown_names():
    assert lookup_hardware("h100").name == "H100-80GB"  # a unique prefix, any case
    assert lookup_hardware("a100-40gb").memory_gib == 40.0
    with pytest.raises(ConfigError) as err:
        lookup_hardware("H1OO-80GB")
    assert "did you mean 'H100-80GB'" in str(err.value)
    for name in ("A100-40GB", "A100-80GB", "H100-80GB", "H200", "L4", "A10", "RTX-4090", "CPU"):
        assert name in str(err.value)


@pytest.mark.parametrize(
    ("device_name", "memory_gib", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", 79.2, "H100-80GB"),
        ("NVIDIA A100-SXM4-40GB", 39.4, "A100-40GB"),
        ("NVIDIA A100-SXM4-80GB", 79.1, "A100-80GB"),
        ("NVIDIA A10", 22.1, "A10"),
        ("NVIDIA L4", 22.0, "L4"),
        ("NVIDIA GeForce RTX 4090", 23.6, "RTX-4090"),
        ("NVIDIA H200", 139.8, "H200"),
        ("NVIDIA H100 PCIe", 79.2, "H100-PCIe"),
        ("NVIDIA A10G", 22.0, "A10G"),
        ("NVIDIA L40S", 44.5, "L40S"),
        ("Tesla V100-SXM2-32GB", 31.7, "V100-32GB"),
        ("Tesla T4", 14.7, "T4"),
        ("NVIDIA GeForce RTX 3090", 23.6, "RTX-3090"),
    ],
)
def test_device_names_map_to_the_table(device_name, memory_gib, expected):
    hw = hardware_from_device_name(device_name, int(memory_gib * GIB))
    assert hw.name == expected and hw.fp32_tflops > 0  # also the fp32 peak an fp32 run's MFU uses
    assert hw.peak_tflops == KNOWN_HARDWARE[expected].peak_tflops
    assert hw.memory_gib == pytest.approx(memory_gib)


def test_detect_on_this_machine():
    hw = detect_hardware()
    assert hw.kind == ("cuda" if torch.cuda.is_available() else "cpu")
    assert hw.memory_bytes > 2**30


def test_hardware_file_extends_and_overrides(tmp_path):
    path = tmp_path / "hw.yaml"
    path.write_text(
        "MI300X: {peak_tflops: 1307, memory_gib: 192, memory_bandwidth_gbs: 5300, link_gbs: 448}\n"
        "H100-80GB: {compute_efficiency: 0.45}\n"
    )
    table = load_hardware_file(path)
    assert table["MI300X"].memory_gib == 192 and table["MI300X"].kind == "cuda"
    assert table["H100-80GB"].compute_efficiency == 0.45 and table["H100-80GB"].peak_tflops == 989.0
    path.write_text("MI300X: {peak_tflop: 1307}\n")
    with pytest.raises(ConfigError, match="did you mean 'peak_tflops'"):
        load_hardware_file(path)
    path.write_text("B200: {peak_tflops: 2250}\n")
    with pytest.raises(ConfigError, match="needs memory_gib"):
        load_hardware_file(path)
    path.write_text("H100-80GB: {compute_efficiency: 1.5}\n")
    with pytest.raises(ConfigError, match=r"compute_efficiency=1.5 must be in \(0, 1\]"):
        load_hardware_file(path)


# -- the CLI -----------------------------------------------------------------------------------------------


def test_cli_plan_json(capsys):
    code = main(["plan", "--model", "7b", "--gpu", "H100-80GB", "--gpus", "64", "--seq", "4096",
                 "--global-batch-tokens", "4M", "--tokens", "1T", "--price-per-gpu-hour", "2", "--tp", "2,8",
                 "--json"])  # fmt: skip
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert (
        out["parameters"] == 6_738_415_616 and out["fits"] and out["chinchilla_tokens"] == 20 * 6_738_415_616
    )
    names = [c["name"] for c in out["candidates"]]
    assert names[:6] == ["DDP", "DDP + AC", "FSDP", "FSDP + AC", "FSDP + offload", "FSDP + AC + offload"]
    assert "FSDP + TP2" in names and "FSDP + TP8 + AC" in names
    assert out["cost"] == pytest.approx(2 * out["gpu_hours"])


def test_cli_plan_table_and_bad_input(capsys):
    assert main(["plan", "--model", "1b", "--gpus", "2", "--seq", "2048"]) == 0
    text = capsys.readouterr().out
    assert "FSDP + AC" in text and "plan " in text and "compute-optimal" in text
    assert main(["plan", "--model", "1b", "--gpu", "H1000"]) == 2
    assert "known: A100-40GB" in capsys.readouterr().err
    assert main(["plan", "--model", "1b", "--interconnect", "infinyband"]) == 2
    assert "did you mean 'infiniband'" in capsys.readouterr().err
    assert main(["plan", "--model", "1b", "--gpus", "6", "--tp", "4"]) == 2
    assert "--tp 4 must be >= 1 and divide --gpus=6" in capsys.readouterr().err
    assert main(["plan", "--model", "1b", "--tokens", "lots"]) == 2
    assert "--tokens='lots' is not a number" in capsys.readouterr().err
    assert main(["plan", "--model", "gpt2-124m", "--seq", "4096"]) == 2
    assert "max_seq_len=1024" in capsys.readouterr().err
    assert main(["plan", "--model", "7b", "model.n_layers=200", "--gpu", "RTX-4090", "--gpus", "1"]) == 2
    assert "over by" in capsys.readouterr().err


def test_cli_probe_on_this_machine(capsys):
    code = main(["plan", "--model", "tiny", "--gpu", "auto", "--gpus", "1", "--seq", "64",
                 "--global-batch-tokens", "512", "--precision", "fp32", "--probe", "--probe-steps", "2",
                 "--json"])  # fmt: skip
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    probe = out["probe"]
    assert probe["micro_batch"] == out["chosen"]["micro_batch"] == 8
    assert 0.7 < probe["memory_scale"] < 1.3 and probe["measured_step_s"] > 0  # fp32 on the CPU: measured
    assert out["corrected"]["chosen"]["timing"]["step_s"] == pytest.approx(
        out["chosen"]["timing"]["step_s"] * probe["time_scale"], rel=0.05
    )
