"""``lmforge scale``: a grid of runs -> the scaling law L(N, D) -> the model and tokens for a budget."""

from __future__ import annotations

import json

# -- scale ----------------------------------------------------------------------------------------------------


def add_scale(sub) -> None:
    p = sub.add_parser(
        "scale",
        help="train a grid of model sizes x token budgets, fit L(N, D) and recommend a model for a budget",
    )
    p.add_argument("grid", nargs="?", default=None, help="a grid spec (YAML: models, tokens, base config)")
    p.add_argument(
        "--out", default="runs/scale", help="the scale folder: runs/, fit.json, plots (runs/scale)"
    )
    p.add_argument("--runs", nargs="*", default=[], help="finished run or scale folders to fit as well")
    p.add_argument("--compute", default=None, help="a compute budget in FLOPs, e.g. 1e21")
    p.add_argument("--gpu-hours", type=float, default=None, help="a budget in GPU-hours of --gpu")
    p.add_argument(
        "--gpu", default="H100-80GB", help="the device of the budget and the plan (h100, A100-80GB...)"
    )
    p.add_argument("--gpus", type=int, default=8, help="GPUs the plan uses (default 8)")
    p.add_argument("--seq", type=int, default=None, help="sequence length of the plan (default: the model's)")
    p.add_argument("--global-batch-tokens", default=None, help="tokens per step of the plan (default: auto)")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--hardware-file", default=None, help="a YAML file adding or changing hardware entries")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap refits for intervals (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    p.add_argument("--json", action="store_true", help="print fit.json instead of the table")


def run_scale(args) -> int:
    from lmforge.auto.scale import scale
    from lmforge.auto.scale_report import Budget, render_table
    from lmforge.cli.plan import _count
    from lmforge.cli.train import _cache_dir

    budget = None
    if args.compute is not None or args.gpu_hours is not None:
        budget = Budget(
            compute=None if args.compute is None else float(_count("--compute", args.compute)),
            gpu_hours=args.gpu_hours,
            gpu=args.gpu,
            gpus=args.gpus,
            seq_len=args.seq,
            global_batch_tokens=_count("--global-batch-tokens", args.global_batch_tokens),
            precision=args.precision,
            hardware_file=args.hardware_file,
        )
    result = scale(
        args.grid,
        args.out,
        run_folders=args.runs,
        bootstrap=args.bootstrap,
        seed=args.seed,
        budget=budget,
        cache_dir=_cache_dir(),
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(render_table(result))
        print("\nwrote " + ", ".join(str(p) for p in result.files))
    return 0
