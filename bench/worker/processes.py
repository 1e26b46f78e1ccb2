"""7. Scaling on one host: ``fraud-worker --processes N`` (N workers in one consumer group), fresh group,
from the first partition assignment to the last commit; rebalances while the workers join are counted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.worker.process import run_to_end
from pipeline.config import KafkaSettings


def bench_processes(settings: KafkaSettings, model_dir: Path, total: int, processes: int) -> dict[str, Any]:
    """``--processes N`` over the whole topic; each worker stops 3 s after its last record."""
    worker, done_at, result, dropped = run_to_end(settings, model_dir, "bench-procs", "--processes", str(processes),
                                                  "--metrics-port", "0", "--exit-when-idle", "3")
    from_start = done_at - worker.started
    from_assign = done_at - (worker.assigned_at or worker.started)
    return {"processes": processes, "records": total, "seconds_from_start": from_start,
            "seconds_from_assignment": from_assign, "tx_s": total / from_start,
            "tx_s_from_assignment": total / from_assign, "assignments": worker.assignments,
            "dropped_starts": dropped, "command": " ".join(worker.command[1:]), **result}
