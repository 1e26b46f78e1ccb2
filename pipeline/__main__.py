"""``python -m pipeline``: the streaming worker."""

import sys

from pipeline.cli import run

sys.exit(run())
