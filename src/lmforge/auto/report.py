"""What a sweep leaves beside its trials: ``trials.csv``, ``best.yaml`` (ready for ``lmforge train``),
``best_d{WIDTH}.yaml`` (muP transfer), and three plots: the optimisation history, the objective against
each parameter, and every trial's validation curve (pruned ones dashed)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import yaml

from lmforge.auto.space import Param, with_values
from lmforge.auto.transfer import transfer_config
from lmforge.files import save_figure_atomic, write_text_atomic


def best_row(rows: list, direction: str):
    """The complete trial with the best final value (None before one completes)."""
    done = [r for r in rows if r.state == "COMPLETE" and r.value is not None and math.isfinite(r.value)]
    if not done:
        return None
    if direction == "minimize":
        return min(done, key=lambda r: (r.value, r.number))  # a tie goes to the earlier trial
    return max(done, key=lambda r: (r.value, -r.number))


def _value_text(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(rows: list, space: tuple[Param, ...], objective: str) -> str:
    """The trials as an aligned text table: number, state, objective, seconds, each parameter, reason."""
    header = ["#", "state", objective, "steps", "seconds", *[p.key for p in space], "note"]
    lines = [header]
    for r in rows:
        lines.append(
            [
                str(r.number),
                r.state.lower(),
                "" if r.value is None else f"{r.value:.4f}",
                "" if r.last_step is None else str(r.last_step),
                "" if r.seconds is None else f"{r.seconds:.1f}",
                *[_value_text(r.params[p.key]) if p.key in r.params else "" for p in space],
                (r.reason[:60] + "...") if len(r.reason) > 63 else r.reason,
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def trials_csv(rows: list, space: tuple[Param, ...], objective: str) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["number", "state", objective, "last_step", "seconds", *[p.key for p in space], "reason"])
    for r in rows:
        writer.writerow(
            [
                r.number,
                r.state,
                r.value,
                r.last_step,
                r.seconds,
                *[r.params.get(p.key) for p in space],
                r.reason,
            ]
        )
    return out.getvalue()


def best_yaml(data: dict, best, objective: str, note: str = "") -> str:
    """CONFIG with the best trial's values, as YAML ``lmforge train`` reads (the config's own out_dir)."""
    head = f"# best of the sweep: trial {best.number}, {objective} {best.value:.6g}{note}\n"
    head += "".join(f"#   {key} = {_value_text(value)}\n" for key, value in best.params.items())
    return head + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def write_report(spec, data: dict, rows: list, *, transfer_widths: tuple[int, ...] = ()) -> dict[str, Path]:
    """Write the table, the best config(s) and the plots into the sweep folder; returns what it wrote."""
    out = Path(spec.out_dir)
    files = {"table": out / "trials.csv"}
    write_text_atomic(files["table"], trials_csv(rows, spec.space, spec.objective))
    best = best_row(rows, spec.direction)
    if best is not None:
        tuned = with_values(data, best.params)
        files["best"] = out / "best.yaml"
        write_text_atomic(files["best"], best_yaml(tuned, best, spec.objective))
        for width in transfer_widths:
            path = out / f"best_d{width}.yaml"
            width_note = f"; muP transfer to model.d_model={width}"
            write_text_atomic(
                path, best_yaml(transfer_config(tuned, width), best, spec.objective, width_note)
            )
            files[f"best_d{width}"] = path
    if rows:
        files.update(plot_sweep(rows, spec.space, spec.objective, spec.direction, out))
    return files


# -- plots ------------------------------------------------------------------------------------------------------


def _shown(rows: list) -> list:
    """Trials with a finite value to draw (complete ones, and pruned ones at their last reported value)."""
    return [
        r
        for r in rows
        if r.state in ("COMPLETE", "PRUNED") and r.value is not None and math.isfinite(r.value)
    ]


def plot_sweep(
    rows: list, space: tuple[Param, ...], objective: str, direction: str, out: Path
) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = _shown(rows)
    files = {}
    complete = [r for r in shown if r.state == "COMPLETE"]
    pruned = [r for r in shown if r.state == "PRUNED"]

    # Optimisation history: each trial's value, and the best so far.
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.scatter(
        [r.number for r in complete], [r.value for r in complete], label="complete", color="C0", zorder=3
    )
    ax.scatter(
        [r.number for r in pruned],
        [r.value for r in pruned],
        label="pruned (last value)",
        color="C1",
        marker="x",
    )
    failed = [r.number for r in rows if r.state == "FAIL"]
    if failed:
        for number in failed:
            ax.axvline(number, color="C3", alpha=0.25, lw=1)
        ax.plot([], [], color="C3", alpha=0.4, label="failed")
    best, best_so_far = None, []
    for r in sorted(complete, key=lambda r: r.number):
        if best is None or (r.value < best if direction == "minimize" else r.value > best):
            best = r.value
        best_so_far.append((r.number, best))
    if best_so_far:
        ax.step(*zip(*best_so_far), where="post", color="C2", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(objective)
    ax.set_title("optimisation history")
    ax.legend()
    fig.tight_layout()
    files["history_plot"] = save_figure_atomic(fig, out / "history.png")

    # The objective against each parameter.
    cols = min(3, len(space))
    nrows = math.ceil(len(space) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for ax, param in zip(axes.flat, space):
        for group, style in ((complete, {"color": "C0"}), (pruned, {"color": "C1", "marker": "x"})):
            points = [(r.params[param.key], r.value) for r in group if param.key in r.params]
            if param.kind == "choice":
                labels = [str(c) for c in param.choices]
                points = [(labels.index(str(x)), y) for x, y in points]
            if points:
                ax.scatter(*zip(*points), **style)
        if param.kind == "choice":
            ax.set_xticks(range(len(param.choices)), [str(c) for c in param.choices])
        elif param.log:
            ax.set_xscale("log")
        ax.set_xlabel(param.key)
        ax.set_ylabel(objective)
    for ax in list(axes.flat)[len(space) :]:
        ax.set_visible(False)
    fig.suptitle(f"{objective} against each parameter (x: pruned, at its last value)")
    fig.tight_layout()
    files["params_plot"] = save_figure_atomic(fig, out / "params.png")

    # Every trial's reported values against the step.
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in shown:
        if r.curve:
            steps, values = zip(*r.curve)
            kwargs = (
                {"color": "C0", "alpha": 0.8}
                if r.state == "COMPLETE"
                else {"color": "C1", "ls": "--", "alpha": 0.6}
            )
            ax.plot(steps, values, lw=1, **kwargs)
    ax.plot([], [], color="C0", label="complete")
    ax.plot([], [], color="C1", ls="--", label="pruned")
    finite = [v for r in shown for _, v in r.curve if math.isfinite(v)]
    if finite:  # a diverged trial's values would flatten the others
        low, high = min(finite), sorted(finite)[max(0, int(0.9 * len(finite)) - 1)]
        ax.set_ylim(low - 0.05 * (high - low + 1e-9), high + 0.3 * (high - low + 1e-9))
    ax.set_xlabel("step")
    ax.set_ylabel(objective)
    ax.set_title("trials' curves")
    ax.legend()
    fig.tight_layout()
    files["curves_plot"] = save_figure_atomic(fig, out / "curves.png")
    return files
