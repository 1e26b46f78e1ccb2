"""Window state in memory, one store per stage and partition, and its restore from a changelog.

Each store has a compacted changelog, written in the batch's delivery: inside its transaction
under exactly-once, acknowledged before the offsets are committed under at-least-once. A batch's
changes go there as deltas (:mod:`.delta`), and each key's whole state now and then, many keys to
a page record (:mod:`.pages`; see ``Store``); an entity the sweep removed is written as a
tombstone under its own key. A store is restored from its changelog (read_committed, to the end
offset) whenever its partition is assigned, and after an aborted transaction: the last whole state
of each key, then the deltas after it. (Changelogs an earlier version wrote, one whole-state
record per key, are read as well.)

A key holding more than ``BIG_ENTRIES`` events and labels (a busy merchant) is not paged: it is
written as a *head* record under its own key and one record per hour of event time it holds
(``<key>\x00<hour>/<chunk>``, at most ``CHUNK_EVENTS`` events each), of which a whole-state write
rewrites only the hours changed since the last: no record ever nears Kafka's size limit. The
hours that emptied get tombstones.
"""

from __future__ import annotations

import logging
import math
import struct
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from kafka import KafkaConsumer, TopicPartition

from pipeline.config import KafkaSettings
from pipeline.errors import FraudPipelineError
from pipeline.streamfeatures import CustomerWindows, TerminalWindows
from pipeline.worker.delivery import StopWithoutCommit
from pipeline.worker.outputs import Output
from pipeline.worker.state import delta, pages
from pipeline.worker.state.decisions import Decisions

log = logging.getLogger(__name__)

RESTORE_STALL_S = 60.0  # a restore that makes no progress this long stops the worker
ASK_TIMEOUT_S = 5.0  # an end-offsets request between batches gives up after this long (asked again next batch)
BIG_ENTRIES = 4096  # an entity holding more events and labels than this is written in segments
SNAPSHOT_LAG = 64  # batches a key's changes may stay in deltas only: what a restore replays at most, per store
CLEAN_MIN = 1024  # whole states a flush may write again to free old pages, at least (more when it writes more)
W = TypeVar("W", CustomerWindows, TerminalWindows, Decisions)


class RestoreFailed(FraudPipelineError):
    """A changelog could not be read to its end: the worker stops rather than score from partial state."""


