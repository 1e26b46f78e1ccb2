"""The worker's Kafka client: one interface, two drivers.

- ``kafka-python`` (the default, :mod:`.kafka_python`): pure Python, the client of every example
  in the docs.
- ``confluent`` (:mod:`.confluent`, ``pip install 'fraud-pipeline[confluent]'``): confluent-kafka,
  Python on librdkafka (the client Quix Streams and Bytewax use); it fetches and parses records
  in C, where kafka-python spends most of the worker's time (docs/benchmarks.md). At-least-once
  only for now.

The interface is :class:`Consumer`, :class:`Producer` and :class:`Sent` below: the part of
kafka-python's API the worker uses, and no more, plus what the two clients need said alike:

- records are :class:`~pipeline.worker.records.Record`-shaped (kafka-python's ``ConsumerRecord``
  has the same fields). A record the client cannot read comes back *as a record* with
  ``unreadable`` set to why, at its offset, its key and value where they could be read; the
  partition goes on after it. The worker dead-letters it as ``corrupt_record``. (kafka-python
  raises inside ``poll`` on such a record, on every poll and after every restart; its driver
  turns that into the record.)
- errors are kafka-python's classes (:mod:`kafka.errors`), so
  :func:`pipeline.worker.delivery.classify` reads both clients alike;
- two rebalance hooks, because the clients rebalance at different moments:
  ``rebalance_coming()`` says whether the next ``poll`` will rejoin the group (kafka-python
  rejoins inside ``poll`` and runs listeners on its IO thread: the worker commits what is in
  flight before that poll), and ``before_revoke`` (settable) is called on the worker's own
  thread before partitions are revoked (librdkafka revokes inside ``poll`` on the calling
  thread: the worker commits there).

Each driver is the only place its client's workarounds and private reach-ins live, each named
with the client version it was written for. ``tests/integration/test_kafka_drivers.py`` is the contract: one
suite, run against both drivers on a real broker.

Group-less helpers off the hot path (state restore, the start-up peek, the stall watchdog's
admin client, the exactly-once transactional producer) use kafka-python with either client.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from kafka import TopicPartition
from kafka.coordinator.assignors.range import RangePartitionAssignor

CLIENTS = ("kafka-python", "confluent")


@dataclass(frozen=True)
class Reconnect:
    """How soon a client tries a broker again: at once, then up to a second apart (kafka-python's defaults wait
    up to 30 s, which a broker restart turned into 30 s without a commit)."""

    reconnect_backoff_ms: int = 50
    reconnect_backoff_max_ms: int = 1000

    def options(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ConsumerTuning(Reconnect):
    """The group consumer's tuning, in kafka-python's option names (the confluent driver translates them)."""

    max_partition_fetch_bytes: int = 4 * 1024 * 1024  # a 4,096-record batch of ~600-byte records in one fetch
    fetch_max_bytes: int = 64 * 1024 * 1024
    session_timeout_ms: int = 10_000  # a dead worker's partitions move on within 10 s
    heartbeat_interval_ms: int = 3_000
    metadata_max_age_ms: int = 15_000  # notice new partitions of the input topic within seconds

    def options(self) -> dict[str, Any]:
        """With what the worker's correctness needs, not tuning: explicit commits only, nothing an upstream
        transaction aborted, and the range assignor (raw input's stages need partition p of the input,
        repartition and labels topics on one member: co-partitioning; round-robin would not give it)."""
        return {**asdict(self), "enable_auto_commit": False, "isolation_level": "read_committed",
                "partition_assignment_strategy": (RangePartitionAssignor,)}


@dataclass(frozen=True)
class ProducerTuning(Reconnect):
    """The output producer's tuning (``acks=all`` is not tuning: an output counts once the in-sync replicas
    have it)."""

    linger_ms: int = 5
    # batches of up to 512 KiB: with 16 KiB (the default) raw input's changelog records filled a batch every
    # dozen records, and each full batch woke the sender thread (4,351 -> 6,414 tx/s, bench/state_bench.py)
    batch_size: int = 512 * 1024
    max_block_ms: int = 10_000
    retry_backoff_ms: int = 100

    def options(self) -> dict[str, Any]:
        return {**asdict(self), "acks": "all"}


class Sent(Protocol):
    """The future of one sent record."""

    @property
    def is_done(self) -> bool: ...

    def get(self, timeout: float | None = None) -> Any:
        """Wait for the acknowledgement; raise the error that failed it (``KafkaTimeoutError`` past ``timeout``)."""


class Producer(Protocol):
    def send(self, topic: str, key: bytes | None = None, value: bytes | None = None,
             headers: list[tuple[str, bytes | None]] | None = None, partition: int | None = None) -> Sent: ...

    def partitions_for(self, topic: str) -> set[int] | None: ...

    def flush(self, timeout: float | None = None) -> None: ...

    def close(self, timeout: float | None = None) -> None: ...


class Consumer(Protocol):
    """A group consumer. ``subscribe`` takes kafka-python's rebalance listener
    (``on_partitions_revoked``/``assigned``/``lost``); ``poll`` returns ``{TopicPartition: [record]}``."""

    before_revoke: Callable[[], None] | None

    def subscribe(self, topics: Iterable[str], listener: Any = None) -> None: ...

    def rebalance_coming(self) -> bool: ...

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[TopicPartition, list[Any]]: ...

    def assignment(self) -> set[TopicPartition]: ...

    def seek(self, tp: TopicPartition, offset: int) -> None: ...

    def position(self, tp: TopicPartition) -> int: ...

    def highwater(self, tp: TopicPartition) -> int | None: ...

    def beginning_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]: ...

    def end_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]: ...

    def pause(self, *partitions: TopicPartition) -> None: ...

    def resume(self, *partitions: TopicPartition) -> None: ...

    def paused(self) -> set[TopicPartition]: ...

    def committed(self, tp: TopicPartition) -> int | None: ...

    def commit(self, offsets: dict[TopicPartition, Any]) -> None:
        """Commit synchronously (kafka-python's ``OffsetAndMetadata`` values)."""

    def close(self, autocommit: bool = False) -> None: ...


def consumer(client: str, **options: Any) -> Consumer:
    """A group consumer of the named client, built from kafka-python's option names."""
    if client == "confluent":
        from pipeline.worker.kafkaclient.confluent import ConfluentConsumer

        return ConfluentConsumer(**options)
    from pipeline.worker.kafkaclient.kafka_python import KafkaPythonConsumer

    return KafkaPythonConsumer(**options)


def producer(client: str, **options: Any) -> Producer:
    """An output producer of the named client, built from kafka-python's option names."""
    if client == "confluent":
        from pipeline.worker.kafkaclient.confluent import ConfluentProducer

        return ConfluentProducer(**options)
    from kafka import KafkaProducer

    return KafkaProducer(**options)  # type: ignore[return-value]
