"""Getting a batch's outputs acknowledged and its input offsets committed, in one of two modes.

- ``at-least-once``: every output is sent and acknowledged (``acks=all``), then the offsets
  are committed. A crash between the two re-scores the batch: duplicates possible, losses not.
  Batches can be pipelined (``AtLeastOnce.submit``): the next is read and scored while the
  outputs of up to ``max_in_flight`` earlier ones are acknowledged; commits stay in batch order,
  and the worker commits what is in flight before the group rebalances.
- ``exactly-once`` (:mod:`~pipeline.worker.transactions`): outputs and offsets go into one
  Kafka transaction, committed with the consumer's group metadata so the broker fences a
  stale member (KIP-447). A crash aborts the transaction: a ``read_committed`` reader sees
  each output once.

Errors are classified, never retried blindly:

- retriable (kafka-python's ``retriable``: timeouts, leader moves, broker away): retried with
  capped exponential backoff, counted in ``fraud_errors_total`` and logged (first failure,
  then every 30 s), until it works or the worker is asked to stop;
- too large or refused for that message alone (an invalid record or timestamp, a value the
  client cannot send): the output is replaced by its smaller form (see ``outputs``); one with
  no smaller form left is dropped, logged and counted, so the partition moves on. Any other
  error, retriable or not, is retried: an output is never dropped for what the broker or the
  producer went through;
- the group moved on (the partitions belong to another member now): nothing is committed,
  the new owner scores the batch again;
- fatal for the worker (authorization, an invalid topic, unsupported broker): raised as
  :class:`DeliveryError`; the worker stops without committing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kafka import TopicPartition
from kafka.errors import (
    AuthorizationError,
    CommitFailedError,
    CorruptRecordError,
    DuplicateSequenceNumberError,
    FencedInstanceIdError,
    IllegalGenerationError,
    IllegalStateError,
    InvalidProducerEpochError,
    InvalidRecordError,
    InvalidTimestampError,
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumberError,
    ProducerFencedError,
    RebalanceInProgressError,
    RecordListTooLargeError,
    UnknownMemberIdError,
    UnknownProducerIdError,
    UnsupportedForMessageFormatError,
    UnsupportedVersionError,
)
from kafka.structs import OffsetAndMetadata

from pipeline.errors import FraudPipelineError
from pipeline.worker import kafkaclient
from pipeline.worker.metrics import WorkerMetrics
from pipeline.worker.outputs import Output

log = logging.getLogger(__name__)

REBALANCED = (CommitFailedError, IllegalGenerationError, UnknownMemberIdError, RebalanceInProgressError,
              FencedInstanceIdError)
FENCED = (ProducerFencedError, InvalidProducerEpochError)
FATAL = (AuthorizationError, InvalidTopicError, UnsupportedVersionError, IllegalStateError)
TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError)
# the broker refuses this message, and would refuse it again as it is
MESSAGE_REFUSED = (InvalidRecordError, InvalidTimestampError, CorruptRecordError, UnsupportedForMessageFormatError)
# the producer's idempotence state is broken, not the message: a new producer sends it again (seen on a three-node
# cluster with two nodes down: OutOfOrderSequenceNumber on the alerts topic, once sent as a smaller alert instead)
PRODUCER_STATE = (OutOfOrderSequenceNumberError, UnknownProducerIdError, DuplicateSequenceNumberError)
REPORT_EVERY_S = 30.0
SLOW_ACK_S = 5.0  # an acknowledgement this late is logged (once per batch)


class StopWithoutCommit(FraudPipelineError):
    """Asked to stop while outputs or offsets could not be delivered: nothing is committed (the worker's run
    handles it; one that escapes is one ``fraud-worker: error:`` line, like every error of the tree)."""


class DeliveryError(FraudPipelineError):
    """Kafka refused the worker's outputs for a reason no retry can fix (authorization, bad topic)."""


def classify(err: BaseException) -> str:
    """What to do with an output that failed: ``retry``, ``renew`` (retry with a new producer), ``shrink``
    (too large, or refused for this message alone) or ``fatal``.

    Only an error about the message itself shrinks it. Every other error is retried, retriable in
    kafka-python's sense or not: a features record (which has no smaller form) failed with a
    non-retriable error that says nothing about it (``BrokerNotAvailableError``, ``UnknownError``, the
    bare ``KafkaError`` kafka-python gives the sound neighbours of an invalid record) was dropped before.
    Inside a transaction one failed send fails its neighbours too, so the same rule holds there."""
    if isinstance(err, FATAL):
        return "fatal"
    if isinstance(err, PRODUCER_STATE):
        return "renew"
    if isinstance(err, TOO_LARGE + MESSAGE_REFUSED) or not isinstance(err, KafkaError):
        return "shrink"
    return "retry"


