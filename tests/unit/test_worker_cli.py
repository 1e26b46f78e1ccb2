"""``fraud-worker`` as a user starts it: fast answers, one line per mistake, clean exits on signals."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from deploy.ports import free_port
from tests.kafka_helpers import REPO


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUD_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def test_parsing_arguments_loads_neither_torch_nor_kafka() -> None:
    code = ("import sys; from pipeline.worker.cli import build_parser; build_parser().parse_args([]); "
            "print(sorted(m for m in ('torch', 'kafka', 'pandas', 'sklearn') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_version_and_bad_flags_answer_with_one_line() -> None:
    version = subprocess.run([sys.executable, "-m", "pipeline", "--version"], cwd=REPO, env=_env(),
                             capture_output=True, text=True, check=False)
    assert version.returncode == 0 and version.stdout.startswith("fraud-worker ")
    for args in (["--max-batch", "0"], ["--bootstrap-servers", "kafka:abc"], ["--processing-guarantee", "maybe"],
                 ["--partitions", "0", "--bootstrap-servers", "127.0.0.1:1", "--connect-timeout-s", "0"],
                 ["--log-level", "LOUD"], ["--request-timeout-ms", "9999999999"], ["--processes", "0"],
                 ["--replication-factor", "-1"],
                 ["--processes", "3", "--metrics-port", "65534"]):
        done = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=_env(),
                              capture_output=True, text=True, check=False)
        assert done.returncode == 2, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, (args, done.stderr)


def test_unreachable_broker_is_said_in_one_line_without_library_noise(tmp_path) -> None:
    port = free_port()
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pipeline", "--model-dir", str(tmp_path), "--metrics-port", "0",
                           "--bootstrap-servers", f"127.0.0.1:{port}", "--connect-timeout-s", "2"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("fraud-worker: error:")]
    assert len(errors) == 1 and f"127.0.0.1:{port}" in errors[0] and "refused" in errors[0]
    assert "kafka." not in done.stderr and "Traceback" not in done.stderr
    assert time.monotonic() - started < 30  # said before any model load or client timeout


def test_sigterm_during_start_up_ends_cleanly(tmp_path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "--model-dir", str(tmp_path), "--metrics-port", "0",
                             "--bootstrap-servers", f"127.0.0.1:{free_port()}", "--connect-timeout-s", "60"],
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    out = ""
    while "cannot reach Kafka" not in out and time.monotonic() < deadline:  # start-up under way
        out += proc.stdout.readline()  # type: ignore[union-attr]
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out + rest  # not -15: the handler is installed before anything slow


def test_busy_metrics_port_is_said_in_one_line_before_anything_else(tmp_path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "pipeline", "--model-dir", str(tmp_path),
                               "--metrics-host", "127.0.0.1", "--metrics-port", str(port),
                               "--bootstrap-servers", f"127.0.0.1:{free_port()}", "--connect-timeout-s", "30"],
                              cwd=REPO, env=_env(), capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("fraud-worker: error:")]
    assert len(errors) == 1 and str(port) in errors[0] and "FRAUD_METRICS_PORT" in errors[0]
    assert "cannot reach Kafka" not in done.stderr  # said before trying the broker
