"""``fraud-worker``: score the input topic, publish alerts and dead letters, serve /metrics."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from prometheus_client import CollectorRegistry, start_http_server

from pipeline.artifact import load_artifact
from pipeline.config import KafkaSettings, WorkerSettings
from pipeline.errors import FraudPipelineError
from pipeline.metrics import WorkerMetrics
from pipeline.reload import ModelWatcher
from pipeline.scoring import Scorer, available_cpus
from pipeline.topics import ensure_topics
from pipeline.worker import Worker

log = logging.getLogger("pipeline")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fraud-worker", description=__doc__)
    KafkaSettings.add_arguments(parser)
    WorkerSettings.add_arguments(parser)
    parser.add_argument("--exit-when-idle", type=float, default=None, metavar="SECONDS",
                        help="stop after this long without records (batch jobs, benchmarks)")
    parser.add_argument("--partitions", type=int, default=3,
                        help="partitions for topics this worker has to create")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    return parser


def load_scorer(path: Path, settings: WorkerSettings) -> Scorer:
    """Load and validate a model version and put it on the configured device."""
    threads = settings.torch_threads or max(1, available_cpus() - 1)
    return Scorer(load_artifact(path), device=settings.device, max_batch=settings.max_batch, threads=threads)


def install_signal_handlers(stop: threading.Event) -> None:
    """SIGTERM and SIGINT ask the worker to finish its batch, commit and leave."""
    def handler(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: finishing the batch in hand, then leaving", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.ERROR)
    try:
        kafka = KafkaSettings.build(args)
        settings = WorkerSettings.build(args)
        log.info("starting with %s and %s", kafka, settings)
        scorer = load_scorer(Path(settings.model_dir), settings)
        registry = CollectorRegistry()
        metrics = WorkerMetrics(registry)
        ensure_topics(kafka, [kafka.input_topic, kafka.alerts_topic, kafka.dead_letter_topic], args.partitions)
    except FraudPipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    server = None
    if settings.metrics_port:
        server, _thread = start_http_server(settings.metrics_port, settings.metrics_host, registry=registry)
        log.info("metrics at http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)
    watcher = ModelWatcher(settings.model_dir, lambda p: load_scorer(p, settings), metrics,
                           settings.reload_interval_s)
    worker = Worker(kafka, settings, scorer, metrics, take_new_scorer=watcher.take)  # type: ignore[arg-type]
    install_signal_handlers(worker.stop)
    watcher.start()
    try:
        stats = worker.run(idle_exit_s=args.exit_when_idle)
    except FraudPipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        watcher.close()
        if server is not None:
            server.shutdown()
    print(f"consumed {stats.consumed}: {stats.scored} scored, {stats.invalid} dead-lettered, "
          f"{stats.alerts} alerts, {stats.batches} batches")
    return 0


def main() -> None:
    """Console-script entry point."""
    sys.exit(run())
