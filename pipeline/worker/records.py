"""The consumed record the worker reads, whichever client read it (kafka-python's ``ConsumerRecord`` has
the same fields; the confluent driver and the repartition hop's unpacking make these)."""

from __future__ import annotations

from dataclasses import dataclass


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
