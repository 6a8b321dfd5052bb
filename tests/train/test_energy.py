"""Training energy: RAPL through a fake powercap tree (with a counter wrap), NVML through a fake module read
at known times, the estimate with a fake clock, and a tiny CPU run end to end through resume, card, export."""

from __future__ import annotations

import json

import pytest
import yaml
from memory_loader import loaders, tiny_config

from lmforge.errors import ConfigError
from lmforge.plan.energy import energy_settings
from lmforge.train.card import model_card
from lmforge.train.energy import (
    EnergyMeter,
    EstimateCounter,
    RaplCounter,
    open_meter,
    rapl_zones,
)
from lmforge.train.loop import train
from lmforge.train.metrics import read_metrics

SITE = energy_settings(grid_intensity=400.0, pue=1.5, node_overhead=0.0)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def zone(root, name, label, energy_uj, max_uj):
    path = root / name
    path.mkdir(parents=True)
    (path / "name").write_text(label + "\n")
    (path / "max_energy_range_uj").write_text(f"{max_uj}\n")
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    return path


def set_energy(path, energy_uj):
    (path / "energy_uj").write_text(f"{energy_uj}\n")


def test_rapl_sums_the_packages_and_unwraps_the_counter(tmp_path):
    max_uj = 262_143_328_850  # a real package's range (about 262 kJ)
    p0 = zone(tmp_path, "intel-rapl:0", "package-0", max_uj - 5_000_000, max_uj)
    p1 = zone(tmp_path, "intel-rapl:1", "package-1", 1_000_000, max_uj)
    core = zone(tmp_path, "intel-rapl:0:0", "core", 7, max_uj)  # inside package 0: not counted again
    assert rapl_zones(tmp_path) == [p0, p1]
    meter = EnergyMeter(RaplCounter(rapl_zones(tmp_path)), settings=SITE, hardware="test CPU")
    assert meter.method == "rapl" and not meter.estimate
    # package 0 wraps: 5 J up to the top, then 3 J after 0 (the counter's range is 0..max inclusive)
    set_energy(p0, 3_000_000 - 1)
    set_energy(p1, 1_000_000 + 2_000_000)  # 2 J
    set_energy(core, 999)
    assert meter.interval_kwh() == pytest.approx(10.0 / 3.6e6)
    # polled in between (as the loop does each step): a second wrap is not lost
    set_energy(p0, max_uj - 1_000_000)
    meter.poll()
    set_energy(p0, 500_000)
    assert meter.interval_kwh() == pytest.approx((max_uj - 1_000_000 - 2_999_999 + 1_500_001) / 1e6 / 3.6e6)
    assert meter.co2_g(1.0) == pytest.approx(600.0)  # x PUE 1.5 x 400 g/kWh


def test_rapl_wrap_counts_every_microjoule(tmp_path):
    # a counter with range 0..999 (inclusive) read at 997 then at 2: 997 -> 998 -> 999 -> 0 -> 1 -> 2 is 5 uJ;
    # an unchanged counter adds nothing
    p0 = zone(tmp_path, "intel-rapl:0", "package-0", 997, 999)
    counter = RaplCounter([p0])
    set_energy(p0, 2)
    assert counter.read_joules() * 1e6 == pytest.approx(5.0, abs=1e-9)
    assert counter.read_joules() * 1e6 == pytest.approx(5.0, abs=1e-9)
    set_energy(p0, 999)
    assert counter.read_joules() * 1e6 == pytest.approx(5.0 + 997.0, abs=1e-9)


def test_rapl_prefers_the_platform_zone(tmp_path):
    zone(tmp_path, "intel-rapl:0", "package-0", 0, 1000)
    psys = zone(tmp_path, "intel-rapl:1", "psys", 0, 1000)
    assert rapl_zones(tmp_path) == [psys]


class FakeNvml:
    """A GPU drawing ``watts`` from the moment the clock starts: its counter is watts x seconds, in mJ."""

    def __init__(self, clock: Clock, watts: float, *, supported: bool = True):
        self.clock, self.watts, self.supported = clock, watts, supported
        self.handles = []

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByUUID(self, uuid):
        self.handles.append(uuid)
        return uuid

    def nvmlDeviceGetHandleByIndex(self, index):
        self.handles.append(index)
        return index

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if not self.supported:
            raise RuntimeError("NVMLError_NotSupported: Not Supported")
        return int(self.watts * self.clock() * 1000) + 123_456_789  # the driver's count before the run


def test_nvml_counter_read_at_known_times_gives_the_known_energy():
    clock = Clock()
    nvml = FakeNvml(clock, 650.0)
    meter = open_meter(
        device_kind="cuda", settings=SITE, hardware="H100", power_w=700.0, nvml=nvml, device_uuid="abc-1"
    )
    assert meter.method == "nvml" and not meter.estimate and nvml.handles == ["GPU-abc-1"]
    clock.now = 3600.0  # one hour at 650 W
    assert meter.interval_kwh() == pytest.approx(0.65)
    clock.now = 3600.0 + 360.0
    assert meter.interval_kwh() == pytest.approx(0.065)
    assert meter.summary(0.715)["co2_g"] == pytest.approx(0.715 * 1.5 * 400.0)


def test_nvml_opens_the_device_by_uuid_or_by_index():
    nvml = FakeNvml(Clock(), 1.0)
    open_meter(device_kind="cuda", settings=SITE, hardware="H100", power_w=700.0, nvml=nvml,
               device_uuid="GPU-5f1e")  # fmt: skip
    open_meter(device_kind="cuda", settings=SITE, hardware="H100", power_w=700.0, nvml=nvml, device_index=3)
    assert nvml.handles == ["GPU-5f1e", 3]  # torch's uuid may already carry NVML's prefix: not doubled


