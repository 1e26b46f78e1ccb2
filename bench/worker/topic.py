"""The broker, the benchmark's topics, and watching a consumer group's committed offsets."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from bench.brokerkit import group_offsets
from pipeline.config import KafkaSettings
from pipeline.topics import ensure_topics
from pipeline.worker.kafkaclient import ConsumerTuning

# The worker's own fetch settings (its one tuning object), so the ceiling fetches the same way.
FETCH = {"max_partition_fetch_bytes": ConsumerTuning().max_partition_fetch_bytes,
         "fetch_max_bytes": ConsumerTuning().fetch_max_bytes}
PARTITIONS = 3


def topics_for(bootstrap: str, tag: str) -> KafkaSettings:
    """Settings naming a fresh input, alerts and dead-letter topic (``bench-*-<tag>``)."""
    return KafkaSettings.build(environ={}, overrides={
        "bootstrap_servers": bootstrap, "input_topic": f"bench-tx-{tag}", "alerts_topic": f"bench-alerts-{tag}",
        "dead_letter_topic": f"bench-dlq-{tag}", "client_id": f"bench-{tag}"})


def create_topics(settings: KafkaSettings) -> None:
    ensure_topics(settings, [settings.input_topic, settings.alerts_topic, settings.dead_letter_topic], PARTITIONS)


def fill_topic(settings: KafkaSettings, records: list[tuple[bytes | None, bytes]]) -> dict[str, Any]:
    """Produce every record once, with the project's producer code, into a 3-partition topic."""
    from producer.send import make_producer, send_records

    create_topics(settings)
    producer = make_producer(settings)
    try:
        report = send_records(records, settings.input_topic, producer, progress=False)
    finally:
        producer.close()
    if report.acked != len(records):
        raise SystemExit(f"only {report.acked} of {len(records)} records acknowledged: {report.errors}")
    return {"records": report.acked, "seconds": report.seconds, "tx_s": report.rate,
            "bytes": sum(len(v) for _, v in records)}


def end_offsets(settings: KafkaSettings) -> dict[TopicPartition, int]:
    """The input topic's end offset per partition."""
    consumer = KafkaConsumer(**settings.client_options(), group_id=None)
    try:
        parts = [TopicPartition(settings.input_topic, p)
                 for p in sorted(consumer.partitions_for_topic(settings.input_topic) or ())]
        return consumer.end_offsets(parts)
    finally:
        consumer.close()


def wait_committed(bootstrap: str, group: str, ends: dict[TopicPartition, int], every_s: float = 0.1,
                   timeout_s: float = 600, alive: Callable[[], bool] = lambda: True,
                   tail: Callable[[], str] = lambda: "") -> float:
    """perf_counter time at which the group's committed offsets first equal ``ends`` (polled, and looked
    at once more after the consumers have exited); ``tail`` adds their last log lines to a failure."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        running = alive()  # before the look: offsets committed just before an exit still count
        offsets = group_offsets(bootstrap, group)
        if all(offsets.get(tp, -1) >= end for tp, end in ends.items()):
            return time.perf_counter()
        if not running:
            break
        time.sleep(every_s)
    raise SystemExit(f"group {group} did not commit up to the end offsets\n{tail()}")
