"""The confluent-kafka driver against the session broker: keys land where kafka-python puts them, and a consumer
whose commits never return is replaced."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest
from kafka import KafkaProducer, TopicPartition
from kafka import errors as kerr

from pipeline.config import KafkaSettings
from pipeline.topics import ensure_topics
from pipeline.worker import kafkaclient

ck = pytest.importorskip("confluent_kafka", reason="confluent-kafka is not installed (make test installs it)")
confluent = pytest.importorskip("pipeline.worker.kafkaclient.confluent")
pytestmark = pytest.mark.integration


def test_keys_land_on_the_partitions_kafka_python_chooses(kafka_settings: KafkaSettings) -> None:
    """The raw-input repartition topic needs it: CRC32 (librdkafka's default) put terminals elsewhere."""
    topic = kafka_settings.input_topic
    ensure_topics(kafka_settings, [topic], 6)
    options = kafka_settings.client_options()
    ours = confluent.ConfluentProducer(**options, acks="all")
    theirs = KafkaProducer(**options, acks="all")
    try:
        assert ours.partitions_for(topic) == theirs.partitions_for(topic) == set(range(6))  # the start-up warm-up
        keys = [f"terminal-{i}".encode() for i in range(60)]
        placed = {}
        for key in keys:
            ours.send(topic, key=key, value=b"c").get(timeout=30)
            placed[key] = theirs.send(topic, key=key, value=b"k").get(timeout=30).partition
        ours.flush(30)
    finally:
        theirs.close()
        ours.close()
    from tests.worker_helpers import read_topic

    seen = {(r.key, r.value): r.partition for r in read_topic(kafka_settings, topic, expect=120)}
    assert len(set(placed.values())) > 1
    assert {key: seen[(key, b"c")] for key in keys} == placed


class Wedged:
    """A confluent consumer whose commits never return (confluent-kafka-python issue 1801)."""

    def __init__(self, real: Any) -> None:
        self.real, self.gate = real, threading.Event()

    def commit(self, **_kw: Any) -> None:
        self.gate.wait()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class Listener:
    def __init__(self) -> None:
        self.lost: list[set] = []
        self.assigned: list[set] = []

    async def on_partitions_assigned(self, partitions: set) -> None:
        self.assigned.append(partitions)

    async def on_partitions_revoked(self, partitions: set) -> None:
        pass

    async def on_partitions_lost(self, partitions: set) -> None:
        self.lost.append(partitions)


def _poll_until(consumer: Any, condition: Any, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        consumer.poll(timeout_ms=200)


def test_a_wedged_consumer_is_replaced_and_its_partitions_count_as_lost(kafka_settings: KafkaSettings) -> None:
    topic = kafka_settings.input_topic
    ensure_topics(kafka_settings, [topic], 2)
    consumer = kafkaclient.consumer("confluent", **{**kafka_settings.client_options(), "request_timeout_ms": 1000},
                                group_id=f"gw-{uuid.uuid4().hex[:8]}", enable_auto_commit=False,
                                auto_offset_reset="earliest")
    listener = Listener()
    consumer.subscribe([topic], listener=listener)
    try:
        _poll_until(consumer, lambda: len(consumer.assignment()) == 2)
        tp = TopicPartition(topic, 0)
        consumer.commit({tp: 0})  # a healthy commit
        wedged = Wedged(consumer._consumer)
        consumer._consumer = wedged
        started = time.monotonic()
        with pytest.raises(kerr.CommitFailedError, match="replaced"):
            consumer.commit({tp: 0})
        assert time.monotonic() - started < 30  # bounded: request timeout + grace, plus the probe
        assert consumer.replaced == 1 and listener.lost == [{tp, TopicPartition(topic, 1)}]
        assert consumer.assignment() == set()
        wedged.gate.set()
        _poll_until(consumer, lambda: len(consumer.assignment()) == 2)  # the new consumer joined
        consumer.commit({tp: 0})  # and commits
        assert consumer.committed(tp) == 0
    finally:
        consumer.close()
