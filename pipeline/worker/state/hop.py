"""The repartition hop's records: a batch's transactions for one partition packed into few records.

The customer stage writes each transaction on to the terminal stage through the repartition
topic, partitioned by terminal. One Kafka record per transaction cost the worker more than its
features did: kafka-python spends about 20 us to send a record and about 12 us to read one,
whatever its size, and raw input sent and read one per transaction there on top of the input.
So a batch's transactions go in *packed* records, one per repartition partition (more past
``PACK_BYTES``), each holding its transactions in the order the customer stage processed them:

    key   b"\\x00packed"   (no entity key holds a NUL; watermark marks have an empty key)
    value b"\\x00P" + format (1 byte) + count (u32), then per transaction
          key length (u32), key (the terminal), value length (u32), value (the JSON record)

The partition of each transaction is the one Kafka's default partitioner (murmur2 of the key,
as the Java client, kafka-python and the worker's librdkafka producer configured with
``murmur2_random`` compute it) gives its terminal: the labels topic's producers put the same
terminal on the same partition, so both meet in one worker's terminal store. The terminal stage
reads a packed record back as one record per transaction, each with the packed record's topic,
partition and offset (offsets committed are unchanged), and reads single-transaction records as
well (what a worker before this change wrote).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from kafka.partitioner.default import murmur2

from pipeline.worker.outputs import Output
from pipeline.worker.records import Record

PACKED_KEY = b"\x00packed"
PACK_BYTES = 64 * 1024  # a packed record is closed past this: below any message limit a changelog record (up to
# ~100 KB) already needs, far below Kafka's default 1 MB; ~150 transactions a record
_FORMAT = 1
_HEAD = struct.Struct("<2sBI")
_LEN = struct.Struct("<I")


@lru_cache(maxsize=1 << 16)
def partition_for(key: bytes, partitions: int) -> int:
    """Kafka's default partitioner for a keyed record (Java's ``Utils.toPositive(murmur2(key)) % n``)."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def pack(topic: str, partitions: int, items: Iterable[tuple[bytes, bytes]]) -> list[Output]:
    """Packed records of ``items`` (key, value), each to its key's partition, in order within a partition."""
    if partitions < 1:  # prepare_topics gives it; only a test without a broker could leave it unknown
        raise ValueError("the repartition topic's partition count is needed to pack its records")
    parts: dict[int, list[list[bytes]]] = {}
    sizes: dict[int, int] = {}
    for key, value in items:
        p = partition_for(key, partitions)
        chunks = parts.setdefault(p, [[]])
        size = sizes.get(p, 0) + len(key) + len(value) + 8
        if size > PACK_BYTES and chunks[-1]:
            chunks.append([])
            size = len(key) + len(value) + 8
        sizes[p] = size
        chunks[-1] += (_LEN.pack(len(key)), key, _LEN.pack(len(value)), value)
    return [Output(topic, PACKED_KEY, _HEAD.pack(b"\x00P", _FORMAT, len(chunk) // 4) + b"".join(chunk), partition=p)
            for p, chunks in parts.items() for chunk in chunks]


def is_packed(record: Any) -> bool:
    return record.key == PACKED_KEY


def packed_count(value: bytes | None) -> int:
    """How many transactions a packed record says it holds (1 where it cannot say: it is read as one)."""
    if value is None or len(value) < _HEAD.size or value[:2] != b"\x00P":
        return 1
    return max(1, _HEAD.unpack_from(value)[2])


def unpack(record: Any) -> list[Record]:
    """The transactions of a packed record, as records at its position. ValueError: not a packed record."""
    value = record.value or b""
    if len(value) < _HEAD.size:
        raise ValueError(f"a packed repartition record of {len(value)} bytes")
    magic, fmt, count = _HEAD.unpack_from(value)
    if magic != b"\x00P" or fmt != _FORMAT:
        raise ValueError(f"not a packed repartition record of format {_FORMAT} ({value[:3]!r})")
    out, at, end = [], _HEAD.size, len(value)
    try:
        for _ in range(count):
            (n,) = _LEN.unpack_from(value, at)
            key = value[at + 4: at + 4 + n]
            at += 4 + n
            (n,) = _LEN.unpack_from(value, at)
            item = value[at + 4: at + 4 + n]
            at += 4 + n
            if at > end:
                raise ValueError(f"a packed repartition record cut short ({end} bytes)")
            out.append(Record(record.topic, record.partition, record.offset, record.timestamp, key, item,
                              list(record.headers or [])))
    except struct.error as err:
        raise ValueError(f"a packed repartition record cut short ({err})") from err
    if at != end:
        raise ValueError(f"a packed repartition record with {end - at} bytes after its {count} transactions")
    return out
