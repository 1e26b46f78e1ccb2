"""Window state in memory, one store per stage and partition, and its restore from a changelog.

Every key a batch changed is written to the store's compacted changelog in the batch's
delivery: inside its transaction under exactly-once, acknowledged before the offsets are
committed under at-least-once. An entity the sweep removed is written as a tombstone. A store
is restored from its changelog (read_committed, to the end offset) whenever its partition is
assigned, and after an aborted transaction.

A key's record is its whole state while it holds at most ``BIG_ENTRIES`` events and labels
(a customer's 60 events: one record of 1.5 KB). A bigger one (a busy merchant) is written as a
*head* record under its own key and one record per hour of event time it holds
(``<key>\x00<hour>/<chunk>``, at most ``CHUNK_EVENTS`` events each), of which a batch rewrites
only the hours it changed: no record ever nears Kafka's size limit, and a hot key costs its
changed hours, not its whole history, per batch. The hours that emptied get tombstones.
"""

from __future__ import annotations

import logging
import math
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from kafka import KafkaConsumer, TopicPartition

from pipeline.config import KafkaSettings
from pipeline.errors import FraudPipelineError
from pipeline.streamfeatures import CustomerWindows, TerminalWindows
from pipeline.worker.delivery import StopWithoutCommit
from pipeline.worker.outputs import Output

log = logging.getLogger(__name__)

RESTORE_STALL_S = 60.0  # a restore that makes no progress this long stops the worker
ASK_TIMEOUT_S = 5.0  # an end-offsets request between batches gives up after this long (asked again next batch)
BIG_ENTRIES = 4096  # an entity holding more events and labels than this is written in segments
W = TypeVar("W", CustomerWindows, TerminalWindows)


class RestoreFailed(FraudPipelineError):
    """A changelog could not be read to its end: the worker stops rather than score from partial state."""


class Store(Generic[W]):
    """One stage's state for one partition: entity key -> windows, and the keys changed since the last flush."""

    def __init__(self, factory: Callable[[], W], parse: Callable[[bytes], W],
                 merge: Callable[[bytes, list[bytes]], W] | None = None) -> None:
        self.factory, self.parse, self.merge = factory, parse, merge
        self.entities: dict[str, W] = {}
        self.dirty: set[str] = set()
        self.swept_at: int | None = None  # the stream time of the last sweep
        self.segmented: dict[str, dict[int, int]] = {}  # big entity -> segment -> records written for it
        self._heads: dict[str, bytes] = {}  # while restoring: big entities' head records ...
        self._parts: dict[str, dict[tuple[int, int], bytes]] = {}  # ... and their segment records

    def get(self, key: str) -> W:
        state = self.entities.get(key)
        if state is None:
            state = self.entities[key] = self.factory()
        self.dirty.add(key)
        return state

    def keep(self, key: str, state: W) -> None:
        """Hold ``state`` for ``key`` (changed: written at the next flush)."""
        self.entities[key] = state
        self.dirty.add(key)

    def load(self, key: bytes | None, value: bytes | None) -> None:
        """Apply one changelog record (a whole state, a head or a segment; an empty value deletes it).
        ValueError: not a state. Big entities are put together by ``assemble`` once every record is read."""
        if key is None:
            raise ValueError("a changelog record without a key")
        if b"\x00" in key:
            entity, _, where = key.partition(b"\x00")
            segment, _, chunk = where.partition(b"/")
            at = (int(segment), int(chunk))
            parts = self._parts.setdefault(entity.decode("utf-8", "surrogateescape"), {})
            if value:
                parts[at] = value
            else:
                parts.pop(at, None)
            return
        name = key.decode("utf-8", "surrogateescape")
        self._heads.pop(name, None)
        self.entities.pop(name, None)
        if value and value[0] == 2:
            self._heads[name] = value
        elif value:
            self.entities[name] = self.parse(value)

    def assemble(self) -> list[str]:
        """After a restore: build each big entity from its head and segments; the keys that could not be."""
        failed = []
        for name, head in self._heads.items():
            parts = self._parts.get(name, {})
            try:
                if self.merge is None:
                    raise ValueError("this store has no segmented entities")
                state = self.merge(head, [parts[at] for at in sorted(parts)])
            except (ValueError, struct.error) as err:
                log.error("big entity %r cannot be put together from its changelog segments (%s); it starts from "
                          "empty windows", name, err)
                failed.append(name)
                continue
            state.touched = set()  # what the changelog holds is what memory holds
            self.entities[name] = state
            written: dict[int, int] = {}
            for segment, _chunk in parts:
                written[segment] = written.get(segment, 0) + 1
            self.segmented[name] = written
        self._heads, self._parts = {}, {}
        return failed

    def sweep(self, cutoff: int) -> int:
        """Remove the entities with nothing after ``cutoff`` (their windows are empty for any event still to come);
        the number removed. Each is written as a tombstone at the next flush."""
        gone = [key for key, state in self.entities.items() if state.expired(cutoff)]
        for key in gone:
            del self.entities[key]
            self.dirty.add(key)
        return len(gone)

    def flush(self, topic: str, partition: int) -> list[Output]:
        """The changelog records of every key changed since the last flush (a tombstone for a key removed)."""
        entities = self.entities
        outputs = []
        for key in sorted(self.dirty):
            state = entities.get(key)
            name = key.encode("utf-8", "surrogateescape")
            written = self.segmented.get(key)
            if state is not None and state.size > BIG_ENTRIES:
                outputs += self._segments(topic, partition, key, name, state)
                continue
            outputs.append(Output(topic, name, state.to_bytes() if state is not None else b"", partition=partition))
            if written is not None:  # it was big: its segments go
                del self.segmented[key]
                outputs += [Output(topic, _segment_key(name, segment, i), b"", partition=partition)
                            for segment, count in sorted(written.items()) for i in range(count)]
                if state is not None:
                    state.touched = None
        self.dirty.clear()
        return outputs

    def _segments(self, topic: str, partition: int, key: str, name: bytes, state: Any) -> list[Output]:
        written = self.segmented.get(key)
        outputs = []
        if written is None or state.touched is None:  # newly big (or restored): every segment
            written = self.segmented.setdefault(key, {})
            segments = state.segments() | written.keys()
            outputs.append(Output(topic, name, state.head(), partition=partition))
        else:
            segments = state.touched
        state.touched = set()
        for segment in sorted(segments):
            records = state.segment_records(segment)
            outputs += [Output(topic, _segment_key(name, segment, i), value, partition=partition)
                        for i, value in enumerate(records)]
            outputs += [Output(topic, _segment_key(name, segment, i), b"", partition=partition)
                        for i in range(len(records), written.get(segment, 0))]
            if records:
                written[segment] = len(records)
            else:
                written.pop(segment, None)
        return outputs


