"""``lmforge train`` and ``plot``."""

from __future__ import annotations

import os

# -- train / plot -------------------------------------------------------------------------------------------


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model (no config: the built-in demo on the Python stdlib)")
    p.add_argument(
        "items", nargs="*", metavar="[CONFIG] [overrides]", help="a YAML config, then dotted overrides"
    )
    p.add_argument(
        "--resume",
        default=None,
        help="'auto' (newest valid checkpoint of train.out_dir) or a checkpoint path",
    )
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")


def _cache_dir():
    """Where measured CPU peaks and downloaded tokenizers are kept (the environment is read here, at the edge)."""
    from pathlib import Path

    if os.environ.get("LMFORGE_CACHE"):
        return Path(os.environ["LMFORGE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmforge"


def run_train(args) -> int:
    import signal

    from lmforge.config import load_config
    from lmforge.train.demo import demo_config
    from lmforge.train.loop import train

    items = list(args.items)
    if items and "=" not in items[0]:
        cfg = load_config(items[0], items[1:])
    else:
        cfg = demo_config(items)
    result = train(
        cfg, resume=args.resume, cache_dir=_cache_dir(), progress=False if args.no_progress else None
    )
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 speaks for the job
        for text in result.samples:
            print(f"--- sample ---\n{text}")
        print(f"run folder: {result.run_dir} (checkpoint {result.checkpoint})")
    if result.stopped_by in ("SIGINT", "SIGTERM"):
        return 128 + int(getattr(signal, result.stopped_by))
    return 0


def add_plot(sub) -> None:
    p = sub.add_parser("plot", help="loss curves of one or more runs, overlaid in one PNG")
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--out", default=None, help="the PNG to write (default: RUN/loss.png for one run)")


def run_plot(args) -> int:
    from lmforge.train.plots import plot_runs

    print(f"wrote {plot_runs(args.runs, args.out)}")
    return 0
