"""Throughput, latency, scoring speed and memory of the streaming worker, in one run.

    python bench/worker_bench.py --json runs/bench/worker.json

Simulates a bank, trains a small model on a history window, fills one 3-partition topic
with every later transaction (labels dropped) through the project's producer, and then
measures against that same topic:

1. the ceiling: a bare kafka-python consumer that only fetches and decodes each value;
2. the worker as a subprocess (``python -m pipeline``), fresh consumer group, from
   process start (and from partition assignment) to the last commit;
3. a naive one-message-at-a-time consumer, as tutorials write it, on a prefix;
4. end-to-end latency at fixed input rates (event time = send time);
5. ``Scorer.score`` alone on prebuilt float32 matrices;
6. the worker's peak RSS.

Prints a markdown table and writes every number to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition  # noqa: E402
from kafka.errors import KafkaError  # noqa: E402

from pipeline.config import KafkaSettings  # noqa: E402
from pipeline.schema import decode, format_event_time  # noqa: E402
from pipeline.topics import ensure_topics  # noqa: E402

SCORING_SIZES = (256, 1024, 4096, 16384, 65536)
# The worker's own fetch settings (pipeline/worker.py), so the ceiling fetches the same way.
FETCH = {"max_partition_fetch_bytes": 4 * 1024 * 1024, "fetch_max_bytes": 64 * 1024 * 1024}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, required=True, help="write all results here")
    p.add_argument("--customers", type=int, default=20000)
    p.add_argument("--terminals", type=int, default=40000)
    p.add_argument("--warmup-days", type=int, default=30, help="feature warm-up, neither trained on nor streamed")
    p.add_argument("--train-days", type=int, default=7, help="training window after the warm-up")
    p.add_argument("--stream-days", type=int, default=14, help="days after the training window, streamed")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--score", default="reconstruction", choices=("reconstruction", "hybrid", "auto"),
                   help="the model's score (fit --score); reconstruction keeps the figures comparable with "
                        "earlier runs, hybrid adds a kNN distance that costs CPU per record")
    p.add_argument("--naive-records", type=int, default=20000, help="prefix the naive consumer reads")
    p.add_argument("--rates", default="1000,10000", help="input rates (tx/s) for the latency runs")
    p.add_argument("--latency-seconds", type=float, default=20.0, help="feeding time per latency run")
    p.add_argument("--second-batch", type=int, default=16384, help="max_batch of the second worker row; 0 skips")
    p.add_argument("--modes", default="at-least-once,exactly-once",
                   help="processing guarantees to measure the worker and its latency in")
    p.add_argument("--profile-records", type=int, default=100_000,
                   help="cProfile an in-process worker over this many records; 0 skips")
    p.add_argument("--bootstrap-servers", default=None, help="use this broker instead of starting one")
    p.add_argument("--kafka-home", type=Path, default=Path(tempfile.gettempdir()) / "worker-bench-kafka")
    p.add_argument("--max-load", type=float, default=1.5, help="wait while the 1-min load average is above")
    p.add_argument("--max-load-wait", type=float, default=300.0,
                   help="longest wait for a quiet machine before each measurement (s)")
    return p


# -- machine, load ---------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines()
    return {"nproc": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "lscpu": lscpu[:12],
            "python": platform.python_version(), "platform": platform.platform(),
            "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def wait_for_quiet(max_load: float, max_wait_s: float) -> dict[str, float]:
    """Wait (bounded) until the 1-minute load average drops below ``max_load``; report it."""
    started = time.monotonic()
    while os.getloadavg()[0] > max_load and time.monotonic() - started < max_wait_s:
        time.sleep(10)
    load1, load5, load15 = os.getloadavg()
    return {"load1": load1, "load5": load5, "load15": load15, "waited_s": round(time.monotonic() - started)}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- data and model --------------------------------------------------------------------------
def simulate_and_train(args: argparse.Namespace, root: Path) -> tuple[pd.DataFrame, Path, dict[str, Any]]:
    """The stream (rows after the training window) and a model version trained on the window."""
    from pipeline.features import HANDBOOK
    from producer.simulator import SimulatorConfig, simulate
    from trainer.fit import FitOptions, run_fit
    from trainer.split import SplitSpec
    from trainer.train import TrainConfig

    start_train, start_stream = args.warmup_days, args.warmup_days + args.train_days
    t0 = time.perf_counter()
    frame = simulate(SimulatorConfig(n_customers=args.customers, n_terminals=args.terminals,
                                     n_days=start_stream + args.stream_days, seed=7))
    sim_s = time.perf_counter() - t0
    days = frame["TX_TIME_DAYS"]
    history = frame[(days >= start_train) & (days < start_stream)].reset_index(drop=True)
    stream = frame[days >= start_stream].reset_index(drop=True)
    options = FitOptions(output=root, train=TrainConfig(epochs=args.epochs, seed=0, progress=False),
                         split=SplitSpec(val_fraction=0.2, test_fraction=0.0), device="cpu",
                         baselines=False, publish=False, score=args.score)
    t0 = time.perf_counter()
    version = run_fit(history, HANDBOOK, options).version_dir
    info = {"simulated_rows": len(frame), "simulate_s": sim_s, "train_rows": len(history),
            "train_s": time.perf_counter() - t0, "stream_rows": len(stream), "epochs": args.epochs,
            "score": args.score}
    return stream, version, info


# -- broker and topics -----------------------------------------------------------------------
@contextmanager
def broker(args: argparse.Namespace) -> Iterator[str]:
    """Bootstrap servers of the given broker, or of a local one started (and stopped) here."""
    if args.bootstrap_servers:
        yield args.bootstrap_servers
        return
    import shutil

    from deploy.kafka.local import DEFAULT_HOME, LocalKafka

    home = args.kafka_home
    if not (home / "libs").exists() and (DEFAULT_HOME / "libs").exists():
        shutil.copytree(DEFAULT_HOME / "libs", home / "libs", symlinks=True)
    local = LocalKafka(home, heap="1g")
    state = local.start()
    try:
        yield state.bootstrap_servers
    finally:
        local.stop()


def topics_for(bootstrap: str, tag: str) -> KafkaSettings:
    return KafkaSettings.build(environ={}, overrides={
        "bootstrap_servers": bootstrap, "input_topic": f"bench-tx-{tag}", "alerts_topic": f"bench-alerts-{tag}",
        "dead_letter_topic": f"bench-dlq-{tag}", "client_id": f"bench-{tag}"})


def wire_records(frame: pd.DataFrame) -> list[tuple[bytes | None, bytes]]:
    """The exact (key, value) bytes the project's producer sends for these rows, labels dropped."""
    from producer.tables import iter_records, resolve_spec

    return list(iter_records(frame, resolve_spec(frame, "handbook"), drop_label=True))


def fill_topic(settings: KafkaSettings, records: list[tuple[bytes | None, bytes]]) -> dict[str, Any]:
    """Produce every record once, with the project's producer code, into a 3-partition topic."""
    from producer.send import make_producer, send_records

    ensure_topics(settings, [settings.input_topic, settings.alerts_topic, settings.dead_letter_topic], 3)
    producer = make_producer(settings)
    try:
        report = send_records(records, settings.input_topic, producer, progress=False)
    finally:
        producer.close()
    if report.acked != len(records):
        raise SystemExit(f"only {report.acked} of {len(records)} records acknowledged: {report.errors}")
    return {"records": report.acked, "seconds": report.seconds, "tx_s": report.rate,
            "bytes": sum(len(v) for _, v in records)}


def end_offsets(settings: KafkaSettings) -> dict[TopicPartition, int]:
    consumer = KafkaConsumer(**settings.client_options(), group_id=None)
    try:
        parts = [TopicPartition(settings.input_topic, p)
                 for p in sorted(consumer.partitions_for_topic(settings.input_topic) or ())]
        return consumer.end_offsets(parts)
    finally:
        consumer.close()


# -- 1. ceiling ------------------------------------------------------------------------------
def bench_ceiling(settings: KafkaSettings, total: int) -> dict[str, Any]:
    """A bare consumer (assigned, no group) that fetches and decodes every record."""
    started = time.perf_counter()
    consumer = KafkaConsumer(**settings.client_options(), group_id=None, enable_auto_commit=False,
                             max_poll_records=4096, **FETCH)
    consumer.assign(list(end_offsets(settings)))
    consumer.seek_to_beginning()
    n = bad = 0
    while n < total:
        for records in consumer.poll(timeout_ms=1000).values():
            for record in records:
                bad += not hasattr(decode(record.value), "event_time_ms")
            n += len(records)
    seconds = time.perf_counter() - started
    consumer.close()
    return {"records": n, "undecodable": bad, "seconds": seconds, "tx_s": n / seconds}


# -- 2. worker subprocess --------------------------------------------------------------------
class WorkerProcess:
    """``python -m pipeline`` as a child: its log lines timestamped on arrival, its rusage on exit."""

    def __init__(self, settings: KafkaSettings, model_dir: Path, group: str, *extra: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUD_")}
        env["PYTHONUNBUFFERED"] = "1"
        cmd = [sys.executable, "-m", "pipeline", "--bootstrap-servers", settings.bootstrap_servers,
               "--input-topic", settings.input_topic, "--alerts-topic", settings.alerts_topic,
               "--dead-letter-topic", settings.dead_letter_topic, "--client-id", settings.client_id,
               "--model-dir", str(model_dir), "--consumer-group", group, "--device", "cpu",
               "--reload-interval-s", "0", *extra]
        self.command = cmd
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.assigned_at: float | None = None
        self.lines: list[str] = []
        self.vm_hwm_kib = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if self.assigned_at is None and "partitions assigned: [T" in line:
                self.assigned_at = time.perf_counter()
            self.lines.append(line.rstrip())

    def alive(self) -> bool:
        """Whether the child still runs; samples its peak RSS (VmHWM) on the way."""
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
            kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
            self.vm_hwm_kib = max(self.vm_hwm_kib, kib)
        except (OSError, StopIteration, ValueError):
            pass
        return self.proc.poll() is None

    def wait_assigned(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while self.assigned_at is None and time.monotonic() < deadline and self.proc.poll() is None:
            time.sleep(0.05)
        if self.assigned_at is None:
            raise SystemExit("worker never got partitions:\n" + "\n".join(self.lines[-20:]))

    def finish(self, terminate: bool = False) -> dict[str, Any]:
        """Reap the child (SIGTERM first if asked): exit code, peak RSS, CPU time.

        Peak RSS is the largest /proc VmHWM sampled while it ran, not wait4's ru_maxrss:
        subprocess starts children with vfork, so ru_maxrss also counts this (large) process.
        """
        self.alive()
        if terminate:
            self.proc.send_signal(signal.SIGTERM)
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self._reader.join(timeout=5)
        return {"returncode": self.proc.returncode, "peak_rss_mib": self.vm_hwm_kib / 1024,
                "cpu_user_s": usage.ru_utime, "cpu_sys_s": usage.ru_stime, "log_head": self.lines[:4],
                "summary": self.lines[-1:]}


def wait_committed(bootstrap: str, group: str, ends: dict[TopicPartition, int], every_s: float = 0.1,
                   timeout_s: float = 600, alive: Callable[[], bool] = lambda: True) -> float:
    """perf_counter time at which the group's committed offsets first equal ``ends`` (polled)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="bench-offsets")
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and alive():
            try:
                offsets = admin.list_group_offsets(group).get(group, {})
            except KafkaError:
                offsets = {}
            if all(tp in offsets and offsets[tp].offset >= end for tp, end in ends.items()):
                return time.perf_counter()
            time.sleep(every_s)
    finally:
        admin.close()
    raise SystemExit(f"group {group} did not commit up to the end offsets")


def bench_worker(settings: KafkaSettings, model_dir: Path, total: int, max_batch: int | None,
                 mode: str = "at-least-once") -> dict[str, Any]:
    """Process start (and partition assignment) to the last commit; the idle-exit wait is not counted."""
    group = f"bench-worker-{uuid.uuid4().hex[:8]}"
    extra = ["--metrics-port", "0", "--exit-when-idle", "3", "--processing-guarantee", mode]
    if max_batch:
        extra += ["--max-batch", str(max_batch)]
    ends = end_offsets(settings)
    worker = WorkerProcess(settings, model_dir, group, *extra)
    done_at = wait_committed(settings.bootstrap_servers, group, ends, alive=worker.alive)
    result = worker.finish()
    from_start = done_at - worker.started
    from_assign = done_at - (worker.assigned_at or worker.started)
    return {"mode": mode, "max_batch": max_batch or 4096, "records": total, "seconds_from_start": from_start,
            "seconds_from_assignment": from_assign, "tx_s": total / from_start,
            "tx_s_from_assignment": total / from_assign, "startup_s": from_start - from_assign,
            "command": " ".join(worker.command[1:]), **result}


# -- 3. naive consumer -----------------------------------------------------------------------
def bench_naive(settings: KafkaSettings, model_dir: Path, limit: int) -> dict[str, Any]:
    """One message at a time, as tutorials do: json deserializer, 1-row tensor, auto-commit."""
    import torch

    from pipeline.artifact import load_artifact
    from pipeline.scoring import Scorer

    scorer = Scorer(load_artifact(model_dir), device="cpu")
    features = scorer.artifact.feature_names
    opts = settings.client_options()
    with warnings.catch_warnings():  # kafka-python 3 prefers Serializer classes; tutorials pass lambdas
        warnings.simplefilter("ignore", DeprecationWarning)
        consumer = KafkaConsumer(settings.input_topic, **opts, group_id=f"bench-naive-{uuid.uuid4().hex[:8]}",
                                 auto_offset_reset="earliest", enable_auto_commit=True,
                                 value_deserializer=lambda v: json.loads(v))
        producer = KafkaProducer(**opts, value_serializer=lambda v: json.dumps(v).encode())
    n = alerts = 0
    started = first = time.perf_counter()
    for message in consumer:
        if n == 0:
            first = time.perf_counter()
        tx = message.value
        x = torch.tensor([[tx[f] for f in features]], dtype=torch.float32)  # (1, features)
        result = scorer.score(x.numpy())
        if result.flags[0]:
            producer.send(settings.alerts_topic, {"transaction_id": tx["transaction_id"],
                                                  "score": float(result.scores[0])})
            alerts += 1
        n += 1
        if n >= limit:
            break
    seconds = time.perf_counter() - first
    producer.flush()
    producer.close()
    consumer.close()
    return {"records": n, "alerts": alerts, "seconds": seconds, "tx_s": n / seconds,
            "join_s": first - started, "commit": "auto-commit (enable_auto_commit=True, every 5 s)"}


# -- 4. latency at fixed input rates ---------------------------------------------------------
def now_stamp() -> bytes:
    """The current time as the 24-character RFC 3339 stamp the producer writes."""
    return format_event_time(time.time_ns() // 1_000_000).encode()


def feed(settings: KafkaSettings, records: list[tuple[bytes | None, bytes]], rate: float, seconds: float
         ) -> dict[str, Any]:
    """Send at ``rate`` with the project's producer and pacer, event_time stamped at send time."""
    from producer.send import Pacer, make_producer

    producer = make_producer(settings)
    pacer = Pacer(rate)
    n = int(min(len(records), rate * seconds))
    started = time.perf_counter()
    for i in range(n):
        pacer.wait(i)
        key, value = records[i]
        at = value.index(b'"event_time":"') + 14
        producer.send(settings.input_topic, key=key, value=value[:at] + now_stamp() + value[at + 24:])
    sent_s = time.perf_counter() - started
    producer.flush(timeout=120)
    producer.close()
    return {"target_tx_s": rate, "sent": n, "send_s": sent_s, "achieved_tx_s": n / sent_s}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def histogram_quantiles(text: str, name: str, qs: tuple[float, ...]) -> dict[str, float]:
    """Quantiles from a Prometheus text histogram, interpolated within buckets (histogram_quantile)."""
    from prometheus_client.parser import text_string_to_metric_families

    buckets = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == f"{name}_bucket":
                buckets.append((float(s.labels["le"]), s.value))
    buckets.sort()
    total = buckets[-1][1]
    out = {"count": total}
    for q in qs:
        rank, lower, below = q * total, 0.0, 0.0
        for bound, cumulative in buckets:
            if cumulative >= rank:
                share = (rank - below) / max(cumulative - below, 1e-9)
                out[f"p{q * 100:g}"] = bound if bound == float("inf") else lower + (bound - lower) * share
                break
            lower, below = bound, cumulative
    return out


def alert_latencies(settings: KafkaSettings) -> np.ndarray:
    """Seconds from each alert's event_time to its Kafka timestamp (when the worker sent it)."""
    from pipeline.schema import parse_event_time

    consumer = KafkaConsumer(settings.alerts_topic, **settings.client_options(), group_id=None,
                             auto_offset_reset="earliest", consumer_timeout_ms=3000)
    latencies = [(r.timestamp - parse_event_time(json.loads(r.value)["event_time"])) / 1000 for r in consumer]
    consumer.close()
    return np.asarray(latencies)


def bench_latency(bootstrap: str, model_dir: Path, records: list, rate: float, seconds: float,
                  mode: str = "at-least-once") -> dict[str, Any]:
    """Worker running and idle, then fed at ``rate``; latency from its histogram and from alerts."""
    settings = topics_for(bootstrap, f"lat{int(rate)}-{uuid.uuid4().hex[:6]}")
    ensure_topics(settings, [settings.input_topic, settings.alerts_topic, settings.dead_letter_topic], 3)
    port, group = free_port(), f"bench-lat-{uuid.uuid4().hex[:8]}"
    worker = WorkerProcess(settings, model_dir, group, "--metrics-port", str(port), "--metrics-host", "127.0.0.1",
                           "--processing-guarantee", mode)
    worker.wait_assigned()
    time.sleep(1.0)
    fed = feed(settings, records, rate, seconds)
    wait_committed(bootstrap, group, end_offsets(settings), timeout_s=120, alive=worker.alive)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    hist = histogram_quantiles(text, "fraud_end_to_end_latency_seconds", (0.5, 0.99))
    usage = worker.finish(terminate=True)
    alerts = alert_latencies(settings)
    exact = {"count": int(alerts.size)}
    if alerts.size:
        exact.update({"p50": float(np.percentile(alerts, 50)), "p99": float(np.percentile(alerts, 99))})
    return {**fed, "mode": mode, "histogram": hist, "alerts": exact, "worker_peak_rss_mib": usage["peak_rss_mib"],
            "worker_cpu_s": usage["cpu_user_s"] + usage["cpu_sys_s"]}


# -- 5. scoring alone ------------------------------------------------------------------------
def bench_scoring(model_dir: Path, matrix: np.ndarray, sizes: tuple[int, ...] = SCORING_SIZES,
                  threads: int | None = None, min_s: float = 1.0) -> list[dict[str, Any]]:
    """Scorer.score on prebuilt float32 CPU matrices: tx/s per batch size (warm-up excluded).

    ``threads`` None keeps what Scorer chooses (one per available CPU).
    """
    import torch

    from pipeline.artifact import load_artifact
    from pipeline.scoring import Scorer

    before = torch.get_num_threads()
    scorer = Scorer(load_artifact(model_dir), device="cpu", max_batch=max(sizes))
    if threads:
        torch.set_num_threads(threads)
    rows = []
    for size in sizes:
        batch = np.ascontiguousarray(np.resize(matrix, (size, matrix.shape[1])), dtype=np.float32)
        scorer.score(batch)
        scorer.score(batch)
        reps, started = 0, time.perf_counter()
        while reps < 3 or time.perf_counter() - started < min_s:
            scorer.score(batch)
            reps += 1
        seconds = time.perf_counter() - started
        rows.append({"batch": size, "device": str(scorer.device), "torch_threads": torch.get_num_threads(),
                     "reps": reps, "ms_per_batch": 1000 * seconds / reps, "tx_s": size * reps / seconds})
    torch.set_num_threads(before)
    return rows


# -- profile ---------------------------------------------------------------------------------
def profile_worker(settings: KafkaSettings, model_dir: Path, records: int) -> dict[str, Any]:
    """cProfile of an in-process Worker (main thread) over the first ``records`` records."""
    import cProfile
    import io
    import pstats

    from prometheus_client import CollectorRegistry

    from pipeline.artifact import load_artifact
    from pipeline.config import WorkerSettings
    from pipeline.scoring import Scorer
    from pipeline.worker.app import Worker
    from pipeline.worker.metrics import WorkerMetrics

    ws = WorkerSettings.build(environ={}, overrides={
        "model_dir": str(model_dir), "consumer_group": f"bench-prof-{uuid.uuid4().hex[:8]}", "device": "cpu",
        "metrics_port": 0, "reload_interval_s": 0})
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
    return {"records": worker.stats.consumed, "wall_s": wall, "process_cpu_s": cpu, "main_thread_cpu_s": main_cpu,
            "top_tottime": out.getvalue()}


# -- report ----------------------------------------------------------------------------------
def table(r: dict[str, Any]) -> str:
    ceiling = r["ceiling"]["tx_s"]
    naive = r["naive"]["tx_s"]
    lines = ["| measurement | records | seconds | tx/s | / ceiling | / naive |", "|---|---:|---:|---:|---:|---:|",
             f"| ceiling: bare KafkaConsumer, fetch + decode | {r['ceiling']['records']:,} | "
             f"{r['ceiling']['seconds']:.1f} | {ceiling:,.0f} | 1.00 | {ceiling / naive:.1f} |"]
    for w in r["worker"]:
        for label, secs, rate in (("process start", w["seconds_from_start"], w["tx_s"]),
                                  ("partition assignment", w["seconds_from_assignment"], w["tx_s_from_assignment"])):
            lines.append(f"| worker {w.get('mode', 'at-least-once')}, max_batch={w['max_batch']}, {label} → last "
                         f"commit | {w['records']:,} | "
                         f"{secs:.1f} | {rate:,.0f} | {rate / ceiling:.2f} | {rate / naive:.1f} |")
    n = r["naive"]
    lines.append(f"| naive per-message consumer (first {n['records']:,} records only, {n['commit']}) | "
                 f"{n['records']:,} | {n['seconds']:.1f} | {naive:,.0f} | {naive / ceiling:.3f} | 1.0 |")
    lines += ["", "| mode | input rate target | achieved | sent | p50 (histogram) | p99 (histogram) | "
              "p50 (alerts) | p99 (alerts) | alerts |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for lat in r["latency"]:
        h, a = lat["histogram"], lat["alerts"]
        lines.append(f"| {lat.get('mode', 'at-least-once')} | {lat['target_tx_s']:,.0f} | "
                     f"{lat['achieved_tx_s']:,.0f} | {lat['sent']:,} | "
                     f"{1000 * h['p50']:.0f} ms | {1000 * h['p99']:.0f} ms | {1000 * a.get('p50', float('nan')):.0f} ms"
                     f" | {1000 * a.get('p99', float('nan')):.0f} ms | {a['count']} |")
    lines += ["", "| Scorer.score batch | device | torch threads | ms/batch | tx/s |", "|---:|---|---:|---:|---:|"]
    lines += [f"| {s['batch']:,} | {s['device']} | {s['torch_threads']} | {s['ms_per_batch']:.2f} | {s['tx_s']:,.0f} |"
              for s in r["scoring"]]
    rss = ", ".join(f"{w.get('mode', 'at-least-once')} max_batch={w['max_batch']}: {w['peak_rss_mib']:.0f} MiB"
                    for w in r["worker"])
    lines += ["", f"Worker peak RSS (/proc VmHWM): {rss}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results: dict[str, Any] = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    loads: dict[str, dict[str, float]] = {}
    results["load"] = loads

    def timed(name: str, run: Callable[[], Any]) -> Any:
        """Wait (bounded) for a quiet machine, note the load, run one measurement."""
        loads[name] = wait_for_quiet(args.max_load, args.max_load_wait)
        result = run()
        log(f"{name} (load {loads[name]}): {str(result)[:400]}")
        results.setdefault("steps", {})[name] = result  # so an interrupted run keeps what it measured
        args.json.write_text(json.dumps(results, indent=2, default=str))
        return result

    args.json.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="worker-bench-"))
    log(f"simulating and training under {work}")
    stream, model_dir, results["data"] = simulate_and_train(args, work / "models")
    log(f"{results['data']}")
    records = wire_records(stream)
    matrix = stream[list(_features(model_dir))].to_numpy(np.float32)
    with broker(args) as bootstrap:
        settings = topics_for(bootstrap, uuid.uuid4().hex[:8])
        results["fill"] = fill_topic(settings, records)
        log(f"filled: {results['fill']}")
        total = results["fill"]["records"]
        results["ceiling"] = timed("ceiling", lambda: bench_ceiling(settings, total))
        modes = args.modes.split(",")
        runs = [(modes[0], None)] + ([(modes[0], args.second_batch)] if args.second_batch else []) + \
            [(m, None) for m in modes[1:]]
        results["worker"] = [timed(f"worker-{m}-{b or 4096}",
                                   lambda m=m, b=b: bench_worker(settings, model_dir, total, b, m))
                             for m, b in runs]
        results["naive"] = timed("naive", lambda: bench_naive(settings, model_dir, args.naive_records))
        results["scoring"] = timed("scoring", lambda: bench_scoring(model_dir, matrix)
                                   + bench_scoring(model_dir, matrix, threads=1))
        results["latency"] = [
            timed(f"latency-{m}-{rate}", lambda r=float(rate), m=m: bench_latency(bootstrap, model_dir, records, r,
                                                                                  args.latency_seconds, m))
            for m in modes for rate in args.rates.split(",")]
        if args.profile_records:
            results["profile"] = timed("profile", lambda: profile_worker(settings, model_dir, args.profile_records))
    args.json.write_text(json.dumps(results, indent=2, default=str))
    print(table(results))
    print("\n1-minute load average before each measurement: "
          + ", ".join(f"{k} {v['load1']:.2f}" for k, v in loads.items()))
    if "profile" in results:
        p = results["profile"]
        print(f"\nprofile: {p['records']:,} records, wall {p['wall_s']:.1f}s, process CPU {p['process_cpu_s']:.1f}s, "
              f"main thread CPU {p['main_thread_cpu_s']:.1f}s\n{p['top_tottime']}")
    return 0


def _features(model_dir: Path) -> tuple[str, ...]:
    from pipeline.artifact import load_artifact

    return load_artifact(model_dir).feature_names


if __name__ == "__main__":
    sys.exit(main())
