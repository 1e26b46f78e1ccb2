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
A commit is never abandoned to retry the same batch: that could publish it twice.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from kafka import KafkaProducer, TopicPartition
from kafka.errors import KafkaError

from pipeline.worker.clients import Call
from pipeline.worker.delivery import (
    FENCED,
    REBALANCED,
    REPORT_EVERY_S,
    Delivery,
    DeliveryError,
    StopWithoutCommit,
    classify,
    classify_in_transaction,
    to_commit,
)
from pipeline.worker.outputs import Output

log = logging.getLogger(__name__)
T = TypeVar("T")
STOP_GRACE_S = 10.0  # how long a stopping worker still waits on a blocked transactional call


class ExactlyOnce(Delivery):
    """Outputs and offsets in one transaction per batch."""

    def __init__(self, *args: Any, transactional_prefix: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.transactional_prefix = transactional_prefix

    def deliver(self, outputs: list[Output], offsets: dict[TopicPartition, int]) -> bool:
        backoff = self._backoff("the transaction", "transaction_retry")
        pending = outputs
        meta = to_commit(offsets)
        while True:
            producer = self._ready_producer()
            try:
                producer.begin_transaction()
                failed = self._send(pending)
                if failed:
                    self._abort()
                    pending, retriable = self._next_try(pending, failed, classify_in_transaction, resend_all=True)
                    if retriable is not None:
                        backoff.wait(retriable)
                    continue
                if meta:  # none: outputs alone (raw input's watermark marks between batches)
                    send_offsets = functools.partial(producer.send_offsets_to_transaction, meta,
                                                     self.consumer.group_metadata())
                    self._bounded(send_offsets)
                self._bounded(producer.commit_transaction)
                backoff.done()
                return True
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
                if classify(err) != "retry":
                    self.close(timeout_s=0)
                    raise DeliveryError(f"transaction failed: {type(err).__name__}: {err}") from err
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
                if classify(err) == "fatal":
                    raise DeliveryError(f"cannot start transactions: {type(err).__name__}: {err}") from err
                backoff.wait(err)
        return self.producer

    def _abort(self) -> None:
        """Abort the open transaction; a producer that cannot abort is replaced."""
        producer = self.producer
        if producer is None:
            return
        try:
            self._bounded(producer.abort_transaction)
        except StopWithoutCommit:
            raise
        except Exception as err:  # fenced or in a fatal state: the coordinator aborts it on its own
            log.info("could not abort the transaction (%s: %s); replacing the producer", type(err).__name__, err)
            self.close(timeout_s=0)

    def _bounded(self, call: Callable[[], T]) -> T:
        """Run a blocking transactional call (kafka-python gives them no timeout) so that a worker
        asked to stop leaves after ``STOP_GRACE_S`` instead of waiting for a broker that is away."""
        running = Call(call, "txn-call")
        waited_stopping, reported = 0.0, time.monotonic()
        while not running.wait(0.5):
            if time.monotonic() - reported > REPORT_EVERY_S:
                reported = time.monotonic()
                log.warning("a transactional call has been waiting on Kafka for over %.0fs", REPORT_EVERY_S)
            if self.stop.is_set():
                waited_stopping += 0.5
                if waited_stopping >= STOP_GRACE_S:
                    raise StopWithoutCommit("Kafka did not answer a transactional call while stopping")
        return running.result()
