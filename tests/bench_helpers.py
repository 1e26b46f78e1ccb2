"""Running the benchmark scripts from tests (``tests/unit/test_bench_scripts.py`` and its broker half)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# a tiny bank for bench/state_bench.py
STATE_BANK = ("--customers", "300", "--terminals", "600", "--warmup-days", "10", "--train-days", "5",
              "--stream-days", "3")


def run_script(*args: str | Path, timeout: float = 240) -> str:
    done = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout
