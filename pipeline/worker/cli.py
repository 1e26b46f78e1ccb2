"""``fraud-worker``: score the input topic, publish alerts and dead letters, serve /metrics.

Exit codes: 0 after a clean stop (SIGTERM/SIGINT, or ``--exit-when-idle``); 1 when Kafka
refused the worker's outputs for good or a rebalance listener failed (nothing of the batch
in hand committed); 2 for a bad flag, setting or model, before anything is consumed.
With ``--processes N``, the worst exit code of the N workers.
"""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from pipeline.cliargs import OneLineParser, VersionAction, print_error
from pipeline.config import KafkaSettings, WorkerSettings
from pipeline.errors import ConfigError, FraudPipelineError

if TYPE_CHECKING:  # torch and kafka load only once the arguments are known to be good
    from pipeline.scores import BatchScorer
    from pipeline.worker.metrics import WorkerMetrics

log = logging.getLogger("pipeline")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="fraud-worker", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action=VersionAction)
    KafkaSettings.add_arguments(parser)
    WorkerSettings.add_arguments(parser)
    parser.add_argument("--exit-when-idle", type=float, default=None, metavar="SECONDS",
                        help="stop after this long without records, counted while the worker holds a settled "
                             "assignment (time spent joining or rebalancing does not count; batch jobs, "
                             "benchmarks)")
    parser.add_argument("--partitions", type=int, default=3,
                        help="partitions for topics this worker has to create")
    parser.add_argument("--processes", type=int, default=1, metavar="N",
                        help="run N worker processes in the consumer group, on this host; each serves metrics on "
                             "--metrics-port + its index (0: none); signals are passed on to all of them")
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                        help="DEBUG shows kafka-python's own log lines too")
    return parser


def load_scorer(path: Path, settings: WorkerSettings) -> BatchScorer:
    """Load and validate a model version and put it on the configured device: scored in NumPy on the
    CPU where it can be, so that PyTorch is imported only for CUDA or a model that needs it."""
    from pipeline.artifact import load_artifact
    from pipeline.cpus import available_cpus
    from pipeline.npscorer import serve

    return serve(load_artifact(path), device=settings.device, max_batch=settings.max_batch,
                 threads=scoring_threads(settings.torch_threads, available_cpus()))


def scoring_threads(torch_threads: int, cpus: int) -> int:
    """CPU scoring threads: ``--torch-threads``, or (0) one per CPU but one, which decoding and Kafka's IO
    thread need."""
    return torch_threads or max(1, cpus - 1)


def install_signal_handlers(stop: threading.Event) -> None:
    """SIGTERM and SIGINT ask the worker to finish its batch, commit and leave."""
    def handler(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: finishing the batch in hand, then leaving", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def run(argv: list[str] | None = None) -> int:
    stop = threading.Event()
    install_signal_handlers(stop)  # first: a signal during the slow start-up still ends cleanly
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # kafka-python logs every refused connection at ERROR; the worker says what matters itself.
    logging.getLogger("kafka").setLevel(logging.DEBUG if args.log_level == "DEBUG" else logging.CRITICAL)
    try:
        kafka = KafkaSettings.build(args)
        settings = WorkerSettings.build(args)
        if args.partitions < 1:
            raise ConfigError(f"--partitions {args.partitions}: a topic needs at least one partition")
        if args.processes != 1:
            from pipeline.worker import launcher

            launcher.check(args.processes, settings.metrics_port)
            return launcher.launch(sys.argv[1:] if argv is None else argv, args.processes, settings.metrics_port,
                                   settings.torch_threads, stop)
        log.info("starting with %s and %s", kafka, settings)
        return _serve(kafka, settings, args, stop)
    except FraudPipelineError as err:
        print_error("fraud-worker", str(err))
        return 2


def _serve(kafka: KafkaSettings, settings: WorkerSettings, args: argparse.Namespace, stop: threading.Event) -> int:
    from prometheus_client import CollectorRegistry, start_http_server

    from pipeline.worker.metrics import WorkerMetrics

    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry, process=True)
    server = None
    if settings.metrics_port:  # first: a busy port is said at once, and /metrics answers during start-up
        try:
            server, _thread = start_http_server(settings.metrics_port, settings.metrics_host, registry=registry)
        except OSError as err:
            raise ConfigError(f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port} ({err}); "
                              "set --metrics-port / FRAUD_METRICS_PORT to a free port, or 0 to disable") from err
        log.info("metrics at http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)
    try:
        return _run_worker(kafka, settings, args, stop, metrics)
    finally:
        if server is not None:
            server.shutdown()


def _run_worker(kafka: KafkaSettings, settings: WorkerSettings, args: argparse.Namespace, stop: threading.Event,
                metrics: WorkerMetrics) -> int:
    from pipeline.topics import check_replication, ensure_topics, wait_for_kafka, warn_if_absent

    wait_for_kafka(kafka, stop=stop)  # before PyTorch and the model load: a wrong address is said at once
    if stop.is_set():
        return 0
    from pipeline.artifact import CHALLENGER
    from pipeline.errors import ModelArtifactError
    from pipeline.worker.app import Worker
    from pipeline.worker.reload import ModelWatcher
    from pipeline.worker.state import check_input_form, prepare_topics

    scorer = load_scorer(Path(settings.model_dir), settings)
    if stop.is_set():
        return 0
    outputs = [kafka.alerts_topic, kafka.dead_letter_topic, *([kafka.features_topic] if kafka.features_topic else [])]
    warn_if_absent(kafka, kafka.input_topic)
    ensure_topics(kafka, [kafka.input_topic, *outputs], args.partitions)
    check_replication(kafka, outputs)  # the input topic is the producer's; what the worker writes is checked
    check_input_form(kafka, scorer.artifact)  # a model/topic mismatch is said at once, not as dead letters
    # raw input: a partition-count mismatch of its topics is a bad setting, said here (exit 2)
    state_topics = prepare_topics(kafka, settings.consumer_group) if scorer.artifact.input_form == "raw" else None
    watcher = ModelWatcher(settings.model_dir, lambda p: load_scorer(p, settings), metrics,
                           settings.reload_interval_s)
    # a challenger (the root's `challenger` link): scored beside the current model, followed like it
    shadow = ModelWatcher(settings.model_dir, lambda p: load_scorer(p, settings), metrics,
                          settings.reload_interval_s, link=CHALLENGER)
    challenger = None
    if (Path(settings.model_dir) / CHALLENGER).exists():
        try:
            challenger = load_scorer(Path(settings.model_dir) / CHALLENGER, settings)
        except ModelArtifactError as err:
            log.error("challenger at %s refused: %s; only the current model is scored", settings.model_dir, err)
    worker = Worker(kafka, settings, scorer, metrics, take_new_scorer=watcher.take,  # type: ignore[arg-type]
                    state_topics=state_topics, challenger=challenger, take_new_challenger=shadow.take)
    worker.stop = stop
    watcher.start()
    shadow.start()
    # What start-up built (PyTorch, the model, the clients) lives as long as the worker: move it out of the
    # collector's reach, so that a full collection walks the batch's objects only (here: 130 ms -> 5 ms
    # per gen-2 pause, alert latency p99 342 -> 236 ms at 10k tx/s; README, Benchmarks)
    gc.collect()
    gc.freeze()
    try:
        stats = worker.run(idle_exit_s=None if stop.is_set() else args.exit_when_idle)
    except FraudPipelineError as err:
        print_error("fraud-worker", str(err))
        return 1
    finally:
        watcher.close()
        shadow.close()
    print(f"consumed {stats.consumed}: {stats.scored} scored, {stats.invalid} dead-lettered, "
          f"{stats.alerts} alerts, {stats.batches} batches"
          + (f", {worker.stages.late_events} late events, {worker.stages.late_labels} late labels"
             if worker.stages is not None else ""))
    return 0


def main() -> None:
    """Console-script entry point."""
    sys.exit(run())
