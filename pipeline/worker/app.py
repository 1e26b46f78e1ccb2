"""The streaming worker: consume, micro-batch, score, publish, commit; one member of the group.

The loop: fill a batch (``max_batch`` records or ``max_wait_ms`` after its first), turn it
into alerts and dead letters (:mod:`~pipeline.worker.processing`, where no record can stop
the batch), and hand it to the :class:`~pipeline.worker.checkpoint.Checkpoint`, the one owner
of the commit (outputs acknowledged or in the transaction, then offsets, then the batch is
counted); the loop only decides when. Rebalances release the records
in hand (:mod:`~pipeline.worker.rebalance`); a member that sits without partitions while
some have no owner joins again (:mod:`~pipeline.worker.liveness`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from kafka import KafkaAdminClient, TopicPartition
from kafka.errors import CorruptRecordError, KafkaError

from pipeline.config import KafkaSettings, WorkerSettings
from pipeline.errors import FraudPipelineError
from pipeline.schema import RecordError
from pipeline.scores import BatchScorer
from pipeline.streamfeatures import DAY_MS
from pipeline.worker import kafkaclient
from pipeline.worker.checkpoint import Checkpoint
from pipeline.worker.delivery import (
    AtLeastOnce,
    Delivery,
    DeliveryError,
    StopWithoutCommit,
    offsets_after,
)
from pipeline.worker.ledger import Ledger, WorkerStats
from pipeline.worker.liveness import FetchWatchdog, StallWatchdog, unowned_partitions
from pipeline.worker.metrics import WorkerMetrics
from pipeline.worker.processing import BatchOutcome, BatchProcessor, Topics
from pipeline.worker.rebalance import PendingRecords, ReleaseOnRevoke
from pipeline.worker.reload import REMOVED
from pipeline.worker.state import Bounds, FeatureStages, Restorer, StateTopics, prepare_topics
from pipeline.worker.state.stages import before_hand_back
from pipeline.worker.transactions import ExactlyOnce

log = logging.getLogger(__name__)

# Clients reconnect within a second once a broker is back (kafka-python's default backs off up to 30 s).
RECONNECT = kafkaclient.Reconnect().options()


class WorkerFailed(FraudPipelineError):
    """A failure outside the batch loop (a rebalance listener) that stops the worker uncommitted."""


class Worker:
    """One member of the consumer group. ``run`` blocks until ``stop`` is set."""

    def __init__(
        self,
        kafka: KafkaSettings,
        settings: WorkerSettings,
        scorer: BatchScorer,
        metrics: WorkerMetrics,
        *,
        take_new_scorer: Callable[[], BatchScorer | None] = lambda: None,
        clock: Callable[[], float] = time.time,
        state_topics: StateTopics | None = None,
        challenger: BatchScorer | None = None,
        take_new_challenger: Callable[[], object | None] = lambda: None,
    ) -> None:
        """``state_topics``: raw input's topics, when the caller has made them ready (else ``run`` does)."""
        self.kafka, self.settings, self.metrics = kafka, settings, metrics
        self.state_topics = state_topics
        self.clock = clock
        self.take_new_scorer = take_new_scorer
        self.ledger = Ledger(metrics, clock)
        self.stop = threading.Event()
        self.worker_id = f"{kafka.client_id}-worker-{id(self):x}"
        self.pending = PendingRecords()
        self.listener: ReleaseOnRevoke | None = None
        self.joined = threading.Event()  # holds a settled assignment: not joining, not between revoke and assign
        self.failure: BaseException | None = None
        self.consumer: kafkaclient.Consumer | None = None  # kafka-python's driver or confluent's
        self.checkpoint: Checkpoint | None = None  # owns every commit (made with the delivery, see ``delivery``)
        self.stages: FeatureStages | None = None  # raw input only
        self.challenger: BatchScorer | None = None  # raw input: scored beside the current model, never alerting
        self.take_new_challenger = take_new_challenger
        self._use(scorer)
        if challenger is not None:
            self._use_challenger(challenger)

    @property
    def delivery(self) -> Delivery | None:
        return self.checkpoint.delivery if self.checkpoint is not None else None

    @delivery.setter
    def delivery(self, delivery: Delivery) -> None:
        self.checkpoint = Checkpoint(delivery, self.ledger, lambda: self.consumer, lambda: self.stages,
                                     lambda: self.listener,
                                     exactly_once=self.settings.processing_guarantee == "exactly-once")

    # -- set-up -----------------------------------------------------------------------
    def _use(self, scorer: BatchScorer) -> None:
        artifact = scorer.artifact
        self.scorer = scorer
        self.processor = BatchProcessor(
            scorer, Topics(self.kafka.alerts_topic, self.kafka.dead_letter_topic, self.kafka.features_topic),
            self.worker_id,
            max_record_bytes=self.settings.max_record_bytes, top_features=self.settings.top_features,
            clock=self.clock)
        self.ledger.use(scorer)
        if self.challenger is not None and not self._fits_as_challenger(self.challenger):
            self._use_challenger(None)  # the new current model changed what a challenger must take
        self.processor.challenger = self.challenger
        self.metrics.threshold.set(artifact.threshold)
        self.metrics.alert_rate.set(artifact.alert_rate)
        self.metrics.model.info({"version": artifact.version, "device": scorer.device_name,
                                 "engine": scorer.engine, "model_class": artifact.model_class})
        if artifact.input_form == "raw":  # online quality: its series exist from 0, so increase() sees the first
            self.metrics.quality_series(artifact.version)
        log.info("serving model %s (threshold %.4g) on %s", artifact.version, artifact.threshold, scorer.where)

    def _connect(self) -> None:
        self.consumer = kafkaclient.consumer(
            self.settings.kafka_client, **self.kafka.client_options(), **kafkaclient.ConsumerTuning().options(),
            client_id=self.worker_id, group_id=self.settings.consumer_group,
            auto_offset_reset=self.settings.auto_offset_reset, max_poll_records=self.settings.max_batch)
        self.consumer.before_revoke = self._settle_before_revoke
        self.listener = ReleaseOnRevoke(self.pending, lambda: self.consumer, self._fail, self._forget, self.joined)
        topics = self.stages.topics.consumed if self.stages is not None else [self.kafka.input_topic]
        self.consumer.subscribe(topics, listener=self.listener)
        self.ledger.assigned = set()
        if self.checkpoint is None:
            self.delivery = self._make_delivery()
        else:
            self.checkpoint.delivery.consumer = self.consumer

    def _make_delivery(self) -> Delivery:
        assert self.consumer is not None
        options = {**self.kafka.client_options(), **kafkaclient.ProducerTuning().options(),
                   "client_id": f"{self.worker_id}-out"}
        args = (self.consumer, self.metrics, self.stop, self.settings.max_retry_backoff_s,
                self.kafka.request_timeout_ms / 1000 + 30)
        if self.settings.processing_guarantee == "exactly-once":
            options.update(transaction_timeout_ms=self.settings.transaction_timeout_ms)
            return ExactlyOnce(options, *args, transactional_prefix=f"{self.settings.consumer_group}-tx")
        # Raw input pipelines too. Safe for state: (1) both producers are idempotent (kafka-python 3's default,
        # set for librdkafka), so a key's changelog records and a partition's watermark marks land in the order
        # they were sent, retries included; (2) offsets are committed in batch order, each only once every earlier
        # batch's outputs are acknowledged, so the changelogs never hold less than the committed offsets say;
        # (3) they may hold more (a later batch acknowledged, an earlier one failed), which a restore reads back
        # harmlessly: window updates are idempotent by transaction id, so the batches read again count nothing
        # twice; (4) batches in flight are settled before partitions are revoked, so no store is restored while
        # this worker still has its changes on the way.
        return AtLeastOnce({**options, "retries": 5}, *args, max_in_flight=self.settings.max_in_flight,
                           client=self.settings.kafka_client)

    def _forget(self, partitions: set[TopicPartition]) -> None:
        self.metrics.forget_partitions(partitions)
        if self.stages is not None:
            self.stages.forget(partitions)

    def _stateful_stages(self) -> FeatureStages | None:
        """Raw input: the feature stages, their topics made ready (see ``stateful``)."""
        artifact = self.scorer.artifact
        if artifact.input_form != "raw":
            return None
        topics = self.state_topics or prepare_topics(self.kafka, self.settings.consumer_group)
        restorer = Restorer(self.kafka, self.worker_id, {**self.kafka.client_options(), **RECONNECT}, self.metrics)
        bounds = Bounds(self.settings.min_amount, self.settings.max_amount,
                        int(self.settings.max_event_ahead_days * DAY_MS))
        # a changelog delta is deleted only once the whole states replacing it are acknowledged (``state.store``):
        # at-least-once sends a batch's outputs before it waits for the oldest of max_in_flight batches in flight,
        # so the batch max_in_flight + 1 later is the first sent after that one is acknowledged; exactly-once
        # commits each batch's transaction before the next
        settle = self.settings.max_in_flight + 1 if self.settings.processing_guarantee != "exactly-once" else 1
        return FeatureStages(topics, artifact.feature_delay_days, restorer, self.metrics,
                             self.settings.max_record_bytes, self.stop, bounds, end_offsets=restorer.end_offsets,
                             settle_batches=settle, grace_ms=round(self.settings.label_grace_days * DAY_MS))

    def _settle_before_revoke(self) -> None:
        """librdkafka revokes inside ``poll``, on this thread: commit what is in flight while it is ours."""
        try:
            self._settle()
        except (StopWithoutCommit, DeliveryError) as err:
            self.failure = self.failure or err  # raised as itself by the main loop after the poll

    def _fail(self, err: BaseException) -> None:
        log.error("rebalance listener failed: %s: %s", type(err).__name__, err)
        self.failure = self.failure or err

    # -- main loop --------------------------------------------------------------------
    @property
    def stats(self) -> WorkerStats:
        return self.ledger.stats

    def run(self, idle_exit_s: float | None = None) -> WorkerStats:
        """Consume until ``stop`` is set (or nothing arrives for ``idle_exit_s``); leave cleanly.

        Raises WorkerFailed (nothing of the batch in hand committed) when a listener failed, and
        delivery's DeliveryError when Kafka refuses the outputs for good.
        """
        self.stages = self._stateful_stages()
        self._connect()
        assert self.checkpoint is not None
        outputs = (self.kafka.alerts_topic, self.kafka.dead_letter_topic, self.kafka.features_topic)
        self.checkpoint.delivery.warm([t for t in outputs if t])
        watchdog = StallWatchdog(self.settings.stall_timeout_s, self._unowned)
        fetching = FetchWatchdog()
        last_record = time.monotonic()
        try:
            while not self.stop.is_set():
                self._check_failure()
                self.metrics.heartbeat.set(self.clock())
                self._swap_model_if_new()
                # idle counts only while the assignment is settled: a join that takes long (or whose result
                # kafka-python dropped, until the stall watchdog joins again) is not idleness
                if self._fill_batch() or not self.joined.is_set():
                    last_record = time.monotonic()
                elif idle_exit_s is not None and time.monotonic() - last_record > idle_exit_s:
                    log.info("no records for %.1fs; stopping", idle_exit_s)
                    break
                self._check_failure()
                self.ledger.track_assignment(self.consumer)
                self._process_pending()
                if self.stages is not None:
                    self.stages.align(self.consumer)
                    self._publish_marks(self.stages)
                if watchdog.check(len(self.ledger.assigned)):
                    self.metrics.errors.labels("stalled").inc()
                    self._rejoin()
                stalled = fetching.check(self.consumer)
                if stalled:
                    self.metrics.errors.labels("fetch_stalled").inc(len(stalled))
                    self.consumer.resume(*stalled)
            self._process_pending()
            self._settle()
        except StopWithoutCommit as err:
            log.warning("stopped before the batch in hand was committed (%s); nothing of it was committed", err)
        finally:
            self._close()
        return self.stats

    def _check_failure(self) -> None:
        if isinstance(self.failure, (StopWithoutCommit, DeliveryError)):
            raise self.failure
        if self.failure is not None:
            raise WorkerFailed(f"rebalance listener failed: {type(self.failure).__name__}: {self.failure}") \
                from self.failure

    def _fill_batch(self) -> int:
        """Poll until the batch is full or ``max_wait_ms`` has passed since its first record."""
        assert self.consumer is not None and self.checkpoint is not None
        checkpoint = self.checkpoint
        max_batch, wait_s = self.settings.max_batch, self.settings.max_wait_ms / 1000
        first_at: float | None = None
        got = 0
        while len(self.pending) < max_batch and not self.stop.is_set() and self.failure is None:
            if checkpoint.in_flight and self.consumer.rebalance_coming():
                checkpoint.settle()  # commit what is in flight while the partitions are surely still ours
            if first_at is None:
                # idle: come back often enough to notice stop and new models; at once while batches are in
                # flight, which are then committed before waiting (a quiet stream waits for no commit)
                timeout_ms = 0 if checkpoint.in_flight else 200
            else:
                remaining = first_at + wait_s - time.monotonic()
                if remaining <= 0:
                    break
                timeout_ms = max(1, int(remaining * 1000))
            asked = time.monotonic()
            try:
                polled = self.consumer.poll(timeout_ms=timeout_ms, max_records=max_batch - len(self.pending))
            except CorruptRecordError as err:  # the driver returns unreadable records; this one it cannot place
                raise WorkerFailed(f"Kafka returned a record that cannot be parsed, at an unknown position: {err}"
                                   ) from err
            for tp, records in polled.items():
                self.pending.extend(records)
                got += len(records) if self.stages is None else self.stages.activity(tp, records)
            checkpoint.settle(block=False)
            if len(self.pending) and first_at is None:
                first_at = time.monotonic()
            elif not polled and first_at is None and checkpoint.in_flight:
                checkpoint.settle()
                continue
            elif not polled and first_at is None:
                if time.monotonic() - asked < timeout_ms / 2000:  # poll returned at once (no partitions yet):
                    self.stop.wait(timeout_ms / 1000)  # do not spin
                break
        return got

    def _settle(self) -> None:
        """Wait for every batch in flight and commit them (nothing left to overlap with)."""
        if self.checkpoint is not None:
            self.checkpoint.settle()

    def _process_pending(self) -> None:
        records = self.pending.take()
        if records:
            self.process(records)

    def process(self, records: Sequence[Any]) -> None:
        """Score one batch and hand it to the checkpoint with its offsets."""
        assert self.checkpoint is not None
        unreadable = [r for r in records if getattr(r, "unreadable", None)]  # either driver (``kafkaclient``)
        offsets = offsets_past(records, unreadable)  # the unreadable ones' too: their dead letters go with the batch
        if unreadable:
            records = [r for r in records if not getattr(r, "unreadable", None)]
        awaiting_commit = False
        if self.stages is None:
            outcome, consumed = self.processor.process(records), len(records)
        else:
            outcome, consumed, handed_back, awaiting_commit = self._process_raw(self.stages, records)
            if handed_back:  # read again from there: commit only what came before
                offsets = offsets_past(before_hand_back([*records, *unreadable], handed_back),
                                       before_hand_back(unreadable, handed_back))
                unreadable = before_hand_back(unreadable, handed_back)  # the others are read (and dead-lettered) again
                for tp, offset in handed_back.items():
                    self.consumer.seek(tp, offset)
            self.stages.staged(offsets)  # until committed, its events may be read again: their windows stay
        for record in unreadable:
            log.warning("%s[%d]@%d cannot be read (%s); dead-lettered", record.topic, record.partition,
                        record.offset, record.unreadable)
            outcome.outputs.append(self.processor.dead_letter(
                record, RecordError("corrupt_record", None, record.unreadable)))
            outcome.dead_letters["corrupt_record"] += 1
        consumed += len(unreadable)
        # the unreadable ones too: an aborted transaction reads them again (the driver has moved past them)
        self.checkpoint.commit(outcome.outputs, offsets, [*records, *unreadable], consumed, outcome)
        if awaiting_commit:  # records wait for the batches in flight: commit them
            self.checkpoint.settle()

    def _process_raw(self, stages: FeatureStages, records: Sequence[Any]
                     ) -> tuple[BatchOutcome, int, dict[TopicPartition, int], bool]:
        """Raw input: customer stage, labels, terminal stage and scoring, then the changed state; the offsets
        handed back (input records ahead in event time, ``state.eventtime``; repartition records that wait for
        labels, ``state.labelgate``)."""
        assert self.consumer is not None
        stages.sync(self.consumer.assignment())
        raw, labels, featured, broken = stages.split(records)
        if raw:
            stages.confirm_idle(self.consumer)
        staged = stages.stage(raw, labels)
        featured, broken, waiting = stages.gate.admit(self.consumer, featured, broken)  # labels first
        staged.handed_back.update(waiting)
        outcome = self.processor.process(featured, enrich=stages.enrich, failed_before=staged.failed + broken)
        stages.decide(outcome.decided, outcome.decided_ratios, outcome.decided_alerted,
                      self.processor.scorer.artifact.version)
        if outcome.challenger is not None:  # the shadow model's decisions, on the same transactions
            stages.decide(outcome.decided, outcome.challenger[1], outcome.challenger[2], outcome.challenger[0])
        outcome.outputs += staged.outputs + stages.changelog()
        outcome.resolved = stages.take_resolved()
        return (outcome, len(before_hand_back(raw, staged.handed_back)), staged.handed_back,
                staged.awaiting_commit)

    def _publish_marks(self, stages: FeatureStages) -> None:
        """Watermark marks due between batches (a partition turned idle, or the periodic repeat)."""
        assert self.checkpoint is not None
        if len(self.pending) or not self.joined.is_set():
            return
        marks = stages.watermarks.marks_due()
        if marks:
            self.checkpoint.publish(marks)

    def _unowned(self) -> int:
        admin = KafkaAdminClient(**self.kafka.client_options(), **RECONNECT, client_id=f"{self.worker_id}-watch")
        try:
            return unowned_partitions(admin, self.settings.consumer_group, self.kafka.input_topic, self.worker_id)
        except Exception as err:  # cannot tell: do not disturb the group
            log.debug("could not describe the group: %s", err)
            return 0
        finally:
            admin.close()

    def _rejoin(self) -> None:
        """Leave the group and join again with a new consumer (nothing is pending while unassigned)."""
        assert self.consumer is not None
        self._settle()
        self.consumer.close(autocommit=False)
        self._connect()

    def _fits_as_challenger(self, challenger: BatchScorer) -> bool:
        """A challenger must take the current model's input: raw, with the same features (one matrix for both)."""
        current, artifact = self.scorer.artifact, challenger.artifact
        if artifact.input_form == "raw" and current.input_form == "raw" and \
                tuple(artifact.feature_names) == tuple(current.feature_names) and artifact.version != current.version:
            return True
        if artifact.version == current.version:  # promoted: it serves now
            log.info("challenger %s is the current version now: no longer scored beside it", artifact.version)
            return False
        why = ("online quality needs raw input (labels reach the terminal stage only)" if current.input_form != "raw"
               else "it expects other input than the current model")
        log.error("challenger %s not scored: %s", artifact.version, why)
        return False

    def _use_challenger(self, challenger: BatchScorer | None) -> None:
        """Score ``challenger`` beside the current model from the next batch (None: stop)."""
        if challenger is not None and not self._fits_as_challenger(challenger):
            if challenger.artifact.version != self.scorer.artifact.version:
                self.metrics.reloads.labels("refused").inc()
            challenger = None
        if self.challenger is not None:
            with contextlib.suppress(KeyError):
                self.metrics.challenger.remove(self.challenger.artifact.version)
        self.challenger = challenger
        self.processor.challenger = challenger
        if challenger is not None:
            self.metrics.quality_series(challenger.artifact.version)
            self.metrics.challenger.labels(challenger.artifact.version).set(1)
            log.info("scoring challenger %s beside model %s (online quality for both; alerts from %s only)",
                     challenger.artifact.version, self.scorer.artifact.version, self.scorer.artifact.version)

    def _swap_model_if_new(self) -> None:
        challenger = self.take_new_challenger()
        if challenger is REMOVED:
            if self.challenger is not None:
                log.info("challenger %s no longer scored (its link is gone)", self.challenger.artifact.version)
            self._use_challenger(None)
        elif challenger is not None:
            self._use_challenger(challenger)  # type: ignore[arg-type]
        new = self.take_new_scorer()
        if new is None:
            return
        if new.artifact.input_form != self.scorer.artifact.input_form:
            log.error("model %s expects %s input but the worker serves %s input; keeping model %s (restart the "
                      "worker to change the input form)", new.artifact.version, new.artifact.input_form,
                      self.scorer.artifact.input_form, self.scorer.artifact.version)
            self.metrics.reloads.labels("refused").inc()
            return
        self._use(new)

    def _close(self) -> None:
        """Leave the group first (its listener only releases records), then close the producer."""
        if self.consumer is not None:
            try:
                self.consumer.close(autocommit=False)
            except KafkaError as err:
                log.warning("error while leaving the group: %s", err)
        if self.checkpoint is not None:
            self.checkpoint.delivery.close()
        if self.stages is not None:
            self.stages.restorer.close()


def offsets_past(records: Sequence[Any], unreadable: Sequence[Any] = ()) -> dict[TopicPartition, int]:
    """``offsets_after`` of ``records``, where an unreadable one among them standing for a whole unreadable batch
    (``skip_to``) moves its partition past all of it (only ``unreadable`` is looked at for that)."""
    offsets = offsets_after(records)
    for record in unreadable:
        tp = TopicPartition(record.topic, record.partition)
        if record.skip_to is not None and tp in offsets:
            offsets[tp] = max(offsets[tp], record.skip_to)
    return offsets
