"""What the worker counts, once a batch is committed: metrics, running totals, lag per partition.

Nothing about a batch is counted before its outputs and offsets are committed. Lag is set for
every partition from the moment it is assigned (from the broker's committed offset, or the log
start), so a worker stuck from the start shows its lag; after that, from each commit and the end
offset seen in fetches. A stream whose records lack the model's features is said at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from kafka import TopicPartition
from kafka.errors import KafkaError

from pipeline.scores import BatchScorer
from pipeline.worker.drift import ScoreDrift
from pipeline.worker.metrics import WorkerMetrics, observe_many
from pipeline.worker.processing import BatchOutcome

log = logging.getLogger(__name__)
MISSING_REPORT_EVERY_S = 60.0


@dataclass
class WorkerStats:
    """Running totals of committed batches, for tests and the end-of-run summary."""

    consumed: int = 0
    scored: int = 0
    invalid: int = 0
    alerts: int = 0
    batches: int = 0
    committed: dict[TopicPartition, int] = field(default_factory=dict)
    quality: dict[tuple[str, str, str], int] = field(default_factory=dict)  # (version, label, alerted) -> resolved


class Ledger:
    """Counts committed batches into metrics and ``stats``; tracks the assignment and its lag."""

    def __init__(self, metrics: WorkerMetrics, clock: Callable[[], float] = time.time) -> None:
        self.metrics, self.clock = metrics, clock
        self.stats = WorkerStats()
        self.assigned: set[TopicPartition] = set()
        self._missing_reported_at = -3600.0

    def use(self, scorer: BatchScorer) -> None:
        """The model in service: its threshold scales score ratios, its validation scores anchor drift."""
        self.scorer = scorer
        self.drift = ScoreDrift.from_artifact(scorer.artifact)

    def committed(self, n_records: int, out: BatchOutcome, offsets: dict[TopicPartition, int],
                  consumer: Any) -> None:
        """A batch of ``n_records`` whose outputs and ``offsets`` are committed."""
        self.stats.committed.update(offsets)
        self._count(n_records, out)
        if out.missing_features:
            self._report_missing_features(out, n_records)
        for tp in offsets.keys() & self.assigned:  # lag: end offset seen in fetches minus the commit
            high = consumer.highwater(tp)
            if high is not None:
                self.metrics.lag.labels(tp.topic, str(tp.partition)).set(max(0, high - offsets[tp]))

    def _count(self, n_records: int, out: BatchOutcome) -> None:
        now = self.clock()
        m, s = self.metrics, self.stats
        m.transactions.labels("scored").inc(out.scored)
        m.transactions.labels("invalid").inc(out.invalid)
        for reason, count in out.dead_letters.items():
            m.dead_letters.labels(reason).inc(count)
        m.alerts.inc(out.alerts)
        m.out_of_range.inc(out.out_of_range)
        m.batches.inc()
        m.batch_size.observe(n_records)
        m.last_batch.set(now)
        if out.scored:
            m.scoring_seconds.observe(out.scoring_seconds)
            observe_many(m.latency, now - out.event_times_ms / 1000.0)
        if len(out.scores):
            observe_many(m.scores, out.scores)
            observe_many(m.score_ratio, out.scores / self.scorer.artifact.threshold)
            m.drift.set(self.drift.update(out.scores))
        if out.resolved:
            self._count_resolved(out)
        s.consumed += n_records
        s.scored += out.scored
        s.invalid += out.invalid
        s.alerts += out.alerts
        s.batches += 1

    def _count_resolved(self, out: BatchOutcome) -> None:
        """Decisions whose labels came due (``state.decisions``): the quality counters and score histograms."""
        m, quality = self.metrics, self.stats.quality
        for part in out.resolved:
            fraud = np.asarray(part.fraud, bool)
            alerted = np.frombuffer(part.alerted, np.uint8).astype(bool)
            ratios = np.frombuffer(part.ratios, np.float64)
            for label, rows in (("fraud", fraud), ("genuine", ~fraud)):
                observe_many(m.quality_score_ratio.labels(part.version, label), ratios[rows])
                for flag, name in ((True, "true"), (False, "false")):
                    n = int((rows & (alerted == flag)).sum())
                    if n:
                        m.quality_resolved.labels(part.version, label, name).inc(n)
                        key = (part.version, label, name)
                        quality[key] = quality.get(key, 0) + n

    def _report_missing_features(self, out: BatchOutcome, n_records: int) -> None:
        """Said at once, then at most once a minute: usually a model for another table, or the wrong topic."""
        now = time.monotonic()
        if now - self._missing_reported_at < MISSING_REPORT_EVERY_S:
            return
        self._missing_reported_at = now
        artifact = self.scorer.artifact
        names = ", ".join(f"{name} ({count})" for name, count in out.missing_features.most_common(5))
        log.error("%d of %d records in a batch lack features the model %s needs, most often: %s; they are "
                  "dead-lettered as missing_feature. The model expects %s: is the worker pointed at the model "
                  "for this stream (--model-dir) and at the right topic (--input-topic)?",
                  sum(out.missing_features.values()), n_records, artifact.version, names,
                  ", ".join(artifact.feature_names))

    def track_assignment(self, consumer: Any) -> None:
        """On a new assignment, set every partition's lag from the broker's committed offset."""
        assignment = consumer.assignment()
        self.metrics.assigned.set(len(assignment))
        new = assignment - self.assigned
        self.assigned = set(assignment)
        if not new:
            return
        try:
            ends = consumer.end_offsets(list(new))
            starts = consumer.beginning_offsets(list(new))
            for tp in new:
                committed = consumer.committed(tp)
                base = committed if committed is not None else starts.get(tp, 0)
                self.stats.committed.setdefault(tp, base)
                self.metrics.lag.labels(tp.topic, str(tp.partition)).set(max(0, ends.get(tp, base) - base))
        except KafkaError as err:
            log.warning("could not read committed offsets of %s yet (%s); lag shows after the first batch",
                        sorted(new), type(err).__name__)
            self.assigned -= new  # try again on the next turn
