"""Helpers for worker tests: simulated streams with known frauds, a trained model, Kafka I/O."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from prometheus_client import CollectorRegistry

from pipeline.artifact import CHALLENGER, load_artifact
from pipeline.config import KafkaSettings, WorkerSettings
from pipeline.scoring import Scorer, score_frame
from pipeline.topics import ensure_topics
from pipeline.worker.app import Worker
from pipeline.worker.metrics import WorkerMetrics
from pipeline.worker.records import Record as Consumed
from pipeline.worker.state import Store
from producer.send import make_producer, send_records
from producer.tables import iter_records, resolve_spec

# Bad records and the reason each must be dead-lettered with.
BAD_RECORDS: list[tuple[bytes, str]] = [
    (b"{not json", "not_json"),
    (b'{"event_time": "2018-05-01T00:00:00Z"}', "missing_field"),
    (b'{"transaction_id": "bad-1", "event_time": "2018-05-01T00:00:00Z", "TX_AMOUNT": "12"}', "bad_type"),
    (b'{"transaction_id": "bad-2", "event_time": "2018-05-01T00:00:00Z"}', "missing_feature"),
    (b"[1,2,3]", "not_object"),
    (b'{"transaction_id": "bad-3", "event_time": "2018-05-01T00:00:00Z", "x": "' + b"y" * 70_000 + b'"}',
     "oversized"),
]


def Record(value: bytes | None, offset: int = 0, topic: str = "tx", partition: int = 0,
           key: bytes | None = b"k", headers: list | None = None, timestamp: int = -1) -> Consumed:
    """A consumed record (the project's one record type), for tests without Kafka: only the value is needed."""
    return Consumed(topic, partition, offset, timestamp, key, value, headers if headers is not None else [])


def hop_records(outputs: list, offset: int = 0) -> list:
    """The transactions of the customer stage's packed repartition outputs, as the terminal stage reads them
    (records at ``offset`` of the packed record's partition)."""
    from pipeline.worker.state.hop import unpack

    return [t for o in outputs for t in unpack(Consumed(o.topic, o.partition or 0, offset, -1, o.key, o.value, []))]


def restored(outputs: list, factory: Any, cls: Any) -> Any:
    """A fresh store loaded from changelog records as a compacted topic keeps them (the last per key)."""
    latest: dict[bytes, bytes] = {}
    for out in outputs:
        latest.pop(out.key, None)
        latest[out.key] = out.value
    store: Store = Store(factory, cls.from_bytes, cls.merge)
    for key, value in latest.items():
        store.load(key, value)
    assert store.assemble() == []
    return store


class PausingConsumer:
    """What raw input's event-time alignment reads and sets on a consumer, for tests without Kafka: positions
    and pauses of ``parts`` (subclasses add high watermarks and end offsets)."""

    def __init__(self, parts: list[TopicPartition]) -> None:
        self.parts = list(parts)
        self.positions = dict.fromkeys(self.parts, 0)
        self.held: set[TopicPartition] = set()

    def position(self, tp: TopicPartition) -> int:
        return self.positions[tp]

    def paused(self) -> set[TopicPartition]:
        return set(self.held)

    def pause(self, *tps: TopicPartition) -> None:
        self.held.update(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.held.difference_update(tps)


def send_messages(settings: KafkaSettings, messages: list) -> None:
    """Send (topic, key, value) messages, e.g. the producer's raw feed; every one must be acknowledged."""
    producer = make_producer(settings)
    try:
        report = send_records(messages, settings.input_topic, producer, progress=False)
    finally:
        producer.close()
    assert report.acked == len(messages), report.errors


def produce_frame(settings: KafkaSettings, frame: pd.DataFrame, partitions: int = 3) -> int:
    """Stream a handbook-layout table (labels dropped) into the input topic; return the count."""
    ensure_topics(settings, [settings.input_topic, settings.alerts_topic, settings.dead_letter_topic], partitions)
    producer = make_producer(settings)
    try:
        report = send_records(iter_records(frame, resolve_spec(frame, "handbook"), drop_label=True),
                              settings.input_topic, producer, progress=False)
    finally:
        producer.close()
    assert report.acked == len(frame)
    return report.acked


def produce_bad(settings: KafkaSettings) -> None:
    producer = KafkaProducer(**settings.client_options())
    for i, (value, _reason) in enumerate(BAD_RECORDS):
        producer.send(settings.input_topic, key=b"bad", value=value, headers=[("origin", f"test-{i}".encode())])
    producer.flush()
    producer.close()


def read_topic(settings: KafkaSettings, topic: str, expect: int | None = None, timeout_s: float = 30,
               isolation_level: str = "read_uncommitted", to_end: bool = False) -> list:
    """All records of a topic (reading until ``expect`` arrive or the end is reached).

    ``to_end`` reads up to the end offsets taken at the start instead: for a topic whose writers are done
    (its group committed to the end, so its outputs are acknowledged), where a count would be fooled by
    at-least-once copies and a quiet second mid-read would end a count-based read early.
    """
    consumer = KafkaConsumer(**settings.client_options(), auto_offset_reset="earliest",
                             enable_auto_commit=False, group_id=None, consumer_timeout_ms=3000,
                             isolation_level=isolation_level)
    parts: list[TopicPartition] = []
    ends: dict[TopicPartition, int] = {}
    if to_end:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        assert parts, f"topic {topic} has no partitions"
        consumer.assign(parts)
        ends = consumer.end_offsets(parts)
    else:
        consumer.subscribe([topic])
    out: list = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            polled = consumer.poll(timeout_ms=1000)
            for records in polled.values():
                out.extend(records)
            if to_end:
                # a transactional topic ends on a commit marker, past the last record: position counts it
                if all(consumer.position(tp) >= ends[tp] for tp in parts):
                    break
            elif not polled and (expect is None or len(out) >= expect):
                break
    finally:
        consumer.close()
    return out


def input_progress(settings: KafkaSettings, group: str) -> dict[int, tuple[int, int | None]]:
    """Per input partition: its end offset and the group's committed offset (None: nothing committed)."""
    consumer = KafkaConsumer(**settings.client_options(), group_id=group, enable_auto_commit=False)
    try:
        parts = [TopicPartition(settings.input_topic, p) for p in consumer.partitions_for_topic(settings.input_topic)]
        ends = consumer.end_offsets(parts)
        return {tp.partition: (ends[tp], consumer.committed(tp)) for tp in parts}
    finally:
        consumer.close(autocommit=False)


def committed_to_end(settings: KafkaSettings, group: str) -> bool:
    """True when the group's committed offsets equal the end of every input partition."""
    return all(committed == end for end, committed in input_progress(settings, group).values())


def state_drained(settings: KafkaSettings, group: str, timeout_s: float) -> bool:
    """Wait until a raw-input group has processed everything: its input committed to the end, then its
    repartition topic committed past every record written before that (the terminal stage, which
    publishes the features and alerts, commits only after they are acknowledged). Input committed to
    the end alone is not enough: the terminal stage may still be behind on the repartition topic
    (a three-worker backlog test stopped there once, 11 features records short)."""
    from pipeline.worker.state.topology import StateTopics

    deadline = time.monotonic() + timeout_s
    if not wait_for(lambda: committed_to_end(settings, group), timeout_s):
        return False
    repartition = StateTopics.for_group(settings, group).repartition
    consumer = KafkaConsumer(**settings.client_options(), group_id=group, enable_auto_commit=False)
    try:
        parts = [TopicPartition(repartition, p) for p in consumer.partitions_for_topic(repartition)]
        ends = consumer.end_offsets(parts)  # marks keep coming while idle: "past", not "at", these
        return wait_for(lambda: all((consumer.committed(tp) or 0) >= ends[tp] for tp in parts),
                        max(1.0, deadline - time.monotonic()))
    finally:
        consumer.close(autocommit=False)


def committed_to_end_yet(settings: KafkaSettings, group: str) -> bool:
    """``committed_to_end`` for polling while a broker comes back: an answer without brokers or leaders
    (kafka-python's ``MetadataEmptyBrokerList``, a timeout) means not yet."""
    try:
        return committed_to_end(settings, group)
    except KafkaError:
        return False


def offline_flags(model_dir: Path, frame: pd.DataFrame) -> set[str]:
    """Transaction ids the offline scoring path flags for the same rows."""
    scorer = Scorer(load_artifact(model_dir), device="cpu")
    result = score_frame(scorer, frame)
    return set(frame["TRANSACTION_ID"].astype(str)[result.flags])


def alert_ids(records: list) -> list[str]:
    return [orjson.loads(r.value)["transaction_id"] for r in records]


def start_worker(settings: KafkaSettings, model_dir: Path, group: str, **overrides: object
                 ) -> tuple[Worker, threading.Thread, dict]:
    """An in-process worker on a thread; returns it, the thread and a box for its stats."""
    wsettings = WorkerSettings.build(environ={}, overrides={
        "model_dir": str(model_dir), "consumer_group": group, "device": "cpu", "metrics_port": 0,
        "max_batch": 512, "max_wait_ms": 50, **overrides})
    metrics = WorkerMetrics(CollectorRegistry())
    scorer = Scorer(load_artifact(model_dir), device="cpu", max_batch=wsettings.max_batch)
    shadow = Path(model_dir) / CHALLENGER  # scored beside the current version, as the CLI does
    challenger = Scorer(load_artifact(shadow), device="cpu", max_batch=wsettings.max_batch) if shadow.exists() else None
    worker = Worker(settings, wsettings, scorer, metrics, challenger=challenger)
    box: dict = {}

    def target() -> None:
        box["stats"] = worker.run(idle_exit_s=box.get("idle_exit_s"))

    thread = threading.Thread(target=target, daemon=True)
    return worker, thread, box


def wait_for(condition, timeout_s: float = 60, every_s: float = 0.2) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every_s)
    return False


def feature_matrix(frame: pd.DataFrame, names: tuple[str, ...]) -> np.ndarray:
    return frame.loc[:, list(names)].to_numpy(dtype=np.float32)
