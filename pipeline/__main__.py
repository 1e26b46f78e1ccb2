"""``python -m pipeline``: the streaming worker."""

import sys

from pipeline.worker.cli import run

sys.exit(run())
