"""The devices the planner knows: peak FLOP/s, memory, bandwidths; a YAML file can add more; detection of
this machine, with a measured CPU matmul peak (for MFU).

Figures are vendors' data-sheet values for the SXM / PCIe parts named: dense bf16 tensor-core peak (no
sparsity), memory as the driver reports it (nvidia-smi MiB), HBM/GDDR bandwidth, and the per-GPU,
one-direction bandwidth of the link between GPUs of one node (NVLink, or PCIe for cards without it).
``compute_efficiency`` is the fraction of peak that large bf16 matmuls reach in practice: the planner's
starting assumption, which ``lmforge plan --probe`` measures and corrects.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

from lmforge.config import build, load_yaml, suggest
from lmforge.errors import ConfigError
from lmforge.files import write_text_atomic

GIB = 2**30
MIB = 2**20


@dataclass(frozen=True, kw_only=True)
class Hardware:
    """One accelerator (or the CPU) as the planner sees it."""

    name: str
    kind: str = "cuda"  # cuda or cpu
    peak_tflops: float  # dense bf16 matmul peak, TFLOP/s
    fp32_tflops: float = 0.0  # dense fp32 peak without TF32, TFLOP/s (MFU of fp32 runs; 0: unknown)
    memory_gib: float  # memory usable by one process
    memory_bandwidth_gbs: float  # HBM / GDDR / DRAM bandwidth, GB/s
    link_gbs: float  # one-direction bandwidth to the other GPUs of the node, GB/s (NVLink or PCIe)
    pcie_gbs: float = 25.0  # host <-> device copies (CPU offload), GB/s
    host_memory_gib: float = 1024.0  # CPU memory of one node (CPU offload keeps the training state there)
    host_bandwidth_gbs: float = 100.0  # CPU memory bandwidth of one node (CPU optimizer steps)
    compute_efficiency: float = 0.6  # achieved / peak for large matmuls (corrected by --probe)
    overhead_gib: float = 1.5  # CUDA context, cuBLAS workspaces, NCCL buffers
    power_watts: float = 0.0  # board power (TDP) of one device, or a CPU's package power; 0: unknown

    @property
    def peak_flops(self) -> float:
        return self.peak_tflops * 1e12

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)

    def problems(self) -> list[str]:
        out = []
        for name in ("peak_tflops", "memory_gib", "memory_bandwidth_gbs", "link_gbs", "pcie_gbs"):
            if getattr(self, name) <= 0:
                out.append(f"{self.name}.{name}={getattr(self, name)} must be > 0")
        if self.power_watts < 0:
            out.append(f"{self.name}.power_watts={self.power_watts} must be >= 0 (0: unknown)")
        if not 0.0 < self.compute_efficiency <= 1.0:
            out.append(f"{self.name}.compute_efficiency={self.compute_efficiency} must be in (0, 1]")
        if self.kind not in ("cuda", "cpu"):
            out.append(f"{self.name}.kind={self.kind!r} must be 'cuda' or 'cpu'")
        return out


def _mib(mib: int) -> float:
    return mib * MIB / GIB


# Data sheets: NVIDIA A100 (2021), H100 SXM5/PCIe (2023), H200 SXM (2024), L4 (2023), L40S (2023), A10 (2021),
# A10G (AWS G5), V100 SXM2 32GB, T4, GeForce RTX 4090 (Ada whitepaper: 165.2 TFLOP/s bf16 with fp32
# accumulate) and RTX 3090 (Ampere whitepaper: 71 TFLOP/s). Dense peaks, no sparsity. NVLink 3 = 600 GB/s, NVLink 4 = 900 GB/s total
# (both directions); L4, A10 and RTX 4090 talk over PCIe 4.0 x16 (~25 GB/s achieved per direction).
KNOWN_HARDWARE: dict[str, Hardware] = {
    "A100-40GB": Hardware(
        name="A100-40GB", peak_tflops=312.0, fp32_tflops=19.5, memory_gib=_mib(40960), memory_bandwidth_gbs=1555.0,
        link_gbs=300.0, pcie_gbs=25.0,
        power_watts=400.0,  # A100 data sheet: SXM4 max TDP 400 W
    ),
    "A100-80GB": Hardware(
        name="A100-80GB", peak_tflops=312.0, fp32_tflops=19.5, memory_gib=_mib(81920), memory_bandwidth_gbs=2039.0,
        link_gbs=300.0, pcie_gbs=25.0,
        power_watts=400.0,  # A100 data sheet: SXM4 max TDP 400 W
    ),
    "H100-80GB": Hardware(
        name="H100-80GB", peak_tflops=989.0, fp32_tflops=67.0, memory_gib=_mib(81559), memory_bandwidth_gbs=3350.0,
        link_gbs=450.0, pcie_gbs=50.0, host_memory_gib=2048.0, host_bandwidth_gbs=300.0,
        power_watts=700.0,  # H100 data sheet: SXM5 max TDP up to 700 W
    ),
    "H200": Hardware(
        name="H200", peak_tflops=989.0, fp32_tflops=67.0, memory_gib=_mib(143771), memory_bandwidth_gbs=4800.0,
        link_gbs=450.0, pcie_gbs=50.0, host_memory_gib=2048.0, host_bandwidth_gbs=300.0,
        power_watts=700.0,  # H200 data sheet: SXM max TDP up to 700 W
    ),
    "L4": Hardware(
        name="L4", peak_tflops=121.0, fp32_tflops=30.3, memory_gib=_mib(23034), memory_bandwidth_gbs=300.0,
        link_gbs=25.0, pcie_gbs=25.0, host_memory_gib=192.0, host_bandwidth_gbs=50.0, overhead_gib=1.0,
        power_watts=72.0,  # L4 data sheet: max TDP 72 W
    ),
    "A10": Hardware(
        name="A10", peak_tflops=125.0, fp32_tflops=31.2, memory_gib=_mib(23028), memory_bandwidth_gbs=600.0,
        link_gbs=25.0, pcie_gbs=25.0, host_memory_gib=192.0, host_bandwidth_gbs=50.0, overhead_gib=1.0,
        power_watts=150.0,  # A10 data sheet: max TDP 150 W
    ),
    "RTX-4090": Hardware(
        name="RTX-4090", peak_tflops=165.2, fp32_tflops=82.6, memory_gib=_mib(24564), memory_bandwidth_gbs=1008.0,
        link_gbs=25.0, pcie_gbs=25.0, host_memory_gib=128.0, host_bandwidth_gbs=50.0, overhead_gib=1.0,
        power_watts=450.0,  # RTX 4090 spec page: total graphics power 450 W
    ),
    "H100-PCIe": Hardware(
        name="H100-PCIe", peak_tflops=756.0, fp32_tflops=51.0, memory_gib=_mib(81559),
        memory_bandwidth_gbs=2000.0, link_gbs=25.0, pcie_gbs=50.0, host_memory_gib=1024.0,
        power_watts=350.0,  # H100 data sheet: PCIe max TDP 300-350 W
    ),
    "L40S": Hardware(
        name="L40S", peak_tflops=362.0, fp32_tflops=91.6, memory_gib=_mib(46068), memory_bandwidth_gbs=864.0,
        link_gbs=25.0, pcie_gbs=25.0, host_memory_gib=512.0, overhead_gib=1.0,
        power_watts=350.0,  # L40S data sheet: max power 350 W
    ),
    "A10G": Hardware(
        name="A10G", peak_tflops=70.0, fp32_tflops=31.2, memory_gib=_mib(23028), memory_bandwidth_gbs=600.0,
        link_gbs=25.0, pcie_gbs=25.0, host_memory_gib=192.0, host_bandwidth_gbs=50.0, overhead_gib=1.0,
        power_watts=300.0,  # AWS G5: nvidia-smi power limit 300 W (NVIDIA publishes no A10G sheet)
    ),
    "V100-32GB": Hardware(  # no bf16: the fp16 tensor-core peak
        name="V100-32GB", peak_tflops=125.0, fp32_tflops=15.7, memory_gib=_mib(32510),
        memory_bandwidth_gbs=900.0, link_gbs=150.0, pcie_gbs=12.0, host_memory_gib=512.0,
        power_watts=300.0,  # V100 data sheet: SXM2 max power 300 W
    ),
    "T4": Hardware(  # no bf16: the fp16 tensor-core peak
        name="T4", peak_tflops=65.0, fp32_tflops=8.1, memory_gib=_mib(15095), memory_bandwidth_gbs=320.0,
        link_gbs=12.0, pcie_gbs=12.0, host_memory_gib=128.0, host_bandwidth_gbs=50.0, overhead_gib=1.0,
        power_watts=70.0,  # T4 data sheet: 70 W
    ),
    "RTX-3090": Hardware(
        name="RTX-3090", peak_tflops=71.0, fp32_tflops=35.6, memory_gib=_mib(24576), memory_bandwidth_gbs=936.0,
        link_gbs=25.0, pcie_gbs=25.0, host_memory_gib=128.0, host_bandwidth_gbs=50.0, overhead_gib=1.0,
        power_watts=350.0,  # RTX 3090 spec page: total graphics power 350 W
    ),
    # A nominal 16-core server CPU (AVX-512 bf16): detection replaces cores and memory with the real ones.
    "CPU": Hardware(
        name="CPU", kind="cpu", peak_tflops=1.6, memory_gib=64.0, memory_bandwidth_gbs=50.0,
        link_gbs=10.0, pcie_gbs=50.0, host_memory_gib=64.0, host_bandwidth_gbs=50.0,
        compute_efficiency=0.5, overhead_gib=0.0,
        power_watts=16 * 12.5,  # CPU_WATTS_PER_CORE below, for 16 cores
    ),
}  # fmt: skip

# Substrings of torch.cuda.get_device_name() -> table entry; longest first so "A100" wins over "A10".
_DEVICE_NAME_HINTS: list[tuple[str, str]] = [
    ("H200", "H200"),
    ("H100 PCIe", "H100-PCIe"),
    ("H100", "H100-80GB"),
    ("A100", "A100-80GB"),
    ("RTX 4090", "RTX-4090"),
    ("RTX 3090", "RTX-3090"),
    ("L40S", "L40S"),
    ("V100", "V100-32GB"),
    ("T4", "T4"),
    ("L4", "L4"),
    ("A10G", "A10G"),
    ("A10", "A10"),
]

# What a bare family name means when several entries share it: the SXM H100, the 80 GB A100.
_SHORT_NAMES = {"h100": "H100-80GB", "a100": "A100-80GB"}

CPU_TFLOPS_PER_CORE = 0.1  # bf16, AVX-512 at ~2.5 GHz; --probe measures the real figure
# Package power per core: AMD EPYC 9124 (16 cores, 200 W default TDP, AMD product page) = 12.5 W per core.
CPU_WATTS_PER_CORE = 12.5


@dataclass(frozen=True, kw_only=True)
class Interconnect:
    """The network between nodes, as one-direction bandwidth per GPU and a per-collective latency."""

    name: str
    gbs_per_gpu: float  # one direction, GB/s, for each GPU of a node at once
    latency_us: float
    note: str


INTERCONNECTS: dict[str, Interconnect] = {
    "nvlink": Interconnect(
        name="nvlink", gbs_per_gpu=450.0, latency_us=10.0,
        note="one NVLink domain across nodes (NVLink Switch, e.g. GB200 NVL72)",
    ),
    "infiniband": Interconnect(
        name="infiniband", gbs_per_gpu=50.0, latency_us=20.0,
        note="400 Gb/s InfiniBand NDR, one adapter per GPU (DGX H100 layout)",
    ),
    "ethernet": Interconnect(
        name="ethernet", gbs_per_gpu=12.5 / 8, latency_us=50.0,
        note="one 100 Gb/s Ethernet port per node, shared by its 8 GPUs",
    ),
}  # fmt: skip


def known_names(table: dict[str, Hardware]) -> str:
    return ", ".join(table)


def lookup_hardware(name: str, table: dict[str, Hardware] | None = None) -> Hardware:
    """The table entry for ``name`` (case-insensitive); an unknown name lists the known ones."""
    table = KNOWN_HARDWARE if table is None else table
    by_lower = {key.lower(): hw for key, hw in table.items()}
    if name.lower() in by_lower:
        return by_lower[name.lower()]
    if name.lower() in _SHORT_NAMES and _SHORT_NAMES[name.lower()] in table:
        return table[_SHORT_NAMES[name.lower()]]
    prefixed = [hw for key, hw in by_lower.items() if key.startswith(name.lower())]
    if len(prefixed) == 1 and name:  # "H100" for "H100-80GB"
        return prefixed[0]
    raise ConfigError(
        f"unknown GPU {name!r}{suggest(name, table)}; known: {known_names(table)}, or 'auto' to detect this "
        f"machine (add your own with --hardware-file)"
    )


def lookup_interconnect(name: str) -> Interconnect:
    if name.lower() in INTERCONNECTS:
        return INTERCONNECTS[name.lower()]
    raise ConfigError(
        f"unknown interconnect {name!r}{suggest(name, INTERCONNECTS)}; known: {', '.join(INTERCONNECTS)}"
    )


def load_hardware_file(path: str | Path, table: dict[str, Hardware] | None = None) -> dict[str, Hardware]:
    """The table extended (or overridden) by a YAML mapping of name -> fields of ``Hardware``.

    An entry whose name is already known starts from that entry, so a file may change one field only::

        MI300X: {peak_tflops: 1307, memory_gib: 192, memory_bandwidth_gbs: 5300, link_gbs: 448}
        H100-80GB: {compute_efficiency: 0.55}
    """
    table = dict(KNOWN_HARDWARE if table is None else table)
    data = load_yaml(path)
    problems = []
    for name, fields in data.items():
        if not isinstance(fields, dict):
            raise ConfigError(
                f"{path}: entry {name!r} must be a mapping of fields, got {type(fields).__name__}"
            )
        names = [f.name for f in dataclasses.fields(Hardware)]
        for key in fields:
            if key not in names:
                raise ConfigError(f"{path}: unknown field '{key}' for {name!r}{suggest(str(key), names)}")
        base = dataclasses.asdict(table[name]) if name in table else {}
        base.update(fields)
        base["name"] = str(name)
        missing = [f.name for f in dataclasses.fields(Hardware) if f.name not in base and _required(f)]
        if missing:
            raise ConfigError(f"{path}: new device {name!r} needs {', '.join(missing)}")
        hw = build(Hardware, base, f"{path}:{name}")
        problems += hw.problems()
        table[str(name)] = hw
    if problems:
        raise ConfigError(f"{path}: invalid hardware:\n  " + "\n  ".join(problems))
    return table


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def hardware_from_device_name(
    name: str, memory_bytes: int, table: dict[str, Hardware] | None = None
) -> Hardware:
    """Match a CUDA device name (``NVIDIA H100 80GB HBM3``) to the table; memory is the device's own."""
    table = KNOWN_HARDWARE if table is None else table
    for key in sorted(table, key=len, reverse=True):  # a user's own entry named like the device wins
        if _names_part(key, name) and table[key].kind == "cuda":
            return dataclasses.replace(table[key], memory_gib=memory_bytes / GIB)
    for hint, key in _DEVICE_NAME_HINTS:
        if _names_part(hint, name):
            base = table[key]
            if key == "A100-80GB" and memory_bytes < 60 * GIB:
                base = table["A100-40GB"]
            return dataclasses.replace(base, memory_gib=memory_bytes / GIB)
    raise ConfigError(
        f"this machine's GPU {name!r} is not in the hardware table; known: {known_names(table)}. "
        f"Describe it in a YAML file and pass --hardware-file (see README, 'lmforge plan')"
    )