def test_without_a_counter_the_meter_estimates_and_says_why(tmp_path):
    clock = Clock()
    gpu = open_meter(
        device_kind="cuda", settings=SITE, hardware="H100", power_w=700.0, utilisation=0.5,
        nvml=FakeNvml(clock, 1.0, supported=False), clock=clock,
    )  # fmt: skip
    assert gpu.method == "estimate" and gpu.estimate and "NVMLError_NotSupported" in gpu.note
    clock.now = 3600.0  # 700 W x (0.3 + 0.7 x 0.5) = 455 W for an hour
    assert gpu.interval_kwh() == pytest.approx(0.455)
    cpu = open_meter(device_kind="cpu", settings=SITE, hardware="CPU", power_w=25.0, powercap_root=tmp_path)
    assert cpu.method == "estimate" and "RAPL unavailable" in cpu.note
    zone(tmp_path, "intel-rapl:0", "package-0", 0, 1000)
    shared = open_meter(
        device_kind="cpu", settings=SITE, hardware="CPU", power_w=25.0, powercap_root=tmp_path,
        single_process=False,
    )  # fmt: skip
    assert shared.method == "estimate" and "several processes" in shared.note


def test_cpu_estimate_follows_the_process_cpu_time():
    clock, cpu = Clock(), [0.0]
    counter = EstimateCounter(25.0, cores=2, clock=clock, cpu_time=lambda: cpu[0])
    clock.now, cpu[0] = 1.0, 1.0  # one of two cores busy for a second: 25 x (0.3 + 0.7 x 0.5) W
    assert counter.read_joules() == pytest.approx(16.25)
    clock.now, cpu[0] = 3.0, 5.0  # both cores busy for two seconds: 25 W
    assert counter.read_joules() == pytest.approx(16.25 + 50.0)


def test_an_unknown_region_in_the_config_names_the_key(tmp_path):
    loader, val = loaders()
    cfg = tiny_config(tmp_path / "run", "train.energy_region=atlantis", "train.steps=1")
    with pytest.raises(ConfigError, match="train.energy_region='atlantis'"):
        train(cfg, loader=loader, val_batches=val, progress=False)


def test_a_tiny_cpu_run_reports_energy_through_resume_card_and_export(tmp_path):
    run_dir = tmp_path / "run"
    extra = ("train.steps=6", "train.log_every=2", "train.ckpt_every=2", "train.energy_region=france")
    loader, val = loaders()
    first = train(
        tiny_config(run_dir, *extra, "train.time_limit_minutes=1e-9"),
        loader=loader,
        val_batches=val,
        progress=False,
    )
    assert first.stopped_by == "time limit" and first.energy_kwh > 0
    loader, val = loaders()
    rest = train(tiny_config(run_dir, *extra), resume="auto", loader=loader, val_batches=val, progress=False)
    assert rest.step == 6 and rest.energy_kwh > first.energy_kwh  # the resumed run adds to the total

    records = [r for r in read_metrics(run_dir) if "energy_kwh" in r]
    assert sum(r["energy_kwh"] for r in records) == pytest.approx(rest.energy_kwh, rel=1e-9)
    assert records[-1]["energy_kwh_total"] == pytest.approx(rest.energy_kwh, rel=1e-12)
    assert rest.co2_g == pytest.approx(rest.energy_kwh * 1.2 * 56.0)
    method = records[-1]["energy_method"]
    assert {r["energy_method"] for r in records} == {method}
    assert all(r["energy_estimate"] == (method == "estimate") for r in records)

    card = (run_dir / "MODEL_CARD.md").read_text()
    assert card.startswith("---\nco2_eq_emissions:\n")
    if method == "estimate":  # this machine has no readable RAPL counter (the usual case without root)
        assert "## Environmental impact" in card and "this is an estimate, not a measurement" in card
        assert "- energy (estimated, estimate):" in card

    from lmforge.convert import export_model

    export_model(run_dir, tmp_path / "hf", verify=False)
    readme = (tmp_path / "hf" / "README.md").read_text()
    assert readme.startswith("---\n")
    meta = yaml.safe_load(readme.split("---\n")[1])
    co2 = meta["co2_eq_emissions"]
    assert co2["emissions"] == pytest.approx(rest.co2_g, rel=1e-5)
    assert co2["training_type"] == "pre-training" and co2["geographical_location"] == "france"
    assert co2["hardware_used"].startswith("CPU")
    assert ("estimated" in co2["source"]) == (method == "estimate")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))  # the numeric energy metrics, with the rest
    events.Reload()
    tb = {e.step: e.value for e in events.Scalars("energy_kwh_total")}
    assert tb[max(tb)] == pytest.approx(rest.energy_kwh, rel=1e-6)  # float32 in the event file
    assert max(tb) == 6


def test_the_card_states_fine_tuning_and_a_measurement():
    energy = {"kwh": 2.0, "co2_g": 960.0, "method": "nvml", "estimate": False, "source": "measured: NVML",
              "note": "", "pue": 1.2, "grid_g_per_kwh": 400.0, "region": "custom",
              "hardware": "8 x NVIDIA H100", "training_type": "fine-tuning"}  # fmt: skip
    from test_card import summary

    card = model_card(summary(energy=energy))
    front = yaml.safe_load(card.split("---\n")[1])
    assert front == {
        "co2_eq_emissions": {
            "emissions": 960.0,
            "source": "lmforge; measured: NVML",
            "training_type": "fine-tuning",
            "geographical_location": "custom",
            "hardware_used": "8 x NVIDIA H100",
        }
    }
    assert "- energy (measured, nvml): 2 kWh at the devices" in card and "estimate, not" not in card
    assert json.dumps(front)  # plain data, as the Hub's parser expects
