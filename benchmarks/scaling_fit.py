"""Goal (not met at this scale; see docs/planning.md): a scaling law fitted by ``lmforge scale`` on small runs
predicts the final validation loss of a larger held-out run (more parameters and more tokens than any
fitted run) within 3%, and the measured loss lies inside the bootstrap interval.

Character-level tinyshakespeare (../shared/data), the real `lmforge train` pipeline (char tokenizer,
prepared shards, 5% validation split, the whole split evaluated at the end). Grid: 4 widths of 3 layers (d_model
32/48/64/96, head size 16, SwiGLU hidden 3 x d_model) x 250K/500K/1M tokens, each run's cosine schedule
(lr 3e-3 -> 3e-4, 5% warmup) ending at its own budget; held out: d_model 128, 3 layers, 1.5M tokens. The fit is Chinchilla
approach 3 with 200 bootstrap refits. Writes benchmarks/results/scaling_fit.json and scaling_fit.png.
Run: python benchmarks/scaling_fit.py [--work DIR] (re-running continues the grid where it stopped; use a
fresh --work for other --tokens/--lr, since the run folders are named by model and budget only).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch
import yaml

from lmforge.auto.scale import load_grid, read_run, run_grid, scale
from lmforge.auto.scale_report import plot_fit, render_table

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data" / "tinyshakespeare.txt"
RESULTS = ROOT / "benchmarks" / "results"
COMMON = [
    f"data.sources=[{DATA.resolve()}]",
    "data.tokenizer=char",
    "data.val_fraction=0.05",
    "model.preset=tiny",
    "model.max_seq_len=64",
    "model.dropout=0.0",
    "train.seq_len=64",
    "train.micro_batch=16",
    "train.schedule=cosine",
    "train.eval_batches=50",
    "train.log_every=100",
    "train.precision=fp32",
    "train.device=cpu",
]


def shape(d_model: int, n_layers: int) -> dict:
    return {"d_model": d_model, "n_layers": n_layers, "n_heads": d_model // 16, "ffn_hidden": 3 * d_model}


MODELS = [shape(32, 3), shape(48, 3), shape(64, 3), shape(96, 3)]  # one family: 3 layers
HELD_OUT_MODEL = shape(128, 3)


def grids(tokens: list[str], held_out_tokens: str, lr: float) -> tuple[dict, dict]:
    """The fitted grid and the held-out run, as grid specs; cosine from lr to lr/10, 5% warmup."""
    common = [*COMMON, f"train.lr={lr}", f"train.min_lr={lr / 10}"]
    grid = {"overrides": common, "models": MODELS, "tokens": tokens, "warmup_fraction": 0.05}
    held_out = {**grid, "models": [HELD_OUT_MODEL], "tokens": [held_out_tokens]}
    return grid, held_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--work", default="/tmp/lmforge-scaling-fit", help="where the runs go (kept: re-runs continue)"
    )
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--tokens", default="250K,500K,1M", help="the grid's token budgets")
    parser.add_argument("--held-out-tokens", default="1.5M", help="the held-out run's tokens")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of every run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    if not DATA.is_file():
        raise SystemExit(f"{DATA} not found: the shared data folder is needed for this benchmark")
    torch.set_num_threads(args.threads)  # on a CPU shared with other jobs, one thread loses least to waiting
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    grid, held_out = grids(args.tokens.split(","), args.held_out_tokens, args.lr)
    (work / "grid.yaml").write_text(yaml.safe_dump(grid))
    (work / "held_out.yaml").write_text(yaml.safe_dump(held_out))
    load_start = os.getloadavg()
    started = time.perf_counter()
    result = scale(work / "grid.yaml", work / "scale", bootstrap=args.bootstrap, cache_dir=work / "cache")
    grid_seconds = time.perf_counter() - started
    print(render_table(result), flush=True)
    started = time.perf_counter()
    held = run_grid(load_grid(work / "held_out.yaml"), work / "held_out", cache_dir=work / "cache")[0]
    held_seconds = time.perf_counter() - started
    predicted, interval = result.fit.predict(held.params, held.tokens)
    error = predicted / held.loss - 1.0
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = plot_fit(result.fit, result.runs, RESULTS / "scaling_fit.png", held_out=[held])
    fitted = [read_run(r.run_dir) for r in result.runs]
    out = {
        "claim": f"fit on {len(result.runs)} small runs predicts a larger held-out run's final validation loss within 3%",
        "held_out": {
            **held.to_dict(),
            "predicted_loss": predicted,
            "interval_95": interval,
            "relative_error": error,
            "within_3_percent": abs(error) <= 0.03,
            "inside_interval": interval is not None and interval[0] <= held.loss <= interval[1],
            "times_largest_fitted_N": held.params / max(r.params for r in fitted),
            "times_largest_fitted_D": held.tokens / max(r.tokens for r in fitted),
        },
        "fit": result.fit.to_dict(),
        "grid": grid,
        "held_out_grid": held_out,
        "wall_seconds": {"grid_and_fit": grid_seconds, "held_out": held_seconds},
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": load_start,
        "load_average_at_end": os.getloadavg(),
        "machine": "2 CPU cores shared with other jobs (load averages above); wall times are not speeds",
        "plot": str(png.relative_to(ROOT)),
        "command": "python benchmarks/scaling_fit.py "
        f"--tokens {args.tokens} --held-out-tokens {args.held_out_tokens} --lr {args.lr}",
    }
    (RESULTS / "scaling_fit.json").write_text(json.dumps(out, indent=2) + "\n")
    shutil.copy(work / "scale" / "fit.md", work / "fit.md")
    print(
        f"held out {held.run_dir.name}: N={held.params:,} D={held.tokens:,} measured {held.loss:.4f}, "
        f"predicted {predicted:.4f} [{interval[0]:.4f}, {interval[1]:.4f}] ({100 * error:+.2f}%); "
        f"grid {grid_seconds:.0f}s + held out {held_seconds:.0f}s",
        flush=True,
    )
    print(f"wrote {RESULTS / 'scaling_fit.json'} and {png}")


if __name__ == "__main__":
    main()