def _segment_key(name: bytes, segment: int, chunk: int) -> bytes:
    return b"%s\x00%d/%d" % (name, segment, chunk)


class Restorer:
    """Reads a changelog partition to its end with a group-less, read_committed consumer.

    A record that is not a state (garbage written to the topic by hand, a format from another
    version) is skipped: an ERROR line names its topic, partition and offset, and
    ``fraud_state_corrupt_records_total`` counts it. Its key is served from empty windows.
    """

    def __init__(self, kafka: KafkaSettings, client_id: str, options: dict[str, Any], metrics: Any = None) -> None:
        self.kafka, self.client_id, self.options, self.metrics = kafka, client_id, options, metrics
        self.consumer: KafkaConsumer | None = None
        self._warned_at = -math.inf

    def _client(self) -> KafkaConsumer:
        if self.consumer is None:
            self.consumer = KafkaConsumer(**self.options, client_id=f"{self.client_id}-restore", group_id=None,
                                          enable_auto_commit=False, isolation_level="read_committed",
                                          max_partition_fetch_bytes=8 * 1024 * 1024,
                                          # a fetch left waiting at a partition's end holds the next partition's
                                          # end-offset request behind it on the connection (500 ms each)
                                          fetch_max_wait_ms=20)
        return self.consumer

    def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        """The broker's end offsets (read_committed: the last stable offsets), asked on this consumer's own
        connections, which no fetch holds between restores. The group consumer's are held by its long-polling
        fetches: a ListOffsets request waits behind one for up to ``fetch.max.wait.ms`` (500 ms per batch in
        the benchmark, 2026-12-07).

        Bounded by ``ASK_TIMEOUT_S``: kafka-python's default is the request timeout, and a call against the
        three-node cluster with two nodes down blocked its full 30 s before it raised. A failure raises, the
        callers treat the offsets as unknown and ask again with the next batch, and a WARNING says so at most
        once a minute."""
        try:
            return self._client().end_offsets(partitions, timeout_ms=int(ASK_TIMEOUT_S * 1000))
        except Exception as err:
            now = time.monotonic()
            if now - self._warned_at >= 60:
                self._warned_at = now
                log.warning("could not read the end offsets of %s (%s: %s); what waits on them waits, asked again "
                            "with the next batch", sorted({tp.topic for tp in partitions}), type(err).__name__, err)
            raise

    def restore(self, topic: str, partition: int, store: Store[Any], stop: threading.Event) -> int:
        """Load every record of ``topic``[``partition``] into ``store``; the number of records read."""
        tp = TopicPartition(topic, partition)
        consumer = self._client()
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        end = consumer.end_offsets([tp])[tp]  # read_committed: the last stable offset
        count, progress_at = 0, time.monotonic()
        while consumer.position(tp) < end and not stop.is_set():
            got = consumer.poll(timeout_ms=500).get(tp, [])
            for record in got:
                self.load(store, record)
            count += len(got)
            if got:
                progress_at = time.monotonic()
            elif time.monotonic() - progress_at > RESTORE_STALL_S:
                raise RestoreFailed(f"restoring {topic}[{partition}] stalled at offset "
                                    f"{consumer.position(tp)} of {end} for {RESTORE_STALL_S:.0f}s")
        if stop.is_set() and consumer.position(tp) < end:  # never score from a half-restored store
            raise StopWithoutCommit(f"asked to stop while restoring {topic}[{partition}]")
        consumer.assign([])  # nothing fetched until the next restore (see ``end_offsets``)
        if store.assemble() and self.metrics is not None:
            self.metrics.state_corrupt.labels(topic).inc()
        return count

    def load(self, store: Store[Any], record: Any) -> None:
        try:
            store.load(record.key, record.value)
        except Exception as err:  # a record that is not a state must not stop the worker for good
            log.error("changelog record %s[%d]@%d is not a window state (%s: %s); skipped (its key keeps what "
                      "earlier records of it held)", record.topic, record.partition, record.offset,
                      type(err).__name__, err)
            if self.metrics is not None:
                self.metrics.state_corrupt.labels(record.topic).inc()

    def close(self) -> None:
        if self.consumer is not None:
            self.consumer.close(autocommit=False)
            self.consumer = None
