"""Files: writing so that an interrupted write never leaves one that looks complete, and reading small
JSONL files of records (tasks, fine-tuning data) with every problem named as file:line."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from lmforge.errors import DataError


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to a temporary name beside ``path``, then rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def default_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 less the process's umask. Read from /proc on Linux, since
    setting the umask to learn it is process-wide; elsewhere set for a moment to 0o077, so a file another
    thread creates meanwhile only comes out stricter."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return 0o666 & ~mask


def save_safetensors(state: dict, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file``, with the file given the mode any other file gets: safetensors writes
    through a private temporary file, so its files came out 0600 beside 0644 configs and tokenizers."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file(state, path, metadata=metadata)
    path.chmod(default_file_mode())
    return path


def save_figure_atomic(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write a matplotlib figure as a PNG at ``path`` through a temporary name (a reader never sees half a
    PNG), creating the folder, and close the figure."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def jsonl_records(path: str | Path, what: str) -> Iterator[tuple[dict, str]]:
    """Each JSON object of a JSONL file with its ``file:line``. Blank lines are skipped; anything else that
    is not a JSON object is a ``DataError`` naming the line. ``what`` names the file when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such {what}")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield obj, where