class Backoff:
    """Capped exponential backoff that waits on the stop event, and says so in logs and metrics."""

    def __init__(self, stop: threading.Event, cap_s: float, count: Callable[[BaseException], None], what: str
                 ) -> None:
        self.stop, self.cap_s, self.count, self.what = stop, cap_s, count, what
        self.attempt = 0
        self.started = time.monotonic()
        self._reported = 0.0

    def wait(self, err: BaseException) -> None:
        """Sleep before the next try; raise StopWithoutCommit when stopping after a few tries."""
        self.attempt += 1
        self.count(err)
        now = time.monotonic()
        if self.attempt == 1 or now - self._reported >= REPORT_EVERY_S:
            self._reported = now
            log.warning("%s failed (%s: %s); retrying (attempt %d, %.0fs so far)", self.what,
                        type(err).__name__, err, self.attempt, now - self.started)
        delay = min(self.cap_s, 0.05 * 2**self.attempt)
        if self.stop.wait(delay) and self.attempt >= 3:
            raise StopWithoutCommit(f"{self.what} failed: {err}")

    def done(self) -> None:
        if self.attempt:
            log.info("%s succeeded after %d retries (%.1fs)", self.what, self.attempt,
                     time.monotonic() - self.started)


def offsets_after(records: Any) -> dict[TopicPartition, int]:
    """The offset to commit per partition: one past the last record of the batch."""
    offsets: dict[TopicPartition, int] = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        offsets[tp] = max(offsets.get(tp, -1), r.offset + 1)
    return offsets


def first_offsets(records: Any) -> dict[TopicPartition, int]:
    """The first offset of the records per partition: where to read them again."""
    first: dict[TopicPartition, int] = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        first[tp] = min(first.get(tp, r.offset), r.offset)
    return first


def to_commit(offsets: dict[TopicPartition, int]) -> dict[TopicPartition, OffsetAndMetadata]:
    """Offsets as the consumer's commit and the transactional producer take them."""
    return {tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()}