def _names_part(part: str, name: str) -> bool:
    """``part`` occurs in ``name`` as a whole word ("A10" in "NVIDIA A10", not in "NVIDIA A100")."""
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(part)}(?![A-Za-z0-9])", name, re.IGNORECASE) is not None


def cpu_hardware(cores: int, memory_bytes: int) -> Hardware:
    """The CPU entry scaled to this machine's cores and memory."""
    base = KNOWN_HARDWARE["CPU"]
    return dataclasses.replace(
        base,
        name=f"CPU ({cores} cores)",
        peak_tflops=cores * CPU_TFLOPS_PER_CORE,
        power_watts=cores * CPU_WATTS_PER_CORE,
        memory_gib=memory_bytes / GIB,
        host_memory_gib=memory_bytes / GIB,
    )


def detect_hardware(table: dict[str, Hardware] | None = None) -> Hardware:
    """This machine's first CUDA device (from torch.cuda properties), else its CPU."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return hardware_from_device_name(props.name, props.total_memory, table)
    import psutil

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cpu_hardware(cores, psutil.virtual_memory().total)


def resolve_hardware(name: str, hardware_file: str | Path | None = None) -> Hardware:
    """``--gpu NAME`` (or ``auto``) with an optional ``--hardware-file``."""
    table = load_hardware_file(hardware_file) if hardware_file else KNOWN_HARDWARE
    if name.lower() == "auto":
        return detect_hardware(table)
    return lookup_hardware(name, table)


# -- this machine: names, measured CPU peak, peak FLOP/s for MFU ---------------------------------------------


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_matmul_flops(
    dtype_name: str, *, size: int = 1024, repeats: int = 40, budget_s: float = 1.0
) -> float:
    """The best FLOP/s of a square matmul on the CPU with the current thread count. Many short repeats,
    because other processes on the same cores make single timings several times too slow. A dtype the CPU
    only emulates (fp16 on most x86 CPUs runs ~100x slower than fp32) gets a smaller matrix, so the whole
    measurement stays within about ``budget_s`` seconds."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    # Never the global RNG: a run's random stream must not depend on this measurement.
    gen = torch.Generator().manual_seed(0)

    def operands(n: int):
        return torch.randn(n, n, generator=gen).to(dtype), torch.randn(n, n, generator=gen).to(dtype)

    def timed(a, b) -> float:
        started = time.perf_counter()
        torch.mm(a, b)
        return time.perf_counter() - started

    probe = 256
    a, b = operands(probe)
    torch.mm(a, b)
    per_probe = timed(a, b)
    while size > probe and per_probe * (size / probe) ** 3 > budget_s / 10:
        size //= 2  # one product must fit ten times into the budget
    a, b = operands(size)
    torch.mm(a, b)
    best, spent, count = math.inf, 0.0, 0
    while count < repeats and (count < 3 or spent < budget_s):
        elapsed = timed(a, b)
        best, spent, count = min(best, elapsed), spent + elapsed, count + 1
    return 2 * size**3 / best


