"""Fake Kafka clients for unit tests, once: futures, a scripted producer and a recording consumer.

They have the shape of the worker's client interface (``pipeline.worker.kafkaclient``); integration tests use
the real clients on a real broker instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from kafka import TopicPartition
from kafka.errors import KafkaTimeoutError


class Acked:
    """A send the broker acknowledged."""

    is_done = True

    def get(self, timeout: float | None = None) -> None:
        return None


class FailedFuture:
    """A send whose acknowledgement failed with ``err``."""

    is_done = True

    def __init__(self, err: BaseException) -> None:
        self.err = err

    def get(self, timeout: float | None = None) -> None:
        raise self.err


class SlowFuture:
    """Acknowledged ``after_s`` after it was made; ``get`` raises KafkaTimeoutError before that."""

    def __init__(self, after_s: float) -> None:
        self.at = time.monotonic() + after_s

    @property
    def is_done(self) -> bool:
        return time.monotonic() >= self.at

    def get(self, timeout: float | None = None) -> None:
        time.sleep(max(0.0, min(timeout if timeout is not None else 1e9, self.at - time.monotonic())))
        if not self.is_done:
            raise KafkaTimeoutError("not yet")


@dataclass
class Raise:
    """A producer outcome: ``send`` itself raises ``err`` (refused before sending)."""

    err: BaseException


@dataclass
class Fail:
    """A producer outcome: the send's acknowledgement fails with ``err``."""

    err: BaseException


class ScriptedProducer:
    """Each send takes the next outcome of ``script`` (``Raise``, ``Fail``, or None: acknowledged); once the script
    is spent, ``then`` (default: acknowledged). ``sent``: (topic, key, value) of every send that was not refused."""

    def __init__(self, *script: Raise | Fail | None, then: Raise | Fail | None = None) -> None:
        self.script, self.then = list(script), then
        self.sent: list[tuple[str, bytes | None, bytes | None]] = []

    def send(self, topic: str, key: bytes | None = None, value: bytes | None = None, headers: Any = None,
             partition: int | None = None) -> Any:
        outcome = self.script.pop(0) if self.script else self.then
        if isinstance(outcome, Raise):
            raise outcome.err
        self.sent.append((topic, key, value))
        return FailedFuture(outcome.err) if isinstance(outcome, Fail) else Acked()

    @property
    def values(self) -> list[bytes | None]:
        return [value for _topic, _key, value in self.sent]


@dataclass
class RecordingConsumer:
    """A group consumer that holds ``owned`` and records the commits and seeks asked of it."""

    owned: set[TopicPartition] = field(default_factory=set)
    commits: list[dict[TopicPartition, Any]] = field(default_factory=list)
    seeks: dict[TopicPartition, int] = field(default_factory=dict)

    def assignment(self) -> set[TopicPartition]:
        return set(self.owned)

    def commit(self, offsets: dict[TopicPartition, Any]) -> None:
        self.commits.append(offsets)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks[tp] = offset