class Delivery:
    """Sends outputs with a producer the subclass owns; ``deliver`` is the one entry point."""

    def __init__(self, producer_options: dict[str, Any], consumer: Any, metrics: WorkerMetrics,
                 stop: threading.Event, max_backoff_s: float, ack_timeout_s: float, client: str = "kafka-python"
                 ) -> None:
        """``consumer`` and ``client``: see :mod:`~pipeline.worker.kafkaclient`."""
        self.producer_options, self.consumer, self.metrics = producer_options, consumer, metrics
        self.stop, self.max_backoff_s, self.ack_timeout_s = stop, max_backoff_s, ack_timeout_s
        self.client = client
        self.producer: Any = None

    def deliver(self, outputs: list[Output], offsets: dict[TopicPartition, int]) -> bool:
        """Publish ``outputs`` and commit ``offsets``; False when the group moved on (nothing committed)."""
        raise NotImplementedError

    @property
    def delivery_timeout_s(self) -> float:
        """How long the producer itself retries an output before it fails it: kafka-python's
        ``delivery_timeout_ms`` (120 s unless set), librdkafka's ``message.timeout.ms`` (its 300-s default:
        the confluent driver maps no option onto it). The wait for a batch is bounded by it, not by
        ``ack_timeout_s`` (which bounds each output's wait: a cluster chaos run held one record 120 s,
        2026-12-07)."""
        if self.client == "confluent":
            return 300.0
        return float(self.producer_options.get("delivery_timeout_ms", 120_000)) / 1000

    def warm(self, topics: list[str]) -> None:
        """Start the producer and fetch the output topics' metadata before the first batch: a first send
        waits for its topic's leaders (150 ms seen, records piling up behind it at 10k tx/s). A broker slow
        to answer here is left to the first send, which waits and retries as always."""
        try:
            producer = self._started_producer()
            for topic in topics:
                producer.partitions_for(topic)
        except Exception as err:  # never a reason not to start
            log.debug("output topics' metadata not fetched ahead (%s: %s); the first send will wait for it",
                      type(err).__name__, err)

    def _started_producer(self) -> Any:
        """The producer, started if it was not."""
        raise NotImplementedError

    def close(self, timeout_s: float = 10.0) -> None:
        """Close the producer (``timeout_s`` to flush what is in flight; 0 to drop it)."""
        if self.producer is not None:
            self.producer.close(timeout=timeout_s)
            self.producer = None

    def _backoff(self, what: str, kind: str) -> Backoff:
        def count(err: BaseException) -> None:
            self.metrics.errors.labels(kind).inc()
            self.metrics.kafka_errors.labels(type(err).__name__).inc()

        return Backoff(self.stop, self.max_backoff_s, count, what)

    def _send(self, outputs: list[Output]) -> list[tuple[Output, BaseException]]:
        """Send all, wait for every acknowledgement; the outputs that failed, with their errors."""
        return self._wait(*self._start(outputs))

    def _start(self, outputs: list[Output]) -> tuple[list[tuple[Output, Any]], list[tuple[Output, BaseException]]]:
        """Hand every output to the producer: their futures, and the ones refused before sending."""
        assert self.producer is not None
        futures, failed = [], []
        for out in outputs:
            try:
                futures.append((out, self.producer.send(out.topic, key=out.key, value=out.value,
                                                        headers=out.headers, partition=out.partition)))
            except Exception as err:  # refused before sending: size, a value the client cannot encode
                failed.append((out, err))
        return futures, failed

    def _wait(self, futures: list[tuple[Output, Any]], failed: list[tuple[Output, BaseException]]
              ) -> list[tuple[Output, BaseException]]:
        """Wait for every acknowledgement (each up to ``ack_timeout_s``): the outputs that failed, with
        their errors. Both clients retry a broker that does not answer on their own, without a word: a wait
        longer than ``SLOW_ACK_S`` is logged, once per call."""
        failed = list(failed)
        started, said = time.monotonic(), False
        for out, future in futures:
            deadline = time.monotonic() + self.ack_timeout_s
            if not said:  # first wait until the slow mark, and say so once if that passes
                try:
                    future.get(timeout=max(0.0, min(started + SLOW_ACK_S, deadline) - time.monotonic()))
                except Exception:
                    if not future.is_done:
                        said = True
                        log.warning("outputs not acknowledged after %.0fs (a broker slow or away?); the client "
                                    "retries each until its delivery timeout (%.0fs) fails it, and each is waited "
                                    "for up to %.0fs", time.monotonic() - started, self.delivery_timeout_s,
                                    self.ack_timeout_s)
            try:
                future.get(timeout=max(0.0, deadline - time.monotonic()))
            except Exception as err:
                failed.append((out, err))
        return failed

    def _next_try(self, pending: list[Output], failed: list[tuple[Output, BaseException]],
                  classify: Callable[[BaseException], str], resend_all: bool
                  ) -> tuple[list[Output], BaseException | None]:
        """What to send next: retriable outputs as they are, refused ones in a smaller form, and (after
        an aborted transaction, ``resend_all``) the ones that had succeeded. Also returns the last
        retriable error (None: no need to back off). Raises DeliveryError for a fatal error."""
        errors = {id(out): err for out, err in failed}
        again: list[Output] = []
        retriable: BaseException | None = None
        renew: BaseException | None = None
        for out in pending:
            err = errors.get(id(out))
            kind = "ok" if err is None else classify(err)
            if kind == "renew":
                renew, kind = err, "retry"
            if kind == "fatal":
                raise DeliveryError(f"Kafka refused an output to {out.topic!r}: {type(err).__name__}: {err}") \
                    from err
            if kind == "shrink":
                smaller = self._shrink(out, err)  # type: ignore[arg-type]
                if smaller is not None:
                    again.append(smaller)
            elif kind == "retry" or resend_all:
                retriable = err if kind == "retry" else retriable
                again.append(out)
        if renew is not None:
            self.metrics.errors.labels("producer_renewed").inc()
            log.warning("the producer's idempotence state broke (%s: %s); a new producer sends its outputs again",
                        type(renew).__name__, renew)
            # not dropped: other batches may have records in flight on it (dropped, they would fail as closed)
            self.close(timeout_s=self.ack_timeout_s)
        return again, retriable

    def _shrink(self, out: Output, err: BaseException) -> Output | None:
        smaller = out.shrink()
        if smaller is None:
            self.metrics.errors.labels("output_dropped").inc()
            log.error("dropped an output to %s that Kafka refuses in every form (%s: %s)", out.topic,
                      type(err).__name__, err)
        else:
            self.metrics.errors.labels("output_shrunk").inc()
            log.warning("output to %s refused (%s: %s); sending a smaller form (%d bytes instead of %d)",
                        out.topic, type(err).__name__, err, len(smaller.value), len(out.value))
        return smaller


