"""The streaming worker: consume, micro-batch, score, publish alerts and dead letters, commit.

Delivery is at-least-once. A batch's offsets are committed only after every alert and
dead letter it produced has been acknowledged by the broker. Publishing is retried with
backoff while the broker is away; a worker told to stop while it cannot publish leaves
without committing, so the batch is scored again by whoever owns the partition next.
On partition revocation the batch in hand is finished and committed before the
partitions move.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from kafka import AsyncConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata

from pipeline.alerts import alert_value, dead_letter_headers
from pipeline.batch import DecodedBatch, decode_batch
from pipeline.config import KafkaSettings, WorkerSettings
from pipeline.drift import ScoreDrift
from pipeline.metrics import WorkerMetrics, observe_many
from pipeline.scoring import Scorer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Output:
    """One message the batch must get acknowledged before its offsets are committed."""

    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]] | None = None


@dataclass
class WorkerStats:
    """Running totals, for tests and the end-of-run summary."""

    consumed: int = 0
    scored: int = 0
    invalid: int = 0
    alerts: int = 0
    batches: int = 0
    committed: dict[TopicPartition, int] = field(default_factory=dict)


class StopWithoutCommit(Exception):
    """Raised when asked to stop while outputs could not be delivered: nothing is committed."""


class Worker:
    """One member of the consumer group. ``run`` blocks until ``stop`` is set."""

    def __init__(
        self,
        kafka: KafkaSettings,
        settings: WorkerSettings,
        scorer: Scorer,
        metrics: WorkerMetrics,
        *,
        take_new_scorer: Callable[[], Scorer | None] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.kafka, self.settings, self.metrics = kafka, settings, metrics
        self.clock = clock
        self.take_new_scorer = take_new_scorer
        self.stats = WorkerStats()
        self.stop = threading.Event()
        self.worker_id = f"{kafka.client_id}-worker-{id(self):x}"
        self._pending: list[Any] = []
        self._rate_window: deque[tuple[float, int]] = deque()
        self._use(scorer)
        self.consumer: KafkaConsumer | None = None
        self.producer: KafkaProducer | None = None

    # -- set-up -----------------------------------------------------------------------
    def _use(self, scorer: Scorer) -> None:
        artifact = scorer.artifact
        self.scorer = scorer
        self._features = tuple(artifact.feature_names)
        self._feature_set = frozenset(self._features)
        self.drift = ScoreDrift.from_artifact(artifact)
        self.metrics.threshold.set(artifact.threshold)
        self.metrics.alert_rate.set(artifact.alert_rate)
        self.metrics.model.info({"version": artifact.version, "device": str(scorer.device),
                                 "model_class": artifact.model_class})
        where = str(scorer.device) if scorer.device.type != "cpu" else f"cpu ({torch.get_num_threads()} threads)"
        log.info("serving model %s (threshold %.4g) on %s", artifact.version, artifact.threshold, where)

    def _connect(self) -> None:
        common = self.kafka.client_options()
        self.producer = KafkaProducer(
            **common, client_id=f"{self.worker_id}-out", acks="all", linger_ms=5,
            retries=5, retry_backoff_ms=200, max_block_ms=10_000,
        )
        self.consumer = KafkaConsumer(
            **common, client_id=self.worker_id, group_id=self.settings.consumer_group,
            enable_auto_commit=False, auto_offset_reset=self.settings.auto_offset_reset,
            max_poll_records=self.settings.max_batch, max_partition_fetch_bytes=4 * 1024 * 1024,
            fetch_max_bytes=64 * 1024 * 1024, session_timeout_ms=10_000, heartbeat_interval_ms=3000,
        )
        self.consumer.subscribe([self.kafka.input_topic], listener=_FinishOnRevoke(self))

    # -- main loop --------------------------------------------------------------------
    def run(self, idle_exit_s: float | None = None) -> WorkerStats:
        """Consume until ``stop`` is set (or nothing arrives for ``idle_exit_s``); leave cleanly."""
        self._connect()
        assert self.consumer is not None
        last_record = time.monotonic()
        try:
            while not self.stop.is_set():
                self._swap_model_if_new()
                got = self._fill_batch()
                if got:
                    last_record = time.monotonic()
                elif idle_exit_s is not None and time.monotonic() - last_record > idle_exit_s:
                    log.info("no records for %.1fs; stopping", idle_exit_s)
                    break
                self._process_pending()
                self._update_lag()
            self._process_pending()
        except StopWithoutCommit:
            log.warning("stopped while outputs could not be delivered; the batch was not committed")
        finally:
            self._close()
        return self.stats

    def _fill_batch(self) -> int:
        """Poll until the batch is full or ``max_wait_ms`` has passed since its first record."""
        assert self.consumer is not None
        max_batch, wait_s = self.settings.max_batch, self.settings.max_wait_ms / 1000
        first_at: float | None = None
        got = 0
        while len(self._pending) < max_batch and not self.stop.is_set():
            if first_at is None:
                timeout_ms = 200  # idle: come back often enough to notice stop and new models
            else:
                remaining = first_at + wait_s - time.monotonic()
                if remaining <= 0:
                    break
                timeout_ms = max(1, int(remaining * 1000))
            polled = self.consumer.poll(timeout_ms=timeout_ms, max_records=max_batch - len(self._pending))
            for records in polled.values():
                self._pending.extend(records)
                got += len(records)
            if self._pending and first_at is None:
                first_at = time.monotonic()
            elif not polled and first_at is None:
                break
        return got

    def _process_pending(self) -> None:
        if self._pending:
            records, self._pending = self._pending, []
            self.process(records)

    def process(self, records: Sequence[Any]) -> None:
        """Score one batch, publish its outputs, wait for acknowledgement, commit its offsets."""
        decoded = decode_batch(records, self._features, self.settings.max_record_bytes)
        outputs, n_alerts = self._score(decoded)
        outputs.extend(self._dead_letters(decoded))
        self._publish(outputs)
        self._commit(records)
        self._account(records, decoded, n_alerts)

    def _score(self, decoded: DecodedBatch) -> tuple[list[Output], int]:
        if not decoded.good:
            return [], 0
        started = time.perf_counter()
        result = self.scorer.score(decoded.matrix)
        self.metrics.scoring_seconds.observe(time.perf_counter() - started)
        observe_many(self.metrics.scores, result.scores)
        observe_many(self.metrics.score_ratio, result.scores / self.scorer.artifact.threshold)
        self.metrics.drift.set(self.drift.update(result.scores))
        artifact, now_ms = self.scorer.artifact, int(self.clock() * 1000)
        outputs = []
        for i in np.flatnonzero(result.flags):
            _, tx = decoded.good[i]
            top = result.top_features(int(i), decoded.matrix[i], self.settings.top_features)
            value = alert_value(tx, float(result.scores[i]), artifact.threshold, artifact.version,
                                now_ms, top, self._feature_set)
            outputs.append(Output(self.kafka.alerts_topic, tx.transaction_id.encode(), value))
        return outputs, len(outputs)

    def _dead_letters(self, decoded: DecodedBatch) -> list[Output]:
        now_ms = int(self.clock() * 1000)
        outputs = []
        for record, error in decoded.bad:
            headers = dead_letter_headers(record, error, self.worker_id, now_ms)
            outputs.append(Output(self.kafka.dead_letter_topic, record.key, record.value or b"", headers))
            self.metrics.dead_letters.labels(error.reason).inc()
            log.debug("dead letter %s[%d]@%d: %s", record.topic, record.partition, record.offset, error)
        return outputs

    # -- delivery ---------------------------------------------------------------------
    def _publish(self, outputs: list[Output]) -> None:
        """Send every output and wait until each is acknowledged, retrying failures with backoff."""
        assert self.producer is not None
        pending, attempt = outputs, 0
        while pending:
            failed, last_error = self._send_all(pending)
            if not failed:
                return
            attempt += 1
            self.metrics.errors.labels("publish_failed").inc()
            backoff = min(self.settings.max_retry_backoff_s, 0.25 * 2**attempt)
            log.warning("%d of %d outputs not acknowledged (%s); retry %d in %.1fs",
                        len(failed), len(pending), last_error, attempt, backoff)
            if self.stop.wait(backoff) and attempt >= 3:
                raise StopWithoutCommit
            pending = failed

    def _send_all(self, outputs: list[Output]) -> tuple[list[Output], Exception | None]:
        assert self.producer is not None
        futures = []
        failed: list[Output] = []
        last_error: Exception | None = None
        for out in outputs:
            try:
                futures.append((out, self.producer.send(out.topic, key=out.key, value=out.value,
                                                        headers=out.headers)))
            except KafkaError as err:
                failed.append(out)
                last_error = err
        for out, future in futures:
            try:
                future.get(timeout=self.kafka.request_timeout_ms / 1000 + 30)
            except KafkaError as err:
                failed.append(out)
                last_error = err
        return failed, last_error

    def _commit(self, records: Sequence[Any]) -> None:
        assert self.consumer is not None
        offsets: dict[TopicPartition, int] = {}
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            offsets[tp] = max(offsets.get(tp, -1), r.offset + 1)
        attempt = 0
        while True:
            try:
                self.consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()})
                self.stats.committed.update(offsets)
                return
            except CommitFailedError as err:
                # The group moved on: these partitions belong to someone else now, who will
                # score the records again from the last commit (at-least-once).
                self.metrics.errors.labels("commit_failed").inc()
                log.warning("commit refused after a rebalance (%s); records will be re-scored", err)
                return
            except KafkaError as err:
                attempt += 1
                self.metrics.errors.labels("commit_retry").inc()
                backoff = min(self.settings.max_retry_backoff_s, 0.25 * 2**attempt)
                log.warning("commit failed (%s); retry %d in %.1fs", err, attempt, backoff)
                if self.stop.wait(backoff) and attempt >= 3:
                    raise StopWithoutCommit from err

    # -- bookkeeping ------------------------------------------------------------------
    def _account(self, records: Sequence[Any], decoded: DecodedBatch, n_alerts: int) -> None:
        now = self.clock()
        m, s = self.metrics, self.stats
        n_good, n_bad = len(decoded.good), len(decoded.bad)
        m.transactions.labels("scored").inc(n_good)
        m.transactions.labels("invalid").inc(n_bad)
        m.alerts.inc(n_alerts)
        m.batches.inc()
        m.batch_size.observe(len(records))
        m.last_batch.set(now)
        if n_good:
            observe_many(m.latency, now - decoded.event_times_ms / 1000.0)
        s.consumed += len(records)
        s.scored += n_good
        s.invalid += n_bad
        s.alerts += n_alerts
        s.batches += 1
        self._rate_window.append((now, len(records)))
        while self._rate_window and now - self._rate_window[0][0] > 10:
            self._rate_window.popleft()
        span = max(1.0, now - self._rate_window[0][0])
        m.rate.set(sum(n for _, n in self._rate_window) / span)

    def _update_lag(self) -> None:
        """Lag per assigned partition: broker end offset (from fetch responses) minus our commit."""
        assert self.consumer is not None
        assignment = self.consumer.assignment()
        self.metrics.assigned.set(len(assignment))
        for tp in assignment:
            high = self.consumer.highwater(tp)
            position = self.stats.committed.get(tp)
            if high is not None and position is not None:
                self.metrics.lag.labels(tp.topic, str(tp.partition)).set(max(0, high - position))

    def _swap_model_if_new(self) -> None:
        new = self.take_new_scorer()
        if new is not None:
            self._use(new)

    def _close(self) -> None:
        if self.producer is not None:
            self.producer.close(timeout=10)
        if self.consumer is not None:
            try:
                self.consumer.close(autocommit=False)
            except KafkaError as err:
                log.warning("error while leaving the group: %s", err)


class _FinishOnRevoke(AsyncConsumerRebalanceListener):
    """Before partitions move, finish and commit the batch in hand.

    kafka-python 3 calls listeners on its IO thread, where blocking consumer calls are
    refused; the batch is therefore finished on a helper thread while this coroutine yields
    to the IO loop (which carries the commit) until it is done.
    """

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.worker.metrics.forget_partitions(revoked)
        if not self.worker._pending:
            return
        log.info("partitions %s revoked: finishing the batch in hand", sorted(revoked))
        errors: list[BaseException] = []

        def finish() -> None:
            try:
                self.worker._process_pending()
            except BaseException as err:  # reported on the IO thread below
                errors.append(err)

        helper = threading.Thread(target=finish, name="finish-on-revoke")
        helper.start()
        while helper.is_alive():
            await _io_sleep(0.01)
        if errors:
            log.error("could not finish the batch before revocation: %s", errors[0])

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("partitions assigned: %s", sorted(assigned))

    async def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        self.worker.metrics.forget_partitions(lost)
        self.worker._pending = [r for r in self.worker._pending
                                if TopicPartition(r.topic, r.partition) not in lost]
        log.warning("partitions %s lost: their uncommitted records will be re-scored", sorted(lost))


def _io_sleep(seconds: float) -> Any:
    """An awaitable that lets kafka-python's IO loop run for ``seconds``."""
    from kafka.net.selector import KernelEvent

    return KernelEvent("_sleep", seconds)
