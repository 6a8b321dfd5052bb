"""The planner's energy for a 7B run beside a published figure: Llama 2 7B's pretraining.

Reference: Touvron et al. 2023, "Llama 2: Open Foundation and Fine-Tuned Chat Models", Table 2 (CO2 emissions
during pretraining): the 7B model took 184,320 GPU-hours on A100-80GB at 400 W per GPU and emitted
31.22 tCO2eq; it saw 2.0T tokens (Table 1) at context 4096 with 4M-token batches. The paper counts each GPU
at its peak power for every hour, so its energy is 184,320 h x 0.4 kW = 73,728 kWh and the implied grid
intensity (with its PUE) is 31.22 t / 73,728 kWh = 423.4 g/kWh.

Two comparisons:
  1. like for like: the planner on A100-80GB, 2T tokens, no node overhead, PUE 1, 423.4 g/kWh;
  2. the README's example (7B on 8 x H100, 1T tokens, the planner's defaults) beside Llama 2 scaled to 1T
     tokens (half the GPU-hours) and to the H100 (GPU-hours x 312/989, the ratio of bf16 peaks, at 700 W).

    python benchmarks/energy_llama2.py

Writes benchmarks/results/energy_llama2.json. Pure arithmetic: no device is used.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.config import PRESETS
from lmforge.plan.energy import energy_settings
from lmforge.plan.hardware import KNOWN_HARDWARE
from lmforge.plan.planner import Cluster, Workload, plan_cluster

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "energy_llama2.json"

LLAMA2_7B = {"gpu_hours": 184_320, "watts": 400.0, "tco2eq": 31.22, "tokens": 2.0e12, "gpu": "A100-80GB"}
LLAMA2_KWH = LLAMA2_7B["gpu_hours"] * LLAMA2_7B["watts"] / 1000
LLAMA2_G_PER_KWH = LLAMA2_7B["tco2eq"] * 1e6 / LLAMA2_KWH


def plan(gpu: str, tokens: float, settings):
    cluster = Cluster(hardware=KNOWN_HARDWARE[gpu], gpus=8, energy=settings)
    workload = Workload(seq_len=4096, global_batch_tokens=4_000_000, total_tokens=int(tokens))
    return plan_cluster(PRESETS["7b"], cluster, workload)


def main() -> None:
    like = energy_settings(grid_intensity=LLAMA2_G_PER_KWH, pue=1.0, node_overhead=0.0)
    a100 = plan("A100-80GB", LLAMA2_7B["tokens"], like)
    same = {
        "planner_gpu_hours": a100.gpu_hours,
        "planner_gpu_kwh": a100.energy.device_kwh,
        "planner_tco2eq": a100.energy.co2_kg / 1000,
        "planner_mfu": a100.chosen.timing.mfu,
        "llama2_gpu_hours": LLAMA2_7B["gpu_hours"],
        "llama2_kwh": LLAMA2_KWH,
        "llama2_tco2eq": LLAMA2_7B["tco2eq"],
        "ratio_gpu_hours": a100.gpu_hours / LLAMA2_7B["gpu_hours"],
        "ratio_kwh": a100.energy.device_kwh / LLAMA2_KWH,
        "ratio_tco2eq": a100.energy.co2_kg / 1000 / LLAMA2_7B["tco2eq"],
    }
    readme = plan("H100-80GB", 1e12, energy_settings())
    scaled_hours = LLAMA2_7B["gpu_hours"] * 0.5 * 312.0 / 989.0
    scaled_kwh = scaled_hours * 0.7
    h100 = {
        "command": "lmforge plan --model 7b --gpu H100-80GB --gpus 8 --seq 4096 --global-batch-tokens 4M "
        "--tokens 1T",
        "planner_gpu_hours": readme.gpu_hours,
        "planner_gpu_kwh": readme.energy.device_kwh,
        "planner_kwh_at_meter": readme.energy.kwh,
        "planner_tco2eq": readme.energy.co2_kg / 1000,
        "planner_settings": {"pue": 1.2, "node_overhead": 0.5, "grid_g_per_kwh": 481.0},
        "llama2_scaled_gpu_hours": scaled_hours,
        "llama2_scaled_gpu_kwh": scaled_kwh,
        "llama2_scaled_tco2eq_at_its_intensity": scaled_kwh * LLAMA2_G_PER_KWH / 1e6,
        "planner_tco2eq_at_llama2_intensity_gpu_only": readme.energy.device_kwh * LLAMA2_G_PER_KWH / 1e6,
        "ratio_gpu_hours": readme.gpu_hours / scaled_hours,
        "ratio_gpu_kwh": readme.energy.device_kwh / scaled_kwh,
    }
    out = {
        "reference": "Touvron et al. 2023, Llama 2, Table 2: 7B, 184,320 A100-80GB GPU-hours, 400 W, 31.22 tCO2eq",
        "llama2_implied_g_per_kwh": LLAMA2_G_PER_KWH,
        "like_for_like_a100_2T": same,
        "readme_h100_1T": h100,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
