"""``fraud-worker --processes N``: N workers in one group, own metrics ports, signals passed on, worst exit code."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from deploy.ports import free_port
from pipeline.config import KafkaSettings
from pipeline.worker.launcher import Launcher
from pipeline.worker.metrics import parse_samples
from tests.kafka_helpers import REPO
from tests.worker_helpers import alert_ids, committed_to_end, offline_flags, produce_frame, read_topic, wait_for


def unreachable() -> list[str]:
    """Flags of workers that wait (up to 300 s) for a broker nobody runs."""
    return ["--model-dir", "unused", "--bootstrap-servers", f"127.0.0.1:{free_port()}", "--connect-timeout-s", "300"]


class Launched:
    """``python -m pipeline --processes ...`` as a child, its output collected line by line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        env = env or {k: v for k, v in os.environ.items() if not k.startswith("FRAUD_")}
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=REPO,
                                     env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def count(self, fragment: str) -> int:
        return sum(fragment in line for line in self.lines)

    def child_pids(self) -> list[int]:
        assert wait_for(lambda: "started 2 workers" in self.text, timeout_s=60), self.text
        return [int(p) for p in re.findall(r"\d+", self.text.split("pids [", 1)[1].split("]", 1)[0])]

    def wait(self, timeout_s: float = 120) -> int:
        code = self.proc.wait(timeout=timeout_s)
        self._reader.join(timeout=10)
        return code


def gone(pid: int) -> bool:
    """The process has exited (reaped, or a zombie waiting for its new parent)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def child(code: str) -> list[str]:
    """A child that leaves with 0 on SIGTERM, like a worker, after running ``code``."""
    return [sys.executable, "-c", "import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n" + code]


def test_the_worst_exit_code_wins_and_a_failure_stops_the_others() -> None:
    commands = [child("time.sleep(120)"), child("time.sleep(0.5); sys.exit(3)"), child("sys.exit(0)")]
    assert Launcher(commands, threading.Event(), poll_s=0.05).run() == 3  # the sleeper was stopped, not waited for


def test_a_stop_before_the_start_starts_nothing() -> None:
    stop = threading.Event()
    stop.set()
    launcher = Launcher([child("sys.exit(5)")], stop)
    assert launcher.run() == 0 and launcher.children == []


def test_sigterm_is_passed_on_to_every_worker() -> None:
    launched = Launched("--processes", "2", "--metrics-port", "0", *unreachable())
    pids = launched.child_pids()
    assert wait_for(lambda: launched.count("cannot reach Kafka") == 2, timeout_s=60), launched.text
    launched.proc.send_signal(signal.SIGTERM)
    assert launched.wait() == 0, launched.text  # both finished cleanly, none was killed
    assert launched.count("finishing the batch in hand") == 2, launched.text
    assert all(wait_for(lambda p=p: gone(p), timeout_s=30) for p in pids)


@pytest.mark.parametrize("failing", [0, 1])
def test_a_failing_worker_stops_the_others_and_sets_the_exit_code(failing: int) -> None:
    base = free_port(consecutive=2)
    with socket.socket() as busy:  # one worker's metrics port is taken: it exits 2 at once
        busy.bind(("127.0.0.1", base + failing))
        busy.listen()
        launched = Launched("--processes", "2", "--metrics-host", "127.0.0.1", "--metrics-port", str(base),
                            *unreachable())
        code = launched.wait()  # the second, waiting up to 300 s for Kafka, is stopped instead
    assert code == 2, launched.text
    errors = [line for line in launched.lines if line.startswith("fraud-worker: error:")]
    assert len(errors) == 1 and str(base + failing) in errors[0], launched.text
    assert "stopping the others" in launched.text


def test_workers_do_not_outlive_a_killed_launcher() -> None:
    launched = Launched("--processes", "2", "--metrics-port", "0", *unreachable())
    pids = launched.child_pids()
    launched.proc.kill()
    launched.wait()
    assert all(wait_for(lambda p=p: gone(p), timeout_s=30) for p in pids), launched.text


def scrape(port: int) -> dict[str, float]:
    try:
        return parse_samples(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode())
    except OSError:
        return {}


@pytest.mark.integration
def test_two_processes_share_the_partitions_and_score_every_record_once(
        kafka_settings: KafkaSettings, kafka_env: dict, model_dir: Path, stream_frame: pd.DataFrame) -> None:
    frame = stream_frame.iloc[:6000]
    produce_frame(kafka_settings, frame.iloc[:10])  # three partitions, a few records
    group = f"gp-{kafka_settings.client_id}"
    base = free_port(consecutive=2)
    launched = Launched("--model-dir", str(model_dir), "--consumer-group", group, "--device", "cpu",
                        "--reload-interval-s", "0", "--processes", "2", "--metrics-host", "127.0.0.1",
                        "--metrics-port", str(base), env=kafka_env)
    try:
        def owned() -> list[float]:
            return sorted(scrape(port).get("fraud_assigned_partitions", 0) for port in (base, base + 1))

        assert wait_for(lambda: owned() == [1, 2], timeout_s=120), (owned(), launched.text)
        produce_frame(kafka_settings, frame.iloc[10:])
        assert wait_for(lambda: committed_to_end(kafka_settings, group), timeout_s=120), launched.text
        scored = [scrape(port)['fraud_transactions_total{outcome="scored"}'] for port in (base, base + 1)]
    finally:
        launched.proc.send_signal(signal.SIGTERM)
        code = launched.wait()
    assert code == 0, launched.text
    assert sum(scored) == len(frame) and all(n > 0 for n in scored), scored  # each record scored by one worker
    consumed = [int(n) for n in re.findall(r"^consumed (\d+):", launched.text, re.MULTILINE)]
    assert sorted(consumed) == sorted(int(n) for n in scored), launched.text
    alerts = read_topic(kafka_settings, kafka_settings.alerts_topic)
    assert sorted(alert_ids(alerts)) == sorted(offline_flags(model_dir, frame))  # same decisions, no duplicates
