"""Prometheus series of the worker. Built on a given registry; nothing is served at import.

Series (all prefixed ``fraud_``), as the dashboards and alerting rules in
``deploy/`` use them:

- ``transactions_total{outcome="scored|invalid"}``, ``alerts_total``,
  ``dead_letters_total{reason}``, ``batches_total``, ``errors_total{kind}``,
  ``model_reloads_total{result="ok|refused"}``
- histograms ``batch_size``, ``scoring_seconds``, ``end_to_end_latency_seconds``
  (event time to outputs acknowledged), ``anomaly_score``, ``score_ratio`` (score / threshold)
- raw input, online quality from delayed labels: ``quality_resolved_total{version,label,alerted}``,
  histogram ``quality_score_ratio{version,label}``, gauge
  ``quality_resolved_until_timestamp_seconds{partition}`` (see ``state.decisions``); gauge
  ``model_challenger{version}`` while a challenger is scored beside the serving model
- ``out_of_range_total``: scored transactions whose score is not finite (alerted, marked)
- gauges ``consumer_lag{topic,partition}`` (from the broker's committed offsets, set from the
  moment a partition is assigned), ``assigned_partitions``, ``model_threshold``,
  ``model_alert_rate`` (calibrated share), ``score_drift_psi``,
  ``last_batch_timestamp_seconds`` (last committed batch), ``loop_heartbeat_timestamp_seconds``
  (last turn of the main loop, idle or not)
- info ``model`` (version, device, model class)
- the standard ``process_*`` and ``python_*`` series of prometheus-client

Everything about a batch is counted once its outputs and offsets are committed; rates come
from the counters (``rate(fraud_transactions_total[1m])``), not from a gauge.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)

SIZE_BUCKETS = (1, 4, 16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
SCORE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 100.0, 1000.0)
DEAD_LETTER_REASONS = ("empty", "oversized", "not_json", "not_object", "missing_field", "bad_type", "bad_time",
                       "missing_feature", "not_finite", "processing_error", "corrupt_record", "out_of_range",
                       "duplicate_conflict")
ERROR_KINDS = ("publish_failed", "commit_retry", "commit_failed", "transaction_retry", "producer_fenced",
               "output_shrunk", "output_dropped", "stalled", "model_watch", "transaction_lost",
               "producer_renewed", "fetch_stalled")
# score / threshold of resolved decisions: 16 a decade from 1e-3 to 1e3, fine enough for average precision from
# the buckets (docs/quality-online.md measures how close); the alert threshold (1.0) is a bound
QUALITY_BUCKETS = tuple(float(f"{10 ** (k / 16):.6g}") for k in range(-48, 49))
RATIO_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0, 10.0, 100.0)


class WorkerMetrics:
    """Every series the worker updates, registered on one registry."""

    def __init__(self, registry: CollectorRegistry, *, process: bool = False) -> None:
        """``process=True`` adds the standard process, platform and GC collectors (once per process)."""
        self.registry = registry
        ns = "fraud"
        if process:
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)

        self.transactions = Counter("transactions", "Transactions consumed, by outcome",
                                    ["outcome"], namespace=ns, registry=registry)
        self.alerts = Counter("alerts", "Alerts published and acknowledged", namespace=ns, registry=registry)
        self.dead_letters = Counter("dead_letters", "Records sent to the dead-letter topic, by reason",
                                    ["reason"], namespace=ns, registry=registry)
        self.batches = Counter("batches", "Micro-batches processed and committed", namespace=ns, registry=registry)
        self.errors = Counter("errors", "Errors by kind", ["kind"], namespace=ns, registry=registry)
        self.kafka_errors = Counter("kafka_errors", "Kafka errors the worker backed off and retried, by the client's "
                                    "error class (NotEnoughReplicasError: a cluster below min.insync.replicas; "
                                    "NotLeaderForPartitionError: leaders moving)", ["error"], namespace=ns,
                                    registry=registry)
        self.reloads = Counter("model_reloads", "Model reload attempts, by result",
                               ["result"], namespace=ns, registry=registry)
        self.batch_size = Histogram("batch_size", "Records per micro-batch", buckets=SIZE_BUCKETS,
                                    namespace=ns, registry=registry)
        self.scoring_seconds = Histogram("scoring_seconds", "Time to score one batch (decode excluded)",
                                         buckets=SECONDS_BUCKETS, namespace=ns, registry=registry)
        self.latency = Histogram("end_to_end_latency_seconds",
                                 "Event time to the moment the batch's outputs were acknowledged",
                                 buckets=LATENCY_BUCKETS, namespace=ns, registry=registry)
        self.scores = Histogram("anomaly_score", "Anomaly score of scored transactions",
                                buckets=SCORE_BUCKETS, namespace=ns, registry=registry)
        self.score_ratio = Histogram("score_ratio", "Anomaly score divided by the alert threshold",
                                     buckets=RATIO_BUCKETS, namespace=ns, registry=registry)
        self.lag = Gauge("consumer_lag", "Records behind the end of each assigned partition",
                         ["topic", "partition"], namespace=ns, registry=registry)
        self.assigned = Gauge("assigned_partitions", "Input partitions this worker owns now (0: not "
                              "yet in the group, or idle because there are more workers than partitions)",
                              namespace=ns, registry=registry)
        self.out_of_range = Counter("out_of_range", "Scored transactions whose score is not finite (inputs beyond "
                                    "the model's range); each is alerted with out_of_range true",
                                    namespace=ns, registry=registry)
        self.heartbeat = Gauge("loop_heartbeat_timestamp_seconds", "Unix time of the main loop's last turn "
                               "(a stale value: the loop is stuck)", namespace=ns, registry=registry)
        self.threshold = Gauge("model_threshold", "Alert threshold of the serving model",
                               namespace=ns, registry=registry)
        self.alert_rate = Gauge("model_alert_rate", "Share of normal transactions the threshold was "
                                "calibrated to flag", namespace=ns, registry=registry)
        self.drift = Gauge("score_drift_psi", "Population stability index of recent scores against the "
                           "model's validation scores", namespace=ns, registry=registry)
        self.last_batch = Gauge("last_batch_timestamp_seconds", "Unix time of the last committed batch",
                                namespace=ns, registry=registry)
        self.model = Info("model", "Serving model", namespace=ns, registry=registry)
        self.state_entities = Gauge("state_entities", "Raw input: customers or terminals held in this worker's "
                                    "window stores", ["store"], namespace=ns, registry=registry)
        self.state_restored = Counter("state_restored_records", "Raw input: changelog records read to restore "
                                      "window stores", ["store"], namespace=ns, registry=registry)
        self.late_events = Counter("late_events", "Raw input: transactions that reached the terminal stage after a "
                                   "later one (by the label delay or more) was scored without them",
                                   namespace=ns, registry=registry)
        self.late_labels = Counter("late_labels", "Raw input: fraud labels (or their withdrawal) that reached the "
                                   "terminal stage after a transaction whose terminal risk should have counted them "
                                   "was scored", namespace=ns, registry=registry)
        self.handed_back = Counter("records_handed_back", "Raw input: records read again later because their "
                                   "input partition ran ahead of the others in event time (watermark alignment)",
                                   namespace=ns, registry=registry)
        self.held_for_labels = Counter("records_held_for_labels", "Raw input: transactions read again later "
                                       "because their terminal's labels partition had labels not read yet",
                                       namespace=ns, registry=registry)
        self.state_swept = Counter("state_swept_entities", "Raw input: customers or terminals dropped from the "
                                   "window stores once nothing of theirs was left in any window",
                                   ["store"], namespace=ns, registry=registry)
        self.state_corrupt = Counter("state_corrupt_records", "Raw input: changelog records skipped at restore "
                                     "because they are not a window state", ["topic"], namespace=ns,
                                     registry=registry)
        self.state_restore_seconds = Counter("state_restore_seconds", "Raw input: time spent restoring window "
                                             "stores from their changelogs", ["store"], namespace=ns,
                                             registry=registry)
        self.quality_resolved = Counter(
            "quality_resolved", "Raw input: scored transactions whose label came due (the label delay plus a day "
            "after their event time, in stream time), by model version, label (fraud: a fraud label arrived; "
            "genuine: none did) and whether they alerted", ["version", "label", "alerted"], namespace=ns,
            registry=registry)
        self.quality_score_ratio = Histogram(
            "quality_score_ratio", "Raw input: score / threshold of the transactions whose label came due, by model "
            "version and label", ["version", "label"], buckets=QUALITY_BUCKETS, namespace=ns, registry=registry)
        self.challenger = Gauge("model_challenger", "Raw input: 1 for the challenger version scored beside the "
                                "serving model (fraud-train fit --challenger), never alerting", ["version"],
                                namespace=ns, registry=registry)
        self.quality_resolved_until = Gauge(
            "quality_resolved_until_timestamp_seconds", "Raw input: event time up to which decisions are resolved, "
            "per repartition partition this worker owns", ["partition"], namespace=ns, registry=registry)
        for outcome in ("scored", "invalid"):
            self.transactions.labels(outcome)
        for result in ("ok", "refused"):
            self.reloads.labels(result)
        for reason in DEAD_LETTER_REASONS:  # series exist (at 0) before the first event
            self.dead_letters.labels(reason)
        for kind in ERROR_KINDS:
            self.errors.labels(kind)

    def quality_series(self, version: str) -> None:
        """Create the online-quality series of a model version at 0 (before its first decision is resolved)."""
        for label in ("fraud", "genuine"):
            self.quality_score_ratio.labels(version, label)
            for alerted in ("true", "false"):
                self.quality_resolved.labels(version, label, alerted)

    def forget_partitions(self, partitions: Iterable[Any]) -> None:
        """Drop the lag series of partitions this worker no longer owns."""
        for tp in partitions:
            with contextlib.suppress(KeyError):
                self.lag.remove(tp.topic, str(tp.partition))


def observe_many(histogram: Histogram, values: np.ndarray) -> None:
    """Observe every value of an array at once (one bincount instead of a Python loop).

    Uses the histogram's bucket counters directly, as ``Histogram.observe`` does.
    """
    if values.size == 0:
        return
    bounds = np.asarray(histogram._upper_bounds)  # includes +Inf
    index = np.searchsorted(bounds, values, side="left")
    counts = np.bincount(index, minlength=len(bounds))
    for i, count in enumerate(counts):
        if count:
            histogram._buckets[i].inc(int(count))
    histogram._sum.inc(float(values.sum()))


def parse_samples(text: str) -> dict[str, float]:
    """Prometheus exposition text as ``{'name{label="v",...}': value}``, for scripts and tests.

    >>> parse_samples('# TYPE a counter\\na_total{outcome="scored"} 3.0\\n')
    {'a_total{outcome="scored"}': 3.0}
    """
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sample.labels.items())
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out
