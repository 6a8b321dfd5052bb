"""The energy a run draws: measured where the hardware counts it, estimated (and labelled so) elsewhere.

Sources, the first that works for the run's device:
  nvml      NVIDIA GPUs (Volta and later): ``nvmlDeviceGetTotalEnergyConsumption``, millijoules since the
            driver loaded, through ``pynvml`` (the nvidia-ml-py package) when it is installed
  rapl      a CPU run of one process on Linux: the package zones of the powercap tree,
            ``/sys/class/powercap/intel-rapl:N/energy_uj``, which wrap at ``max_energy_range_uj`` (the whole
            package, other processes included; recent kernels let only root read it)
  estimate  the device's power from the hardware table at its utilisation: on the CPU this process's CPU
            time over wall time and cores, on a GPU the planner's predicted busy fraction (``plan.energy``)

Each process meters its own device; the loop sums the processes' energy at every logging step. CO2 is the
energy times the data centre's PUE and the grid's carbon intensity (``train.energy_region``,
``train.grid_intensity``, ``train.pue``). The collaborators (the powercap root, the NVML module, the clocks)
are arguments, so tests drive the meter with a fake tree and fake counters.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmforge.plan.energy import EnergySettings, device_power_w, energy_settings

POWERCAP_ROOT = Path("/sys/class/powercap")


class NvmlCounter:
    """One GPU's energy counter (mJ since the driver loaded; 64 bits, so it does not wrap)."""

    method = "nvml"
    estimate = False

    def __init__(self, nvml: Any, handle: Any):
        self.nvml, self.handle = nvml, handle
        self.read_joules()  # fails here, at setup, on a GPU without the counter

    def read_joules(self) -> float:
        return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1000.0


class RaplCounter:
    """The package zones of a powercap tree, each unwrapped at its ``max_energy_range_uj``.

    Read at least once per wrap period (minutes at a package's full power); the loop reads every step."""

    method = "rapl"
    estimate = False

    def __init__(self, zones: list[Path]):
        if not zones:
            raise OSError("no RAPL package zones")
        self.zones = zones
        self.ranges = [int((z / "max_energy_range_uj").read_text()) for z in zones]
        self.last = [self._raw(z) for z in zones]
        self.total_uj = 0

    @staticmethod
    def _raw(zone: Path) -> int:
        return int((zone / "energy_uj").read_text())

    def read_joules(self) -> float:
        for i, zone in enumerate(self.zones):
            now = self._raw(zone)
            delta = now - self.last[i]
            if delta < 0:  # the counter passed max_energy_range_uj and started again from 0
                delta += self.ranges[i] + 1
            self.total_uj += delta
            self.last[i] = now
        return self.total_uj / 1e6


def rapl_zones(root: Path) -> list[Path]:
    """The top-level zones of a powercap tree (``intel-rapl:0``, not its sub-zones ``intel-rapl:0:0``):
    the packages, or the platform zone ``psys`` alone where there is one (it contains the packages)."""
    zones = sorted(p for p in root.glob("intel-rapl:*") if p.name.count(":") == 1)
    names = {z: (z / "name").read_text().strip() if (z / "name").is_file() else "" for z in zones}
    platform = [z for z in zones if names[z] == "psys"]
    return platform or [z for z in zones if names[z] != "psys"]


class EstimateCounter:
    """Energy as power x time: ``power_w`` of board power at a utilisation that is either fixed or the
    process's CPU time over wall time and ``cores`` (``cpu_time`` given)."""

    method = "estimate"
    estimate = True

    def __init__(
        self,
        power_w: float,
        *,
        utilisation: float = 1.0,
        cores: int = 0,
        clock: Callable[[], float] = time.monotonic,
        cpu_time: Callable[[], float] | None = None,
    ):
        self.power_w, self.utilisation, self.cores = power_w, utilisation, cores
        self.clock, self.cpu_time = clock, cpu_time
        self.last_t = clock()
        self.last_cpu = cpu_time() if cpu_time else 0.0
        self.joules = 0.0

    def read_joules(self) -> float:
        now = self.clock()
        elapsed = now - self.last_t
        utilisation = self.utilisation
        if self.cpu_time is not None:
            cpu = self.cpu_time()
            utilisation = (cpu - self.last_cpu) / (elapsed * self.cores) if elapsed > 0 else 0.0
            self.last_cpu = cpu
        self.joules += device_power_w(self.power_w, utilisation) * max(0.0, elapsed)
        self.last_t = now
        return self.joules


