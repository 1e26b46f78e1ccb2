"""The confluent driver: confluent-kafka (librdkafka, checked on confluent-kafka 2.16) in the shape of the
worker's client interface (see the package).

What librdkafka does differently, and what this module does about it:

- **Options** are kafka-python's names translated to librdkafka's (:func:`config`); one with no
  equivalent raises, so a setting is never dropped in silence. ``metadata_max_age_ms`` maps to
  ``topic.metadata.refresh.interval.ms`` (librdkafka's ``metadata.max.age.ms`` only expires a
  cache: new partitions of the input topic would go unnoticed).
- **Partitioning**: librdkafka's default partitioner is CRC32; Java and kafka-python hash keys
  with murmur2. The worker's keyed outputs (the raw-input repartition topic) must land where
  kafka-python producers put the same keys, so the producer uses ``murmur2_random``.
- **Errors** are raised as kafka-python's class for the same Kafka error code (:func:`translate`);
  librdkafka's own negative codes are mapped by meaning and keep their ``retriable`` flag.
- **Polling** returns as soon as one record is there, plus what is already fetched (librdkafka's
  ``consume`` alone waits to fill the batch).
- **Rebalances** run inside ``poll`` on the calling thread: ``before_revoke`` (the worker commits
  what is in flight) and the kafka-python listener are called there. A partition assigned
  starts at its committed offset, which is never past a record released on revoke, so the
  listener's rewinds are not needed and not applied. librdkafka keeps a partition's pause through a
  revoke and a reassignment (librdkafka issue 1849): a partition revoked or lost is resumed as it
  goes, so one that comes back is fetched and ``paused()`` tells the truth (a silent stall otherwise:
  cluster chaos run of 2026-12-07).
- **Headers**: confluent-kafka 2.16's ``Message.headers()`` returns with a decode error still
  pending when a header name is not UTF-8; a specialised call site then raises ``SystemError``
  later, in unrelated code. Headers are read through ``operator.methodcaller`` (a C-level call
  that checks), and such a record is marked ``unreadable``: the worker dead-letters it as
  ``corrupt_record``. A record librdkafka reports as an error with an offset is unreadable too.
- **Commits that never return** (confluent-kafka-python issue 1801): after a broker freeze a
  synchronous commit can sit unsent on the coordinator connection for good, and every later
  one with it. Commits are bounded (request timeout + 5 s). When one times out while a *fresh*
  client gets metadata from the cluster, this consumer is wedged: it is replaced by a new one
  (its partitions count as lost, their records are read again: at-least-once) and the commit
  fails as a rebalance. While the cluster does not answer either, the timeout is retriable.
- **Logs**: librdkafka's log lines go to the ``pipeline.worker.librdkafka`` logger at DEBUG (the
  worker reports what failed through its own retries, as with kafka-python, whose lines are
  DEBUG too); ``LIBRDKAFKA_DEBUG=cgrp,broker`` adds librdkafka's debug contexts.
"""

from __future__ import annotations

import logging
import operator
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import confluent_kafka as ck
from kafka import TopicPartition
from kafka import errors as kerr

from pipeline.worker.kafkaclient.calls import Call
from pipeline.worker.records import Record

log = logging.getLogger(__name__)
librdkafka_log = logging.getLogger("pipeline.worker.librdkafka")

COMMIT_GRACE_S = 5.0  # a commit may take the request timeout plus this before it counts as stuck
CLOSE_TIMEOUT_S = 30.0  # leaving the group
PROBE_TIMEOUT_S = 5.0

# kafka-python option -> librdkafka property (None: handled by this module, not passed on)
COMMON = {
    "bootstrap_servers": "bootstrap.servers",
    "client_id": "client.id",
    "security_protocol": "security.protocol",
    "ssl_cafile": "ssl.ca.location",
    "ssl_certfile": "ssl.certificate.location",
    "ssl_keyfile": "ssl.key.location",
    "ssl_password": "ssl.key.password",
    "ssl_check_hostname": "ssl.endpoint.identification.algorithm",
    "sasl_mechanism": "sasl.mechanism",
    "sasl_plain_username": "sasl.username",
    "sasl_plain_password": "sasl.password",
    "request_timeout_ms": "socket.timeout.ms",
    "reconnect_backoff_ms": "reconnect.backoff.ms",
    "reconnect_backoff_max_ms": "reconnect.backoff.max.ms",
    "metadata_max_age_ms": "topic.metadata.refresh.interval.ms",
}
CONSUMER = {
    "group_id": "group.id",
    "enable_auto_commit": "enable.auto.commit",
    "auto_offset_reset": "auto.offset.reset",
    "isolation_level": "isolation.level",
    "max_partition_fetch_bytes": "max.partition.fetch.bytes",
    "fetch_max_bytes": "fetch.max.bytes",
    "session_timeout_ms": "session.timeout.ms",
    "heartbeat_interval_ms": "heartbeat.interval.ms",
    "max_poll_records": None,  # poll's max_records
    "partition_assignment_strategy": "partition.assignment.strategy",  # kafka-python's assignor classes
}
PRODUCER = {
    "acks": "acks",
    "linger_ms": "linger.ms",
    "batch_size": "batch.size",
    "retries": "retries",
    "retry_backoff_ms": "retry.backoff.ms",
    "max_block_ms": None,  # send waits this long for room in a full queue
}

