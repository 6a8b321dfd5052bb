"""The planner's energy and emissions, against arithmetic done by hand from the step timing."""

from __future__ import annotations

import json

import pytest

from lmforge.cli import main
from lmforge.config import PRESETS
from lmforge.errors import ConfigError
from lmforge.plan.energy import GRID_INTENSITY, device_power_w, energy_settings, run_energy
from lmforge.plan.hardware import KNOWN_HARDWARE, load_hardware_file
from lmforge.plan.planner import Cluster, Workload, plan_cluster

H100 = KNOWN_HARDWARE["H100-80GB"]


def test_run_energy_by_hand():
    # 8 devices of 400 W at 50% busy for one hour, no node overhead, PUE 1.1, 400 g/kWh:
    # 400 x (0.3 + 0.7 x 0.5) = 260 W; x 8 = 2080 W; x 1.1 = 2288 W; one hour = 2.288 kWh; 915.2 g.
    settings = energy_settings(grid_intensity=400.0, pue=1.1, node_overhead=0.0)
    e = run_energy(400.0, 0.5, 8, 3600.0, settings)
    assert e.device_power_w == pytest.approx(260.0)
    assert e.device_kwh == pytest.approx(2.080)
    assert e.kwh == pytest.approx(2.288)
    assert e.co2_kg == pytest.approx(0.9152)
    # Node overhead 0.5 multiplies the IT power, not the GPUs' own energy.
    e = run_energy(400.0, 1.0, 1, 1800.0, energy_settings(region="france", pue=1.0, node_overhead=0.5))
    assert (e.device_kwh, e.kwh) == (pytest.approx(0.2), pytest.approx(0.3))
    assert e.co2_kg == pytest.approx(0.3 * GRID_INTENSITY["france"] / 1000)


def test_device_power_stays_between_the_idle_draw_and_the_board_power():
    # A measured busy fraction can overshoot 1 (timer jitter) or undershoot 0: the draw stays within
    # 0.3 x 700 W idle (the documented assumption) and 700 W, never beyond the board's rating.
    assert device_power_w(700.0, 1.7) == pytest.approx(700.0)
    assert device_power_w(700.0, -0.5) == pytest.approx(210.0)
    assert device_power_w(700.0, 0.25) == pytest.approx(700.0 * (0.3 + 0.7 * 0.25))


def test_energy_settings_boundaries_and_region_names():
    assert energy_settings(region="France").grid_g_per_kwh == 56.0  # region names are case-insensitive
    # the boundaries are valid sites: no facility overhead, no node overhead, a carbon-free grid
    settings = energy_settings(region="norway", grid_intensity=0.0, pue=1.0, node_overhead=0.0)
    assert settings.region == "norway"  # the number was given for that region: the card names it
    e = run_energy(500.0, 1.0, 2, 3600.0, settings)  # 2 x 500 W for an hour
    assert (e.kwh, e.co2_kg) == (pytest.approx(1.0), 0.0)
    assert energy_settings(grid_intensity=100.0).region == "custom"
    with pytest.raises(ConfigError, match="--node-overhead=-0.1 must be >= 0"):
        energy_settings(node_overhead=-0.1)