class EnergyMeter:
    """Energy drawn by this process's device since the last ``interval_kwh``, and what it emitted."""

    def __init__(
        self,
        counter,
        *,
        settings: EnergySettings,
        hardware: str,
        training_type: str = "pre-training",
        note: str = "",
    ):
        self.counter, self.settings, self.hardware = counter, settings, hardware
        self.training_type, self.note = training_type, note
        self.last = counter.read_joules()

    @property
    def method(self) -> str:
        return self.counter.method

    @property
    def estimate(self) -> bool:
        return self.counter.estimate

    def poll(self) -> None:
        """Read the counter (a wrapping counter must be read more often than it wraps)."""
        self.counter.read_joules()

    def interval_kwh(self) -> float:
        now = self.counter.read_joules()
        joules, self.last = now - self.last, now
        return joules / 3.6e6

    def co2_g(self, kwh: float) -> float:
        """Grams of CO2eq for ``kwh`` measured at the device: x PUE x grid intensity."""
        return kwh * self.settings.pue * self.settings.grid_g_per_kwh

    def source(self) -> str:
        kind = {
            "nvml": "measured: NVML energy counters of the GPUs",
            "rapl": "measured: RAPL package energy counters (Linux powercap)",
            "estimate": "estimated: device power from lmforge's hardware table x utilisation (no counter)",
        }[self.method]
        s = self.settings
        return f"{kind}; x PUE {s.pue:g} x {s.grid_g_per_kwh:g} g CO2eq/kWh ({s.grid_source})"

    def summary(self, total_kwh: float) -> dict:
        """What the run summary and the model card report."""
        return {
            "kwh": total_kwh,
            "co2_g": self.co2_g(total_kwh),
            "method": self.method,
            "estimate": self.estimate,
            "source": self.source(),
            "note": self.note,
            "pue": self.settings.pue,
            "grid_g_per_kwh": self.settings.grid_g_per_kwh,
            "region": self.settings.region,
            "hardware": self.hardware,
            "training_type": self.training_type,
        }


def _nvml_counter(nvml: Any, device_index: int, device_uuid: str | None) -> NvmlCounter:
    nvml.nvmlInit()
    if device_uuid:
        uuid = device_uuid if device_uuid.startswith("GPU-") else f"GPU-{device_uuid}"
        handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
    else:
        handle = nvml.nvmlDeviceGetHandleByIndex(device_index)
    return NvmlCounter(nvml, handle)


def open_meter(
    *,
    device_kind: str,
    settings: EnergySettings,
    hardware: str,
    power_w: float,
    cores: int = 1,
    utilisation: float = 1.0,
    single_process: bool = True,
    training_type: str = "pre-training",
    device_index: int = 0,
    device_uuid: str | None = None,
    nvml: Any = None,
    powercap_root: Path | None = POWERCAP_ROOT,
    clock: Callable[[], float] = time.monotonic,
    cpu_time: Callable[[], float] = time.process_time,
) -> EnergyMeter:
    """The best meter for the device: NVML on CUDA, RAPL on a one-process CPU run, else the estimate.
    ``nvml=None`` imports pynvml if it is installed; ``powercap_root=None`` skips RAPL."""
    why_not = []
    counter = None
    if device_kind == "cuda":
        try:
            if nvml is None:
                import pynvml as nvml
            counter = _nvml_counter(nvml, device_index, device_uuid)
        except ImportError:
            why_not.append("pynvml is not installed (pip install nvidia-ml-py)")
        except Exception as exc:  # NVMLError_NotSupported on pre-Volta GPUs, a driver without NVML, ...
            why_not.append(f"NVML energy counter unavailable ({exc})")
    elif device_kind == "cpu" and powercap_root is not None:
        if not single_process:
            why_not.append("RAPL counts the whole package, which several processes share")
        else:
            try:
                counter = RaplCounter(rapl_zones(Path(powercap_root)))
            except (OSError, ValueError) as exc:  # no tree, or energy_uj readable by root only
                why_not.append(f"RAPL unavailable ({exc})")
    if counter is None:
        if power_w <= 0:
            why_not.append("no power figure for this device in the hardware table: the estimate is 0")
        on_cpu = device_kind == "cpu"
        counter = EstimateCounter(
            power_w,
            utilisation=utilisation,
            cores=cores if on_cpu else 0,
            clock=clock,
            cpu_time=cpu_time if on_cpu else None,
        )
    return EnergyMeter(
        counter, settings=settings, hardware=hardware, training_type=training_type, note="; ".join(why_not)
    )


def meter_for_run(train_cfg, world, *, utilisation: float, fine_tuning: bool) -> EnergyMeter:
    """The meter of a training run: its device's power from the hardware table, the site from the config."""
    import torch

    from lmforge.errors import ConfigError
    from lmforge.plan.hardware import CPU_WATTS_PER_CORE, hardware_from_device_name, hardware_summary

    settings = energy_settings(
        region=train_cfg.energy_region,
        grid_intensity=train_cfg.grid_intensity,
        pue=train_cfg.pue,
        node_overhead=0.0,
        flag="train.energy_region",
    )
    device = world.device
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    power_w, uuid, index = cores * CPU_WATTS_PER_CORE, None, 0
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        index = device.index if device.index is not None else torch.cuda.current_device()
        uuid = str(getattr(props, "uuid", "") or "") or None
        try:
            power_w = hardware_from_device_name(props.name, props.total_memory).power_watts
        except ConfigError:
            power_w = 0.0  # unknown GPU: an estimate of 0 kWh, said in the note
    devices = world.world_size
    return open_meter(
        device_kind=device.type,
        settings=settings,
        hardware=f"{devices} x {hardware_summary(device)}" if devices > 1 else hardware_summary(device),
        power_w=power_w,
        cores=cores,
        utilisation=utilisation,
        single_process=not world.distributed,
        training_type="fine-tuning" if fine_tuning else "pre-training",
        device_index=index,
        device_uuid=uuid,
    )
