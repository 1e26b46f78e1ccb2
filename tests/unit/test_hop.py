"""The repartition hop's packed records (``pipeline.worker.state.hop``), without a broker."""

from __future__ import annotations

import random
from unittest.mock import MagicMock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka import TopicPartition
from kafka.partitioner.default import DefaultPartitioner

from pipeline.worker.records import Record
from pipeline.worker.state.hop import PACK_BYTES, PACKED_KEY, pack, packed_count, partition_for, unpack
from tests.unit.test_stream_features import TOPICS, stages

KEYS = st.binary(min_size=1, max_size=40)


def read_back(outputs: list, offset: int = 0) -> list[Record]:
    return [t for o in outputs for t in unpack(Record(o.topic, o.partition, offset, 5, o.key, o.value, []))]


@settings(max_examples=200, deadline=None)
@given(items=st.lists(st.tuples(KEYS, st.binary(max_size=3000)), max_size=60), partitions=st.integers(1, 12))
def test_packed_records_give_back_every_transaction_in_order_on_its_keys_partition(items: list, partitions: int
                                                                                   ) -> None:
    outputs = pack("rep", partitions, items)
    assert all(o.key == PACKED_KEY and o.topic == "rep" for o in outputs)
    assert all(packed_count(o.value) == len(read_back([o])) for o in outputs)
    for p in range(partitions):
        mine = [(k, v) for k, v in items if partition_for(k, partitions) == p]
        got = [(r.key, r.value) for r in read_back([o for o in outputs if o.partition == p])]
        assert got == mine  # every one, once, in the order staged
    back = read_back(outputs, offset=41)
    assert all(r.offset == 41 and r.timestamp == 5 and r.topic == "rep" for r in back)


def test_a_big_batch_is_packed_into_records_kafka_accepts() -> None:
    items = [(b"t%d" % (i % 7), b"x" * 900) for i in range(3000)]
    outputs = pack("rep", 1, items)
    assert len(outputs) > 1 and all(len(o.value) <= PACK_BYTES + 1000 for o in outputs)
    assert [(r.key, r.value) for r in read_back(outputs)] == items


def test_the_partition_is_kafkas_default_partitioners() -> None:
    """The labels topic's producers put a terminal where the hop puts its transactions (both meet in one store)."""
    rng = random.Random(3)
    cluster = MagicMock()
    for n in (1, 3, 7, 12):
        cluster.topics.return_value = {"t"}
        cluster.partitions_for_topic.return_value = set(range(n))
        cluster.available_partitions_for_topic.return_value = set(range(n))
        for _ in range(300):
            key = str(rng.randrange(10**9)).encode()
            assert partition_for(key, n) == DefaultPartitioner().partition("t", key, key, None, None, cluster)


@pytest.mark.parametrize("value", [b"", b"\x00P", b"\x00P\x01\x05\x00\x00\x00", b"\x00P\x09\x00\x00\x00\x00",
                                   b"\x00P\x01\x01\x00\x00\x00\x02\x00\x00\x00ab\xff\xff\xff\x7f",
                                   b"\x00P\x01\x00\x00\x00\x00trailing"])
def test_a_packed_record_that_cannot_be_read_is_dead_lettered_not_raised(value: bytes) -> None:
    made = stages()
    good = pack(TOPICS.repartition, 1, [(b"7", b'{"transaction_id": "a"}')])[0]
    batch = [Record(TOPICS.repartition, 0, 3, -1, PACKED_KEY, value, []),
             Record(TOPICS.repartition, 0, 4, -1, PACKED_KEY, good.value, [])]
    _raw, _labels, featured, broken = made.split(batch)
    assert [r.offset for r in featured] == [4]
    ((record, error),) = broken
    assert record.offset == 3 and error.reason == "corrupt_record" and "packed" in error.detail


def test_a_transaction_written_alone_by_an_earlier_worker_is_still_read() -> None:
    made = stages()
    single = Record(TOPICS.repartition, 0, 9, -1, b"7", b'{"transaction_id": "a"}', [])
    _raw, _labels, featured, broken = made.split([single])
    assert featured == [single] and broken == []
    assert made.activity(TopicPartition(TOPICS.repartition, 0), [single]) == 1
    packed = pack(TOPICS.repartition, 1, [(b"7", b"{}")] * 5)[0]
    assert made.activity(TopicPartition(TOPICS.repartition, 0),
                         [Record(TOPICS.repartition, 0, 10, -1, PACKED_KEY, packed.value, [])]) == 5