class Store(Generic[W]):
    """One stage's state for one partition: entity key -> windows, and what its changelog still needs written.

    Each batch's changes go to the changelog as deltas (:mod:`.delta`); whole states (in pages,
    :mod:`.pages`) are written for the keys a batch marked ``dirty`` (kept without a change: a test,
    a swept entity's tombstone), for each key whose oldest change not yet in a whole state is ``lag``
    batches old, and for the live keys of the oldest pages while dead page entries outnumber live
    ones. A page, like a delta, gets a tombstone once nothing in it is needed, ``settle`` batches on. A
    delta gets a tombstone once every key it touched has a later whole state, and ``settle``
    batches after that: by then the batch that wrote those states is acknowledged (at-least-once
    keeps at most ``max_in_flight`` batches unacknowledged; the caller passes it), so no delta is
    deleted before what replaces it is on the broker.
    """

    def __init__(self, factory: Callable[[], W], parse: Callable[[bytes], W],
                 merge: Callable[[bytes, list[bytes]], W] | None = None, settle: int = 1,
                 lag: int | None = None) -> None:
        self.factory, self.parse, self.merge, self.settle = factory, parse, merge, settle
        self.lag = SNAPSHOT_LAG if lag is None else lag
        self.entities: dict[str, W] = {}
        self.dirty: set[str] = set()  # keys whose whole state the next flush writes
        self.changes: list[delta.Change] = []  # this batch's changes, for its delta
        self.swept_at: int | None = None  # the stream time of the last sweep
        self.segmented: dict[str, dict[int, int]] = {}  # big entity -> segment -> records written for it
        self.writer = delta.writer_id()
        self.seq = 0  # batches flushed (restored: deltas read)
        self.pending: OrderedDict[str, int] = OrderedDict()  # key -> the batch of its oldest change in no whole state
        self.live: OrderedDict[bytes, int] = OrderedDict()  # delta records written, not yet covered -> their batch
        self.covered: deque[tuple[bytes, int]] = deque()  # deltas covered, and the batch that covered them
        self.home: dict[str, bytes] = {}  # key -> the page holding its latest whole state
        self.pages: OrderedDict[bytes, list[str]] = OrderedDict()  # live pages (oldest first) -> the keys written
        self.page_live: dict[bytes, int] = {}  # live page -> how many of its keys it is the home of
        self.dead = 0  # entries of live pages that are no key's home
        self._heads: dict[str, bytes] = {}  # while restoring: big entities' head records ...
        self._parts: dict[str, dict[tuple[int, int], bytes]] = {}  # ... and their segment records,
        self._deltas: OrderedDict[bytes, tuple[int, delta.Delta]] = OrderedDict()  # the deltas read ...
        self._whole_at: dict[str, int] = {}  # ... and per key, the deltas read before its last whole state

    def keep(self, key: str, state: W) -> None:
        """Hold ``state`` for ``key``, changed in a way no delta says: its whole state is written at the next flush."""
        self.entities[key] = state
        self.dirty.add(key)

    def change(self, key: str, state: W, kind: int, eid: int, t_ms: int, value: float) -> None:
        """Hold ``state`` for ``key`` after one change (``state.apply`` replays it): written in the next delta."""
        self.entities[key] = state
        self.changes.append((key, kind, eid, t_ms, value))

    def load(self, key: bytes | None, value: bytes | None) -> None:
        """Apply one changelog record (a whole state, a head, a segment or a delta; an empty value deletes it).
        ValueError: not a state. Big entities and deltas are applied by ``assemble`` once every record is read."""
        if key is None:
            raise ValueError("a changelog record without a key")
        if delta.is_delta_key(key):
            self._deltas.pop(key, None)
            if value:
                self._deltas[key] = (self.seq, delta.Delta(value))
                self.seq += 1
            return
        if pages.is_page_key(key):
            self._load_page(key, value)
            return
        if b"\x00" in key:
            entity, _, where = key.partition(b"\x00")
            segment, _, chunk = where.partition(b"/")
            at = (int(segment), int(chunk))
            name = entity.decode("utf-8", "surrogateescape")
            parts = self._parts.setdefault(name, {})
            if value:
                parts[at] = value
            else:
                parts.pop(at, None)
            self._whole_at[name] = self.seq
            return
        name = key.decode("utf-8", "surrogateescape")
        self._heads.pop(name, None)
        self.entities.pop(name, None)
        self.home.pop(name, None)
        self._whole_at[name] = self.seq
        if value and value[0] == 2:
            self._heads[name] = value
        elif value:
            self.entities[name] = self.parse(value)

    def _load_page(self, key: bytes, value: bytes | None) -> None:
        if not value:  # every key it held was written again or deleted later on
            for name in self.pages.pop(key, []):
                if self.home.get(name) == key:  # cannot be, unless records were lost: start that key empty
                    del self.home[name]
                    self.entities.pop(name, None)
            return
        states = pages.decode(value)
        names, broken = [], []
        for name, state in states:  # parsed now: a restore holds states, not the pages' bytes (1.4 GiB a million)
            self._heads.pop(name, None)
            self._whole_at[name] = self.seq
            names.append(name)
            try:
                self.entities[name] = self.parse(state)
            except (ValueError, struct.error) as err:
                self.entities.pop(name, None)
                self.home.pop(name, None)
                broken.append(f"{name!r} ({err})")
                continue
            self.home[name] = key
        self.pages[key] = names
        if broken:
            raise ValueError(f"{len(broken)} of its {len(states)} states are not window states, e.g. {broken[0]}; "
                             "they start from empty windows")

    def assemble(self) -> list[str]:
        """After a restore: build each big entity from its head and segments, then replay the deltas after each
        key's last whole state; the keys that could not be built."""
        failed = []
        live: dict[bytes, int] = {}
        for page in self.home.values():
            live[page] = live.get(page, 0) + 1
        for page, names in list(self.pages.items()):
            if page in live:
                self.page_live[page] = live[page]
                self.dead += len(names) - live[page]
            else:  # nothing of it is any key's latest: deleted at the next flushes
                del self.pages[page]
                self.covered.append((page, self.seq))
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
        whole_at, entities, pending = self._whole_at, self.entities, self.pending
        for key, (seq, record) in self._deltas.items():
            self.live[key] = seq
            try:
                for name, kind, eid, t, value in record.changes():
                    if whole_at.get(name, -1) > seq:
                        continue  # a later whole state of it holds this change
                    state = entities.get(name)
                    if state is None:
                        state = entities[name] = self.factory()
                    state.apply(kind, eid, t, value)  # a big one's ``touched`` says which segments it changed
                    if name not in pending:
                        pending[name] = seq
            except (ValueError, UnicodeDecodeError) as err:  # written by something else than a store
                log.error("changelog delta %r cannot be replayed (%s); the rest of it is skipped", key, err)
                failed.append(key.decode("utf-8", "replace"))
        self._heads, self._parts, self._deltas, self._whole_at = {}, {}, OrderedDict(), {}
        return failed

    def _unhome(self, key: str, seq: int) -> None:
        """``key``'s latest whole state is no longer in its page (written again, or deleted)."""
        page = self.home.pop(key, None)
        if page is None:
            return
        left = self.page_live[page] - 1
        if left:
            self.page_live[page] = left
            self.dead += 1
            return
        self.dead -= len(self.pages.pop(page)) - 1
        del self.page_live[page]
        self.covered.append((page, seq))  # deleted once this flush is surely acknowledged

    def _to_clean(self, budget: int) -> set[str]:
        """Live keys of the oldest pages, to be written again (freeing those pages) while dead entries outnumber
        live ones; at most about ``budget`` of them."""
        again: set[str] = set()
        for page, names in self.pages.items():
            if self.dead - len(again) <= len(self.home) or len(again) >= budget:
                break
            again.update(name for name in names if self.home.get(name) == page)
        return again

    def sweep(self, cutoff: int) -> int:
        """Remove the entities with nothing after ``cutoff`` (their windows are empty for any event still to come);
        the number removed. Each is written as a tombstone at the next flush."""
        gone = [key for key, state in self.entities.items() if state.expired(cutoff)]
        for key in gone:
            del self.entities[key]
            self.dirty.add(key)
        return len(gone)

    def flush(self, topic: str, partition: int) -> list[Output]:
        """This batch's changelog records: its delta, the whole states due (a tombstone for a key removed), and
        tombstones for the deltas whose changes are all in whole states acknowledged by now."""
        outputs = []
        seq = self.seq
        self.seq += 1
        if self.changes:
            pending = self.pending
            for key, *_ in self.changes:
                if key not in pending:
                    pending[key] = seq
            for i, value in enumerate(delta.encode(self.changes)):
                name = delta.delta_key(self.writer, seq, i)
                self.live[name] = seq
                outputs.append(Output(topic, name, value, partition=partition))
            self.changes = []
        due = self.dirty
        for key, first in self.pending.items():
            if first > seq - self.lag:
                break
            due.add(key)
        due |= self._to_clean(max(CLEAN_MIN, 2 * len(due)))
        entities = self.entities
        paged: list[tuple[str, bytes, bytes]] = []
        for key in sorted(due):
            self.pending.pop(key, None)
            state = entities.get(key)
            name = key.encode("utf-8", "surrogateescape")
            written = self.segmented.get(key)
            if state is not None and state.size > BIG_ENTRIES:
                self._unhome(key, seq)
                outputs += self._segments(topic, partition, key, name, state)
                continue
            if state is None:  # deleted: a tombstone under its own key (which an old whole-state record had)
                self._unhome(key, seq)
                outputs.append(Output(topic, name, b"", partition=partition))
            else:
                paged.append((key, name, state.to_bytes()))
            if written is not None:  # it was big: its segments go
                del self.segmented[key]
                outputs += [Output(topic, _segment_key(name, segment, i), b"", partition=partition)
                            for segment, count in sorted(written.items()) for i in range(count)]
                if state is not None:
                    state.touched = None
        for page, value, keys in pages.encode(self.writer, seq, paged):
            outputs.append(Output(topic, page, value, partition=partition))
            for key in keys:
                self._unhome(key, seq)
                self.home[key] = page
            self.pages[page] = keys
            self.page_live[page] = len(keys)
        self.dirty = set()
        floor = next(iter(self.pending.values()), seq + 1)
        while self.live and next(iter(self.live.values())) < floor:
            self.covered.append((self.live.popitem(last=False)[0], seq))
        while self.covered and self.covered[0][1] <= seq - self.settle:
            outputs.append(Output(topic, self.covered.popleft()[0], b"", partition=partition))
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