# librdkafka's own (negative) error codes, by meaning
LOCAL_ERRORS: dict[int, type[kerr.KafkaError]] = {
    ck.KafkaError._TIMED_OUT: kerr.KafkaTimeoutError,
    ck.KafkaError._MSG_TIMED_OUT: kerr.KafkaTimeoutError,
    ck.KafkaError._QUEUE_FULL: kerr.KafkaTimeoutError,
    ck.KafkaError._TRANSPORT: kerr.KafkaConnectionError,
    ck.KafkaError._ALL_BROKERS_DOWN: kerr.KafkaConnectionError,
    ck.KafkaError._RESOLVE: kerr.KafkaConnectionError,
    ck.KafkaError._UNKNOWN_TOPIC: kerr.UnknownTopicOrPartitionError,
    ck.KafkaError._UNKNOWN_PARTITION: kerr.UnknownTopicOrPartitionError,
    ck.KafkaError._AUTHENTICATION: kerr.SaslAuthenticationFailedError,
    ck.KafkaError._SSL: kerr.SaslAuthenticationFailedError,
    ck.KafkaError._STATE: kerr.CommitFailedError,  # e.g. a commit after the assignment was lost
    ck.KafkaError._ASSIGNMENT_LOST: kerr.CommitFailedError,
    ck.KafkaError._FENCED: kerr.FencedInstanceIdError,
    ck.KafkaError._INVALID_ARG: kerr.IllegalArgumentError,
}


def config(options: dict[str, Any], *, role: str) -> dict[str, Any]:
    """librdkafka properties for kafka-python ``options`` of a ``consumer`` or ``producer``."""
    table = {**COMMON, **(CONSUMER if role == "consumer" else PRODUCER)}
    unknown = sorted(set(options) - table.keys())
    if unknown:
        raise ValueError(f"no confluent-kafka equivalent for the {role} option(s) {', '.join(unknown)}")
    conf: dict[str, Any] = {}
    for name, value in options.items():
        prop = table[name]
        if prop is None or value is None:
            continue
        if name == "bootstrap_servers" and not isinstance(value, str):
            value = ",".join(value)
        elif name == "ssl_check_hostname":
            value = "https" if value else "none"
        elif name == "security_protocol":
            value = value.lower()
        elif name == "partition_assignment_strategy":
            value = ",".join(assignor.name for assignor in value)  # RangePartitionAssignor.name: "range"
        conf[prop] = value
    if "ssl.key.location" in conf and "ssl.certificate.location" not in conf:
        conf.pop("ssl.key.password", None)
    if role == "producer":
        conf["partitioner"] = "murmur2_random"  # where Java and kafka-python put the same keys
        # librdkafka's default is off (kafka-python 3's is on): without it a retried batch can land after a later
        # one, and a compacted changelog would keep an older state of a key, or a watermark mark pass its data
        conf["enable.idempotence"] = True
    else:
        conf["enable.partition.eof"] = False
    conf["logger"] = Demoted()
    conf["error_cb"] = _client_error
    debug = os.environ.get("LIBRDKAFKA_DEBUG", "").strip()
    if debug:
        conf["debug"] = debug
    return conf


class Demoted:
    """librdkafka's log lines at DEBUG: the worker says what failed through its own retries."""

    def log(self, level: int, msg: str, *args: Any) -> None:
        librdkafka_log.debug(msg, *args)


def _client_error(err: ck.KafkaError) -> None:
    """Client-level errors (a broker away, all brokers down): librdkafka retries them itself."""
    librdkafka_log.debug("client error: %s", err)


