"""4. End-to-end latency at fixed input rates: event time = send time, paced by the producer's Pacer."""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from kafka import KafkaConsumer

from bench.worker.process import WorkerProcess
from bench.worker.topic import create_topics, end_offsets, topics_for, wait_committed
from deploy.ports import free_port
from pipeline.config import KafkaSettings
from pipeline.schema import format_event_time

HISTOGRAM = "fraud_end_to_end_latency_seconds"


def now_stamp() -> bytes:
    """The current time as the 24-character RFC 3339 stamp the producer writes."""
    return format_event_time(time.time_ns() // 1_000_000).encode()


def feed(settings: KafkaSettings, records: list[tuple[bytes | None, bytes]], rate: float, seconds: float
         ) -> dict[str, Any]:
    """Send at ``rate`` with the project's producer and pacer, event_time stamped at send time."""
    from producer.send import Pacer, make_producer

    producer = make_producer(settings)
    # the topic's metadata first: a first send waits for it, and the records stamped meanwhile would reach
    # the broker in one burst, already late (up to 0.3 s seen), charged to the worker
    producer.partitions_for(settings.input_topic)
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


def alert_latencies(settings: KafkaSettings) -> tuple[np.ndarray, np.ndarray]:
    """Seconds from each alert's event_time to its Kafka timestamp (when the worker sent it), and each
    alert's event_time (ms)."""
    from pipeline.schema import parse_event_time

    consumer = KafkaConsumer(settings.alerts_topic, **settings.client_options(), group_id=None,
                             auto_offset_reset="earliest", consumer_timeout_ms=3000)
    pairs = np.asarray([(parse_event_time(json.loads(r.value)["event_time"]), r.timestamp) for r in consumer],
                       dtype=np.float64).reshape(-1, 2)
    consumer.close()
    return (pairs[:, 1] - pairs[:, 0]) / 1000, pairs[:, 0]


def bench_latency(bootstrap: str, model_dir: Path, records: list, rate: float, seconds: float,
                  mode: str = "at-least-once", in_flight: int | None = None, client: str = "kafka-python",
                  max_wait_ms: int | None = None) -> dict[str, Any]:
    """Worker running and idle, then fed at ``rate``; latency from its histogram and from alerts.

    ``in_flight``: the worker's ``--max-in-flight`` (None: its default); ``client``: its ``--kafka-client``;
    ``max_wait_ms``: its ``--max-wait-ms`` (None: its default)."""
    extra = ["--max-in-flight", str(in_flight)] if in_flight else []
    extra += ["--max-wait-ms", str(max_wait_ms)] if max_wait_ms is not None else []
    extra += ["--kafka-client", client]
    settings = topics_for(bootstrap, f"lat{int(rate)}-{uuid.uuid4().hex[:6]}")
    create_topics(settings)
    port, group, worker = free_port(), "", None
    for dropped in range(3):  # a start whose assignment kafka-python dropped (bench.worker.process.run_to_end)
        group = f"bench-lat-{uuid.uuid4().hex[:8]}"
        worker = WorkerProcess(settings, model_dir, group, "--metrics-port", str(port), "--metrics-host",
                               "127.0.0.1", "--processing-guarantee", mode, *extra)
        try:
            worker.wait_assigned(timeout_s=45)
            break
        except SystemExit:
            stuck = worker.alive()  # running, partitions never handed over; else it failed: say why
            worker.finish(terminate=True)
            if not stuck or dropped == 2:
                raise
    assert worker is not None
    time.sleep(1.0)
    fed = feed(settings, records, rate, seconds)
    wait_committed(bootstrap, group, end_offsets(settings), timeout_s=120, alive=worker.alive, tail=worker.tail)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    hist = histogram_quantiles(text, HISTOGRAM, (0.5, 0.99))
    usage = worker.finish(terminate=True)
    alerts, event_ms = alert_latencies(settings)
    exact = {"count": int(alerts.size)}
    if alerts.size:
        exact.update({"p50": float(np.percentile(alerts, 50)), "p99": float(np.percentile(alerts, 99))})
        settled = alerts[event_ms >= event_ms.min() + 1000]  # the first second of traffic left out: first
        if settled.size:  # sends and commits, first batches' backlog
            exact.update({"p99_after_1s": float(np.percentile(settled, 99))})
    return {**fed, "mode": mode, "client": client, "in_flight": in_flight, "max_wait_ms": max_wait_ms,
            "dropped_starts": dropped,
            "histogram": hist, "alerts": exact,
            "worker_peak_rss_mib": usage["peak_rss_mib"], "worker_cpu_s": usage["cpu_user_s"] + usage["cpu_sys_s"]}
