"""Hostile records without a broker: whatever a producer sends, the batch survives.

Every record ends scored (alert or not) or dead-lettered, exactly once, and every output the
worker builds is one kafka-python's producer accepts and its record encoder can write.
Regression tests for the three records that used to stop a partition for good.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka import TopicPartition
from kafka.errors import KafkaTimeoutError, MessageSizeTooLargeError, TopicAuthorizationFailedError
from kafka.record.default_records import DefaultRecordBatchBuilder
from prometheus_client import CollectorRegistry

from pipeline.artifact import load_artifact
from pipeline.config import KafkaSettings, WorkerSettings
from pipeline.schema import FLOAT32_MAX, RecordError
from pipeline.scoring import Scorer
from pipeline.worker.app import Worker
from pipeline.worker.delivery import AtLeastOnce, DeliveryError
from pipeline.worker.liveness import FetchWatchdog, StallWatchdog
from pipeline.worker.metrics import WorkerMetrics
from pipeline.worker.outputs import TRUNCATED_VALUE_BYTES, Output, dead_letter
from pipeline.worker.processing import BatchProcessor, Topics
from pipeline.worker.rebalance import PendingRecords, ReleaseOnRevoke
from tests.fakes import Acked, RecordingConsumer
from tests.worker_helpers import Record

EVENT_MS = 1_600_000_000_000


def check_like_kafka_python(out: Output) -> None:
    """The checks KafkaProducer.send makes, then the wire encoder itself."""
    headers = out.headers or []
    assert isinstance(headers, list)
    assert all(isinstance(h, tuple) and len(h) == 2 and isinstance(h[0], str) and isinstance(h[1], bytes)
               for h in headers), headers
    assert out.key is None or isinstance(out.key, bytes)
    assert isinstance(out.value, bytes)
    builder = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, -1, batch_size=64 * 1024 * 1024)
    assert builder.append(0, EVENT_MS, out.key, out.value, headers) is not None


class StrictProducer:
    """Acknowledges what kafka-python would accept; refuses values above ``max_bytes`` as too large."""

    def __init__(self, max_bytes: int = 10**9, error: Exception | None = None) -> None:
        self.max_bytes, self.error, self.sent = max_bytes, error, []

    def send(self, topic, key=None, value=None, headers=None, partition=None):
        out = Output(topic, key, value, headers)
        check_like_kafka_python(out)
        if self.error is not None:
            raise self.error
        if len(value) + sum(len(k) + len(v) for k, v in headers or []) > self.max_bytes:
            raise MessageSizeTooLargeError(f"{len(value)} bytes")
        self.sent.append(out)
        return Acked()


def delivery(producer: StrictProducer, consumer: Any = None) -> AtLeastOnce:
    d = AtLeastOnce({}, consumer or RecordingConsumer(), WorkerMetrics(CollectorRegistry()), threading.Event(),
                    max_backoff_s=0.01, ack_timeout_s=1)
    d.producer = producer  # type: ignore[assignment]
    return d


@pytest.fixture(scope="module")
def scorer(model_dir: Path) -> Scorer:
    return Scorer(load_artifact(model_dir), device="cpu")


@pytest.fixture
def worker(scorer: Scorer) -> Worker:
    kafka = KafkaSettings.build(environ={})
    settings = WorkerSettings.build(environ={}, overrides={"device": "cpu", "max_retry_backoff_s": 0.01})
    w = Worker(kafka, settings, scorer, WorkerMetrics(CollectorRegistry()))
    w.consumer = RecordingConsumer()  # type: ignore[assignment]
    w.delivery = delivery(StrictProducer(), w.consumer)
    return w


def normal_row(scorer: Scorer) -> dict[str, float]:
    """A transaction at the training mean of every feature: scored, not alerted."""
    pre = scorer.artifact.preprocessing
    return {name: float(pre.mean[j]) for j, name in enumerate(scorer.artifact.feature_names)}


def tx(i: int, features: dict[str, Any], **extra: Any) -> bytes:
    return orjson.dumps({"transaction_id": f"t{i}", "event_time": EVENT_MS + i, **features, **extra})


def sent(worker: Worker) -> list[Output]:
    return worker.delivery.producer.sent  # type: ignore[union-attr]


# -- the three records that used to stop a partition ----------------------------------------
def test_value_that_overflows_standardisation_is_alerted_out_of_range(worker: Worker, scorer: Scorer) -> None:
    names = scorer.artifact.feature_names
    narrow = names[int(np.argmin(scorer.artifact.preprocessing.std))]
    row = normal_row(scorer)
    records = [Record(tx(0, row), 0), Record(tx(1, {**row, narrow: 3e38}), 1), Record(tx(2, row), 2)]
    worker.process(records)
    alerts = [orjson.loads(o.value) for o in sent(worker) if o.topic == worker.kafka.alerts_topic]
    assert [a["transaction_id"] for a in alerts] == ["t1"]  # the most anomalous record is not silently skipped
    assert alerts[0]["out_of_range"] is True and alerts[0]["score"] == FLOAT32_MAX
    assert alerts[0]["top_features"][0]["name"] == narrow and alerts[0]["top_features"][0]["out_of_range"]
    m = worker.metrics
    assert m.registry.get_sample_value("fraud_transactions_total", {"outcome": "scored"}) == 3
    assert m.registry.get_sample_value("fraud_out_of_range_total") == 1
    assert m.scores._sum.get() > 0 and math.isfinite(m.scores._sum.get())  # the histogram took the others
    assert worker.consumer.commits[-1][TopicPartition("tx", 0)].offset == 3  # type: ignore[union-attr]


def test_an_alert_whose_passthrough_field_cannot_be_written_goes_out_without_fields(worker: Worker,
                                                                                    scorer: Scorer) -> None:
    """A record the model flags, with a field nested 300 deep (orjson reads it, cannot write it): the fraud is
    raised, in the alert's smaller form (``fields_dropped``), not dead-lettered as a processing error."""
    row = normal_row(scorer)
    amount = {**row, "TX_AMOUNT": 1e6} if "TX_AMOUNT" in row else {k: v * 1000 + 1000 for k, v in row.items()}
    deep = tx(0, amount)[:-1] + b',"meta":' + b"[" * 300 + b"1" + b"]" * 300 + b"}"  # orjson reads it, cannot write it
    records = [Record(deep, 0), Record(tx(1, amount), 1), Record(tx(2, row), 2)]
    worker.process(records)
    alerts = {a["transaction_id"]: a for a in (orjson.loads(o.value) for o in sent(worker)
                                                if o.topic == worker.kafka.alerts_topic)}
    assert sorted(alerts) == ["t0", "t1"]
    assert alerts["t0"]["fields_dropped"] is True and "fields" not in alerts["t0"]
    assert "fields" in alerts["t1"] and "fields_dropped" not in alerts["t1"]
    assert not [o for o in sent(worker) if o.topic == worker.kafka.dead_letter_topic]
    assert worker.stats.scored == 3 and worker.stats.invalid == 0


