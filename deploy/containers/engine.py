"""The project's container engine: Podman serving the Docker API on a socket in the checkout.

Docker Compose, testcontainers and the Docker SDK all speak the Docker API; ``podman system service``
serves it, so the images, the compose stack and the testcontainers tests run for real on a machine
without Docker (CI's). Everything lives in ``.cache/containers``; nothing in /etc is changed (Podman
reads ``containers.conf`` beside this file through ``CONTAINERS_CONF``).

Podman schedules health checks with systemd timers. Where there is no systemd (CI's sandbox), no
check would ever run, every container would stay "starting" and compose's ``service_healthy``
conditions would wait for ever; ``health_loop`` does the timers' job: it runs ``podman healthcheck
run`` for each running container at the container's own interval.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
STATE = REPO / ".cache" / "containers"
SOCKET = STATE / "podman.sock"
CONF = HERE / "containers.conf"
# Debian's packages for rootful Podman with runc, CNI networks with service-name DNS, and debootstrap for the
# base image (containers issue: crun refuses this machine's mixed cgroup layout).
PACKAGES = ("podman", "runc", "fuse-overlayfs", "slirp4netns", "uidmap", "iptables", "containernetworking-plugins",
            "golang-github-containernetworking-plugin-dnsname", "catatonit", "conmon", "debootstrap")


class EngineError(RuntimeError):
    """The container engine could not be installed, started or reached."""


def engine_env() -> dict[str, str]:
    """What a Docker API client (compose, testcontainers, the Docker SDK) needs to reach the engine."""
    return {
        "CONTAINERS_CONF": str(CONF),
        "DOCKER_HOST": f"unix://{SOCKET}",
        # Ryuk (testcontainers' reaper) is an image from Docker Hub, which cannot be pulled here; the tests
        # remove what they start themselves.
        "TESTCONTAINERS_RYUK_DISABLED": "true",
        # Published ports are reached on the engine's host (a /.dockerenv in CI's VM misleads the auto-detection).
        "TESTCONTAINERS_CONNECTION_MODE": "docker_host",
    }


def podman(*args: str, check: bool = True, capture: bool = True, timeout: float | None = None,
           ) -> subprocess.CompletedProcess[str]:
    """Run the podman CLI with the project's settings."""
    env = {**os.environ, "CONTAINERS_CONF": str(CONF)}
    done = subprocess.run(["podman", *args], env=env, text=True, capture_output=capture, timeout=timeout,
                          check=False)
    if check and done.returncode != 0:
        tail = (done.stderr or "")[-1500:].strip()
        raise EngineError(f"podman {' '.join(args[:3])} ... failed ({done.returncode}): {tail}")
    return done


# -- install ------------------------------------------------------------------------------------------------
def missing_tools() -> list[str]:
    return [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]


def setup() -> None:
    """Install Podman and its companions from Debian's packages where they are missing (root only)."""
    missing = missing_tools()
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise EngineError(f"{', '.join(missing)} not installed, and this is not a root shell with apt-get: install "
                          f"Podman (Debian: apt-get install {' '.join(PACKAGES)}) or run Docker")
    log.info("installing %s from Debian's packages", " ".join(PACKAGES))
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *PACKAGES]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise EngineError(f"{' '.join(cmd[:2])} failed: {done.stderr[-1500:]}")
    still = missing_tools()
    if still:
        raise EngineError(f"still missing after apt-get install: {', '.join(still)}")


# -- the API service ----------------------------------------------------------------------------------------
def answers(timeout_s: float = 2.0) -> bool:
    """True when something serves the Docker API's ping on the socket."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(str(SOCKET))
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: engine\r\n\r\n")
            reply = sock.recv(4096)
    except OSError:
        return False
    return reply.startswith(b"HTTP/1.") and b" 200 " in reply.split(b"\r\n", 1)[0] + b" "


def _spawn(name: str, cmd: list[str]) -> int:
    STATE.mkdir(parents=True, exist_ok=True)
    with open(STATE / f"{name}.log", "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "CONTAINERS_CONF": str(CONF)}, start_new_session=True)
    (STATE / f"{name}.pid").write_text(str(proc.pid))
    return proc.pid


def _pid(name: str) -> int | None:
    try:
        pid = int((STATE / f"{name}.pid").read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def start(timeout_s: float = 60.0) -> bool:
    """Start the API service and the health-check loop; False when they were already running."""
    if answers() and _pid("health"):
        return False
    setup()
    if not answers():
        SOCKET.unlink(missing_ok=True)
        _spawn("service", ["podman", "system", "service", "--time=0", f"unix://{SOCKET}"])
        deadline = time.monotonic() + timeout_s
        while not answers():
            if time.monotonic() > deadline or _pid("service") is None:
                tail = (STATE / "service.log").read_text(errors="replace")[-1500:]
                raise EngineError(f"podman system service did not answer on {SOCKET} in {timeout_s:.0f} s: {tail}")
            time.sleep(0.2)
    if _pid("health") is None:
        _spawn("health", [sys.executable, "-m", "deploy.containers", "health-loop"])
    log.info("container engine: podman serving the Docker API on %s", SOCKET)
    return True


def stop(timeout_s: float = 20.0) -> None:
    """Stop the health-check loop and the API service (containers keep running: podman owns them)."""
    for name in ("health", "service"):
        pid = _pid(name)
        if pid is None:
            continue
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _pid(name) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        if _pid(name) is not None:
            os.killpg(pid, signal.SIGKILL)
        (STATE / f"{name}.pid").unlink(missing_ok=True)


def run_with_engine(cmd: list[str]) -> int:
    """Run a command with the engine up and its environment set; stop the engine after if this started it."""
    started = start()
    try:
        return subprocess.run(cmd, env={**os.environ, **engine_env()}, check=False).returncode
    finally:
        if started:
            stop()


# -- health checks without systemd ---------------------------------------------------------------------------
def _interval_s(container_id: str) -> float | None:
    """The container's health-check interval in seconds, or None when it has no health check."""
    done = podman("inspect", "--format", "{{json .Config.Healthcheck}}", container_id, check=False)
    if done.returncode != 0:
        return None
    try:
        check = json.loads(done.stdout.strip() or "null")
    except json.JSONDecodeError:
        return None
    if not check or not check.get("Test") or check["Test"][0] == "NONE":
        return None
    return max(1.0, (check.get("Interval") or 30_000_000_000) / 1e9)


def health_loop(poll_s: float = 1.0) -> None:
    """Run every running container's health check at its interval, for ever (what systemd's timers would do)."""
    due: dict[str, float] = {}
    interval: dict[str, float | None] = {}
    while True:
        done = podman("ps", "-q", "--no-trunc", check=False)
        running = set(done.stdout.split()) if done.returncode == 0 else set()
        now = time.monotonic()
        for cid in running:
            if cid not in interval:
                interval[cid] = _interval_s(cid)
                if interval[cid] is not None:
                    due[cid] = now + interval[cid]
            every = interval[cid]
            if every is not None and now >= due[cid]:
                podman("healthcheck", "run", cid, check=False, timeout=120)
                due[cid] = time.monotonic() + every
        for cid in set(interval) - running:
            interval.pop(cid, None)
            due.pop(cid, None)
        time.sleep(poll_s)
