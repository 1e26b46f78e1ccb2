"""Worker logic without a broker: batch decoding, alert and dead-letter shape, retries, metrics."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import orjson
import pytest
from kafka import TopicPartition
from kafka import errors as kafka_errors
from kafka.errors import (
    KafkaConnectionError,
    KafkaTimeoutError,
    OutOfOrderSequenceNumberError,
    UnknownProducerIdError,
)
from prometheus_client import CollectorRegistry, Histogram

from pipeline.artifact import load_artifact
from pipeline.config import KafkaSettings, WorkerSettings
from pipeline.schema import RecordError, Transaction, encode
from pipeline.scoring import Scorer
from pipeline.worker import delivery as delivery_module
from pipeline.worker.app import Worker
from pipeline.worker.batch import decode_batch
from pipeline.worker.delivery import AtLeastOnce, StopWithoutCommit
from pipeline.worker.metrics import WorkerMetrics, observe_many
from pipeline.worker.outputs import Output, alert_value, dead_letter
from tests.fakes import Acked, Fail, Raise, ScriptedProducer, SlowFuture
from tests.worker_helpers import Record


def good(i: int, amount: float = 10.0) -> bytes:
    return encode({"transaction_id": f"t{i}", "event_time": 1_600_000_000_000 + i, "a": amount, "b": i, "c": "x"})


def test_decode_batch_keeps_order_and_separates_bad_records() -> None:
    records = [Record(good(0)), Record(b"nope", 1), Record(good(2, 5.5), 2),
               Record(encode({"transaction_id": "t3", "event_time": 1_600_000_000_000, "a": 1}), 3)]
    batch = decode_batch(records, ["a", "b"], max_bytes=1000)
    assert [tx.transaction_id for _, tx in batch.good] == ["t0", "t2"]
    assert batch.matrix.tolist() == [[10.0, 0.0], [5.5, 2.0]]
    assert batch.matrix.dtype == np.float32
    assert [(r.offset, e.reason, e.field) for r, e in batch.bad] == [(1, "not_json", None),
                                                                     (3, "missing_feature", "b")]
    assert batch.event_times_ms.tolist() == [1_600_000_000_000, 1_600_000_000_002]


def test_observe_many_matches_observe() -> None:
    values = np.random.default_rng(0).exponential(size=500)
    values[:3] = [0.1, 1.0, 100.0]  # exactly on bucket bounds
    one, many = (Histogram("h", "h", buckets=(0.1, 0.5, 1.0, 2.0), registry=CollectorRegistry()) for _ in range(2))
    for v in values:
        one.observe(float(v))
    observe_many(many, values)
    samples = [{s.name + str(s.labels): s.value for s in h.collect()[0].samples if not s.name.endswith("created")}
               for h in (one, many)]
    assert samples[0].keys() == samples[1].keys()
    for key, value in samples[0].items():
        assert samples[1][key] == pytest.approx(value)


def test_alert_carries_explanation_and_passthrough_fields() -> None:
    tx = Transaction("t9", 1_522_540_831_000, {"transaction_id": "t9", "event_time": "x", "a": 1.0, "CUSTOMER_ID": 4})
    top = [{"name": "a", "value": 1.0, "reconstruction": 0.2, "z": 7.5}]
    alert = orjson.loads(alert_value(tx, 2.5, 1.0, "v1", 1_522_540_832_000, top, frozenset({"a"})))
    assert alert == {"transaction_id": "t9", "event_time": "2018-04-01T00:00:31.000Z", "score": 2.5,
                     "threshold": 1.0, "model_version": "v1", "scored_at": "2018-04-01T00:00:32.000Z",
                     "top_features": top, "fields": {"CUSTOMER_ID": 4}}


def test_dead_letter_headers_name_error_and_source() -> None:
    record = Record(b"{", offset=41, partition=2, headers=[("trace", b"abc")])
    letter = dead_letter("dlq", record, RecordError("bad_type", "a", "must be a number"), "w1", 0)
    assert (letter.topic, letter.key, letter.value) == ("dlq", b"k", b"{")
    headers = dict(letter.headers or [])
    assert headers["trace"] == b"abc"
    assert headers["dlq.error.reason"] == b"bad_type" and headers["dlq.error.field"] == b"a"
    assert headers["dlq.source.partition"] == b"2" and headers["dlq.source.offset"] == b"41"
    assert b"must be a number" in headers["dlq.error.message"]


@pytest.fixture
def worker(model_dir: Path) -> Worker:
    kafka = KafkaSettings.build(environ={})
    settings = WorkerSettings.build(environ={}, overrides={"max_retry_backoff_s": 0.01, "device": "cpu"})
    scorer = Scorer(load_artifact(model_dir), device="cpu")
    return Worker(kafka, settings, scorer, WorkerMetrics(CollectorRegistry()))


def at_least_once(producer: object, consumer: object = None, stop: threading.Event | None = None) -> AtLeastOnce:
    delivery = AtLeastOnce({}, consumer, WorkerMetrics(CollectorRegistry()), stop or threading.Event(),  # type: ignore
                           max_backoff_s=0.01, ack_timeout_s=1)
    delivery.producer = producer  # type: ignore[assignment]
    return delivery


def test_publish_retries_until_acknowledged() -> None:
    delivery = at_least_once(ScriptedProducer(*[Raise(KafkaTimeoutError("broker away"))] * 3))
    outputs = [Output("alerts", b"k", b"v1"), Output("alerts", b"k", b"v2")]
    delivery._publish(outputs)
    assert sorted(v for _, _, v in delivery.producer.sent) == [b"v1", b"v2"]  # type: ignore[union-attr]
    assert delivery.metrics.registry.get_sample_value("fraud_errors_total", {"kind": "publish_failed"}) == 2
    # named by the client's error class
    assert delivery.metrics.registry.get_sample_value("fraud_kafka_errors_total", {"error": "KafkaTimeoutError"}) == 2


def test_a_slow_acknowledgement_is_logged_once_and_waited_for(monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(delivery_module, "SLOW_ACK_S", 0.1)
    delivery = at_least_once(None)
    futures = [(Output("alerts", b"k", b"v1"), SlowFuture(0.3)), (Output("alerts", b"k", b"v2"), SlowFuture(0.4))]
    with caplog.at_level(logging.WARNING):
        assert delivery._wait(futures, []) == []  # both acknowledged within ack_timeout_s (1 s)
    slow = [r.getMessage() for r in caplog.records if "not acknowledged after" in r.getMessage()]
    assert len(slow) == 1, caplog.text
    # the real bound named: the client's own delivery timeout (kafka-python's 120 s default), per output 1 s
    assert "delivery timeout (120s)" in slow[0] and "up to 1s" in slow[0], slow
    late = [(Output("alerts", b"k", b"v3"), SlowFuture(5.0))]
    (failed,) = delivery._wait(late, [])  # past ack_timeout_s: failed, retried by the caller
    assert isinstance(failed[1], KafkaTimeoutError)


class MetadataProducer:
    """Answers partitions_for, or raises as a broker away at start would."""

    def __init__(self, broken: bool = False) -> None:
        self.asked: list[str] = []
        self.broken = broken

    def partitions_for(self, topic: str) -> set[int]:
        self.asked.append(topic)
        if self.broken:
            raise KafkaTimeoutError("no metadata")
        return {0, 1, 2}


def test_warm_fetches_every_output_topic_and_never_stops_start_up(caplog: pytest.LogCaptureFixture) -> None:
    delivery = at_least_once(MetadataProducer())
    delivery.warm(["alerts", "dead-letters"])
    assert delivery.producer.asked == ["alerts", "dead-letters"]  # type: ignore[union-attr]
    broken = at_least_once(MetadataProducer(broken=True))
    with caplog.at_level(logging.DEBUG, logger="pipeline.worker.delivery"):
        broken.warm(["alerts"])  # a broker slow at start: said at DEBUG, left to the first send
    assert "the first send will wait for it" in caplog.text


def test_stop_during_outage_leaves_without_commit() -> None:
    stop = threading.Event()
    stop.set()
    delivery = at_least_once(ScriptedProducer(then=Raise(KafkaTimeoutError("broker away"))), stop=stop)
    with pytest.raises(StopWithoutCommit):
        delivery._publish([Output("alerts", b"k", b"v")])


def test_process_commits_only_after_publishing(worker: Worker) -> None:
    events: list[str] = []

    class Producer(ScriptedProducer):
        def send(self, *a, **k):
            events.append("send")
            return super().send(*a, **k)

    class Consumer:
        def commit(self, offsets):
            events.append("commit")
            self.offsets = offsets

    worker.consumer = Consumer()  # type: ignore[assignment]
    worker.delivery = at_least_once(Producer(), worker.consumer)
    names = worker.scorer.artifact.feature_names
    bad = Record(b"not json", offset=7)
    huge = {"transaction_id": "x", "event_time": 1_600_000_000_000, **{n: 1e30 for n in names}}
    worker.process([bad, Record(encode(huge), offset=8)])
    assert events[-1] == "commit" and "send" in events
    (tp, meta), = worker.consumer.offsets.items()  # type: ignore[attr-defined]
    assert (tp.partition, meta.offset) == (0, 9)
    assert worker.stats.invalid == 1 and worker.stats.scored == 1 and worker.stats.alerts == 1
    (value,) = [v for topic, _, v in worker.delivery.producer.sent  # type: ignore[union-attr]
                if topic == worker.kafka.alerts_topic]
    alert = orjson.loads(value)
    assert alert["transaction_id"] == "x" and alert["score"] > alert["threshold"]  # finite, not null


class PendingFuture:
    """A send whose acknowledgement the test gives (or refuses) when it likes; ``get`` gives it at once."""

    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name, self.is_done, self.error = log, name, False, None

    def ack(self, error: BaseException | None = None) -> None:
        self.is_done, self.error = True, error

    def get(self, timeout=None):
        if not self.is_done:
            self.log.append(f"waited for {self.name}")
            self.ack()
        if self.error is not None:
            raise self.error


class HeldProducer:
    """Hands out PendingFutures; resends (after a failure) are acknowledged at once."""

    def __init__(self, log: list[str]) -> None:
        self.log, self.futures, self.sent = log, {}, []

    def send(self, topic, key=None, value=None, headers=None, partition=None):
        self.sent.append(value)
        if value in self.futures:
            return Acked()
        self.futures[value] = future = PendingFuture(self.log, value.decode())
        return future


class OwningConsumer:
    def __init__(self, log: list[str], owned: set) -> None:
        self.log, self.owned, self.commits = log, owned, []

    def assignment(self) -> set:
        return set(self.owned)

    def commit(self, offsets) -> None:
        self.commits.append({(tp.partition, meta.offset) for tp, meta in offsets.items()})
        self.log.append("commit")


def pipelined(max_in_flight: int, owned: set | None = None) -> tuple[AtLeastOnce, HeldProducer, OwningConsumer,
                                                                      list[str]]:
    log: list[str] = []
    consumer = OwningConsumer(log, owned if owned is not None else {TopicPartition("in", p) for p in range(3)})
    delivery = AtLeastOnce({}, consumer, WorkerMetrics(CollectorRegistry()), threading.Event(),  # type: ignore
                           max_backoff_s=0.01, ack_timeout_s=1, max_in_flight=max_in_flight)
    delivery.producer = producer = HeldProducer(log)  # type: ignore[assignment]
    return delivery, producer, consumer, log


def test_batches_in_flight_are_committed_in_order_once_acknowledged() -> None:
    delivery, producer, consumer, log = pipelined(4)
    tp0, tp1 = TopicPartition("in", 0), TopicPartition("in", 1)
    delivery.submit([Output("alerts", b"k", b"a")], {tp0: 10}, lambda: log.append("counted a"))
    delivery.submit([Output("alerts", b"k", b"b")], {tp0: 20, tp1: 5}, lambda: log.append("counted b"))
    producer.futures[b"b"].ack()  # the later batch first: it waits for the earlier one
    delivery.settle(block=False)
    assert consumer.commits == [] and len(delivery.in_flight) == 2
    producer.futures[b"a"].ack()
    delivery.settle(block=False)
    assert consumer.commits == [{(0, 20), (1, 5)}]  # both in one commit, the later offsets
    assert log == ["commit", "counted a", "counted b"] and not delivery.in_flight


def test_batches_in_flight_are_bounded() -> None:
    delivery, _producer, consumer, log = pipelined(2)
    for n, name in enumerate((b"a", b"b", b"c")):
        delivery.submit([Output("alerts", b"k", name)], {TopicPartition("in", 0): n + 1}, lambda: None)
    assert log == ["waited for a", "commit"] and consumer.commits == [{(0, 1)}]
    assert len(delivery.in_flight) == 2
    delivery.settle(block=True)
    assert consumer.commits[-1] == {(0, 3)} and not delivery.in_flight


def test_a_failed_output_in_flight_is_sent_again_before_its_commit() -> None:
    delivery, producer, _consumer, log = pipelined(4)
    delivery.submit([Output("alerts", b"k", b"a")], {TopicPartition("in", 0): 1}, lambda: log.append("counted"))
    producer.futures[b"a"].ack(KafkaTimeoutError("broker away"))
    delivery.settle(block=False)
    assert producer.sent == [b"a", b"a"] and log == ["commit", "counted"]
    assert delivery.metrics.registry.get_sample_value("fraud_errors_total", {"kind": "publish_failed"}) == 1


def test_offsets_of_partitions_moved_away_are_left_to_their_new_owner() -> None:
    delivery, _producer, consumer, _log = pipelined(4, owned={TopicPartition("in", 0)})
    delivery.submit([Output("alerts", b"k", b"a")], {TopicPartition("in", 0): 4, TopicPartition("in", 1): 9},
                    lambda: None)
    delivery.settle(block=True)
    assert consumer.commits == [{(0, 4)}]


def test_deliver_commits_what_is_in_flight_first() -> None:
    delivery, _producer, consumer, log = pipelined(4)
    delivery.submit([Output("alerts", b"k", b"a")], {TopicPartition("in", 0): 1}, lambda: log.append("counted"))
    assert delivery.deliver([], {TopicPartition("in", 0): 2})
    assert consumer.commits == [{(0, 1)}, {(0, 2)}] and log[-3:] == ["commit", "counted", "commit"]


def test_stop_event_is_a_threading_event(worker: Worker) -> None:
    assert isinstance(worker.stop, threading.Event)


@pytest.mark.parametrize("raw_value, reason", [
    (b"1e39", "not_finite"), (b"-1e300", "not_finite"), (b"true", "bad_type"), (b'"1"', "bad_type"),
    (b"null", "missing_feature"), (b"[1]", "bad_type"),
])
def test_decode_batch_refuses_each_kind_of_bad_feature(raw_value: bytes, reason: str) -> None:
    raw = b'{"transaction_id":"t","event_time":1600000000000,"a":1.0,"b":' + raw_value + b"}"
    batch = decode_batch([Record(good(0)), Record(raw, 1), Record(good(2), 2)], ["a", "b"], max_bytes=10_000)
    assert [tx.transaction_id for _, tx in batch.good] == ["t0", "t2"]
    assert batch.matrix.tolist() == [[10.0, 0.0], [10.0, 2.0]]
    assert [(r.offset, e.reason, e.field) for r, e in batch.bad] == [(1, reason, "b")]


class HangingTransactions:
    """A transactional producer whose ``commit_transaction`` (or ``send_offsets_to_transaction``) never returns,
    as kafka-python's did when the transaction coordinator's node was killed on a three-node cluster."""

    def __init__(self, hang_in: str) -> None:
        self.hang_in, self.closed, self.sent = hang_in, False, []
        self.release = threading.Event()

    def begin_transaction(self) -> None:
        pass

    def send(self, topic, key=None, value=None, headers=None, partition=None):
        self.sent.append(value)
        return Acked()

    def send_offsets_to_transaction(self, offsets, group_metadata) -> None:
        if self.hang_in == "send_offsets_to_transaction":
            self.release.wait()

    def commit_transaction(self) -> None:
        if self.hang_in == "commit_transaction":
            self.release.wait()

    def abort_transaction(self) -> None:
        pass

    def close(self, timeout=None) -> None:
        self.closed = True
        self.release.set()


class CommittedOffsets:
    """A consumer whose group has committed ``offsets`` (what the transaction's outcome is read from); its first
    ``failures`` reads fail as kafka-python's did with the coordinator's node just back."""

    def __init__(self, offsets: dict[TopicPartition, int], failures: int = 0) -> None:
        self.offsets, self.failures = offsets, failures

    def group_metadata(self) -> object:
        return object()

    def committed(self, tp: TopicPartition, timeout_ms: int | None = None) -> int | None:
        assert timeout_ms is not None  # kafka-python's committed() may otherwise wait for good
        if self.failures:
            self.failures -= 1
            raise KafkaConnectionError("111 ECONNREFUSED")
        return self.offsets.get(tp)


@pytest.mark.parametrize(("hang_in", "group_committed", "failures", "done"), [
    ("commit_transaction", 10, 0, True),  # the coordinator completed the commit: the batch is done
    ("commit_transaction", 4, 0, False),  # it aborted: the batch is read again
    ("commit_transaction", 10, 2, True),  # the outcome read fails twice first (retried)
    ("send_offsets_to_transaction", 10, 0, False),  # never asked to commit: aborted by its timeout, read again
])
def test_a_transactional_call_that_outlives_its_transaction_is_resolved_not_waited_on_for_good(
        hang_in: str, group_committed: int, failures: int, done: bool, caplog: pytest.LogCaptureFixture) -> None:
    from pipeline.worker.transactions import ExactlyOnce

    tp = TopicPartition("tx", 0)
    delivery = ExactlyOnce({"transaction_timeout_ms": 300}, CommittedOffsets({tp: group_committed}, failures),
                           WorkerMetrics(CollectorRegistry()), threading.Event(), max_backoff_s=0.01,
                           ack_timeout_s=0.2, transactional_prefix="g-tx")
    stuck = HangingTransactions(hang_in)
    delivery.producer = stuck  # type: ignore[assignment]
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="pipeline.worker.transactions"):
        assert delivery.deliver([Output("alerts", b"k", b"v")], {tp: 10}) is done
    assert time.monotonic() - started < 5  # 0.5 s past the transaction, not for good
    assert delivery.producer is None and stuck.closed  # a new producer for the next batch
    assert delivery.metrics.registry.get_sample_value("fraud_errors_total", {"kind": "transaction_lost"}) == 1
    assert any("transaction lost" in r.getMessage() and hang_in in r.getMessage() for r in caplog.records)


class BrokenIdempotence:
    """A producer whose sends fail with ``error`` (its idempotence state broken) until it is replaced."""

    made: ClassVar[list[BrokenIdempotence]] = []

    def __init__(self, **options: object) -> None:
        self.closed, self.sent = False, []
        BrokenIdempotence.made.append(self)

    def send(self, topic, key=None, value=None, headers=None, partition=None):
        if len(BrokenIdempotence.made) == 1:  # the first producer's state is broken
            raise OutOfOrderSequenceNumberError("sequence 7, expected 5")
        self.sent.append(value)
        return Acked()

    def close(self, timeout=None) -> None:
        self.closed = True


def test_a_producer_state_error_gets_a_new_producer_and_the_same_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """OutOfOrderSequenceNumber is the producer's state, not the message's: the alert goes out whole from a new
    producer, never in its smaller form (without ``fields``) as a message-specific refusal would."""
    from pipeline.worker import kafkaclient

    BrokenIdempotence.made = []
    monkeypatch.setattr(kafkaclient, "producer", lambda client, **options: BrokenIdempotence(**options))
    delivery = at_least_once(None)
    delivery.producer = None
    alert = Output("alerts", b"k", b'{"transaction_id": "t1", "fields": {"a": 1}}')
    delivery._publish([alert])
    first, second = BrokenIdempotence.made
    assert first.closed and second.sent == [alert.value]
    assert delivery.metrics.registry.get_sample_value("fraud_errors_total", {"kind": "producer_renewed"}) == 1
    assert delivery.metrics.registry.get_sample_value("fraud_errors_total", {"kind": "output_shrunk"}) == 0


def test_classification_of_producer_state_errors() -> None:
    from pipeline.worker.delivery import classify

    for err in (OutOfOrderSequenceNumberError(), UnknownProducerIdError()):
        assert classify(err) == "renew"


@pytest.mark.parametrize(("err", "kind"), [
    (kafka_errors.MessageSizeTooLargeError(), "shrink"),
    (kafka_errors.InvalidRecordError("bad record"), "shrink"),
    (kafka_errors.InvalidTimestampError(), "shrink"),
    (TypeError("key must be bytes"), "shrink"),  # refused by the client before sending
    (kafka_errors.KafkaTimeoutError(), "retry"),
    (kafka_errors.NotLeaderForPartitionError(), "retry"),
    # not retriable in kafka-python's sense, and nothing to do with the message: retried, never dropped
    (kafka_errors.BrokerNotAvailableError(), "retry"),
    (kafka_errors.UnknownError(), "retry"),
    (kafka_errors.KafkaError("Failed to append record because it was part of a batch which had one more more "
                             "invalid records"), "retry"),
    (kafka_errors.TopicAuthorizationFailedError(), "fatal"),
])
def test_only_an_error_about_the_message_itself_shrinks_or_drops_it(err: BaseException, kind: str) -> None:
    from pipeline.worker.delivery import classify

    assert classify(err) == kind


def test_a_features_record_failed_by_a_broker_error_is_sent_again_not_dropped() -> None:
    """A features record has no smaller form: classified as message-specific, it was dropped (an ERROR line,
    ``output_dropped``) for an error that said nothing about it."""
    delivery = at_least_once(ScriptedProducer(Fail(kafka_errors.BrokerNotAvailableError())))
    delivery._publish([Output("features", b"k", b"f1")])
    assert delivery.producer.values == [b"f1", b"f1"]  # type: ignore[union-attr]
    assert delivery.metrics.registry.get_sample_value("fraud_errors_total", {"kind": "output_dropped"}) == 0
    invalid = at_least_once(ScriptedProducer(Fail(kafka_errors.InvalidRecordError("refused"))))
    invalid._publish([Output("features", b"k", b"f1")])  # refused for itself, and no smaller form: dropped, counted
    assert invalid.producer.values == [b"f1"]  # type: ignore[union-attr]
    assert invalid.metrics.registry.get_sample_value("fraud_errors_total", {"kind": "output_dropped"}) == 1


@pytest.mark.parametrize(("fail_in", "group_committed", "done"), [
    ("commit_transaction", 10, True),  # it committed after all: done, not sent twice
    ("commit_transaction", 4, False),  # it did not: read again
    ("send_offsets_to_transaction", 4, True),  # before the commit: a new producer, and the batch commits
])
def test_a_transactional_error_the_client_cannot_name_neither_stops_the_worker_nor_guesses(
        fail_in: str, group_committed: int, done: bool) -> None:
    """kafka-python raised a bare KafkaError ("Could not execute transactional request for unknown reasons:
    RequestTimedOutError") with the coordinator's node paused 30 s: it stopped the worker (exit 1)."""
    from kafka.errors import KafkaError

    from pipeline.worker.transactions import ExactlyOnce

    class Unnamed(HangingTransactions):
        def send_offsets_to_transaction(self, offsets, group_metadata) -> None:
            if self.hang_in == "send_offsets_to_transaction" and not self.closed:
                raise KafkaError("Could not execute transactional request for unknown reasons: [Error 7] "
                                 "RequestTimedOutError")

        def commit_transaction(self) -> None:
            if self.hang_in == "commit_transaction":
                raise KafkaError("Could not execute transactional request for unknown reasons")

    tp = TopicPartition("tx", 0)
    delivery = ExactlyOnce({"transaction_timeout_ms": 300}, CommittedOffsets({tp: group_committed}),
                           WorkerMetrics(CollectorRegistry()), threading.Event(), max_backoff_s=0.01,
                           ack_timeout_s=0.2, transactional_prefix="g-tx")
    first = Unnamed(fail_in)
    delivery.producer = first  # type: ignore[assignment]

    def ready() -> Unnamed:  # a new producer where the last was dropped, as _ready_producer makes one
        if delivery.producer is None:
            delivery.producer = Unnamed("nothing")  # type: ignore[assignment]
        return delivery.producer  # type: ignore[return-value]

    delivery._ready_producer = ready  # type: ignore[method-assign]
    assert delivery.deliver([Output("alerts", b"k", b"v")], {tp: 10}) is done
    assert first.closed


def test_the_range_assignor_is_pinned_for_both_clients(worker: Worker, monkeypatch: pytest.MonkeyPatch) -> None:
    """Raw input's co-partitioning needs the range assignor: the worker names it, and the confluent driver passes
    it on as librdkafka's "range" (not a default list that would allow round-robin)."""
    from dataclasses import asdict

    from kafka.coordinator.assignors.range import RangePartitionAssignor

    from pipeline.worker import kafkaclient as clients
    from pipeline.worker.kafkaclient import confluent

    seen: dict = {}

    def capture(client: str, **options: object) -> object:
        seen.update(options)
        raise RuntimeError("captured")

    monkeypatch.setattr(clients, "consumer", capture)
    with pytest.raises(RuntimeError, match="captured"):
        worker._connect()
    assert seen["partition_assignment_strategy"] == (RangePartitionAssignor,)
    # what correctness needs is set whatever the tuning; the tuning comes from its one object
    assert (seen["enable_auto_commit"], seen["isolation_level"]) == (False, "read_committed")
    assert {k: seen[k] for k in asdict(clients.ConsumerTuning())} == asdict(clients.ConsumerTuning())
    conf = confluent.config({"partition_assignment_strategy": seen["partition_assignment_strategy"]}, role="consumer")
    assert conf["partition.assignment.strategy"] == "range"


# -- the checkpoint: the one owner of the commit ------------------------------------------------------
def test_only_the_checkpoint_and_the_delivery_modes_commit() -> None:
    """quix-streams' Checkpoint shape: the loop decides when, one object decides how. A commit, send-offsets or
    deliver call anywhere else in the product would be a second owner (the client drivers implement them)."""
    import re
    from pathlib import Path

    owners = {"checkpoint.py", "delivery.py", "transactions.py", "confluent.py", "kafka_python.py"}
    calls = re.compile(r"(?<!checkpoint)\.(deliver|submit|commit|commit_transaction|send_offsets_to_transaction)\(")
    root = Path(__file__).resolve().parents[2]
    found = [f"{path.relative_to(root)}:{n}" for folder in ("pipeline", "producer", "trainer")
             for path in (root / folder).rglob("*.py") if path.name not in owners
             for n, line in enumerate(path.read_text().splitlines(), 1) if calls.search(line)]
    assert found == []


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return lambda *args, **kwargs: self.calls.append((name, *args))


class _Delivery:
    def __init__(self, ok: bool) -> None:
        self.ok, self.delivered = ok, []

    def deliver(self, outputs: list, offsets: dict) -> bool:
        self.delivered.append((outputs, offsets))
        return self.ok


@pytest.mark.parametrize("ok", [True, False])
def test_the_checkpoint_counts_a_committed_batch_and_rewinds_an_aborted_one(ok: bool) -> None:
    from pipeline.worker.checkpoint import Checkpoint
    from pipeline.worker.processing import BatchOutcome

    ledger, stages, listener, consumer = _Recorder(), _Recorder(), _Recorder(), _Recorder()
    delivery = _Delivery(ok)
    checkpoint = Checkpoint(delivery, ledger, lambda: consumer, lambda: stages, lambda: listener,  # type: ignore[arg-type]
                            exactly_once=True)
    records = [Record(b"{}", 5), Record(b"{}", 6)]
    tp = TopicPartition("tx", 0)
    outcome = BatchOutcome()
    checkpoint.commit(["alert"], {tp: 7}, records, 2, outcome)  # type: ignore[list-item]
    assert delivery.delivered == [(["alert"], {tp: 7})]
    if ok:  # counted, the stages release what they kept for a replay, the listener forgets its rewinds
        assert ledger.calls == [("committed", 2, outcome, {tp: 7}, consumer)]
        assert stages.calls == [("committed", {tp: 7})] and listener.calls == [("committed", {tp})]
        assert consumer.calls == []
    else:  # aborted: nothing counted, the stores it touched restored, the batch read again from its first record
        assert ledger.calls == []
        assert stages.calls == [("discard", records)]
        assert consumer.calls == [("seek", tp, 5)] and listener.calls == [("rewind_on_assignment", {tp: 5})]


def test_an_unreadable_record_standing_for_a_whole_batch_moves_its_partition_past_the_batch() -> None:
    """kafka-python's driver returns a batch it cannot read (a CRC failure) as one unreadable record at the batch's
    first offset with ``skip_to`` past its last: the commit goes past the batch, not into it."""
    from pipeline.worker.app import offsets_past
    from pipeline.worker.records import Record as Consumed

    good = Consumed("in", 0, 4, -1, b"k", b"v", [])
    batch = Consumed("in", 0, 5, -1, None, None, [], "kafka-python cannot parse it: CRC", skip_to=12)
    other = Consumed("in", 1, 7, -1, b"k", b"v", [])
    assert offsets_past([good, batch, other], [batch]) == {TopicPartition("in", 0): 12, TopicPartition("in", 1): 8}
    assert offsets_past([good, other]) == {TopicPartition("in", 0): 5, TopicPartition("in", 1): 8}


def test_an_aborted_transaction_reads_an_unreadable_record_again(worker: Worker) -> None:
    """The driver has moved its partition past an unreadable record; when the transaction holding its dead letter
    aborts, the batch is read again from its first record, the unreadable one included (else its dead letter is
    lost and the next commit passes it)."""
    from pipeline.worker.checkpoint import Checkpoint
    from pipeline.worker.records import Record as Consumed

    consumer, listener, delivery = _Recorder(), _Recorder(), _Delivery(False)
    worker.checkpoint = Checkpoint(delivery, worker.ledger, lambda: consumer, lambda: None,  # type: ignore[arg-type]
                                   lambda: listener, exactly_once=True)
    worker.process([Consumed("tx", 0, 3, -1, b"k", b"poison", [], "kafka-python cannot parse it")])
    ((outputs, offsets),) = delivery.delivered
    assert [o.topic for o in outputs] == [worker.kafka.dead_letter_topic] and offsets == {TopicPartition("tx", 0): 4}
    assert consumer.calls == [("seek", TopicPartition("tx", 0), 3)]
