"""1. The ceiling: a bare kafka-python consumer that only fetches and decodes each value."""

from __future__ import annotations

import time
from typing import Any

from kafka import KafkaConsumer

from bench.worker.topic import FETCH, end_offsets
from pipeline.config import KafkaSettings
from pipeline.schema import decode


def bench_ceiling(settings: KafkaSettings, total: int) -> dict[str, Any]:
    """A bare consumer (assigned, no group) that fetches and decodes every record."""
    started = time.perf_counter()
    consumer = KafkaConsumer(**settings.client_options(), group_id=None, enable_auto_commit=False,
                             max_poll_records=4096, **FETCH)
    consumer.assign(list(end_offsets(settings)))
    consumer.seek_to_beginning()
    n = bad = 0
    while n < total:
        for records in consumer.poll(timeout_ms=1000).values():
            for record in records:
                bad += not hasattr(decode(record.value), "event_time_ms")
            n += len(records)
    seconds = time.perf_counter() - started
    consumer.close()
    return {"records": n, "undecodable": bad, "seconds": seconds, "tx_s": n / seconds}


def bench_ceiling_confluent(settings: KafkaSettings, total: int) -> dict[str, Any]:
    """The same bare fetch + decode through confluent-kafka (librdkafka), when it is installed
    (``pip install 'fraud-pipeline[bench]'``): what a C client leaves of the per-record cost."""
    try:
        from confluent_kafka import OFFSET_BEGINNING, Consumer
        from confluent_kafka import TopicPartition as CTopicPartition
    except ImportError:
        return {"skipped": "confluent-kafka is not installed (pip install 'fraud-pipeline[bench]')"}
    if settings.security_protocol != "PLAINTEXT":
        return {"skipped": f"the confluent-kafka ceiling runs over PLAINTEXT only, not {settings.security_protocol}"}
    import confluent_kafka

    started = time.perf_counter()
    consumer = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": "bench-ceiling-unused",
                         "enable.auto.commit": False, "enable.partition.eof": False,
                         "max.partition.fetch.bytes": FETCH["max_partition_fetch_bytes"],
                         "fetch.max.bytes": FETCH["fetch_max_bytes"]})
    consumer.assign([CTopicPartition(tp.topic, tp.partition, OFFSET_BEGINNING) for tp in end_offsets(settings)])
    n = bad = 0
    while n < total:
        for message in consumer.consume(num_messages=4096, timeout=1.0):
            if message.error() is None:
                bad += not hasattr(decode(message.value()), "event_time_ms")
                n += 1
    seconds = time.perf_counter() - started
    consumer.close()
    return {"records": n, "undecodable": bad, "seconds": seconds, "tx_s": n / seconds,
            "client": f"confluent-kafka {_first(confluent_kafka.version())} (librdkafka "
                      f"{_first(confluent_kafka.libversion())})"}


def _first(version: str | tuple) -> str:
    """confluent-kafka's ``version()`` is a string, ``libversion()`` a (string, number) pair."""
    return version[0] if isinstance(version, tuple) else version