@dataclass
class InFlight:
    """A batch whose outputs were handed to the producer and whose offsets wait for their acknowledgements."""

    outputs: list[Output]
    futures: list[tuple[Output, Any]]
    refused: list[tuple[Output, BaseException]]
    offsets: dict[TopicPartition, int]
    committed: Callable[[], None]  # counts the batch once its offsets are committed

    def acknowledged(self) -> bool:
        return all(future.is_done for _out, future in self.futures)


class AtLeastOnce(Delivery):
    """Outputs acknowledged first, offsets committed after.

    ``submit`` pipelines: it hands a batch's outputs to the producer and returns, so the worker
    reads and scores the next batch while they are acknowledged. Batches are committed in the
    order they were submitted, each once its own and every earlier batch's outputs are
    acknowledged (``settle``); at most ``max_in_flight`` wait at a time (back-pressure: the
    oldest is waited for). Failed outputs are retried, shrunk or fatal exactly as ``deliver``
    does, and a batch is committed only after that.
    """

    def __init__(self, *args: Any, max_in_flight: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_in_flight = max_in_flight
        self.in_flight: deque[InFlight] = deque()

    def deliver(self, outputs: list[Output], offsets: dict[TopicPartition, int]) -> bool:
        self.settle(block=True)  # what is in flight first: commits stay in order
        self._producer()
        self._publish(outputs)
        return self._commit(offsets)

    def submit(self, outputs: list[Output], offsets: dict[TopicPartition, int], committed: Callable[[], None]
               ) -> None:
        """Send a batch's outputs without waiting; ``committed`` is called once its offsets are committed."""
        self._producer()
        self.in_flight.append(InFlight(outputs, *self._start(outputs), offsets, committed))
        while len(self.in_flight) > self.max_in_flight:
            self._settle(1)
        self.settle(block=False)

    def settle(self, block: bool) -> None:
        """Commit the batches in flight whose outputs are acknowledged, oldest first (``block``: all)."""
        ready = len(self.in_flight) if block else 0
        if not block:
            for batch in self.in_flight:
                if not batch.acknowledged():
                    break
                ready += 1
        if ready:
            self._settle(ready)

    def _settle(self, count: int) -> None:
        """Finish the ``count`` oldest batches (retrying what failed) and commit their offsets in one go.

        Offsets of partitions this worker no longer owns are left to their new owner, which reads
        those records again (at-least-once: repeated outputs, nothing lost)."""
        done = [self.in_flight.popleft() for _ in range(count)]
        offsets: dict[TopicPartition, int] = {}
        for batch in done:
            failed = self._wait(batch.futures, batch.refused)
            if failed:
                self._publish(batch.outputs, failed)
            offsets.update(batch.offsets)  # later batches of a partition are further on
        owned = self.consumer.assignment()
        offsets = {tp: o for tp, o in offsets.items() if tp in owned}
        if offsets and self._commit(offsets):
            for batch in done:
                batch.committed()

    def _producer(self) -> None:
        if self.producer is None:
            self.producer = kafkaclient.producer(self.client, **self.producer_options)

    def _started_producer(self) -> Any:
        self._producer()
        return self.producer

    def _publish(self, outputs: list[Output], failed: list[tuple[Output, BaseException]] | None = None) -> None:
        """Get ``outputs`` acknowledged; ``failed``: the first try was made already and these failed."""
        backoff = self._backoff("publishing outputs", "publish_failed")
        pending = outputs
        while pending:
            if failed is None:
                self._producer()  # a new one, if the last was dropped (``renew``)
                failed = self._send(pending)
            if not failed:
                break
            pending, retriable = self._next_try(pending, failed, classify, resend_all=False)
            failed = None
            if retriable is not None:
                backoff.wait(retriable)
        backoff.done()

    def _commit(self, offsets: dict[TopicPartition, int]) -> bool:
        if not offsets:  # outputs alone (raw input's watermark marks between batches)
            return True
        backoff = self._backoff("committing offsets", "commit_retry")
        while True:
            try:
                self.consumer.commit(to_commit(offsets))
                backoff.done()
                return True
            except REBALANCED as err:
                self.metrics.errors.labels("commit_failed").inc()
                log.warning("commit refused: the group rebalanced (%s); the new owner scores these records "
                            "again", type(err).__name__)
                return False
            except KafkaError as err:
                if not getattr(err, "retriable", False):  # the fatal ones included
                    raise DeliveryError(f"committing offsets failed: {type(err).__name__}: {err}") from err
                backoff.wait(err)
