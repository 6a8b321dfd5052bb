"""Energy and emissions of a run: device power at a utilisation, node overhead, the data centre's PUE and
the grid's carbon intensity. Pure arithmetic, shared by ``lmforge plan`` (a prediction from the step
timing) and ``train.energy`` (the estimate used where no energy counter can be read).

    device power  = board power x (IDLE_POWER_FRACTION + (1 - IDLE_POWER_FRACTION) x utilisation)
    IT power      = device power x (1 + node overhead)        CPUs, memory, NICs, fans of the node
    facility kWh  = IT power x PUE x GPUs x hours / 1000
    CO2 (g)       = facility kWh x grid intensity (g CO2eq / kWh)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lmforge.config import suggest
from lmforge.errors import ConfigError

# An allocated accelerator that waits (exposed communication, optimizer, data) still draws power: the
# fraction of board power it draws at zero utilisation. An assumption: nvidia-smi shows ~60-100 W for an
# idle H100 SXM (of 700 W) and more while spinning in NCCL kernels; 0.3 sits between the two.
IDLE_POWER_FRACTION = 0.3

# Power usage effectiveness (facility / IT energy). Uptime Institute, Global Data Center Survey 2023: the
# industry average is 1.58; hyperscale operators report ~1.1 (Google 2023 Environmental Report: fleet
# average 1.10; Meta's Llama 1 paper, Touvron et al. 2023, used 1.1). 1.2 is a modern cloud/colocation hall.
DEFAULT_PUE = 1.2
PUE_SOURCE = (
    "1.2: a modern cloud data centre (Uptime Institute 2023 survey: 1.58 industry average, ~1.1 hyperscale)"
)

# The rest of a GPU node (CPUs, DRAM, NICs, fans, power supplies) as a fraction of its GPUs' power. NVIDIA's
# DGX H100 data sheet gives 10.2 kW maximum system power for 8 x 700 W GPUs: at most 4.6 kW = 0.82 x the
# GPUs' power; CPUs and fans rarely run at their maximum while the GPUs train, so the default is 0.5.
DEFAULT_NODE_OVERHEAD = 0.5
NODE_OVERHEAD_SOURCE = "0.5 x GPU power (DGX H100 data sheet: at most 0.82 = (10.2 kW - 8 x 700 W) / 5.6 kW)"

# Carbon intensity of electricity generation, g CO2eq per kWh, 2023 national averages: Ember, "Yearly
# electricity data" (2024 release), as published by Our World in Data ("Carbon intensity of electricity
# generation"). Rounded to the gram; a run's own grid is better passed as --grid-intensity.
GRID_INTENSITY_SOURCE = "Ember yearly electricity data 2023, via Our World in Data"
GRID_INTENSITY: dict[str, float] = {
    "world": 481.0,
    "us": 369.0,
    "eu": 244.0,
    "france": 56.0,
    "germany": 381.0,
    "uk": 238.0,
    "sweden": 41.0,
    "norway": 30.0,
    "canada": 170.0,
    "japan": 485.0,
    "china": 582.0,
    "india": 713.0,
}
DEFAULT_REGION = "world"


@dataclass(frozen=True, kw_only=True)
class EnergySettings:
    """The site a run draws its power from: overhead, PUE, and the grid's carbon intensity."""

    pue: float = DEFAULT_PUE
    node_overhead: float = DEFAULT_NODE_OVERHEAD
    grid_g_per_kwh: float = GRID_INTENSITY[DEFAULT_REGION]
    region: str = DEFAULT_REGION  # a name from GRID_INTENSITY, or "custom" for a given intensity
    grid_source: str = f"{DEFAULT_REGION} average, {GRID_INTENSITY_SOURCE}"

    def problems(self) -> list[str]:
        out = []
        if self.pue < 1.0:
            out.append(f"--pue={self.pue} must be >= 1 (facility energy / IT energy)")
        if self.node_overhead < 0:
            out.append(f"--node-overhead={self.node_overhead} must be >= 0")
        if self.grid_g_per_kwh < 0:
            out.append(f"--grid-intensity={self.grid_g_per_kwh} must be >= 0 g/kWh")
        return out


def energy_settings(
    *,
    region: str | None = None,
    grid_intensity: float | None = None,
    pue: float = DEFAULT_PUE,
    node_overhead: float = DEFAULT_NODE_OVERHEAD,
    flag: str = "--region",
) -> EnergySettings:
    """Settings from a region name (a table entry) or an explicit intensity in g/kWh (which wins)."""
    if grid_intensity is not None:
        where = region or "custom"
        settings = EnergySettings(
            pue=pue, node_overhead=node_overhead, grid_g_per_kwh=float(grid_intensity), region=where,
            grid_source=f"given: {grid_intensity:g} g/kWh",
        )  # fmt: skip
    else:
        name = (region or DEFAULT_REGION).lower()
        if name not in GRID_INTENSITY:
            raise ConfigError(
                f"{flag}={region!r} is not in the grid-intensity table{suggest(name, GRID_INTENSITY)}; known: "
                f"{', '.join(GRID_INTENSITY)}; or give the intensity in g CO2eq/kWh"
            )
        settings = EnergySettings(
            pue=pue, node_overhead=node_overhead, grid_g_per_kwh=GRID_INTENSITY[name], region=name,
            grid_source=f"{name} average {GRID_INTENSITY[name]:g} g/kWh, {GRID_INTENSITY_SOURCE}",
        )  # fmt: skip
    problems = settings.problems()
    if problems:
        raise ConfigError("invalid energy settings:\n  " + "\n  ".join(problems))
    return settings


def device_power_w(board_power_w: float, utilisation: float) -> float:
    """Average draw of one device busy for ``utilisation`` (0..1) of the time."""
    u = min(1.0, max(0.0, utilisation))
    return board_power_w * (IDLE_POWER_FRACTION + (1.0 - IDLE_POWER_FRACTION) * u)


@dataclass(frozen=True, kw_only=True)
class EnergyEstimate:
    """A run's predicted energy: per device, for the whole cluster and site, and its emissions."""

    devices: int
    board_power_w: float  # per device, from the hardware table
    utilisation: float  # busy fraction of the step
    device_power_w: float  # average per device
    it_power_w: float  # all devices with their nodes' overhead
    facility_power_w: float  # times PUE
    hours: float
    device_kwh: float  # the accelerators alone (what NVML counters would measure)
    kwh: float  # at the meter of the data centre
    co2_kg: float
    settings: EnergySettings

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(out.pop("settings"))
        return out


def run_energy(
    board_power_w: float, utilisation: float, devices: int, seconds: float, settings: EnergySettings
) -> EnergyEstimate:
    """Energy and emissions of ``devices`` devices busy ``utilisation`` of ``seconds``."""
    device = device_power_w(board_power_w, utilisation)
    it = device * devices * (1.0 + settings.node_overhead)
    facility = it * settings.pue
    hours = seconds / 3600.0
    kwh = facility * hours / 1000.0
    return EnergyEstimate(
        devices=devices,
        board_power_w=board_power_w,
        utilisation=utilisation,
        device_power_w=device,
        it_power_w=it,
        facility_power_w=facility,
        hours=hours,
        device_kwh=device * devices * hours / 1000.0,
        kwh=kwh,
        co2_kg=kwh * settings.grid_g_per_kwh / 1000.0,
        settings=settings,
    )
