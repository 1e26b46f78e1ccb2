"""``python -m trainer``: same as ``fraud-train``."""

import sys

from trainer.cli import run

sys.exit(run())
