"""Exactly-once delivery: a batch's outputs and its input offsets in one Kafka transaction.

Per batch: ``begin_transaction``, send every output, ``send_offsets_to_transaction`` with the
consumer's group metadata (KIP-447: the broker fences a member of a stale generation),
``commit_transaction``. The producer's ``transactional_id`` is a uuid per producer; a
crashed worker's open transaction is aborted by the broker after ``transaction_timeout_ms``.

On failure the transaction is aborted and:

- the group moved on (stale generation, unknown member): ``deliver`` returns False; the worker
  reads the batch again where it still owns it, the new owner everywhere else;
- the producer was fenced (a transaction timed out while the broker was away): a new producer
  is started and the batch sent again;
- an output was refused as too large: it is replaced by its smaller form and the whole
  batch sent again in a new transaction;
- retriable errors: backoff, then the whole batch again; fatal ones raise DeliveryError.

kafka-python gives ``commit_transaction``, ``abort_transaction`` and
``send_offsets_to_transaction`` no timeout; they run on a helper thread so that a worker
asked to stop leaves after ``STOP_GRACE_S`` instead of waiting for a broker that is away.

A transactional call still waiting after the transaction timeout plus the acknowledgement
timeout is *lost*: kafka-python can wait for good on a transaction coordinator that moved (seen
on a three-node cluster, the coordinator's node killed: the new coordinator had aborted the
transaction with a bumped epoch, the client never heard). The coordinator aborts any
transaction open longer than its timeout, so the batch's transaction is over either way; which
way is read from the group's committed offsets (``require_stable``: an answer only once the
transaction is complete), never guessed:

- committed (the offsets are the batch's): the batch is done, ``deliver`` returns True;
- aborted: ``deliver`` returns False and the worker reads the batch again (exactly what an
  aborted transaction calls for).

Either way the stuck producer is dropped for a new one, an ERROR line says so and
``fraud_errors_total{kind="transaction_lost"}`` counts it. A ``commit_transaction`` that raises
(anything but fenced or a rebalance) is resolved the same way: it may have committed, and a
retry could publish the batch twice. Before the commit, an error kafka-python cannot name
("Could not execute transactional request for unknown reasons", seen with the coordinator's
node paused 30 s) gets a new producer and the batch again; it stopped the worker before.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError

from pipeline.errors import FraudPipelineError
from pipeline.worker.delivery import (
    FATAL,
    FENCED,
    REBALANCED,
    REPORT_EVERY_S,
    Delivery,
    DeliveryError,
    StopWithoutCommit,
    classify,
    to_commit,
)
from pipeline.worker.kafkaclient.calls import Call
from pipeline.worker.outputs import Output

log = logging.getLogger(__name__)
T = TypeVar("T")
STOP_GRACE_S = 10.0  # how long a stopping worker still waits on a blocked transactional call


class TransactionLost(KafkaError, FraudPipelineError):
    """A transactional call outlived the transaction it belongs to (see the module's docstring). A KafkaError
    for the paths that handle Kafka's own, and in the project's one tree."""

    def __init__(self, call: str, waited_s: float) -> None:
        super().__init__(f"{call} still waiting on Kafka after {waited_s:.0f}s, past the transaction timeout")
        self.call = call


class ExactlyOnce(Delivery):
    """Outputs and offsets in one transaction per batch."""

    def __init__(self, *args: Any, transactional_prefix: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.transactional_prefix = transactional_prefix
        # past this, the coordinator has aborted the transaction or completed it: waiting on is a stall
        self.lost_after_s = self.producer_options.get("transaction_timeout_ms", 60_000) / 1000 + self.ack_timeout_s

    def deliver(self, outputs: list[Output], offsets: dict[TopicPartition, int]) -> bool:
        backoff = self._backoff("the transaction", "transaction_retry")
        pending = outputs
        meta = to_commit(offsets)
        while True:
            producer = self._ready_producer()
            stage = "begin_transaction"
            try:
                producer.begin_transaction()
                stage = "send"
                failed = self._send(pending)
                if failed:
                    self._abort()
                    pending, retriable = self._next_try(pending, failed, classify, resend_all=True)
                    if retriable is not None:
                        backoff.wait(retriable)
                    continue
                if meta:  # none: outputs alone (raw input's watermark marks between batches)
                    stage = "send_offsets_to_transaction"
                    send_offsets = functools.partial(producer.send_offsets_to_transaction, meta,
                                                     self.consumer.group_metadata())
                    self._bounded(send_offsets, stage)
                stage = "commit_transaction"
                self._bounded(producer.commit_transaction, stage)
                backoff.done()
                return True
            except TransactionLost as err:
                return self._lost(err.call, str(err), meta)
            except REBALANCED as err:
                self._abort()
                self.metrics.errors.labels("commit_failed").inc()
                log.warning("transaction aborted: the group rebalanced (%s); the batch is scored again by "
                            "whoever owns its partitions", type(err).__name__)
                return False
            except FENCED as err:
                self.metrics.errors.labels("producer_fenced").inc()
                log.warning("producer fenced (%s); starting a new one and retrying the batch", type(err).__name__)
                self.close(timeout_s=0)
            except KafkaError as err:
                if isinstance(err, FATAL):
                    self.close(timeout_s=0)
                    raise DeliveryError(f"transaction failed: {type(err).__name__}: {err}") from err
                if stage == "commit_transaction":  # committed or not: read it, never guess (a retry could double)
                    return self._lost(stage, f"{type(err).__name__}: {err}", meta)
                if not getattr(err, "retriable", False):
                    # what kafka-python cannot name ("Could not execute transactional request for unknown
                    # reasons: RequestTimedOutError", the coordinator's node paused 30 s): uncommitted, so the
                    # batch again, from a new producer (this one's transactional state is unknown)
                    self.metrics.errors.labels("producer_renewed").inc()
                    log.warning("%s failed (%s: %s); a new producer sends the batch again", stage,
                                type(err).__name__, err)
                    self._drop_producer()
                else:
                    self._abort()
                backoff.wait(err)

    def _started_producer(self) -> KafkaProducer:
        return self._ready_producer()

    def _ready_producer(self) -> KafkaProducer:
        backoff = self._backoff("starting the transactional producer", "transaction_retry")
        while self.producer is None:
            tid = f"{self.transactional_prefix}-{uuid.uuid4().hex[:12]}"
            producer = KafkaProducer(**self.producer_options, transactional_id=tid)
            try:
                producer.init_transactions()
                self.producer = producer
            except KafkaError as err:
                producer.close(timeout=0)
                if isinstance(err, FATAL):
                    raise DeliveryError(f"cannot start transactions: {type(err).__name__}: {err}") from err
                backoff.wait(err)
        return self.producer

    def _lost(self, call: str, reason: str, meta: dict[TopicPartition, Any]) -> bool:
        """After a transactional call that outlived its transaction, or a commit that failed without saying
        whether it committed: a new producer, and whether the batch's transaction committed."""
        self._drop_lost(call, reason)
        if call != "commit_transaction" or not meta:
            return False  # never asked to commit (or nothing to tell it by: marks only, read again harmlessly)
        committed = self._committed(meta)
        log.error("the lost transaction %s; %s", "committed" if committed else "was aborted",
                  "the batch is done" if committed else "the batch is read again")
        return committed

    def _drop_lost(self, call: str, reason: str) -> None:
        """Count and say a lost transactional call, and drop its producer for a new one."""
        self.metrics.errors.labels("transaction_lost").inc()
        log.error("transaction lost: %s (%s); dropping the producer for a new one", call, reason)
        self._drop_producer()

    def _drop_producer(self) -> None:
        """Close the stuck producer without waiting on it (its blocked call may never return)."""
        producer, self.producer = self.producer, None
        if producer is not None:
            Call(functools.partial(producer.close, timeout=0), "txn-drop")

    def _committed(self, meta: dict[TopicPartition, Any]) -> bool:
        """Whether the group's committed offsets are the batch's (its transaction committed). The consumer reads
        them stable (read_committed: kafka-python sets require_stable), so a transaction still completing is
        waited for, never taken for aborted."""
        backoff = self._backoff("reading the lost transaction's outcome", "transaction_retry")
        reader, failed = self.consumer, False
        try:
            while True:
                try:
                    if failed:
                        reader = self._fresh_reader()
                    wait_ms = int(self.ack_timeout_s * 1000)  # without one, kafka-python may wait for good
                    return all(reader.committed(tp, timeout_ms=wait_ms) == om.offset for tp, om in meta.items())
                except KafkaError as err:
                    failed = True
                    if reader is not self.consumer:
                        reader.close(autocommit=False)
                        reader = self.consumer
                    backoff.wait(err)
        finally:
            if reader is not self.consumer:
                reader.close(autocommit=False)

    def _fresh_reader(self) -> Any:
        """A new reader of the group's committed offsets (it does not join the group), after a read failed:
        kafka-python's consumer kept failing with ECONNREFUSED after the coordinator's node was killed and came
        back, where a new client asks the cluster afresh."""
        config = getattr(self.consumer, "config", None)
        if not isinstance(config, dict):  # not kafka-python's (a test's fake): ask it again
            return self.consumer
        options = {k: v for k, v in config.items() if k in KafkaConsumer.DEFAULT_CONFIG}
        return KafkaConsumer(**{**options, "client_id": f"{config.get('client_id')}-outcome",
                                "isolation_level": "read_committed", "enable_auto_commit": False})

    def _abort(self) -> None:
        """Abort the open transaction; a producer that cannot abort is replaced."""
        producer = self.producer
        if producer is None:
            return
        try:
            self._bounded(producer.abort_transaction, "abort_transaction")
        except StopWithoutCommit:
            raise
        except TransactionLost as err:  # the coordinator aborts it on its own
            self._drop_lost(err.call, str(err))
        except Exception as err:  # fenced or in a fatal state: the coordinator aborts it on its own
            log.info("could not abort the transaction (%s: %s); replacing the producer", type(err).__name__, err)
            self.close(timeout_s=0)

    def _bounded(self, call: Callable[[], T], name: str) -> T:
        """Run a blocking transactional call (kafka-python gives them no timeout) so that a worker
        asked to stop leaves after ``STOP_GRACE_S`` instead of waiting for a broker that is away, and
        one that outlives its transaction raises TransactionLost."""
        running = Call(call, "txn-call")
        waited_stopping, started = 0.0, time.monotonic()
        reported = started
        while not running.wait(0.5):
            now = time.monotonic()
            if now - started > self.lost_after_s:
                raise TransactionLost(name, now - started)
            if now - reported > REPORT_EVERY_S:
                reported = now
                log.warning("%s has been waiting on Kafka for %.0fs (lost after %.0fs)", name, now - started,
                            self.lost_after_s)
            if self.stop.is_set():
                waited_stopping += 0.5
                if waited_stopping >= STOP_GRACE_S:
                    raise StopWithoutCommit("Kafka did not answer a transactional call while stopping")
        return running.result()
