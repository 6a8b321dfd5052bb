"""``lmforge launch`` and ``consolidate``: runs on several processes and machines."""

from __future__ import annotations

# -- launch / consolidate (distributed) ---------------------------------------------------------------------


def add_launch(sub) -> None:
    p = sub.add_parser(
        "launch", help="run `lmforge train` on N processes / nodes through torchrun, or write a Slurm script"
    )
    p.add_argument("items", nargs="*", metavar="[CONFIG] [overrides]", help="as for `lmforge train`")
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes per node (GPUs per node)")
    p.add_argument("--nnodes", type=int, default=1, help="number of nodes")
    p.add_argument(
        "--rdzv-endpoint", default=None, help="HOST:PORT where the nodes meet (one node's address)"
    )
    p.add_argument("--rdzv-id", default="lmforge", help="a job id shared by all nodes")
    p.add_argument("--rdzv-timeout", type=float, default=120.0, help="seconds to wait for the endpoint/nodes")
    p.add_argument("--max-restarts", type=int, default=0, help="restart the group after a failure (resumes)")
    p.add_argument("--resume", default=None, help="passed to `lmforge train` (default with restarts: auto)")
    p.add_argument("--no-progress", action="store_true", help="passed to `lmforge train`")
    p.add_argument("--dry-run", action="store_true", help="print the torchrun command instead of running it")
    p.add_argument("--slurm", default=None, metavar="FILE", help="write a Slurm batch script to FILE")
    p.add_argument("--slurm-time", default="24:00:00", help="Slurm time limit")
    p.add_argument("--slurm-partition", default=None, help="Slurm partition")
    p.add_argument(
        "--gpus-per-node",
        type=int,
        default=None,
        help="Slurm --gpus-per-node (default: --nproc-per-node, unless train.device=cpu; 0: none)",
    )


def run_launch(args) -> int:
    import shlex
    from pathlib import Path

    from lmforge.config import load_config
    from lmforge.distributed import launch

    items = list(args.items)
    config = items.pop(0) if items and "=" not in items[0] else None
    cfg = load_config(config, items)  # a bad config fails here, not N times
    config_world_size = cfg.parallel.world_size
    spec = launch.LaunchSpec(
        nproc_per_node=args.nproc_per_node,
        nnodes=args.nnodes,
        rdzv_endpoint=args.rdzv_endpoint,
        rdzv_id=args.rdzv_id,
        max_restarts=args.max_restarts,
        rdzv_timeout_s=args.rdzv_timeout,
    )
    train_args = launch.train_arguments(config, items, resume=args.resume, spec=spec)
    train_args += ["--no-progress"] if args.no_progress else []
    launch.check_world_size(spec, config_world_size)
    if args.slurm:
        from lmforge.files import write_text_atomic

        gpus = args.gpus_per_node
        if gpus is None:  # one GPU per process, unless the run is meant for CPUs
            gpus = 0 if cfg.train.device == "cpu" else args.nproc_per_node
        script = launch.slurm_script(
            spec,
            train_args,
            time_limit=args.slurm_time,
            gpus_per_node=gpus,
            partition=args.slurm_partition,
        )
        write_text_atomic(Path(args.slurm), script)
        print(f"wrote {args.slurm}; submit it with: sbatch {args.slurm}")
        return 0
    if args.dry_run:
        print(shlex.join(launch.torchrun_command(spec, train_args)))
        return 0
    return launch.run(spec, train_args, config_world_size=config_world_size)


def add_consolidate(sub) -> None:
    p = sub.add_parser(
        "consolidate", help="gather a sharded (multi-process) checkpoint into one safetensors file"
    )
    p.add_argument("checkpoint", help="a sharded checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("out", help="the ordinary checkpoint folder to write (readable by export and generate)")


def run_consolidate(args) -> int:
    from lmforge.checkpoint import resolve_checkpoint
    from lmforge.checkpoint.sharded import consolidate

    out = consolidate(resolve_checkpoint(args.checkpoint), args.out)
    print(f"wrote {out}")
    return 0
