"""Records kafka-python cannot parse: find them, so the worker can dead-letter them and move on.

Some records are legal on the wire but refused by kafka-python's parser inside ``poll()``:
a header key that is not UTF-8 (any producer can send one; ``kcat -H`` does) raises
``CorruptRecordError``, with no partition or offset in the error, on every poll and after
every restart. Left alone, that one record stops its partition for good.

Like Java's client, kafka-python returns the records before the bad one and raises on the
bad one at the next poll. The frames of that exception still hold where it happened: the
fetch (its partition) and the record being read (its offset, key and value bytes, read
before the headers). :func:`locate` reads them from the traceback. Where a whole batch is
unreadable (a CRC failure), it names the batch's offset range instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from kafka import TopicPartition


@dataclass(frozen=True)
class CorruptRecord:
    """Where an unreadable record sits, and what of it could be read. Quacks like a ConsumerRecord."""

    topic: str
    partition: int
    offset: int
    next_offset: int  # where to resume: past the record, or past the whole unreadable batch
    key: bytes | None = None
    value: bytes | None = None
    headers: list[tuple[str, bytes]] = field(default_factory=list)

    @property
    def topic_partition(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)


def _frames(err: BaseException | None) -> Iterator[Any]:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        tb: TracebackType | None = err.__traceback__
        while tb is not None:
            yield tb.tb_frame
            tb = tb.tb_next
        err = err.__context__


def locate(err: BaseException) -> CorruptRecord | None:
    """The partition and offset of the record (or batch) that made ``poll()`` raise ``err``."""
    tp: Any = None
    record: dict[str, Any] | None = None
    batch: Any = None
    for frame in _frames(err):
        local = frame.f_locals
        owner = local.get("self")
        if tp is None and hasattr(owner, "topic_partition"):
            tp = owner.topic_partition
        if frame.f_code.co_name == "_read_msg" and "offset" in local:
            record = {"offset": local["offset"], "key": local.get("key"), "value": local.get("value")}
        if frame.f_code.co_name == "_unpack_records" and local.get("batch") is not None:
            batch = local["batch"]
    if tp is None:
        return None
    if record is not None:
        return CorruptRecord(tp.topic, tp.partition, int(record["offset"]), int(record["offset"]) + 1,
                             _bytes(record["key"]), _bytes(record["value"]))
    if batch is not None and hasattr(batch, "base_offset") and hasattr(batch, "next_offset"):
        return CorruptRecord(tp.topic, tp.partition, int(batch.base_offset), int(batch.next_offset))
    return None


def _bytes(value: Any) -> bytes | None:
    return bytes(value) if isinstance(value, bytes | bytearray | memoryview) else None
