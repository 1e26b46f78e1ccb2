"""A worker as a child process (``python -m pipeline``), watched from outside: log lines, memory, CPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from pipeline.config import KafkaSettings

REPO = Path(__file__).resolve().parents[2]
ASSIGNED = "partitions assigned: [T"
# Start-up milestones: the first log line containing each, in the order a worker reaches them.
MILESTONES = {"settings_parsed": "starting with ", "model_served": "serving model ", "assigned": ASSIGNED}


class WorkerProcess:
    """``python -m pipeline`` as a child: its log lines timestamped on arrival, its rusage on exit.

    With ``--processes N`` the child is a launcher and its N workers write to the same pipe;
    the peak RSS of each process of the tree is sampled.
    """

    def __init__(self, settings: KafkaSettings, model_dir: Path, group: str, *extra: str, device: str = "cpu") -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUD_")}
        env["PYTHONUNBUFFERED"] = "1"
        cmd = [sys.executable, "-m", "pipeline", "--bootstrap-servers", settings.bootstrap_servers,
               "--input-topic", settings.input_topic, "--alerts-topic", settings.alerts_topic,
               "--dead-letter-topic", settings.dead_letter_topic, "--client-id", settings.client_id,
               "--model-dir", str(model_dir), "--consumer-group", group, "--device", device,
               "--reload-interval-s", "0", *extra]
        self.command = cmd
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.milestones: dict[str, float] = {}
        self.assignments = 0
        self.lines: list[str] = []
        self.vm_hwm_kib: dict[int, int] = {}
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def assigned_at(self) -> float | None:
        """When a worker first logged an assignment with partitions (perf_counter)."""
        return self.milestones.get("assigned")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            now = time.perf_counter()
            for name, text in MILESTONES.items():
                if name not in self.milestones and text in line:
                    self.milestones[name] = now
            self.assignments += ASSIGNED in line
            self.lines.append(line.rstrip())

    def _tree(self) -> list[int]:
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            return [self.proc.pid, *map(int, children.read_text().split())]
        except OSError:
            return [self.proc.pid]

    def alive(self) -> bool:
        """Whether the child still runs; samples the peak RSS (VmHWM) of it and its children on the way."""
        for pid in self._tree():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
                self.vm_hwm_kib[pid] = max(self.vm_hwm_kib.get(pid, 0), kib)
            except (OSError, StopIteration, ValueError):
                pass
        return self.proc.poll() is None

    def tail(self, lines: int = 20) -> str:
        """The child's last log lines."""
        return "\n".join(self.lines[-lines:])

    def wait_assigned(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while self.assigned_at is None and time.monotonic() < deadline and self.proc.poll() is None:
            time.sleep(0.05)
        if self.assigned_at is None:
            raise SystemExit(f"worker never got partitions:\n{self.tail()}")

    def ready(self) -> dict[str, float]:
        """Seconds from process start to each start-up milestone reached."""
        return {f"{name}_s": at - self.started for name, at in sorted(self.milestones.items(), key=lambda m: m[1])}

    def finish(self, terminate: bool = False) -> dict[str, Any]:
        """Reap the child (SIGTERM first if asked): exit code, peak RSS, CPU time.

        Peak RSS is the largest /proc VmHWM sampled while it ran, not wait4's ru_maxrss:
        subprocess starts children with vfork, so ru_maxrss also counts this (large) process.
        The CPU time includes the child's own children (its workers under ``--processes``).
        """
        self.alive()
        if terminate:
            self.proc.send_signal(signal.SIGTERM)
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self._reader.join(timeout=5)
        own = self.vm_hwm_kib.get(self.proc.pid, 0)
        return {"returncode": self.proc.returncode, "peak_rss_mib": own / 1024,
                "tree_peak_rss_mib": sum(self.vm_hwm_kib.values()) / 1024, "processes_seen": len(self.vm_hwm_kib),
                "cpu_user_s": usage.ru_utime, "cpu_sys_s": usage.ru_stime, "ready": self.ready(),
                "log_head": self.lines[:4], "summary": self.lines[-1:]}


def run_to_end(settings: KafkaSettings, model_dir: Path, group_prefix: str, *extra: str,
               attempts: int = 3, device: str = "cpu") -> tuple[WorkerProcess, float, dict[str, Any], int]:
    """Start the worker in a fresh group and wait for its last commit at the input topic's end.

    A start whose worker leaves cleanly (``--exit-when-idle``) before the end was handed no
    partition: kafka-python 3.0.12 can drop an assignment that arrives while a short poll times
    out (the member then idles, the group believing it owns the partitions). Such a start is
    counted and made again in a new group, ``attempts`` times at most. Returns the worker, the
    perf_counter time of the last commit, its ``finish()`` result and the dropped starts. ``device``:
    the worker's ``--device``.
    """
    from bench.worker.topic import end_offsets, wait_committed

    ends = end_offsets(settings)
    for dropped in range(attempts):
        group = f"{group_prefix}-{uuid.uuid4().hex[:8]}"
        worker = WorkerProcess(settings, model_dir, group, *extra, device=device)
        try:
            done_at = wait_committed(settings.bootstrap_servers, group, ends, alive=worker.alive, tail=worker.tail)
        except SystemExit:
            result = worker.finish()
            if result["returncode"] != 0 or dropped + 1 == attempts:
                raise
            print(f"a worker of group {group} left without its partitions; starting again", file=sys.stderr)
            continue
        return worker, done_at, worker.finish(), dropped
    raise AssertionError("unreachable")
