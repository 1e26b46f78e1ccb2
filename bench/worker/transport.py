"""4b. The latency floor: a bare consumer that only reads, fed like the worker's latency rows.

Event time (stamped at send, ``latency.feed``) to the moment a consumer that does nothing else
holds the record: the producer's linger and batching, the broker's append, the fetch. What the
worker adds on top is its own (batch window, decode, score, deliver, commit).
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from typing import Any

from bench.worker.latency import feed
from bench.worker.topic import create_topics, topics_for

# The consumer, in its own interpreter as the worker is: assign every partition at its end, say
# "ready", then read ``n`` records and print the receive - event_time quantiles as JSON.
READER = r"""
import json, re, sys, time
import numpy as np
from pipeline.schema import parse_event_time
bootstrap, topic, client, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
stamp = re.compile(rb'"event_time":"([^"]{24})"')
got = []
if client == "confluent":
    from confluent_kafka import Consumer, TopicPartition, OFFSET_END
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "floor", "enable.auto.commit": False})
    parts = c.list_topics(topic, timeout=10).topics[topic].partitions
    c.assign([TopicPartition(topic, p, OFFSET_END) for p in parts])
    print("ready", flush=True)
    deadline = time.time() + 300
    while len(got) < n and time.time() < deadline:
        first = c.poll(0.1)  # returns with the first record; consume(n, t) would wait for n or t
        for m in ([first] if first is not None else []) + c.consume(10000, 0):
            if m.error() is None:
                got.append(time.time() * 1000 - parse_event_time(stamp.search(m.value()).group(1).decode()))
else:
    from kafka import KafkaConsumer, TopicPartition
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    tps = [TopicPartition(topic, p) for p in c.partitions_for_topic(topic)]
    c.assign(tps)
    c.seek_to_end()
    for tp in tps:
        c.position(tp)
    print("ready", flush=True)
    deadline = time.time() + 300
    while len(got) < n and time.time() < deadline:
        for records in c.poll(timeout_ms=100, max_records=10000).values():
            now = time.time() * 1000
            got += [now - parse_event_time(stamp.search(r.value).group(1).decode()) for r in records]
c.close()
ms = np.asarray(got)
print(json.dumps({"count": int(ms.size), "p50": float(np.percentile(ms, 50)) / 1000,
                  "p99": float(np.percentile(ms, 99)) / 1000, "max": float(ms.max()) / 1000}))
"""


def bench_transport(bootstrap: str, records: list, rate: float, seconds: float, client: str = "kafka-python"
                    ) -> dict[str, Any]:
    """Receive - event_time quantiles (seconds) of a bare consumer while ``feed`` sends at ``rate``."""
    settings = topics_for(bootstrap, f"floor{int(rate)}-{uuid.uuid4().hex[:6]}")
    create_topics(settings)
    n = int(min(len(records), rate * seconds))
    reader = subprocess.Popen([sys.executable, "-c", READER, bootstrap, settings.input_topic, client, str(n)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout is not None
        if reader.stdout.readline().strip() != "ready":
            raise SystemExit(f"the {client} reader did not start")
        fed = feed(settings, records, rate, seconds)
        out, _ = reader.communicate(timeout=330)
    finally:
        if reader.poll() is None:
            reader.kill()
    return {**fed, "client": client, "consumer_only": json.loads(out.strip().splitlines()[-1])}