def test_null_header_value_on_a_bad_record_is_dead_lettered(worker: Worker) -> None:
    worker.process([Record(b"{not json", 5, headers=[("trace", None), ("ok", b"1")])])
    (letter,) = sent(worker)
    headers = dict(letter.headers or [])
    assert headers["trace"] == b"" and headers["ok"] == b"1"
    assert headers["dlq.headers.null"] == b"trace" and headers["dlq.error.reason"] == b"not_json"


def test_a_stream_without_the_model_features_is_reported_at_once(worker: Worker, caplog) -> None:
    records = [Record(orjson.dumps({"transaction_id": f"u{i}", "event_time": EVENT_MS, "Amount": 3.0, "V1": 0.1}), i)
               for i in range(5)]
    with caplog.at_level("ERROR", logger="pipeline.worker.ledger"):
        worker.process(records)
        worker.process(records)  # said once, not once per batch
    (line,) = [r.getMessage() for r in caplog.records if "lack features" in r.getMessage()]
    assert line.startswith("5 of 5 records") and worker.scorer.artifact.feature_names[0] in line
    assert "--model-dir" in line


# -- errors that no retry fixes -------------------------------------------------------------
def test_too_large_dead_letter_is_truncated_then_sent_as_headers_only() -> None:
    value = b"x" * 900_000
    letter = dead_letter("dlq", Record(value, 3, headers=[("h", b"y" * 100)]),
                         RecordError("oversized", None, "too big"), "w", 0)
    truncated = delivery(StrictProducer(max_bytes=100_000))
    truncated._publish([letter])
    (out,) = truncated.producer.sent  # type: ignore[union-attr]
    assert out.value == value[:TRUNCATED_VALUE_BYTES] and b"900000" in dict(out.headers or [])["dlq.truncated"]
    assert truncated.metrics.registry.get_sample_value("fraud_errors_total", {"kind": "output_shrunk"}) == 1
    tiny = delivery(StrictProducer(max_bytes=2_000))
    tiny._publish([letter])
    (out,) = tiny.producer.sent  # type: ignore[union-attr]
    assert out.value == b"" and dict(out.headers or [])["dlq.source.offset"] == b"3"
    nothing = delivery(StrictProducer(max_bytes=10))
    nothing._publish([letter])  # returns: the partition moves on, the drop is counted
    assert nothing.metrics.registry.get_sample_value("fraud_errors_total", {"kind": "output_dropped"}) == 1


