"""The ``lmforge`` command: parse arguments, call one function per verb; no logic of its own.

Each verb has an ``add_<verb>(subparsers)`` that declares its arguments and a ``run_<verb>(args)`` that
calls one library function and prints its result. lmforge's own errors, and an OSError of any verb (a path
that cannot be read or written), become one line on stderr and exit code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable

from lmforge.cli.chat import add_chat, run_chat
from lmforge.cli.cluster import add_consolidate, add_launch, run_consolidate, run_launch
from lmforge.cli.data import add_data, run_data
from lmforge.cli.model import add_export, add_import, add_model, run_export, run_import, run_model
from lmforge.cli.plan import add_plan, run_plan
from lmforge.cli.scale import add_scale, run_scale
from lmforge.cli.serve import add_serve, run_serve
from lmforge.cli.sweep import add_sweep, run_sweep
from lmforge.cli.train import add_plot, add_train, run_plot, run_train
from lmforge.cli.use import (
    add_eval,
    add_finetune,
    add_generate,
    add_prune,
    run_eval,
    run_finetune,
    run_generate,
    run_prune,
)
from lmforge.errors import LMForgeError

# -- the table of verbs -------------------------------------------------------------------------------------

VERBS: dict[str, tuple[Callable, Callable]] = {
    "model": (add_model, run_model),
    "data": (add_data, run_data),
    "export": (add_export, run_export),
    "import": (add_import, run_import),
    "train": (add_train, run_train),
    "plot": (add_plot, run_plot),
    "sweep": (add_sweep, run_sweep),
    "generate": (add_generate, run_generate),
    "chat": (add_chat, run_chat),
    "serve": (add_serve, run_serve),
    "eval": (add_eval, run_eval),
    "finetune": (add_finetune, run_finetune),
    "prune": (add_prune, run_prune),
    "plan": (add_plan, run_plan),
    "scale": (add_scale, run_scale),
    "launch": (add_launch, run_launch),
    "consolidate": (add_consolidate, run_consolidate),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmforge",
        description="Train GPT/Llama-style language models end to end: raw text in, a trained, evaluated, "
        "exported model out. `lmforge train` with no argument runs the built-in demo.",
        epilog="`lmforge VERB --help` shows a verb's options.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="verb", required=True)
    for add, _ in VERBS.values():
        add(sub)
    parser.set_defaults(verb_parsers=sub.choices)  # verb -> its parser, for errors in the verb's own words
    return parser


def _unrecognized(verb_parser: argparse.ArgumentParser, extra: list[str]) -> str:
    """ "unrecognized arguments: ..." with a "did you mean" for a mistyped option."""
    import difflib

    def options_of(p: argparse.ArgumentParser) -> list[str]:  # with those of nested verbs (`model info`)
        found = []
        for action in p._actions:
            found += action.option_strings
            choices = getattr(action, "choices", None)  # a dict of parsers for verbs; a list for --x {a,b}
            for nested in choices.values() if isinstance(choices, dict) else ():
                if isinstance(nested, argparse.ArgumentParser):
                    found += options_of(nested)
        return found

    options = options_of(verb_parser)
    hints = []
    for arg in extra:
        if arg.startswith("--"):
            close = difflib.get_close_matches(arg.split("=")[0], options, n=1)
            hints += [f"{arg.split('=')[0]}: did you mean {close[0]}?"] if close else []
    message = f"unrecognized arguments: {' '.join(extra)}"
    return message + (f" ({'; '.join(hints)})" if hints else "")


def _one_line(exc: Exception) -> str:
    """lmforge's own message; for an OSError the path(s) and the reason ("/proc/x: Permission denied"). An
    atomic write fails on its temporary (``PATH.tmp-<pid>``), but the user named PATH: show that."""
    if not isinstance(exc, OSError):
        return str(exc)
    if exc.filename is None or not exc.strerror:
        return str(exc).replace("\n", " ")
    paths = [
        re.sub(r"\.tmp-(\d+|sharded)(?=(\.\w+)?$)", "", str(name))
        for name in (exc.filename, exc.filename2)
        if name
    ]
    return f"{' -> '.join(paths)}: {exc.strerror}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse gives a trailing positional list nothing once an option has come between: dotted overrides
    # written after options (`lmforge finetune BASE DATA --out X train.steps=20`) are still overrides.
    dest = next((d for d in ("overrides", "items") if isinstance(getattr(args, d, None), list)), None)
    if extra and dest and all("=" in a and not a.startswith("-") for a in extra):
        setattr(args, dest, getattr(args, dest) + extra)
    elif extra:
        args.verb_parsers[args.verb].error(_unrecognized(args.verb_parsers[args.verb], extra))
    started = time.time()
    try:
        return VERBS[args.verb][1](args) or 0
    except (LMForgeError, OSError) as exc:  # a bad input, or a path that cannot be read or written
        if debug:
            raise
        print(f"lmforge {args.verb}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmforge {args.verb}: interrupted after {time.time() - started:.0f}s", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
