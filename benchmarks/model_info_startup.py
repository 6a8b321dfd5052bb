"""Wall time of ``lmforge model info 7b`` in a fresh process, against a bare ``python -c pass`` start.

Claim checked: ``model info`` answers for a 7B model in under 2 s, import included (it needs neither torch
nor the model; tests/model/test_model_info.py checks that as behaviour, this script measures the time).
The two commands are interleaved (A B A B ...) and the medians and their difference are reported.

    python benchmarks/model_info_startup.py [--reps 5]

Writes benchmarks/results/model_info_startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "model_info_startup.json"
CLAIM_S = 2.0
COMMANDS = {
    "model_info_7b": [sys.executable, "-m", "lmforge.cli", "model", "info", "7b"],
    "python_pass": [sys.executable, "-c", "pass"],
}


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.reps):
        for name, command in COMMANDS.items():  # A B A B: both see the same machine load
            times[name].append(timed(command))
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "reps": args.reps,
        "seconds": times,
        "median_s": medians,
        "lmforge_over_bare_python_s": medians["model_info_7b"] - medians["python_pass"],
        "claim_s": CLAIM_S,
        "claim_met": medians["model_info_7b"] < CLAIM_S,
        "load_average": os.getloadavg(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, RESULTS)
    print(json.dumps(result["median_s"]), "claim met" if result["claim_met"] else "CLAIM NOT MET")


if __name__ == "__main__":
    main()
