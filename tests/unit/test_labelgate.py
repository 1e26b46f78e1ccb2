"""The terminal stage scores a partition's transactions only once its labels partition is read to the end the
broker gave after they were read (``pipeline.worker.state.labelgate``)."""

from __future__ import annotations

import logging

import pytest
from kafka import TopicPartition
from prometheus_client import CollectorRegistry

from pipeline.schema import RecordError
from pipeline.worker.metrics import WorkerMetrics
from pipeline.worker.state import StateTopics
from pipeline.worker.state.labelgate import WAIT_MAX_S, LabelGate
from tests.worker_helpers import PausingConsumer, Record

TOPICS = StateTopics("raw", "labels", "g-repartition", "g-c", "g-t", 2)
L0, L1 = TopicPartition(TOPICS.labels, 0), TopicPartition(TOPICS.labels, 1)
R0, R1 = TopicPartition(TOPICS.repartition, 0), TopicPartition(TOPICS.repartition, 1)


class LabelsConsumer(PausingConsumer):
    """Positions and end offsets of the labels partitions; the ListOffsets requests it answered."""

    def __init__(self) -> None:
        super().__init__([L0, L1, R0, R1])
        self.ends = {L0: 0, L1: 0}
        self.asked = 0
        self.fail: Exception | None = None

    def assignment(self) -> set[TopicPartition]:
        return set(self.parts)

    def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        self.asked += 1
        if self.fail is not None:
            raise self.fail
        return {tp: self.ends[tp] for tp in tps}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def transactions(partition: int, *offsets: int) -> list[Record]:
    return [Record(b"{}", o, TOPICS.repartition, partition, b"T1") for o in offsets]


def made() -> tuple[LabelGate, LabelsConsumer, Clock, WorkerMetrics]:
    clock, metrics = Clock(), WorkerMetrics(CollectorRegistry())
    return LabelGate(TOPICS, metrics, clock), LabelsConsumer(), clock, metrics


def held(metrics: WorkerMetrics) -> float:
    return metrics.registry.get_sample_value("fraud_records_held_for_labels_total")


def test_labels_read_to_the_end_let_every_transaction_through_with_one_request() -> None:
    gate, consumer, _clock, metrics = made()
    consumer.ends[L0] = consumer.positions[L0] = 7
    batch = transactions(0, 3, 3, 4) + transactions(1, 9)
    now, broken, back = gate.admit(consumer, batch, [])
    assert (now, broken, back) == (batch, [], {})
    assert consumer.asked == 1 and held(metrics) == 0
    gate.between_batches(consumer)
    assert consumer.held == set()


def test_a_labels_partition_behind_holds_its_transactions_until_it_is_read_to_the_end_asked() -> None:
    """Labels partition 0 has labels the consumer has not fetched yet (its leader moved): partition 0's
    transactions are handed back and their repartition partition paused; partition 1's go on. Once labels 0
    is read to the end asked, the transactions read before the asking go through without asking again,
    however many labels arrived since."""
    gate, consumer, _clock, metrics = made()
    consumer.positions[L0], consumer.ends[L0] = 5, 9
    batch = transactions(0, 10, 10, 11) + transactions(1, 4)
    now, _broken, back = gate.admit(consumer, batch, [])
    assert now == batch[3:] and back == {R0: 10} and held(metrics) == 3
    gate.between_batches(consumer)
    assert consumer.held == {R0}
    consumer.positions[L0] = 8  # read some of them
    gate.between_batches(consumer)
    assert consumer.held == {R0}
    consumer.positions[L0], consumer.ends[L0] = 9, 15  # read to the end asked; more labels have come since
    gate.between_batches(consumer)
    assert consumer.held == set()
    asked = consumer.asked
    now, _broken, back = gate.admit(consumer, transactions(0, 10, 10, 11), [])
    assert len(now) == 3 and back == {} and consumer.asked == asked
    # records read after the asking need a new answer: labels 0 is behind again
    now, _broken, back = gate.admit(consumer, transactions(0, 12, 13), [])
    assert now == [] and back == {R0: 12} and consumer.asked == asked + 1


def test_records_read_before_and_after_the_asking_in_one_batch_split_where_the_answer_covers() -> None:
    gate, consumer, _clock, _metrics = made()
    consumer.positions[L0], consumer.ends[L0] = 0, 4
    gate.admit(consumer, transactions(0, 20, 21), [])  # waits for labels 0 to reach offset 4
    consumer.positions[L0], consumer.ends[L0] = 4, 6  # reached; two more labels since
    now, _broken, back = gate.admit(consumer, transactions(0, 20, 21, 22, 23), [])
    assert [r.offset for r in now] == [20, 21] and back == {R0: 22}


