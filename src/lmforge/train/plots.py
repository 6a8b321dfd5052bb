"""Loss curves: the training and validation loss of one or more runs, overlaid in one PNG."""

from __future__ import annotations

import math
import os
from pathlib import Path

from lmforge.errors import DataError
from lmforge.train.metrics import read_metrics


def plot_runs(run_dirs: list[str | Path], out_path: str | Path | None = None) -> Path:
    """Training and validation loss of one or more runs against tokens seen, overlaid in one PNG at
    ``out_path`` (default: RUN/loss.png for one run, loss.png for several). Returns the PNG's path."""
    missing = [r for r in run_dirs if not (Path(r) / "metrics.jsonl").is_file()]
    if missing:
        raise DataError(f"{missing[0]}: no metrics.jsonl (not an lmforge run folder)")
    if out_path is None:
        out_path = Path(run_dirs[0]) / "loss.png" if len(run_dirs) == 1 else Path("loss.png")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_path = Path(out_path)
    fig, ax = plt.subplots(figsize=(8, 5))
    for run_dir in run_dirs:
        records = read_metrics(run_dir)
        name = Path(run_dir).name
        train = [r for r in records if "loss" in r and math.isfinite(r["loss"])]
        val = [r for r in records if "val_loss" in r]
        x_key = "tokens" if train and all("tokens" in r for r in train + val) else "step"
        if train:
            (line,) = ax.plot([r[x_key] for r in train], [r["loss"] for r in train], label=f"{name} train")
            color = line.get_color()
        else:
            color = None
        if val:
            ax.plot(
                [r[x_key] for r in val], [r["val_loss"] for r in val], "o--", color=color, label=f"{name} val"
            )
    ax.set_xlabel("tokens seen" if x_key == "tokens" else "step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f"{out_path.stem}.tmp-{os.getpid()}{out_path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_path)
    return out_path
