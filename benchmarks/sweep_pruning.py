"""Claim: pruning makes a sweep cheaper without making its best result worse. ``lmforge sweep`` runs the
same 20-trial study (a small char model on tinyshakespeare; learning rate, warmup, weight decay, depth) twice
with the same TPE seed: once with the median pruner, once without. Both share the first 10 (random)
trials' parameters; after that TPE follows what each sweep has seen. Reported for each: wall time, the
training steps actually run (a measure of work that machine noise does not touch), trials pruned, and the
best validation loss with its parameters.

The two sweeps run side by side, so a shared machine's load falls on both. Writes
benchmarks/results/sweep_pruning.json. Run: python benchmarks/sweep_pruning.py [--trials 20] (about 10
minutes on 2 quiet CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import torch
import yaml

from lmforge.auto.space import parse_space
from lmforge.auto.sweep import SweepSpec, prepare_data_once, run_sweep

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinyshakespeare.txt"
RESULTS = Path(__file__).resolve().parent / "results" / "sweep_pruning.json"
SPACE = [
    "train.lr=loguniform(1e-4,1e-1)",
    "train.warmup_steps=int(0,60)",
    "train.weight_decay=uniform(0,0.3)",
    "model.n_layers=choice(1,2)",
]
STEPS, EVAL_EVERY = 90, 10


def config(folder: Path) -> Path:
    data = {
        "model": {"d_model": 64, "n_heads": 4, "ffn_hidden": 192, "max_seq_len": 64},
        "data": {"sources": [str(DATA.resolve())], "tokenizer": "char", "val_fraction": 0.1},
        "train": {
            "steps": STEPS,
            "seq_len": 64,
            "micro_batch": 8,
            "lr": 3e-3,
            "min_lr": 1e-5,
            "eval_every": EVAL_EVERY,
            "eval_batches": 4,
            "log_every": 10,
            "ckpt_every": 10_000,
            "sample_prompts": [],
            "trackers": [],
            "device": "cpu",
        },
    }
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def one_sweep(cfg: Path, out: Path, cache: Path, *, pruner: str, trials: int) -> dict:
    spec = SweepSpec(
        config=str(cfg),
        space=tuple(parse_space(SPACE)),
        trials=trials,
        out_dir=str(out),
        pruner=pruner,
        prune_startup_trials=4,
        prune_warmup_steps=2 * EVAL_EVERY,
        seed=0,
        startup_trials=10,
    )

    def show(row) -> None:
        print(
            f"  [{pruner}] trial {row.number}: {row.state.lower()} {row.value} at step {row.last_step} in {row.seconds}s",
            flush=True,
        )

    started = time.perf_counter()
    result = run_sweep(spec, cache_dir=cache, on_trial=show)
    if result.stopped_by:
        raise SystemExit(f"stopped by {result.stopped_by}; no result written")
    wall = time.perf_counter() - started
    states = [r.state for r in result.rows]
    return {
        "pruner": pruner,
        "wall_s": round(wall, 1),
        "steps_trained": sum(r.last_step or 0 for r in result.rows),
        "steps_if_all_complete": STEPS * len(result.rows),
        "complete": states.count("COMPLETE"),
        "pruned": states.count("PRUNED"),
        "failed": states.count("FAIL"),
        "best_val_loss": result.best.value if result.best else None,
        "best_trial": result.best.number if result.best else None,
        "best_params": result.best.params if result.best else None,
        "trials": [
            {
                "number": r.number,
                "state": r.state,
                "value": r.value,
                "last_step": r.last_step,
                "params": r.params,
                "seconds": r.seconds,
            }
            for r in result.rows
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument(
        "--keep", default=None, help="keep the sweep folders here (default: a temporary folder)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        cfg = config(root)
        cache = root / "cache"
        prepare_data_once(yaml.safe_load(cfg.read_text()), cache, root / "prepare.lock")  # once, for both
        # Both sweeps run at the same time, so both see the same load on a shared machine (when the pruned one
        # finishes first, the other gets the machine to itself: that favours the unpruned sweep).
        results: dict[str, dict] = {}
        threads = [
            threading.Thread(
                target=lambda p=p: results.update(
                    {p: one_sweep(cfg, root / p, cache, pruner=p, trials=args.trials)}
                )
            )
            for p in ("median", "none")
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        pruned, unpruned = results["median"], results["none"]
    result = {
        "claim": "median pruning makes the same 20-trial sweep cheaper without a worse best validation loss",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "note": "The machine was shared with other jobs (up to 8 helpers on 2 cores), so wall times are noisy; "
        "steps_trained counts the work itself. The two sweeps ran at the same time (each one trial at a "
        "time), so both met the same load; each trial is a separate `lmforge train` process (about 4 s of "
        "start-up on a quiet core, which pruning cannot save).",
        "setup": {
            "data": "tinyshakespeare.txt, char tokenizer, 10% validation",
            "model": "d_model 64, 4 heads, ffn 192, n_layers searched (1 or 2)",
            "train": f"{STEPS} steps of 8 x 64 tokens, val_loss every {EVAL_EVERY} steps (4 batches)",
            "space": SPACE,
            "sampler": "TPE, seed 0, 10 random startup trials",
            "pruner": f"median (after 4 finished trials, not before step {2 * EVAL_EVERY}) vs none",
        },
        "pruned": pruned,
        "unpruned": unpruned,
        "wall_ratio": round(pruned["wall_s"] / unpruned["wall_s"], 3),
        "steps_ratio": round(pruned["steps_trained"] / unpruned["steps_trained"], 3),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    for run in (pruned, unpruned):
        print(
            f"{run['pruner']:>6}: {run['wall_s']:.0f} s, {run['steps_trained']} steps, {run['pruned']} pruned, "
            f"best val_loss {run['best_val_loss']:.4f} (trial {run['best_trial']})"
        )
    print(f"wall ratio {result['wall_ratio']}, steps ratio {result['steps_ratio']}; wrote {RESULTS}")


if __name__ == "__main__":
    main()