# No CPU thread multiplies faster than this (AMX bf16 on a 3.5 GHz Sapphire Rapids core: ~7 TFLOP/s; Apple's
# AMX fp32: ~2 TFLOP/s). A cached peak above threads x this was not measured on this machine: it is dropped.
CPU_MAX_FLOPS_PER_THREAD = 10e12


def cpu_peak_flops(precision: str, cache_dir: str | Path | None) -> float:
    """The CPU's matmul peak for ``precision``: measured at every call (at most about a second) and kept in a
    JSON cache per (CPU, usable cores, threads, torch) as the best measurement so far. Other processes on the
    same cores can only make a measurement too low, so a peak measured once on a busy machine would report
    MFU above 100% for ever after; the best one seen is the peak. A cached value no CPU thread could reach
    (or not a number) is replaced by this measurement."""
    import torch

    threads = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    key = f"{cpu_name()}|cores={cores}|threads={threads}|torch={torch.__version__}|{precision}"
    path = Path(cache_dir) / "cpu_peak.json" if cache_dir is not None else None
    table: dict = {}
    if path is not None and path.is_file():
        try:
            table = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            table = {}
    if not isinstance(table, dict):
        table = {}
    cached = table.get(key)
    plausible = isinstance(cached, (int, float)) and 0 < cached <= threads * CPU_MAX_FLOPS_PER_THREAD
    peak = max(float(cached) if plausible else 0.0, measure_matmul_flops(precision))
    if path is not None and peak != cached:
        table[key] = peak
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps(table, indent=2))
        except OSError:  # a read-only cache only costs the best-so-far
            pass
    return peak


def model_flops_utilisation(achieved_flops: float, peak: float | None) -> float | None:
    """MFU: achieved / peak FLOP/s, or None where no peak is known or the achieved rate exceeds it (the
    peak was then measured too low, and a utilisation above 100% would be a wrong number, not a result)."""
    if not peak or achieved_flops > peak:
        return None
    return achieved_flops / peak


def peak_flops(device, precision: str, cache_dir: str | Path | None) -> float | None:
    """Peak FLOP/s of one device for MFU: the GPU's entry in the planner's hardware table
    (above), or the measured CPU matmul peak."""
    import torch

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        try:
            hw = hardware_from_device_name(props.name, props.total_memory)
        except ConfigError:  # a GPU missing from the table: no MFU, the rest of the metrics stand
            return None
        return (hw.fp32_tflops * 1e12 or None) if precision == "fp32" else hw.peak_flops
    if device.type == "cpu":
        return cpu_peak_flops(precision, cache_dir)
    return None


def hardware_summary(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()})"
    return f"CPU: {cpu_name()}, {torch.get_num_threads()} threads"
