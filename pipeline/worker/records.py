"""The consumed record the worker reads, whichever client read it: one type.

:class:`ConsumedRecord` is what the worker reads of a record (kafka-python's ``ConsumerRecord``
has these fields); :class:`Record` is the one concrete record the project makes (the drivers'
unreadable records, the confluent driver, the repartition hop's unpacking, tests and benchmarks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kafka import TopicPartition


class ConsumedRecord(Protocol):
    """The parts of a consumed record the worker reads."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes | None]] | None


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