def test_authorization_error_stops_delivery_instead_of_dropping() -> None:
    refused = delivery(StrictProducer(error=TopicAuthorizationFailedError("no ACL")))
    with pytest.raises(DeliveryError, match="TopicAuthorizationFailedError"):
        refused._publish([Output("alerts", b"k", b"v")])


# -- failures inside scoring ----------------------------------------------------------------
class PickyScorer:
    """Raises on any batch holding a row whose first value is 13 (stands for any scoring fault)."""

    def __init__(self, scorer: Scorer) -> None:
        self.inner, self.artifact, self.device = scorer, scorer.artifact, scorer.device

    def score(self, raw: np.ndarray):  # type: ignore[no-untyped-def]
        if (raw[:, 0] == 13).any():
            raise RuntimeError("boom")
        return self.inner.score(raw)


def test_a_scoring_fault_is_bisected_down_to_the_failing_rows(scorer: Scorer) -> None:
    first = scorer.artifact.feature_names[0]
    row = normal_row(scorer)
    records = [Record(tx(i, {**row, first: 13.0 if i in (3, 11) else row[first]}), i) for i in range(16)]
    processor = BatchProcessor(PickyScorer(scorer), Topics("a", "d"), "w", max_record_bytes=65536,  # type: ignore
                               top_features=3)
    out = processor.process(records)
    assert out.scored == 14 and out.dead_letters == {"processing_error": 2}
    failed = sorted(int(dict(o.headers or [])["dlq.source.offset"]) for o in out.outputs if o.topic == "d")
    assert failed == [3, 11]


# -- property: arbitrary input ---------------------------------------------------------------
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**63, max_value=2**64 - 1),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4) |
                          st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
number = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.just(3e38), st.just(-3.4e38),
                   st.just(5e-324), st.integers(min_value=-2**63, max_value=2**63 - 1))
header = st.tuples(st.text(max_size=10), st.one_of(st.none(), st.binary(max_size=20)))


