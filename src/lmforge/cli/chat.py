"""``lmforge chat``: a terminal conversation with a model through its chat template (``infer/chat.py``).

Input: one line is one message. A line ending in ``\\`` continues on the next line; a line holding only
``\"\"\"`` starts a block that runs to the next such line (for pasting text with blank lines). ``/reset``
forgets the conversation (the system prompt stays), ``/exit`` or end of input (Ctrl-D) quits.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from lmforge.cli.use import add_decode_options, add_sampling_options, decode_from_args, sampling_from_args

BLOCK = '"""'
HELP = (
    'end a line with \\ to continue it, or put lines between two lines holding only """; '
    "/reset starts over, /exit (or Ctrl-D) quits"
)


def add_chat(sub) -> None:
    p = sub.add_parser("chat", help="talk to a model in the terminal, through its chat template")
    p.add_argument("model", help="an lmforge run/checkpoint folder or a Hugging Face model folder")
    p.add_argument("--system", default=None, help="a system prompt, kept when the history is trimmed")
    add_sampling_options(p, max_new_tokens=256, temperature=0.7, top_p=0.9)
    p.add_argument("--device", default="auto")
    add_decode_options(p)


def read_message(read_line: Callable[[str], str]) -> str | None:
    """The next message from ``read_line`` (``input``): a line, lines joined by a trailing ``\\``, or a
    \"\"\" block. None at the end of input."""
    try:
        line = read_line(">>> ")
    except EOFError:
        return None
    if line.strip() == BLOCK:
        lines = []
        while True:
            try:
                line = read_line("... ")
            except EOFError:
                break
            if line.strip() == BLOCK:
                break
            lines.append(line)
        return "\n".join(lines)
    parts = []
    while line.endswith("\\"):
        parts.append(line[:-1])
        try:
            line = read_line("... ")
        except EOFError:
            line = ""
            break
    parts.append(line)
    return "\n".join(parts)


def run_chat(args) -> int:
    from lmforge.errors import DataError
    from lmforge.infer.loading import open_chat
    from lmforge.train.run import pick_device

    sampling = sampling_from_args(args)
    session, notice = open_chat(
        args.model,
        sampling,
        device=pick_device(args.device),
        system=args.system,
        decode=decode_from_args(args),
    )
    if notice:
        print(f"lmforge chat: {notice}", file=sys.stderr)
    interactive = sys.stdin.isatty()
    print(f"lmforge chat: {HELP}", file=sys.stderr)

    def read_line(prompt: str) -> str:
        return input(prompt if interactive else "")

    while (text := read_message(read_line)) is not None:
        command = text.strip()
        if command == "/exit":
            break
        if command == "/reset":
            session.reset()
            print("(conversation reset)")
            continue
        if not command:
            continue
        try:
            reply = session.send(text, on_text=lambda piece: _show(session, piece))
        except DataError as exc:  # a message too long for the context: say so and keep the session
            print(f"lmforge chat: {exc}", file=sys.stderr)
            continue
        _show(session, "")
        print()
        if reply.finish_reason in ("length", "context"):
            print(
                f"(the reply was cut at {len(reply.tokens)} tokens: --max-new-tokens or the context)",
                file=sys.stderr,
            )
    return 0


def _show(session, piece: str) -> None:
    """Print the session's notices (history trimmed) before the reply's first piece, then the piece."""
    for notice in session.notices:
        print(notice, file=sys.stderr)
    session.notices.clear()
    print(piece, end="", flush=True)