def translate(err: Any) -> kerr.KafkaError:
    """kafka-python's exception for a confluent-kafka ``KafkaError`` (or a ``KafkaException`` holding one)."""
    if isinstance(err, ck.KafkaException) and err.args and isinstance(err.args[0], ck.KafkaError):
        err = err.args[0]
    if not isinstance(err, ck.KafkaError):
        return kerr.KafkaError(str(err))
    code = err.code()
    cls = LOCAL_ERRORS.get(code) if code < 0 else kerr.for_code(code)
    out = (cls or kerr.KafkaError)(f"{err.name()}: {err.str()}")
    if err.retriable() and not getattr(out, "retriable", False):
        out.retriable = True  # type: ignore[misc]
    return out


def _ctp(tp: TopicPartition, offset: int = ck.OFFSET_INVALID) -> ck.TopicPartition:
    return ck.TopicPartition(tp.topic, tp.partition, offset)


def _tp(ctp: ck.TopicPartition) -> TopicPartition:
    return TopicPartition(ctp.topic, ctp.partition)


_headers = operator.methodcaller("headers")  # a C-level call checks the error confluent-kafka 2.16 leaves


def to_record(msg: Any) -> Record:
    """A ``Record`` for a confluent-kafka ``Message`` (one with an error is unreadable)."""
    error = msg.error()
    if error is not None:
        return Record(msg.topic(), msg.partition(), msg.offset(), -1, None, None, [],
                      f"librdkafka could not read it: {error.name()}: {error.str()}")
    try:
        headers, why = _headers(msg) or [], None
    except (UnicodeDecodeError, SystemError) as err:
        headers, why = [], f"its headers cannot be read: {type(err).__name__}: {err}"
    return Record(msg.topic(), msg.partition(), msg.offset(), msg.timestamp()[1], msg.key(), msg.value(),
                  headers, why)