def test_unreadable_records_wait_with_their_partition_so_each_is_dead_lettered_once() -> None:
    gate, consumer, _clock, _metrics = made()
    consumer.positions[L1], consumer.ends[L1] = 0, 1
    bad = (transactions(1, 5)[0], RecordError("corrupt_record", None, "cut short"))
    good = (transactions(0, 2)[0], RecordError("corrupt_record", None, "cut short"))
    now, broken, back = gate.admit(consumer, transactions(1, 4), [bad, good])
    assert now == [] and broken == [good] and back == {R1: 4}


def test_a_labels_partition_that_makes_no_progress_stops_holding_after_the_limit(
        caplog: pytest.LogCaptureFixture) -> None:
    gate, consumer, clock, _metrics = made()
    consumer.positions[L0], consumer.ends[L0] = 0, 3
    gate.admit(consumer, transactions(0, 1), [])
    clock.now = WAIT_MAX_S - 1
    consumer.positions[L0] = 1  # progress: the wait starts again from here
    gate.between_batches(consumer)
    assert consumer.held == {R0}
    clock.now = 2 * WAIT_MAX_S - 2
    gate.between_batches(consumer)
    assert consumer.held == {R0}
    with caplog.at_level(logging.WARNING):
        clock.now = 2 * WAIT_MAX_S
        gate.between_batches(consumer)
        now, _broken, back = gate.admit(consumer, transactions(0, 1), [])
    assert consumer.held == set()
    assert len(now) == 1 and back == {}  # not waited for while it stays where it was given up
    assert len(gate.admit(consumer, transactions(0, 2), [])[0]) == 1
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "labels partition labels[0] read to offset 1 made no progress towards offset 3 for 31 s; its transactions "
        "are scored without waiting for it until it moves (labels that come later count in "
        "fraud_late_labels_total)"]
    consumer.positions[L0] = 2  # it moves: waited for again
    assert gate.admit(consumer, transactions(0, 3), [])[2] == {R0: 3}


def test_an_end_offset_the_broker_cannot_give_holds_without_pausing_and_is_asked_again() -> None:
    gate, consumer, _clock, _metrics = made()
    consumer.fail = TimeoutError("no leader")
    now, _broken, back = gate.admit(consumer, transactions(0, 6), [])
    assert now == [] and back == {R0: 6}
    gate.between_batches(consumer)
    assert consumer.held == set()  # nothing to wait for: the next batch asks again
    consumer.fail = None
    now, _broken, back = gate.admit(consumer, transactions(0, 6), [])
    assert len(now) == 1 and back == {} and consumer.asked == 2


def test_partitions_revoked_are_forgotten_and_resumed() -> None:
    gate, consumer, _clock, _metrics = made()
    consumer.positions[L0], consumer.ends[L0] = 0, 3
    gate.admit(consumer, transactions(0, 1), [])
    gate.between_batches(consumer)
    assert consumer.held == {R0}
    consumer.parts = [L1, R1]
    consumer.held.discard(R0)  # the client forgets the pause of a partition revoked
    gate.between_batches(consumer)
    assert gate.waits == {} and consumer.held == set()


def test_the_restore_consumer_asks_with_a_bound_and_says_once_a_minute_when_it_cannot(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.config import KafkaSettings
    from pipeline.worker.state import store
    from pipeline.worker.state.store import ASK_TIMEOUT_S, Restorer

    asked: list[int | None] = []

    class Unreachable:
        def end_offsets(self, tps: list[TopicPartition], timeout_ms: int | None = None) -> dict:
            asked.append(timeout_ms)
            raise TimeoutError("Failed to get offsets by timestamps")

    now = [1000.0]
    monkeypatch.setattr(store.time, "monotonic", lambda: now[0])
    restorer = Restorer(KafkaSettings.build(environ={}, overrides={}), "w", {})
    restorer.consumer = Unreachable()  # type: ignore[assignment]
    with caplog.at_level(logging.WARNING):
        for step in (0, 30, 61):  # seconds
            now[0] = 1000.0 + step
            with pytest.raises(TimeoutError):
                restorer.end_offsets([L0])
    assert asked == [int(ASK_TIMEOUT_S * 1000)] * 3
    said = [r.getMessage() for r in caplog.records if r.name == store.__name__]
    assert len(said) == 2 and said[0].startswith("could not read the end offsets of ['labels'] (TimeoutError: ")
