"""Loss curves: the training and validation loss of one or more runs, overlaid in one PNG."""

from __future__ import annotations

import math
from pathlib import Path

from lmforge.errors import DataError
from lmforge.files import save_figure_atomic
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
    return save_figure_atomic(fig, out_path)


def plot_expert_load(run_dir: str | Path, out_path: str | Path | None = None) -> Path | None:
    """A Mixture-of-Experts run's routing balance against step: each MoE layer's most loaded expert over the
    mean (1 is perfectly balanced) and the fraction of assignments dropped by the capacity limit, as a PNG at
    ``out_path`` (default RUN/expert_load.png). None when the run logged no expert load (a dense model)."""
    records = [r for r in read_metrics(run_dir) if "moe_load_max_mean" in r]
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_path = Path(out_path) if out_path is not None else Path(run_dir) / "expert_load.png"
    layers = sorted(
        {k for r in records for k in r if k.startswith("moe_load_max_mean/")},
        key=lambda k: int(k.rsplit("layer", 1)[1]),
    )
    fig, (load_ax, drop_ax) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for key in layers:
        rows = [r for r in records if key in r]
        load_ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=key.split("/")[1])
    load_ax.axhline(1.0, color="gray", lw=0.8, ls=":")
    load_ax.set_ylabel("tokens per expert, max / mean")
    load_ax.grid(alpha=0.3)
    load_ax.legend(fontsize="small", ncol=4)
    drop_ax.plot([r["step"] for r in records], [r["moe_dropped_frac"] for r in records], color="tab:red")
    drop_ax.set_ylabel("assignments dropped")
    drop_ax.set_xlabel("step")
    drop_ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure_atomic(fig, out_path)
