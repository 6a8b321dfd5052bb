"""Print one of the README's two set-up commands, exactly as written there: `demo` or `test`.

.ci/run executes the `test` one through this, so a README whose command stops working fails CI. Standard
library only (it runs before any virtual environment exists)."""

import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def setup_commands(text: str) -> dict[str, str]:
    """{"demo": ..., "test": ...}: the one-line commands of the README's "Set up" section that make a venv."""
    section = text.split("\n## Set up\n", 1)[1].split("\n## ", 1)[0]
    commands = [line.strip() for line in section.splitlines() if line.strip().startswith("python3 -m venv ")]
    tests = [c for c in commands if "pytest" in c]
    demos = [c for c in commands if "pytest" not in c]
    if len(tests) != 1 or len(demos) != 1:
        raise SystemExit(f"{README}: the Set up section must hold exactly one demo and one test command")
    return {"demo": demos[0], "test": tests[0]}


if __name__ == "__main__":
    print(setup_commands(README.read_text(encoding="utf-8"))[sys.argv[1]])
