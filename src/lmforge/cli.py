"""The ``lmforge`` command: parse arguments, call one function per verb; no logic of its own.

Each verb has an ``_add_<verb>(subparsers)`` that declares its arguments and a ``_run_<verb>(args)`` that
calls the library. lmforge's own errors become one line on stderr and exit code 2; ``--debug`` shows the
traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

from lmforge.errors import LMForgeError


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


# -- model info --------------------------------------------------------------------------------------------


def _add_model(sub) -> None:
    p = sub.add_parser("model", help="inspect model shapes")
    msub = p.add_subparsers(dest="model_cmd", required=True)
    info = msub.add_parser("info", help="parameters, FLOPs per token and weight sizes of a preset or config")
    info.add_argument(
        "model", help="a preset name (tiny, gpt2-124m, llama-160m, 1b, 3b, 7b) or a YAML config"
    )
    info.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.n_layers=8")
    info.add_argument(
        "--seq", type=int, default=None, help="sequence length for FLOPs (default: max_seq_len)"
    )
    info.add_argument("--json", action="store_true", help="print JSON")


def _run_model(args) -> int:
    from lmforge.model.info import describe, model_config_from_arg

    cfg = model_config_from_arg(args.model, args.overrides)
    info = describe(cfg, seq_len=args.seq)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model            {info['preset'] or args.model}")
    print(
        f"shape            {cfg.n_layers} layers x d_model {cfg.d_model}, {cfg.n_heads} heads "
        f"({cfg.kv_heads} kv), ffn {cfg.ffn} {cfg.hidden_dim}, vocab {cfg.vocab_size}"
    )
    print(
        f"switches         position={cfg.position} norm={cfg.norm} bias={cfg.bias} tied={cfg.tie_embeddings}"
    )
    print(f"parameters       {info['parameters']:,} ({_human(info['parameters'])})")
    print(f"FLOPs per token  {info['flops_per_token']:.4g} (training, seq {info['seq_len']})")
    print(f"weights fp32     {info['bytes_fp32'] / 2**30:.2f} GiB")
    print(f"weights bf16     {info['bytes_bf16'] / 2**30:.2f} GiB")
    return 0


# -- export / import --------------------------------------------------------------------------------------


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export", help="write a Hugging Face folder (safetensors + config.json) from a checkpoint"
    )
    p.add_argument("checkpoint", help="an lmforge run folder or checkpoint folder")
    p.add_argument("out_dir", help="the Hugging Face folder to write")
    p.add_argument("--no-verify", action="store_true", help="skip the logits check against transformers")


def _run_export(args) -> int:
    from lmforge.model.hf import export_checkpoint

    report = export_checkpoint(args.checkpoint, args.out_dir, verify=not args.no_verify)
    print(f"wrote {report['out_dir']} ({report['architecture']})")
    if report.get("max_abs_diff") is not None:
        print(f"verified with transformers: max |logits difference| = {report['max_abs_diff']:.2e}")
    elif report.get("verify_note"):
        print(report["verify_note"])
    return 0


def _add_import(sub) -> None:
    p = sub.add_parser("import", help="read a Hugging Face Llama or GPT-2 folder into an lmforge checkpoint")
    p.add_argument("hf_dir", help="a folder with config.json and *.safetensors (or pytorch_model.bin)")
    p.add_argument("out", help="the lmforge checkpoint folder to write")


def _run_import(args) -> int:
    from lmforge.model.hf import import_hf

    out = import_hf(args.hf_dir, args.out)
    print(f"wrote {out}")
    return 0


# -- train / plot -------------------------------------------------------------------------------------------


def _add_train(sub) -> None:
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
    import os
    from pathlib import Path

    if os.environ.get("LMFORGE_CACHE"):
        return Path(os.environ["LMFORGE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmforge"


def _run_train(args) -> int:
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
    for text in result.samples:
        print(f"--- sample ---\n{text}")
    print(f"run folder: {result.run_dir} (checkpoint {result.checkpoint})")
    if result.stopped_by in ("SIGINT", "SIGTERM"):
        return 128 + int(getattr(signal, result.stopped_by))
    return 0


def _add_plot(sub) -> None:
    p = sub.add_parser("plot", help="loss curves of one or more runs, overlaid in one PNG")
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--out", default=None, help="the PNG to write (default: RUN/loss.png for one run)")


def _run_plot(args) -> int:
    from pathlib import Path

    from lmforge.errors import DataError
    from lmforge.train.metrics import plot_runs

    missing = [r for r in args.runs if not (Path(r) / "metrics.jsonl").is_file()]
    if missing:
        raise DataError(f"{missing[0]}: no metrics.jsonl (not an lmforge run folder)")
    out = args.out or (Path(args.runs[0]) / "loss.png" if len(args.runs) == 1 else "loss.png")
    print(f"wrote {plot_runs(args.runs, out)}")
    return 0


# -- the table of verbs -------------------------------------------------------------------------------------

VERBS: dict[str, tuple[Callable, Callable]] = {
    "model": (_add_model, _run_model),
    "export": (_add_export, _run_export),
    "import": (_add_import, _run_import),
    "train": (_add_train, _run_train),
    "plot": (_add_plot, _run_plot),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="verb", required=True)
    for add, _ in VERBS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.time()
    try:
        return VERBS[args.verb][1](args) or 0
    except LMForgeError as exc:
        if debug:
            raise
        print(f"lmforge {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmforge {args.verb}: interrupted after {time.time() - started:.0f}s", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
