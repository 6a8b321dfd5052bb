"""What ``lmforge scale`` shows: the recommendation for a budget (through the planner), the table, the plots."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.config import ModelConfig
from lmforge.errors import ConfigError
from lmforge.files import save_figure_atomic
from lmforge.plan.scaling import Fit, compute_of_gpu_hours, non_embedding_params, shape_near


@dataclass(frozen=True, kw_only=True)
class Budget:
    """A training budget: FLOPs, or GPU-hours of a device (converted at the planner's peak x efficiency);
    and the cluster and batch the plan for it uses."""

    compute: float | None = None
    gpu_hours: float | None = None
    gpu: str = "H100-80GB"
    gpus: int = 8
    seq_len: int | None = None  # None: the fitted runs' model context
    global_batch_tokens: int | None = None  # None: ~2000 steps, at most 4M tokens a step
    precision: str = "bf16"
    hardware_file: str | None = None

    def problems(self) -> list[str]:
        out = []
        if (self.compute is None) == (self.gpu_hours is None):
            out.append("give exactly one budget: --compute FLOPS or --gpu-hours H")
        for name in ("compute", "gpu_hours"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                out.append(f"--{name.replace('_', '-')}={value} must be a positive number")
        if self.gpus < 1:
            out.append(f"--gpus={self.gpus} must be >= 1")
        return out


def check_budget(budget: Budget):
    """The budget's problems as one ConfigError, else its hardware entry (checked before any run trains)."""
    from lmforge.plan.hardware import resolve_hardware

    problems = budget.problems()
    if problems:
        raise ConfigError("invalid budget:\n  " + "\n  ".join(problems))
    return resolve_hardware(budget.gpu, budget.hardware_file)


def _interval(pair) -> list[float] | None:
    return None if pair is None else [float(pair[0]), float(pair[1])]


def recommend(fit: Fit, budget: Budget, base: ModelConfig) -> dict:
    """N, D and the loss on the compute-optimal frontier at the budget (with intervals), the nearest model
    shape of ``base``'s family, the loss predicted for that shape, and the plan of training it."""
    from lmforge.plan.hardware import lookup_interconnect
    from lmforge.plan.planner import Cluster, Workload, plan_cluster
    from lmforge.plan.report import render_report

    hardware = check_budget(budget)
    if budget.compute is not None:
        compute, source = budget.compute, f"{budget.compute:.3g} FLOPs"
    else:
        peak = hardware.fp32_tflops * 1e12 if budget.precision == "fp32" else hardware.peak_flops
        compute = compute_of_gpu_hours(budget.gpu_hours, peak, hardware.compute_efficiency)
        source = (
            f"{budget.gpu_hours:g} {hardware.name} GPU-hours x {peak / 1e12:g} TFLOP/s peak x "
            f"{hardware.compute_efficiency:g} compute efficiency (the planner's assumption) = {compute:.3g} FLOPs"
        )
    frontier = fit.frontier(compute)
    aspect = base.d_model / base.n_layers
    shape = shape_near(base, frontier["params"], aspect)
    n_shape = non_embedding_params(shape)
    tokens = compute / (6.0 * n_shape)  # keep C = 6 N D with the shape's own N
    loss, loss_interval = fit.predict(n_shape, tokens)
    seq = budget.seq_len or base.max_seq_len
    batch = budget.global_batch_tokens or int(min(4 * 2**20, max(seq, tokens / 2000)))
    batch = max(seq, seq * round(batch / seq))
    report = plan_cluster(
        shape,
        Cluster(
            hardware=hardware,
            gpus=budget.gpus,
            gpus_per_node=min(8, budget.gpus),
            interconnect=lookup_interconnect("infiniband"),
        ),
        Workload(
            seq_len=seq, global_batch_tokens=batch, total_tokens=int(tokens), precision=budget.precision
        ),
    )
    overrides = (
        f"model.d_model={shape.d_model} model.n_layers={shape.n_layers} model.n_heads={shape.n_heads}"
        + (f" model.ffn_hidden={shape.ffn_hidden}" if shape.ffn_hidden is not None else "")
    )
    return {
        "budget": source,
        "compute": compute,
        "frontier": {k: (_interval(v) if k.endswith("_interval") else v) for k, v in frontier.items()},
        "shape": {
            "d_model": shape.d_model,
            "n_layers": shape.n_layers,
            "n_heads": shape.n_heads,
            "ffn_hidden": shape.hidden_dim,
            "non_embedding_params": n_shape,
            "total_params": report.parameters,
        },
        "tokens": int(tokens),
        "predicted_loss": loss,
        "predicted_loss_interval": _interval(loss_interval),
        "plan_command": f"lmforge plan --model {base.preset or 'CONFIG'} {overrides} --gpu {hardware.name} "
        f"--gpus {budget.gpus} --seq {seq} --global-batch-tokens {batch} --tokens {int(tokens)}",
        "plan": report.to_dict(),
        "plan_text": render_report(report),
    }


def _fmt_interval(pair, fmt: str = ".4g") -> str:
    return "" if pair is None else f" [{pair[0]:{fmt}}, {pair[1]:{fmt}}]"


def _hours(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def render_table(result) -> str:
    """The runs, the fitted parameters with their intervals, and the recommendation, as text."""
    fit = result.fit
    lines = [f"{'run':<28} {'N (non-emb.)':>13} {'D (tokens)':>12} {'val loss':>9} {'fit':>8} {'resid':>7}"]
    for run in result.runs:
        fitted = float(fit.law.loss(run.params, run.tokens))
        lines.append(
            f"{run.run_dir.name:<28} {run.params:>13,} {run.tokens:>12,} {run.loss:>9.4f} {fitted:>8.4f} "
            f"{100 * (fitted / run.loss - 1):>+6.2f}%"
        )
    level = f"{100 * fit.confidence:.0f}%"
    lines += [
        "",
        f"L(N, D) = E + A / N^alpha + B / D^beta   ({len(fit.boot)} bootstrap refits, {level} intervals)",
    ]
    for name in ("E", "A", "B", "alpha", "beta"):
        lines.append(f"  {name:<6} {getattr(fit.law, name):>10.4g}{_fmt_interval(fit.interval(name))}")
    lines.append(
        f"  compute-optimal: N_opt ~ C^{fit.law.beta / (fit.law.alpha + fit.law.beta):.3f}, "
        f"D_opt ~ C^{fit.law.alpha / (fit.law.alpha + fit.law.beta):.3f} (C = 6 N D)"
    )
    rec = result.recommendation
    if rec is not None:
        front, shape = rec["frontier"], rec["shape"]
        lines += [
            "",
            f"budget     {rec['budget']}",
            f"optimal    N = {front['params']:.4g}{_fmt_interval(front.get('params_interval'))} non-embedding "
            f"parameters, D = {front['tokens']:.4g}{_fmt_interval(front.get('tokens_interval'))} tokens, "
            f"loss {front['loss']:.4f}{_fmt_interval(front.get('loss_interval'))}",
            f"model      d_model {shape['d_model']}, {shape['n_layers']} layers, {shape['n_heads']} heads, "
            f"FFN {shape['ffn_hidden']}: {shape['non_embedding_params']:,} non-embedding parameters "
            f"({shape['total_params']:,} in all)",
            f"train      {rec['tokens']:,} tokens; predicted validation loss {rec['predicted_loss']:.4f}"
            f"{_fmt_interval(rec['predicted_loss_interval'])}",
            f"plan       {rec['plan_command']}",
            f"           the planner's time model: {_hours(rec['plan']['gpu_hours'])} GPU-hours on "
            f"{rec['plan']['gpus']} x {rec['plan']['hardware']['name']}",
            "",
            rec["plan_text"],
        ]
    return "\n".join(lines)


def plot_fit(fit: Fit, runs, path: Path, *, budget: dict | None = None, held_out=()) -> Path:
    """Two panels: loss against tokens per model size (measured points, fitted curves; ``held_out`` runs
    as stars with their predicted curve, dashed), and the compute-optimal N_opt(C) and D_opt(C) with their
    bootstrap bands. Returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    sizes = sorted({r.params for r in runs})
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(sizes)))
    d_all = np.array([r.tokens for r in runs], dtype=float)
    d_max = max([d_all.max(), *(r.tokens for r in held_out)])
    grid_d = np.geomspace(d_all.min() / 1.5, d_max * 1.5, 100)
    for n, color in zip(sizes, colors):
        mine = [r for r in runs if r.params == n]
        left.scatter([r.tokens for r in mine], [r.loss for r in mine], color=color, zorder=3)
        left.plot(grid_d, fit.law.loss(n, grid_d), color=color, label=f"N={n:,}")
    for run in held_out:
        line = left.plot(grid_d, fit.law.loss(run.params, grid_d), "k--", label=f"held out N={run.params:,}")
        left.scatter([run.tokens], [run.loss], marker="*", s=120, color=line[0].get_color(), zorder=3)
    left.set_xscale("log")
    left.set_xlabel("tokens D")
    left.set_ylabel("validation loss")
    left.set_title("runs (points) and the fitted law (lines)")
    left.legend(fontsize=7)
    c_runs = 6.0 * np.array([r.params for r in runs], dtype=float) * d_all
    c_hi = max(c_runs.max() * 10, budget["compute"] * 2 if budget else 0)
    grid_c = np.geomspace(c_runs.min() / 2, c_hi, 100)
    for of, label in (("optimal_params", "N_opt"), ("optimal_tokens", "D_opt")):
        line = right.plot(grid_c, getattr(fit.law, of)(grid_c), label=label)[0]
        if fit.boot:
            values = np.array([getattr(law, of)(grid_c) for law in fit.boot])
            tail = 100 * (1 - fit.confidence) / 2
            lo, hi = np.nanpercentile(values, [tail, 100 - tail], axis=0)
            right.fill_between(grid_c, lo, hi, color=line.get_color(), alpha=0.2)
    right.scatter(c_runs, [r.params for r in runs], s=12, color="k", label="runs (C, N)")
    if budget is not None:
        right.axvline(budget["compute"], color="grey", linestyle="--", label="budget")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("compute C = 6 N D (FLOPs)")
    right.set_title("compute-optimal frontier")
    right.legend(fontsize=7)
    fig.tight_layout()
    return save_figure_atomic(fig, path, dpi=90)
