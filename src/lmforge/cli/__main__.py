"""``python -m lmforge.cli``: the ``lmforge`` command (used by ``lmforge launch`` under torchrun)."""

import sys

from lmforge.cli import main

sys.exit(main())
