"""The promtool and Prometheus server of the release docker-compose.yml runs.

Rules are checked, unit-tested and evaluated by the same major version the stack runs.
``make tools`` (``deploy/install-tools.sh``) builds both once, from the Prometheus Go module at
the compose file's release, into ``.cache/tools/prometheus-VERSION/``.

>>> version_of("promtool, version 3.5.0 (branch: HEAD, revision: v0.305.0)")
'3.5.0'
>>> version_of("prometheus, version 2.42.0+ds (branch: debian/sid, revision: 2.42.0+ds-5+deb12u1)")
'2.42.0'
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
CACHE = REPO / ".cache" / "tools"


def compose_prometheus_version(compose: Path = COMPOSE_FILE) -> str:
    """The X.Y.Z of the ``prom/prometheus:vX.Y.Z`` image in the compose file."""
    found = re.search(r"^\s*image:\s*prom/prometheus:v(\d+\.\d+\.\d+)\s*$", compose.read_text(), re.MULTILINE)
    if found is None:
        raise ValueError(f"{compose}: no `image: prom/prometheus:vX.Y.Z` line")
    return found.group(1)


def version_of(text: str) -> str | None:
    """The X.Y.Z in a ``promtool --version`` first line."""
    found = re.search(r"version (\d+\.\d+\.\d+)", text)
    return found.group(1) if found else None


def tool_version(path: Path | str) -> str | None:
    """The version a promtool or prometheus binary reports, or None if it does not run."""
    try:
        done = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=30)
    except OSError:
        return None
    return version_of(done.stdout + done.stderr)


def find_tool(name: str) -> Path | None:
    """``name`` (promtool, prometheus) of the compose release: the cached build, else one on PATH
    of the same major version."""
    wanted = compose_prometheus_version()
    cached = CACHE / f"prometheus-{wanted}" / name
    if cached.is_file() and tool_version(cached) == wanted:
        return cached
    on_path = shutil.which(name)
    found = tool_version(on_path) if on_path else None
    if on_path and found and found.split(".")[0] == wanted.split(".")[0]:
        return Path(on_path)
    return None


def find_promtool() -> Path | None:
    """promtool of the compose release (see ``find_tool``)."""
    return find_tool("promtool")


def find_prometheus() -> Path | None:
    """The Prometheus server of the compose release (see ``find_tool``)."""
    return find_tool("prometheus")