@st.composite
def hostile_record(draw: st.DrawFn, features: tuple[str, ...]) -> bytes:
    kind = draw(st.sampled_from(["bytes", "json", "transaction", "transaction_text_numbers"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "json":
        return orjson.dumps(draw(json_value))
    fields: dict[str, Any] = {name: draw(number) for name in features if draw(st.integers(0, 9))}
    fields["transaction_id"] = draw(st.one_of(st.text(max_size=12), st.integers(-2**63, 2**64 - 1), st.none()))
    fields["event_time"] = draw(st.one_of(st.integers(min_value=-2**63, max_value=2**63 - 1), st.text(max_size=30),
                                          st.just("2018-04-01T00:00:31Z"), st.just(EVENT_MS)))
    fields.update(draw(st.dictionaries(st.text(max_size=6), json_value, max_size=3)))
    raw = orjson.dumps(fields, option=orjson.OPT_NON_STR_KEYS)
    if kind == "transaction_text_numbers":  # JSON has no NaN, Infinity or 100-digit integers; producers write them
        raw = raw.replace(b"3e38", b"NaN", 1).replace(b"5e-324", b"Infinity", 1)
        raw = raw[:-1] + b',"' + names_or(features) + b'":' + b"9" * draw(st.integers(19, 100)) + b"}"
    return raw


def names_or(features: tuple[str, ...]) -> bytes:
    return features[0].encode() if features else b"x"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_hostile_record_ends_scored_or_dead_lettered(scorer: Scorer, data: st.DataObject) -> None:
    names = tuple(scorer.artifact.feature_names)
    values = data.draw(st.lists(st.one_of(hostile_record(names), st.just(tx(0, normal_row(scorer)))),
                                min_size=1, max_size=12))
    records = [Record(v, i, key=data.draw(st.one_of(st.none(), st.binary(max_size=8))),
                      headers=data.draw(st.lists(header, max_size=3))) for i, v in enumerate(values)]
    processor = BatchProcessor(scorer, Topics("alerts", "dlq"), "w", max_record_bytes=65536, top_features=3)
    out = processor.process(records)
    assert out.scored + out.invalid == len(records)
    letters = [o for o in out.outputs if o.topic == "dlq"]
    assert len(letters) == out.invalid
    assert sorted(int(dict(o.headers or [])["dlq.source.offset"]) for o in letters) == \
        sorted({int(dict(o.headers or [])["dlq.source.offset"]) for o in letters})  # each record once
    for o in out.outputs:
        check_like_kafka_python(o)
        if o.topic == "alerts":
            alert = orjson.loads(o.value)
            assert alert["score"] > alert["threshold"] or alert.get("out_of_range")


# -- rebalance and liveness ------------------------------------------------------------------
def test_revoked_records_are_released_and_their_partition_rewound_if_it_comes_back() -> None:
    pending, consumer, failures = PendingRecords(), RecordingConsumer(), []
    pending.extend([Record(b"x", o, partition=p) for p, o in [(0, 7), (1, 3), (0, 8), (1, 4)]])
    listener = ReleaseOnRevoke(pending, lambda: consumer, failures.append, lambda _tps: None)
    asyncio.run(listener.on_partitions_revoked({TopicPartition("tx", 0)}))
    assert [(r.partition, r.offset) for r in pending.records] == [(1, 3), (1, 4)]
    asyncio.run(listener.on_partitions_assigned({TopicPartition("tx", 0), TopicPartition("tx", 1)}))
    assert consumer.seeks == {TopicPartition("tx", 0): 7} and not failures


def test_the_assignment_counts_as_settled_from_assign_to_the_next_revoke() -> None:
    """The worker's idle clock runs only while ``joined`` is set: a slow or lost join is not idleness."""
    listener = ReleaseOnRevoke(PendingRecords(), RecordingConsumer, lambda _err: None, lambda _tps: None)
    assert not listener.joined.is_set()
    asyncio.run(listener.on_partitions_assigned(set()))
    assert listener.joined.is_set()  # an empty assignment is settled too (more members than partitions)
    asyncio.run(listener.on_partitions_revoked(set()))
    assert not listener.joined.is_set()
    asyncio.run(listener.on_partitions_assigned({TopicPartition("tx", 0)}))
    assert listener.joined.is_set()


def test_a_listener_failure_is_kept_for_the_main_loop() -> None:
    failures: list[BaseException] = []

    def broken(_tps: set) -> None:
        raise RuntimeError("metrics broke")

    listener = ReleaseOnRevoke(PendingRecords(), RecordingConsumer, failures.append, broken)
    asyncio.run(listener.on_partitions_revoked({TopicPartition("tx", 0)}))
    assert [str(f) for f in failures] == ["metrics broke"]


def test_stall_watchdog_rejoins_only_when_partitions_have_no_owner() -> None:
    now = [0.0]
    unowned = [0]
    dog = StallWatchdog(30, lambda: unowned[0], clock=lambda: now[0])
    now[0] = 31
    assert not dog.check(assigned=0)  # more members than partitions: idle is fine
    unowned[0] = 3
    now[0] = 45
    assert not dog.check(assigned=0)  # looks again only after another timeout
    now[0] = 62
    assert dog.check(assigned=0)
    assert not dog.check(assigned=2)
    now[0] = 100
    assert not dog.check(assigned=0)  # the clock restarted when partitions came



class Positions:
    """Assignment, pauses, positions and end offsets: what ``FetchWatchdog`` asks of a consumer."""

    def __init__(self, positions: dict[int, int], ends: dict[int, int]) -> None:
        self.positions, self.ends, self.held_paused = positions, ends, set()

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition("tx", p) for p in self.positions}

    def paused(self) -> set[TopicPartition]:
        return {TopicPartition("tx", p) for p in self.held_paused}

    def position(self, tp: TopicPartition) -> int:
        return self.positions[tp.partition]

    def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.ends[tp.partition] for tp in tps}


def test_fetch_watchdog_names_an_unpaused_partition_with_records_whose_position_stays(caplog) -> None:
    """Partition 0 moves, 1 is paused by the worker, 2 is read to its end, 3 has records and does not move:
    only 3 is named (once per timeout), and only once it stayed for the whole timeout."""
    now = [0.0]
    consumer = Positions({0: 10, 1: 5, 2: 7, 3: 40}, {0: 100, 1: 50, 2: 7, 3: 90})
    consumer.held_paused = {1}
    dog = FetchWatchdog(120, clock=lambda: now[0])
    for t in (30, 60, 90, 119):
        now[0] = t
        consumer.positions[0] += 1
        assert dog.check(consumer) == []
    now[0] = 150
    consumer.positions[0] += 1
    with caplog.at_level(logging.WARNING):
        assert dog.check(consumer) == [TopicPartition("tx", 3)]
    assert "tx[3] has 50 records to read from offset 40" in caplog.text
    now[0] = 180
    assert dog.check(consumer) == []  # said once; again only after another timeout
    now[0] = 185
    assert dog.check(consumer) == []  # looks only every timeout / 4
    consumer.positions[3] = 41
    for t in (300, 330):
        now[0] = t
        consumer.positions[0] += 1
        assert dog.check(consumer) == []  # it moved: a new wait
    assert FetchWatchdog(0, clock=lambda: now[0]).check(consumer) == []


def test_fetch_watchdog_starts_again_after_a_broker_away_or_a_loop_that_stood_still() -> None:
    """Nothing is fetched while the broker is away (its end offsets cannot be read) or while the main loop is held
    up (delivery retries): neither is the client holding a partition paused, and neither is named once it is over."""
    now = [0.0]
    consumer = Positions({0: 40}, {0: 90})
    dog = FetchWatchdog(120, clock=lambda: now[0])
    asked = consumer.end_offsets

    def away(_tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        raise KafkaTimeoutError("no broker")

    for t in (30, 60, 90):
        now[0] = t
        assert dog.check(consumer) == []
    consumer.end_offsets = away  # type: ignore[method-assign]
    for t in (120, 150):
        now[0] = t
        assert dog.check(consumer) == []
    consumer.end_offsets = asked  # type: ignore[method-assign]
    for t in (180, 210, 240, 270):  # back: the partition is fetched within seconds; a new wait starts meanwhile
        now[0] = t
        assert dog.check(consumer) == []
    now[0] = 305
    assert dog.check(consumer) == [TopicPartition("tx", 0)]  # 125 s after the broker came back, still not fetched
    now[0] = 700  # the loop stood still for minutes
    assert dog.check(consumer) == []
    for t in (730, 760, 790):
        now[0] = t
        assert dog.check(consumer) == []
    now[0] = 820
    assert dog.check(consumer) == [TopicPartition("tx", 0)]


class GroupAdmin:
    """describe_topics / describe_groups answers in kafka-python 3's shapes."""

    def __init__(self, members: list[tuple[str, list[int]]]) -> None:
        self.members = members

    def describe_topics(self, topics: list[str]) -> list[dict]:
        return [{"name": topics[0], "partitions": [{"partition_index": p} for p in range(3)]}]

    def describe_groups(self, groups: list[str]) -> dict:
        return {groups[0]: {"members": [
            {"client_id": client, "member_assignment": {"assigned_partitions": [{"topic": "tx", "partitions": parts}]}}
            for client, parts in self.members]}}


def test_partitions_the_group_gives_a_member_whose_consumer_holds_none_count_as_unowned() -> None:
    from pipeline.worker.liveness import unowned_partitions

    admin = GroupAdmin([("worker-a", [0, 1]), ("worker-b", [2])])
    assert unowned_partitions(admin, "g", "tx") == 0
    assert unowned_partitions(admin, "g", "tx", me="worker-b") == 1  # the group thinks b has 2; b has nothing
    assert unowned_partitions(GroupAdmin([("worker-a", [0])]), "g", "tx", me="worker-c") == 2


def test_an_aborted_batch_is_read_again_if_its_partition_comes_back_before_a_commit() -> None:
    """Exactly-once, the group coordinator's node paused 30 s on a cluster: the worker's seeks back after each
    aborted transaction were refused (the group had taken the partitions), kafka-python kept its position past
    them when it gave them straight back, and 600 records were committed unread. The aborted batch's first
    offsets now wait in the listener until the partition is assigned again or committed."""
    consumer, failures = RecordingConsumer(), []
    listener = ReleaseOnRevoke(PendingRecords(), lambda: consumer, failures.append, lambda _tps: None)
    tp0, tp1 = TopicPartition("tx", 0), TopicPartition("tx", 1)
    listener.rewind_on_assignment({tp0: 120, tp1: 40})
    listener.rewind_on_assignment({tp0: 150})  # a later aborted batch: the earliest offset wins
    listener.committed({tp1})  # tp1 committed since: nothing of it to read again
    asyncio.run(listener.on_partitions_lost({tp0, tp1}))
    asyncio.run(listener.on_partitions_assigned({tp0, tp1}))
    assert consumer.seeks == {tp0: 120} and not failures
    asyncio.run(listener.on_partitions_assigned({tp0, tp1}))  # once only
    assert consumer.seeks == {tp0: 120}