class ConfluentConsumer:
    """A confluent-kafka group consumer with the worker's interface (see the package)."""

    def __init__(self, **options: Any) -> None:
        self._conf = config(options, role="consumer")
        self._probe_conf = {k: v for k, v in self._conf.items()
                            if k not in CONSUMER.values() and k != "enable.partition.eof"}
        self._request_timeout_s = options.get("request_timeout_ms", 30_000) / 1000
        self._consumer = ck.Consumer(self._conf)
        self._topics: list[str] = []
        self._listener: Any = None
        self._assignment: set[TopicPartition] = set()
        self._paused: set[TopicPartition] = set()
        self.before_revoke: Callable[[], None] | None = None
        self.replaced = 0  # wedged consumers replaced (see ``commit``)

    # -- group ---------------------------------------------------------------------------
    def subscribe(self, topics: Iterable[str], listener: Any = None) -> None:
        self._topics, self._listener = list(topics), listener
        self._subscribe(self._consumer)

    def _subscribe(self, consumer: ck.Consumer) -> None:
        # each callback acts on the consumer that calls it (a replaced one may still call while closing)
        consumer.subscribe(self._topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
                           on_lost=self._on_lost)

    def rebalance_coming(self) -> bool:
        return False  # librdkafka rebalances inside poll and calls before_revoke there

    def _on_assign(self, consumer: ck.Consumer, partitions: list[ck.TopicPartition]) -> None:
        if consumer is not self._consumer:
            return
        assigned = {_tp(p) for p in partitions}
        self._assignment |= assigned
        self._call_listener("on_partitions_assigned", assigned, seeks_apply=False)

    def _on_revoke(self, consumer: ck.Consumer, partitions: list[ck.TopicPartition]) -> None:
        if consumer is not self._consumer:
            return
        revoked = {_tp(p) for p in partitions}
        if self.before_revoke is not None and revoked:
            self.before_revoke()  # still ours: commit what is in flight
        self._call_listener("on_partitions_revoked", revoked)
        self._assignment -= revoked
        self._unpause(revoked)

    def _on_lost(self, consumer: ck.Consumer, partitions: list[ck.TopicPartition]) -> None:
        if consumer is not self._consumer:
            return
        self._lose({_tp(p) for p in partitions})

    def _lose(self, lost: set[TopicPartition]) -> None:
        self._call_listener("on_partitions_lost", lost)
        self._assignment -= lost
        self._unpause(lost)

    def _unpause(self, gone: set[TopicPartition]) -> None:
        """Resume the partitions ``gone`` that are paused, while they are still assigned: librdkafka keeps a
        partition's pause through a revoke and a later reassignment (module docstring)."""
        held = self._paused & gone
        if held:
            try:
                self._consumer.resume([_ctp(tp) for tp in held])
            except ck.KafkaException as err:  # not assigned any more: nothing of it is kept then
                log.debug("resuming %s as they go: %s", sorted(held), err)
        self._paused -= gone

    _assigning = False

    def _call_listener(self, method: str, partitions: set[TopicPartition], seeks_apply: bool = True) -> None:
        if self._listener is None:
            return
        self._assigning = not seeks_apply
        try:
            result = getattr(self._listener, method)(partitions)
            if hasattr(result, "send"):  # kafka-python's async listener: its coroutines never await
                try:
                    result.send(None)
                except StopIteration:
                    pass
                else:
                    result.close()
                    raise RuntimeError(f"rebalance listener {method} awaited; it must not block")
        finally:
            self._assigning = False

    def assignment(self) -> set[TopicPartition]:
        return set(self._assignment)

    # -- fetching ------------------------------------------------------------------------
    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[TopicPartition, list[Record]]:
        first = self._consumer.poll(timeout_ms / 1000)
        if first is None:
            return {}
        messages = [first]
        if max_records is None or max_records > 1:
            messages += self._consumer.consume((max_records or 100_000) - 1, 0)  # what is fetched already
        out: dict[TopicPartition, list[Record]] = {}
        for msg in messages:
            error = msg.error()
            if error is not None and (msg.topic() is None or msg.offset() is None or msg.offset() < 0):
                self._not_a_record(error)
                continue
            record = to_record(msg)
            out.setdefault(TopicPartition(record.topic, record.partition), []).append(record)
        return out

    @staticmethod
    def _not_a_record(error: ck.KafkaError) -> None:
        """An event in the message stream (a topic not there yet, a broker away): fatal ones are raised."""
        err = translate(error)
        if getattr(err, "retriable", False) or isinstance(err, kerr.UnknownTopicOrPartitionError):
            log.debug("consumer event: %s", err)
            return
        raise err

    def seek(self, tp: TopicPartition, offset: int) -> None:
        if self._assigning:
            return  # assigned partitions start at their committed offset (module docstring)
        try:
            self._consumer.seek(_ctp(tp, offset))
        except ck.KafkaException as err:
            raise translate(err) from err

    def position(self, tp: TopicPartition) -> int:
        """The next offset to read; before the partition returned a record, its committed offset (else
        the log start), which is where librdkafka starts it."""
        offset = self._consumer.position([_ctp(tp)])[0].offset
        if offset >= 0:
            return offset
        committed = self.committed(tp)
        return committed if committed is not None else self.beginning_offsets([tp])[tp]

    def highwater(self, tp: TopicPartition) -> int | None:
        try:
            _low, high = self._consumer.get_watermark_offsets(_ctp(tp), cached=True)
        except ck.KafkaException:
            return None
        return high if high is not None and high >= 0 else None

    def _watermarks(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, tuple[int, int]]:
        try:
            return {tp: self._consumer.get_watermark_offsets(_ctp(tp), timeout=self._request_timeout_s)
                    for tp in partitions}
        except ck.KafkaException as err:
            raise translate(err) from err

    def beginning_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: low for tp, (low, _high) in self._watermarks(partitions).items()}

    def end_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: high for tp, (_low, high) in self._watermarks(partitions).items()}

    def pause(self, *partitions: TopicPartition) -> None:
        if partitions:
            self._consumer.pause([_ctp(tp) for tp in partitions])
            self._paused |= set(partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        if partitions:
            self._consumer.resume([_ctp(tp) for tp in partitions])
            self._paused -= set(partitions)

    def paused(self) -> set[TopicPartition]:
        return set(self._paused)

    # -- offsets -------------------------------------------------------------------------
    def committed(self, tp: TopicPartition) -> int | None:
        try:
            found = self._consumer.committed([_ctp(tp)], timeout=self._request_timeout_s)[0]
        except ck.KafkaException as err:
            raise translate(err) from err
        if found.error is not None:
            raise translate(found.error)
        return found.offset if found.offset >= 0 else None

    def commit(self, offsets: dict[TopicPartition, Any]) -> None:
        """Commit synchronously, bounded (module docstring: commits that never return)."""
        wanted = [_ctp(tp, getattr(o, "offset", o)) for tp, o in offsets.items()]
        consumer = self._consumer
        running = Call(lambda: consumer.commit(offsets=wanted, asynchronous=False), "commit")
        if not running.wait(self._request_timeout_s + COMMIT_GRACE_S):
            if self._cluster_answers():
                self._replace()
                raise kerr.CommitFailedError("the commit never returned while the cluster answers; the consumer "
                                             "was replaced and its partitions count as lost")
            raise kerr.KafkaTimeoutError(f"the commit took over {self._request_timeout_s + COMMIT_GRACE_S:.0f}s "
                                         "and the cluster does not answer")
        try:
            done = running.result()
        except ck.KafkaException as err:
            raise translate(err) from err
        for part in done or ():
            if part.error is not None:
                raise translate(part.error)

    def _cluster_answers(self) -> bool:
        """Whether a fresh client gets metadata (the one in use may be the stuck one)."""
        from confluent_kafka.admin import AdminClient

        try:
            admin = AdminClient(self._probe_conf)
            admin.list_topics(timeout=PROBE_TIMEOUT_S)
            return True
        except Exception as err:
            log.debug("the cluster does not answer a fresh client either: %s", err)
            return False

    def _replace(self) -> None:
        """Give up a wedged consumer: its partitions are lost to this worker, a new consumer joins."""
        old, held = self._consumer, set(self._assignment)
        self.replaced += 1
        log.warning("a commit never returned while the cluster answers (confluent-kafka-python issue 1801); "
                    "replacing the consumer: partitions %s count as lost, their uncommitted records are read "
                    "again", sorted(held))
        self._consumer = ck.Consumer(self._conf)
        self._lose(held)
        self._subscribe(self._consumer)
        threading.Thread(target=self._close_quietly, args=(old,), name="close-wedged", daemon=True).start()

    @staticmethod
    def _close_quietly(consumer: ck.Consumer) -> None:
        try:
            consumer.close()
        except Exception as err:
            log.debug("closing the replaced consumer: %s", err)

    def close(self, autocommit: bool = False) -> None:
        """Leave the group (bounded: a wedged consumer is left behind after ``CLOSE_TIMEOUT_S``)."""
        del autocommit  # never: the worker commits explicitly
        consumer = self._consumer
        running = Call(consumer.close, "close")
        if not running.wait(CLOSE_TIMEOUT_S):
            log.warning("leaving the group took over %.0fs; going on without waiting", CLOSE_TIMEOUT_S)
            return
        try:
            running.result()
        except (ck.KafkaException, RuntimeError) as err:
            raise translate(err) from err


class Delivered:
    """The future of one produced message, settled by the producer's ``poll``."""

    __slots__ = ("_producer", "done", "error")

    def __init__(self, producer: ck.Producer) -> None:
        self._producer = producer
        self.error: kerr.KafkaError | None = None
        self.done = False

    def __call__(self, err: Any, _msg: Any) -> None:  # librdkafka's delivery report
        self.error = translate(err) if err is not None else None
        self.done = True

    @property
    def is_done(self) -> bool:
        if not self.done:
            self._producer.poll(0)
        return self.done

    def get(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            left = 1.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise kerr.KafkaTimeoutError(f"no acknowledgement within {timeout}s")
            self._producer.poll(min(left, 0.1))
        if self.error is not None:
            raise self.error


class ConfluentProducer:
    """A confluent-kafka producer with the worker's interface (see the package)."""

    def __init__(self, **options: Any) -> None:
        if "transactional_id" in options:
            raise ValueError("the confluent client does not run transactions here (exactly-once needs "
                             "kafka-python for now)")
        self._max_block_s = options.get("max_block_ms", 60_000) / 1000
        self._producer = ck.Producer(config(options, role="producer"))

    def send(self, topic: str, key: bytes | None = None, value: bytes | None = None,
             headers: list[tuple[str, bytes | None]] | None = None, partition: int | None = None) -> Delivered:
        future = Delivered(self._producer)
        extra = {} if partition is None else {"partition": partition}
        deadline = time.monotonic() + self._max_block_s
        while True:
            try:
                self._producer.produce(topic, value=value, key=key, headers=headers or None, on_delivery=future,
                                       **extra)
                return future
            except BufferError as err:  # the local queue is full: wait for room, as kafka-python does
                if time.monotonic() >= deadline:
                    raise kerr.KafkaTimeoutError(f"no room in the producer's queue for {self._max_block_s}s") \
                        from err
                self._producer.poll(0.05)
            except ck.KafkaException as err:
                raise translate(err) from err

    def partitions_for(self, topic: str) -> set[int]:
        """The topic's partitions, from a metadata request (kafka-python's name; up to ``max_block_ms``)."""
        try:
            metadata = self._producer.list_topics(topic, timeout=self._max_block_s)
        except ck.KafkaException as err:
            raise translate(err) from err
        return set(metadata.topics[topic].partitions)

    def flush(self, timeout: float | None = None) -> None:
        left = self._producer.flush(-1 if timeout is None else timeout)
        if left:
            raise kerr.KafkaTimeoutError(f"{left} messages not acknowledged within {timeout}s")

    def close(self, timeout: float | None = None) -> None:
        self._producer.flush(10.0 if timeout is None else timeout)
