"""``fraud-worker --processes N``: N worker processes on one host, in one consumer group.

Kafka shares the input partitions among the N workers as among any members of the group
(more workers than partitions leaves the extra ones idle). Each child is ``python -m pipeline``
with the launcher's own flags and environment, except:

- its metrics port is the base port plus its index: ``--metrics-port 9108 --processes 3``
  serves 9108, 9109 and 9110 (0 keeps metrics off in every child);
- where PyTorch's threads are automatic (``--torch-threads 0``), the CPUs are shared out:
  each child gets ``CPUs // N - 1`` threads, at least one.

SIGTERM and SIGINT are passed on to every child: each finishes its batch, commits and leaves.
A child that exits with an error makes the launcher stop the others the same way; a child
that exits 0 (``--exit-when-idle``) leaves the others running. Children get SIGTERM if the
launcher itself dies. The launcher's exit code is the worst of its children's: 0 when all
stopped cleanly, else the highest code, a child killed by signal S counting as 128 + S.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from types import FrameType

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1  # prctl option: the signal a child gets when its parent dies (Linux)


def check(processes: int, metrics_port: int) -> None:
    """Refuse a process count below 1, or metrics ports past 65535."""
    if processes < 1:
        raise ConfigError(f"--processes {processes}: run at least one worker process")
    if metrics_port and metrics_port + processes - 1 > 65535:
        raise ConfigError(f"--processes {processes} needs metrics ports {metrics_port} to "
                          f"{metrics_port + processes - 1}; set a lower --metrics-port, or 0 to disable metrics")


def child_commands(argv: Sequence[str], processes: int, metrics_port: int, torch_threads: int, cpus: int
                   ) -> list[list[str]]:
    """One ``python -m pipeline`` command line per child: the launcher's flags, then the child's own
    (argparse keeps the last value of a repeated flag).

    >>> child_commands(["--max-batch", "512"], 2, 9108, 0, 8)[1][3:]
    ['--max-batch', '512', '--processes', '1', '--torch-threads', '3', '--metrics-port', '9109']
    """
    threads = [] if torch_threads else ["--torch-threads", str(max(1, cpus // processes - 1))]
    return [[sys.executable, "-m", "pipeline", *argv, "--processes", "1", *threads,
             "--metrics-port", str(metrics_port + i if metrics_port else 0)] for i in range(processes)]


def worst(codes: Iterable[int]) -> int:
    """The exit code that says the most: the highest, a death by signal S (code -S) counting as 128 + S.

    >>> worst([0, 0]), worst([0, 2, 1]), worst([0, -signal.SIGKILL])
    (0, 2, 137)
    """
    return max((128 - code if code < 0 else code for code in codes), default=0)


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the launcher dies, so no worker outlives it (Linux only)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Launcher:
    """Starts the children, passes signals on, waits for all of them."""

    def __init__(self, commands: list[list[str]], stop: threading.Event, poll_s: float = 0.2) -> None:
        self.commands, self.stop, self.poll_s = commands, stop, poll_s
        self.children: list[subprocess.Popen[bytes]] = []

    def forward(self, signum: int, _frame: FrameType | None) -> None:
        """Signal handler: pass SIGTERM/SIGINT on to every running child."""
        log.info("received %s: passing it on to %d workers", signal.Signals(signum).name, len(self.children))
        self.stop.set()
        self._signal_all(signum)

    def _signal_all(self, signum: int) -> None:
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signum)

    def run(self) -> int:
        """Start every child (none after a stop signal), wait for all; the worst exit code."""
        preexec = _die_with_parent if sys.platform == "linux" else None
        for command in self.commands:
            if self.stop.is_set():
                break
            self.children.append(subprocess.Popen(command, preexec_fn=preexec))
        log.info("started %d workers: pids %s", len(self.children), [c.pid for c in self.children])
        stopping = self.stop.is_set()
        if stopping:  # a signal while starting: the child started last may have missed it
            self._signal_all(signal.SIGTERM)
        while None in (codes := [child.poll() for child in self.children]):  # every child polled each turn
            failed = [(c.pid, code) for c, code in zip(self.children, codes, strict=True) if code not in (None, 0)]
            if failed and not stopping:
                log.warning("worker pid %d exited with %d; stopping the others", *failed[0])
                stopping = True
                self._signal_all(signal.SIGTERM)
            time.sleep(self.poll_s)
        return worst(child.returncode for child in self.children)


def launch(argv: Sequence[str], processes: int, metrics_port: int, torch_threads: int,
           stop: threading.Event) -> int:
    """Run ``processes`` workers with these flags until all have exited; the worst exit code."""
    from pipeline.cpus import available_cpus

    launcher = Launcher(child_commands(argv, processes, metrics_port, torch_threads, available_cpus()), stop)
    signal.signal(signal.SIGTERM, launcher.forward)
    signal.signal(signal.SIGINT, launcher.forward)
    return launcher.run()
