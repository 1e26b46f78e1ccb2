"""``python -m producer``."""

import sys

from producer.cli import run

sys.exit(run())
