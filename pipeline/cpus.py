"""How many CPUs this process may use; light, so the worker launcher can share them out without PyTorch."""

from __future__ import annotations

import math
import os
from pathlib import Path


def available_cpus(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPUs this process may use: its affinity mask, lowered to a cgroup v2 CPU quota (a
    container started with ``--cpus 2`` on a 16-core host gets 2, not 16)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota here
    return max(1, cpus)
