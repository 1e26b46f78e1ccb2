"""The client interface's contract (``pipeline.worker.kafkaclient``), one suite for both drivers, on the real broker.

What the worker relies on from a client, stated once and checked against kafka-python's driver and
confluent's alike: records in offset order with every field the worker reads; a record the client
cannot parse returned as an unreadable record at its offset (its value kept), the partition going on
after it (sent by kcat, an independent client); commits, committed offsets and seeks; pause and
resume; the offsets a lag is computed from; sends acknowledged on the partition asked for; and a
rebalance listener told what it holds.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kafka import ConsumerRebalanceListener, KafkaProducer, TopicPartition
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.structs import OffsetAndMetadata

from pipeline.config import KafkaSettings
from pipeline.topics import ensure_topics
from pipeline.worker import kafkaclient

pytestmark = pytest.mark.integration


@pytest.fixture
def topic(kafka_settings: KafkaSettings) -> str:
    name = f"contract-{uuid.uuid4().hex[:10]}"
    ensure_topics(kafka_settings, [name], partitions=2)
    return name


def open_consumer(client: str, settings: KafkaSettings, group: str | None = None) -> kafkaclient.Consumer:
    return kafkaclient.consumer(
        client, **settings.client_options(), client_id=f"contract-{uuid.uuid4().hex[:6]}",
        group_id=group or f"contract-{uuid.uuid4().hex[:10]}", enable_auto_commit=False,
        auto_offset_reset="earliest", isolation_level="read_committed", session_timeout_ms=10_000,
        heartbeat_interval_ms=3000, partition_assignment_strategy=(RangePartitionAssignor,))


class Listener(ConsumerRebalanceListener):
    """kafka-python's rebalance listener (the interface's listener type); remembers what it was told."""

    def __init__(self) -> None:
        self.held: set[TopicPartition] = set()
        self.assigned_calls = 0

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.held |= set(assigned)
        self.assigned_calls += 1

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.held -= set(revoked)

    def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        self.held -= set(lost)


@pytest.fixture
def consumer(kafka_client: str, kafka_settings: KafkaSettings, topic: str) -> Iterator[tuple[Any, Listener]]:
    listener = Listener()
    made = open_consumer(kafka_client, kafka_settings)
    made.subscribe([topic], listener=listener)
    try:
        yield made, listener
    finally:
        made.close(autocommit=False)


def send(settings: KafkaSettings, topic: str, values: list[bytes], partition: int = 0,
         headers: list[tuple[str, bytes]] | None = None) -> None:
    producer = KafkaProducer(**settings.client_options())
    try:
        for i, value in enumerate(values):
            producer.send(topic, key=f"k{i}".encode(), value=value, partition=partition, headers=headers or [])
        producer.flush(30)
    finally:
        producer.close()


def read(consumer: Any, want: int, timeout_s: float = 60, max_records: int | None = None) -> list[Any]:
    """Poll until ``want`` records came back (the first polls also join the group)."""
    out: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < want and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500, max_records=max_records).values():
            out += records
    return out


def wait_assigned(consumer: Any, listener: Listener, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not listener.held and time.monotonic() < deadline:
        consumer.poll(timeout_ms=200)
    assert listener.held, "no partitions assigned"


def test_records_come_in_offset_order_with_every_field_the_worker_reads(
        consumer: tuple[Any, Listener], kafka_settings: KafkaSettings, topic: str) -> None:
    reader, listener = consumer
    values = [f"v{i}".encode() for i in range(30)]
    send(kafka_settings, topic, values, headers=[("trace", b"t1")])
    got = read(reader, 30, max_records=7)
    assert [r.value for r in got] == values
    assert [r.offset for r in got] == list(range(30))
    first = got[0]
    assert (first.topic, first.partition, first.key) == (topic, 0, b"k0")
    assert list(first.headers) == [("trace", b"t1")]
    assert first.timestamp > 1_600_000_000_000
    assert not getattr(first, "unreadable", None)
    assert listener.held == {TopicPartition(topic, 0), TopicPartition(topic, 1)}
    assert reader.assignment() == listener.held


def test_max_records_bounds_a_poll(consumer: tuple[Any, Listener], kafka_settings: KafkaSettings,
                                   topic: str) -> None:
    reader, listener = consumer
    wait_assigned(reader, listener)
    send(kafka_settings, topic, [b"x"] * 20)
    sizes: list[int] = []
    deadline = time.monotonic() + 60
    while sum(sizes) < 20 and time.monotonic() < deadline:
        sizes += [len(records) for records in reader.poll(timeout_ms=500, max_records=4).values()]
    assert sum(sizes) == 20 and max(sizes) <= 4


def test_a_record_the_client_cannot_parse_comes_back_unreadable_and_the_partition_goes_on(
        consumer: tuple[Any, Listener], kafka_settings: KafkaSettings, topic: str, kcat: str) -> None:
    """A header name that is not UTF-8, sent by kcat: kafka-python raises inside poll on it (every poll, every
    restart), confluent-kafka 2.16 leaves a decode error pending. Both drivers return it as a record."""
    reader, _listener = consumer
    send(kafka_settings, topic, [b"before"])
    subprocess.run([kcat, "-b", kafka_settings.bootstrap_servers, "-P", "-t", topic, "-p", "0", "-H",
                    b"bad\xffkey=v"], input=b"poison", check=True, timeout=30)
    send(kafka_settings, topic, [b"after"])
    got = read(reader, 3)
    assert [r.offset for r in got] == [0, 1, 2]
    assert [bool(getattr(r, "unreadable", None)) for r in got] == [False, True, False]
    assert got[1].value == b"poison"  # the original bytes, for the dead letter
    assert got[2].value == b"after"
    assert not read(reader, 1, timeout_s=3)  # not returned again


def test_commit_committed_and_seek(consumer: tuple[Any, Listener], kafka_settings: KafkaSettings,
                                   topic: str) -> None:
    reader, _listener = consumer
    send(kafka_settings, topic, [f"v{i}".encode() for i in range(10)])
    read(reader, 10)
    tp = TopicPartition(topic, 0)
    assert reader.committed(tp) is None
    reader.commit({tp: OffsetAndMetadata(6, "", -1)})
    assert reader.committed(tp) == 6
    assert reader.position(tp) == 10
    reader.seek(tp, 4)
    assert [r.offset for r in read(reader, 6)] == [4, 5, 6, 7, 8, 9]


def test_a_new_member_starts_at_the_committed_offset(kafka_client: str, kafka_settings: KafkaSettings,
                                                     topic: str) -> None:
    group = f"contract-{uuid.uuid4().hex[:10]}"
    send(kafka_settings, topic, [f"v{i}".encode() for i in range(10)])
    first = open_consumer(kafka_client, kafka_settings, group)
    first.subscribe([topic], listener=Listener())
    try:
        read(first, 10)
        first.commit({TopicPartition(topic, 0): OffsetAndMetadata(7, "", -1)})
    finally:
        first.close(autocommit=False)
    second = open_consumer(kafka_client, kafka_settings, group)
    second.subscribe([topic], listener=Listener())
    try:
        assert [r.offset for r in read(second, 3)] == [7, 8, 9]
    finally:
        second.close(autocommit=False)


def test_pause_and_resume(consumer: tuple[Any, Listener], kafka_settings: KafkaSettings, topic: str) -> None:
    reader, listener = consumer
    wait_assigned(reader, listener)
    p0 = TopicPartition(topic, 0)
    reader.pause(p0)
    assert reader.paused() == {p0}
    send(kafka_settings, topic, [b"a0", b"a1"], partition=0)
    send(kafka_settings, topic, [b"b0"], partition=1)
    got = read(reader, 1)
    got += read(reader, 1, timeout_s=3)  # anything more would be p0's
    assert [(r.partition, r.value) for r in got] == [(1, b"b0")]
    reader.resume(p0)
    assert reader.paused() == set()
    assert [r.value for r in read(reader, 2)] == [b"a0", b"a1"]


def test_the_offsets_a_lag_is_computed_from(consumer: tuple[Any, Listener], kafka_settings: KafkaSettings,
                                            topic: str) -> None:
    reader, _listener = consumer
    send(kafka_settings, topic, [b"x"] * 5)
    read(reader, 5)
    p0, p1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    assert reader.beginning_offsets([p0, p1]) == {p0: 0, p1: 0}
    assert reader.end_offsets([p0, p1]) == {p0: 5, p1: 0}
    deadline = time.monotonic() + 10  # the fetch's high watermark: known once a fetch answered
    while reader.highwater(p0) is None and time.monotonic() < deadline:
        reader.poll(timeout_ms=200)
    assert reader.highwater(p0) == 5


def test_sends_are_acknowledged_on_the_partition_asked_for(kafka_client: str, kafka_settings: KafkaSettings,
                                                           topic: str) -> None:
    producer = kafkaclient.producer(kafka_client, **kafka_settings.client_options(), acks="all", linger_ms=5)
    try:
        assert producer.partitions_for(topic) == {0, 1}
        futures = [producer.send(topic, key=b"k", value=f"v{i}".encode(), partition=1,
                                 headers=[("h", b"1")]) for i in range(5)]
        for future in futures:
            future.get(timeout=30)
            assert future.is_done
        producer.flush(30)
    finally:
        producer.close(10)
    reader = open_consumer(kafka_client, kafka_settings)
    reader.subscribe([topic], listener=Listener())
    try:
        got = read(reader, 5)
    finally:
        reader.close(autocommit=False)
    assert [(r.partition, r.value, list(r.headers)) for r in got] == [(1, f"v{i}".encode(), [("h", b"1")])
                                                                      for i in range(5)]


def test_a_second_member_takes_partitions_through_the_listener(kafka_client: str, kafka_settings: KafkaSettings,
                                                               topic: str) -> None:
    """Two members of one group: the first is told it gave a partition up (revoked), the second that it holds it,
    and together they hold every partition once."""
    group = f"contract-{uuid.uuid4().hex[:10]}"
    first, second = open_consumer(kafka_client, kafka_settings, group), open_consumer(kafka_client,
                                                                                    kafka_settings, group)
    heard = [Listener(), Listener()]
    warned: list[str] = []
    first.before_revoke = lambda: warned.append("before_revoke")
    try:
        first.subscribe([topic], listener=heard[0])
        wait_assigned(first, heard[0])
        assert len(heard[0].held) == 2
        second.subscribe([topic], listener=heard[1])
        deadline = time.monotonic() + 60
        while not (len(heard[0].held) == len(heard[1].held) == 1) and time.monotonic() < deadline:
            if first.rebalance_coming():
                warned.append("rebalance_coming")
            first.poll(timeout_ms=100)
            second.poll(timeout_ms=100)
        assert heard[0].held | heard[1].held == {TopicPartition(topic, 0), TopicPartition(topic, 1)}
        assert len(heard[0].held) == len(heard[1].held) == 1
        assert first.assignment() == heard[0].held and second.assignment() == heard[1].held
        if kafka_client == "confluent":  # librdkafka revokes inside poll, on the worker's thread: it is told first
            assert "before_revoke" in warned
    finally:
        first.close(autocommit=False)
        second.close(autocommit=False)


def test_what_paused_reports_across_a_rebalance_is_what_the_client_holds_paused(
        kafka_client: str, kafka_settings: KafkaSettings, topic: str) -> None:
    """``paused()`` is the truth across a rebalance: a partition that moved to another member and came back is
    not paused; one that stayed may keep its pause (kafka-python does, as Java's consumer), and is reported so.
    librdkafka keeps a partition's pause across a revoke and a reassignment (librdkafka issue 1849) while the
    driver's bookkeeping forgot it on the revoke: the worker never resumed it, and its terminal stage stopped
    reading a repartition partition for good, without a word (cluster chaos run of 2026-12-07, confluent)."""
    group = f"contract-{uuid.uuid4().hex[:10]}"
    first, heard = open_consumer(kafka_client, kafka_settings, group), Listener()
    second = open_consumer(kafka_client, kafka_settings, group)
    both = {TopicPartition(topic, 0), TopicPartition(topic, 1)}
    try:
        first.subscribe([topic], listener=heard)
        wait_assigned(first, heard)
        first.pause(*both)
        second.subscribe([topic], listener=Listener())
        deadline = time.monotonic() + 60
        while len(heard.held) != 1 and time.monotonic() < deadline:
            first.poll(timeout_ms=100)
            second.poll(timeout_ms=100)
        assert len(heard.held) == 1, "the second member took no partition"
        moved = both - heard.held
        second.close(autocommit=False)
        deadline = time.monotonic() + 60
        while heard.held != both and time.monotonic() < deadline:
            first.poll(timeout_ms=100)
        assert heard.held == both, "the partitions did not come back to the first member"
        still = first.paused()
        assert still <= both - moved, f"{sorted(still)} reported paused; {sorted(moved)} moved away and back"
        send(kafka_settings, topic, [b"a0"], partition=0)
        send(kafka_settings, topic, [b"b0"], partition=1)
        first.resume(*still)
        assert sorted(r.value for r in read(first, 2, timeout_s=30)) == [b"a0", b"b0"]
    finally:
        first.close(autocommit=False)
        second.close(autocommit=False)
