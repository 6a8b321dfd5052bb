"""Run ``lmforge`` and SIGKILL this very process right after metrics.jsonl announces training step STEP.

    python kill_at_step.py STEP lmforge-arguments...

The kill lands at a step the run announces, not at a moment a watcher happens to look, so a test built on
it cannot lose a race against a fast or a slow machine. The announcement is the metrics writer's record
with a ``loss`` for that step (already flushed to metrics.jsonl when the process dies).
"""

import os
import signal
import sys

from lmforge.cli import main
from lmforge.train.metrics import RunLogger

STEP = int(sys.argv[1])
announce = RunLogger.log


def log_then_die(self, step, values, **kwargs):
    announce(self, step, values, **kwargs)
    if step == STEP and "loss" in values:
        os.kill(os.getpid(), signal.SIGKILL)


RunLogger.log = log_then_die
sys.exit(main(sys.argv[2:]))
