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
