"""``lmforge plan``: memory, layout, time, cost, energy and emissions of a run."""

from __future__ import annotations

import json

# -- plan -------------------------------------------------------------------------------------------------


def add_plan(sub) -> None:
    p = sub.add_parser("plan", help="predict memory, time, cost and energy of training a model on a cluster")
    p.add_argument("--model", required=True, help="a preset name (e.g. 7b) or a YAML config")
    p.add_argument("overrides", nargs="*", help="dotted model overrides, e.g. model.vocab_size=128256")
    p.add_argument("--gpu", default="H100-80GB", help="a device from the hardware table, or 'auto' to detect")
    p.add_argument("--gpus", type=int, default=8, help="number of GPUs (default 8)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs in one node (default 8)")
    p.add_argument(
        "--interconnect", default="infiniband", help="network between nodes: nvlink, infiniband, ethernet"
    )
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the model's max_seq_len)")
    p.add_argument("--global-batch-tokens", default="4M", help="tokens per optimizer step (default 4M)")
    p.add_argument("--tokens", default=None, help="tokens to train on (default: ~20 per parameter)")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--tp", default="", help="tensor-parallel degrees to compare, e.g. 2,4,8")
    p.add_argument(
        "--ep",
        default="",
        help="expert-parallel degrees to compare for a MoE model, e.g. 8,64 (default: every valid one)",
    )
    p.add_argument("--price-per-gpu-hour", type=float, default=None, help="price of one GPU-hour")
    p.add_argument(
        "--region",
        default=None,
        help="grid carbon intensity of a region (world, us, eu, france, ...; default world)",
    )
    p.add_argument("--grid-intensity", type=float, default=None, help="grid carbon intensity, g CO2eq/kWh")
    p.add_argument("--pue", type=float, default=None, help="data centre PUE (default 1.2)")
    p.add_argument(
        "--node-overhead",
        type=float,
        default=None,
        help="node power beyond the GPUs, x GPU power (default 0.5)",
    )
    p.add_argument("--hardware-file", default=None, help="a YAML file adding or changing hardware entries")
    p.add_argument(
        "--probe", action="store_true", help="check the plan with a few real steps on this machine"
    )
    p.add_argument("--probe-steps", type=int, default=4, help="steps of the probe run (default 4)")
    p.add_argument("--json", action="store_true", help="print JSON")


def _count(flag: str, text: str | None) -> int | None:
    """A token count written as 4M, 1T or 2e12."""
    from lmforge.config import parse_number
    from lmforge.errors import ConfigError

    if text is None:
        return None
    try:
        return int(parse_number(text))
    except ValueError:
        raise ConfigError(f"{flag}={text!r} is not a number (examples: 4M, 1T, 2e12)") from None


def _degrees(flag: str, text: str) -> tuple[int, ...]:
    from lmforge.errors import ConfigError

    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ConfigError(f"{flag}={text!r} must be a comma-separated list of integers, e.g. 2,4") from None


def run_plan(args) -> int:
    from lmforge.errors import ConfigError
    from lmforge.model.info import model_config_from_arg
    from lmforge.plan.energy import DEFAULT_NODE_OVERHEAD, DEFAULT_PUE, energy_settings
    from lmforge.plan.hardware import lookup_interconnect, resolve_hardware
    from lmforge.plan.planner import Cluster, Workload, plan_cluster
    from lmforge.plan.report import render_probe, render_report

    tp_degrees = _degrees("--tp", args.tp)
    ep_degrees = _degrees("--ep", args.ep) or None  # None: every degree the model allows
    cfg = model_config_from_arg(args.model, args.overrides)
    cluster = Cluster(
        hardware=resolve_hardware(args.gpu, args.hardware_file),
        gpus=args.gpus,
        gpus_per_node=args.gpus_per_node,
        interconnect=lookup_interconnect(args.interconnect),
        price_per_gpu_hour=args.price_per_gpu_hour,
        energy=energy_settings(
            region=args.region,
            grid_intensity=args.grid_intensity,
            pue=DEFAULT_PUE if args.pue is None else args.pue,
            node_overhead=DEFAULT_NODE_OVERHEAD if args.node_overhead is None else args.node_overhead,
        ),
    )
    workload = Workload(
        seq_len=args.seq or cfg.max_seq_len,
        global_batch_tokens=_count("--global-batch-tokens", args.global_batch_tokens),
        total_tokens=_count("--tokens", args.tokens),
        precision=args.precision,
    )
    report = plan_cluster(cfg, cluster, workload, tp_degrees=tp_degrees, ep_degrees=ep_degrees)
    probe = corrected = None
    if args.probe:  # a few real steps on this machine correct the plan's assumptions
        from lmforge.plan.probe import probe_report

        probe, corrected = probe_report(report, steps=args.probe_steps, hardware_file=args.hardware_file)
    if args.json:
        extra = {"probe": probe.to_dict(), "corrected": corrected.to_dict()} if probe is not None else {}
        print(json.dumps({**report.to_dict(), **extra}, indent=2))
    else:
        print(render_report(report))
        if probe is not None:
            print(f"\n{render_probe(probe)}\n\ncorrected plan:\n{render_report(corrected)}")
    if report.chosen is None:
        raise ConfigError(report.shortfall())
    return 0
