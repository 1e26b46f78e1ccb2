"""cProfile of an in-process worker: where the main thread's time goes."""

from __future__ import annotations

import cProfile
import io
import pstats
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from pipeline.config import KafkaSettings


def profile_worker(settings: KafkaSettings, model_dir: Path, records: int, client: str = "kafka-python"
                   ) -> dict[str, Any]:
    """cProfile of an in-process Worker (main thread) over the first ``records`` records, on ``client``."""
    from prometheus_client import CollectorRegistry

    from pipeline.artifact import load_artifact
    from pipeline.config import WorkerSettings
    from pipeline.scoring import Scorer
    from pipeline.worker.app import Worker
    from pipeline.worker.metrics import WorkerMetrics

    ws = WorkerSettings.build(environ={}, overrides={
        "model_dir": str(model_dir), "consumer_group": f"bench-prof-{uuid.uuid4().hex[:8]}", "device": "cpu",
        "metrics_port": 0, "reload_interval_s": 0, "kafka_client": client})
    worker = Worker(settings, ws, Scorer(load_artifact(model_dir), device="cpu", max_batch=ws.max_batch),
                    WorkerMetrics(CollectorRegistry()))

    def stopper() -> None:
        while worker.stats.consumed < records and not worker.stop.is_set():
            time.sleep(0.05)
        worker.stop.set()

    threading.Thread(target=stopper, daemon=True).start()
    profile = cProfile.Profile()
    cpu0, thread0, wall0 = time.process_time(), time.thread_time(), time.perf_counter()
    profile.runcall(worker.run)
    cpu, main_cpu, wall = time.process_time() - cpu0, time.thread_time() - thread0, time.perf_counter() - wall0
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(25)
    return {"client": client, "records": worker.stats.consumed, "wall_s": wall, "process_cpu_s": cpu,
            "main_thread_cpu_s": main_cpu, "top_tottime": out.getvalue()}
