"""2. The worker as a subprocess (``python -m pipeline``), fresh consumer group, from process start
(and from partition assignment) to the last commit; 6. its peak RSS; 7. scaling on one host: ``fraud-worker
--processes N`` (N workers in one consumer group), rebalances while the workers join counted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.worker.process import run_to_end
from pipeline.config import KafkaSettings

DEFAULT_BATCH = 4096  # the worker's default --max-batch
DEFAULT_IN_FLIGHT = 4  # the worker's default --max-in-flight (at-least-once, featured input; exactly-once: 1)


def bench_worker(settings: KafkaSettings, model_dir: Path, total: int, max_batch: int | None,
                 mode: str = "at-least-once", in_flight: int | None = None, client: str = "kafka-python",
                 device: str = "cpu") -> dict[str, Any]:
    """Process start (and partition assignment) to the last commit; the idle-exit wait is not counted.

    ``in_flight``: the worker's ``--max-in-flight`` (None: its default); ``client``: its ``--kafka-client``;
    ``device``: its ``--device``."""
    extra = ["--metrics-port", "0", "--exit-when-idle", "3", "--processing-guarantee", mode,
             "--kafka-client", client]
    if in_flight:
        extra += ["--max-in-flight", str(in_flight)]
    if max_batch:
        extra += ["--max-batch", str(max_batch)]
    flight = 1 if mode == "exactly-once" else in_flight or DEFAULT_IN_FLIGHT
    return {"mode": mode, "client": client, "device": device, "max_batch": max_batch or DEFAULT_BATCH,
            "in_flight": flight, **_timed(total, *run_to_end(settings, model_dir, "bench-worker", *extra,
                                                                device=device))}


def bench_processes(settings: KafkaSettings, model_dir: Path, total: int, processes: int) -> dict[str, Any]:
    """``--processes N`` over the whole topic; each worker stops 3 s after its last record."""
    worker, *run = run_to_end(settings, model_dir, "bench-procs", "--processes", str(processes), "--metrics-port",
                              "0", "--exit-when-idle", "3")
    return {"processes": processes, "assignments": worker.assignments, **_timed(total, worker, *run)}


def _timed(total: int, worker: Any, done_at: float, result: dict[str, Any], dropped: int) -> dict[str, Any]:
    """A run's rates from process start and from partition assignment to the last commit."""
    from_start = done_at - worker.started
    from_assign = done_at - (worker.assigned_at or worker.started)
    return {"records": total, "seconds_from_start": from_start, "seconds_from_assignment": from_assign,
            "tx_s": total / from_start, "tx_s_from_assignment": total / from_assign,
            "startup_s": from_start - from_assign, "dropped_starts": dropped,
            "command": " ".join(worker.command[1:]), **result}
