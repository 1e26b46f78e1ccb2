"""The consumed record the worker reads, whichever client read it (kafka-python's ``ConsumerRecord`` has
the same fields; the drivers' unreadable records, the confluent driver and the repartition hop's unpacking
make these)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kafka import TopicPartition


@dataclass(slots=True)
class Record:
    """A consumed record, with the fields of kafka-python's ``ConsumerRecord`` the worker reads."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]
    unreadable: str | None = None  # why it cannot be read (the worker dead-letters it)
    skip_to: int | None = None  # an unreadable record standing for a whole unreadable batch: the offset after it


def comes_before_hand_back(record: Any, handed_back: dict[TopicPartition, int]) -> bool:
    """Whether ``record`` comes before its partition's hand-back offset (True where its partition has none):
    scored now, not read again later."""
    return record.offset < handed_back.get(TopicPartition(record.topic, record.partition), record.offset + 1)
