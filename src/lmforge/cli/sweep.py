"""``lmforge sweep``: hyperparameter search, each trial a real ``lmforge train`` run."""

from __future__ import annotations

import sys

# -- sweep ------------------------------------------------------------------------------------------------------


def add_sweep(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="search hyperparameters with Optuna (TPE, pruning); each trial is an `lmforge train` run",
        description="Search any config keys; each trial trains in SWEEP/trials/NNNN in its own process. "
        "Running the same command again continues a stopped sweep.",
    )
    p.add_argument(
        "items", nargs="*", metavar="CONFIG [overrides]", help="a YAML config, then dotted overrides"
    )
    p.add_argument(
        "--space",
        action="append",
        default=[],
        required=True,
        metavar="SPEC",
        help="KEY=KIND(ARGS): uniform(a,b), loguniform(a,b), int(a,b[,step]), logint(a,b), choice(v1,...); "
        "repeat it, separate entries with ';', or name a YAML file of KEY: KIND(ARGS)",
    )
    p.add_argument(
        "--trials", type=int, required=True, help="trials in the study in all (failed/pruned count)"
    )
    p.add_argument("--objective", default="val_loss", help="the logged value to optimise (default: val_loss)")
    p.add_argument("--direction", default="minimize", choices=("minimize", "maximize"))
    p.add_argument("--out", default=None, help="the sweep folder (default: sweeps/<config name>)")
    p.add_argument(
        "--storage",
        default=None,
        help="an Optuna database URL shared by several workers (default: SWEEP/study.db)",
    )
    p.add_argument("--study", default=None, help="the study's name in --storage (default: the folder's name)")
    p.add_argument("--workers", type=int, default=1, help="trials this process runs at once")
    p.add_argument("--pruner", default="median", choices=("median", "halving", "none"))
    p.add_argument(
        "--prune-warmup", type=int, default=0, metavar="STEPS", help="never prune before this step"
    )
    p.add_argument(
        "--prune-startup",
        type=int,
        default=5,
        metavar="N",
        help="median: prune only once N trials have finished",
    )
    p.add_argument("--seed", type=int, default=0, help="the TPE sampler's seed")
    p.add_argument(
        "--startup-trials", type=int, default=10, help="random trials before TPE models the results"
    )
    p.add_argument(
        "--transfer-width",
        type=int,
        nargs="+",
        default=[],
        metavar="D",
        help="muP (model.mup=true): also write SWEEP/best_dD.yaml, the best hyperparameters at model.d_model=D",
    )
    p.add_argument(
        "--slurm",
        default=None,
        metavar="FILE",
        help="write a Slurm array script of sweep workers to FILE (needs --storage)",
    )
    p.add_argument(
        "--slurm-tasks", type=int, default=4, help="array tasks: sweep processes sharing the study"
    )
    p.add_argument("--slurm-time", default="24:00:00", help="Slurm time limit of each task")
    p.add_argument("--slurm-partition", default=None, help="Slurm partition")
    p.add_argument("--gpus-per-task", type=int, default=0, help="Slurm --gpus-per-task (0: none)")


def spec_from_args(args):
    """The SweepSpec the command line describes (the space parsed and checked)."""
    from pathlib import Path

    from lmforge.auto.space import parse_space
    from lmforge.auto.sweep import SweepSpec
    from lmforge.errors import ConfigError

    items = list(args.items)
    if not items or "=" in items[0]:
        raise ConfigError(
            "lmforge sweep needs a CONFIG file first (e.g. lmforge sweep configs/demo.yaml --space ...)"
        )
    return SweepSpec(
        config=items[0],
        overrides=tuple(items[1:]),
        space=tuple(parse_space(args.space)),
        trials=args.trials,
        out_dir=args.out or str(Path("sweeps") / Path(items[0]).stem),
        objective=args.objective,
        direction=args.direction,
        storage=args.storage,
        study_name=args.study,
        workers=args.workers,
        pruner=args.pruner,
        prune_warmup_steps=args.prune_warmup,
        prune_startup_trials=args.prune_startup,
        seed=args.seed,
        startup_trials=args.startup_trials,
    )


def run_sweep(args) -> int:
    import logging
    import signal
    from pathlib import Path

    from lmforge.auto.report import format_table
    from lmforge.auto.sweep import require_optuna, slurm_array_script
    from lmforge.auto.sweep import run_sweep as sweep
    from lmforge.cli.train import _cache_dir
    from lmforge.files import write_text_atomic

    spec = spec_from_args(args)
    widths = tuple(args.transfer_width)
    if args.slurm:
        script = slurm_array_script(
            spec,
            tasks=args.slurm_tasks,
            transfer_widths=widths,
            time_limit=args.slurm_time,
            gpus_per_task=args.gpus_per_task,
            partition=args.slurm_partition,
        )
        write_text_atomic(Path(args.slurm), script)
        print(
            f"wrote {args.slurm}: {args.slurm_tasks} sweep workers on one study; submit it with: sbatch {args.slurm}"
        )
        return 0
    require_optuna().logging.set_verbosity(logging.WARNING)  # our own line per trial instead of Optuna's

    def on_trial(row) -> None:
        value = "" if row.value is None else f" {spec.objective} {row.value:.4f}"
        note = f" ({row.reason})" if row.reason else ""
        print(f"trial {row.number}: {row.state.lower()}{value} in {row.seconds or 0:.0f}s{note}", flush=True)

    result = sweep(spec, cache_dir=_cache_dir(), on_trial=on_trial, transfer_widths=widths)
    print(format_table(result.rows, spec.space, spec.objective))
    if result.best is not None:
        params = ", ".join(f"{k}={v}" for k, v in result.best.params.items())
        print(f"best: trial {result.best.number}, {spec.objective} {result.best.value:.4f} ({params})")
    else:
        print("best: no trial has completed yet", file=sys.stderr)
    for name, path in result.files.items():
        print(f"wrote {path}" if name != "table" else f"wrote {path} (the table above)")
    print(f"study '{result.study_name}' in {result.storage}: run the same command again to continue it")
    if result.stopped_by:
        return 128 + int(getattr(signal, result.stopped_by))
    return 0
