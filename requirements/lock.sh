#!/usr/bin/env bash
# Regenerate constraints-cpu.txt: every package of every extra pinned, for Python 3.11 on x86-64 Linux, with the
# CPU build of torch (found in the machine's find-links, /opt/wheels on our CPU machines).
# Needs uv (pip install uv). Run after changing a dependency in pyproject.toml, then run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
uv pip compile pyproject.toml requirements/cpu.in --all-extras --python-version 3.11 \
    --python-platform x86_64-manylinux_2_28 --find-links "${LMFORGE_FIND_LINKS:-/opt/wheels}" \
    --no-emit-find-links --custom-compile-command "bash requirements/lock.sh" -o constraints-cpu.txt "$@"
