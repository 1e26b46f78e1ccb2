"""Helpers for integration tests: read a topic back with kcat, run CLIs as subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def with_shared_jars(home: Path) -> Path:
    """``home`` for a broker or cluster of a test's own, holding the Kafka jars an earlier run or `make demo`
    resolved (a copy: no Maven run when the pom has not changed)."""
    import shutil

    from deploy.kafka.local import DEFAULT_HOME

    if (DEFAULT_HOME / "libs").exists():
        shutil.copytree(DEFAULT_HOME / "libs", home / "libs", symlinks=True)
    return home


def kcat_read(kcat: str, bootstrap: str, topic: str, timeout_s: float = 60) -> list[dict]:
    """Every message of ``topic`` as kcat's JSON envelope (topic, partition, offset, key, payload)."""
    done = subprocess.run(
        [kcat, "-b", bootstrap, "-C", "-t", topic, "-o", "beginning", "-e", "-J", "-q",
         "-X", "enable.partition.eof=true"],
        capture_output=True, text=True, timeout=timeout_s, check=True,
    )
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def run_cli(module: str, *args: str, env: dict[str, str], timeout_s: float = 120,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``python -m module args`` from the repository root, as a user would."""
    done = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=timeout_s, check=False,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} exited {done.returncode}:\n"
                             f"{done.stdout}\n{done.stderr}")
    return done