def _hand_kwh(report, candidate, *, watts, overhead, pue):
    """The run's kWh from the candidate's step timing, written out without the library's formula."""
    t, lay = candidate.timing, candidate.layout
    tokens_per_step = lay.micro_batch * lay.grad_accum * lay.dp * lay.seq_len
    steps = -(-report.total_tokens // tokens_per_step)
    busy = (t.compute_s + t.memory_bound_s) / t.step_s
    watts_per_gpu = watts * (0.3 + 0.7 * busy)
    return watts_per_gpu * report.cluster.gpus * (1 + overhead) * pue * steps * t.step_s / 3.6e6


@pytest.mark.parametrize("name", ["FSDP", "FSDP + AC"])
def test_two_layouts_of_the_7b_plan_match_hand_computation(name):
    settings = energy_settings(region="us", pue=1.3, node_overhead=0.4)
    cluster = Cluster(hardware=H100, gpus=8, energy=settings)
    workload = Workload(seq_len=4096, global_batch_tokens=4_000_000, total_tokens=10**12)
    report = plan_cluster(PRESETS["7b"], cluster, workload)
    candidate = next(c for c in report.candidates if c.name == name)
    energy = report.energy_of(candidate)
    kwh = _hand_kwh(report, candidate, watts=700.0, overhead=0.4, pue=1.3)
    assert energy.kwh == pytest.approx(kwh, rel=1e-9)
    assert energy.co2_kg == pytest.approx(kwh * 369.0 / 1000, rel=1e-9)
    assert energy.hours * 3600 == pytest.approx(report.steps_of(candidate) * candidate.timing.step_s)


def test_layouts_differ_in_energy_and_the_plan_reports_the_chosen_one():
    cluster = Cluster(hardware=H100, gpus=8)
    workload = Workload(seq_len=4096, global_batch_tokens=4_000_000, total_tokens=10**12)
    report = plan_cluster(PRESETS["7b"], cluster, workload)
    fitting = [c for c in report.candidates if c.fits]
    kwh = {c.name: report.energy_of(c).kwh for c in fitting}
    assert kwh["FSDP + AC"] > kwh["FSDP"]  # recomputing the forward costs time at nearly full power
    assert report.energy.kwh == kwh[report.chosen.name]
    assert all(report.energy_of(c) is None for c in report.candidates if not c.fits)
    out = report.to_dict()
    assert out["energy"]["kwh"] == pytest.approx(report.energy.kwh)
    assert out["energy"]["pue"] == 1.2 and out["energy"]["grid_g_per_kwh"] == GRID_INTENSITY["world"]
    assert [c["energy"] is not None for c in out["candidates"]] == [c.fits for c in report.candidates]


def test_energy_settings_reject_bad_input_with_the_flag_and_a_suggestion():
    with pytest.raises(ConfigError, match="--region='franse'.*did you mean 'france'"):
        energy_settings(region="franse")
    with pytest.raises(ConfigError, match="--pue=0.9 must be >= 1"):
        energy_settings(pue=0.9)
    with pytest.raises(ConfigError, match="--grid-intensity=-1"):
        energy_settings(grid_intensity=-1.0)
    assert energy_settings(region="norway", grid_intensity=12.0).grid_g_per_kwh == 12.0  # the number wins


def test_a_device_without_a_power_figure_plans_without_energy(tmp_path):
    path = tmp_path / "hw.yaml"
    path.write_text("X1: {peak_tflops: 500, memory_gib: 96, memory_bandwidth_gbs: 3000, link_gbs: 100}\n")
    hw = load_hardware_file(path)["X1"]
    report = plan_cluster(
        PRESETS["tiny"], Cluster(hardware=hw, gpus=1), Workload(seq_len=64, global_batch_tokens=4096)
    )
    assert report.energy is None and any("power_watts" in n for n in report.notes)


def test_cli_prints_energy_and_json(capsys):
    args = ["plan", "--model", "7b", "--gpu", "H100-80GB", "--gpus", "8", "--seq", "4096",
            "--global-batch-tokens", "4M", "--tokens", "1T"]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "kWh at the data centre's meter" in text and "t CO2eq at 481 g/kWh" in text
    assert "PUE 1.2: a modern cloud data centre" in text
    assert main([*args, "--json", "--region", "germany", "--pue", "1.1", "--node-overhead", "0"]) == 0
    out = json.loads(capsys.readouterr().out)
    e = out["energy"]
    assert (e["region"], e["pue"], e["node_overhead"]) == ("germany", 1.1, 0.0)
    assert e["kwh"] == pytest.approx(e["device_kwh"] * 1.1)
    assert e["co2_kg"] == pytest.approx(e["kwh"] * 381.0 / 1000)
