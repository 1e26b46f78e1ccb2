"""The two stateful stages of raw input, for the partitions this worker owns.

The customer stage reads raw transactions (keyed by customer), adds the calendar and customer
features and writes each to the repartition topic keyed by terminal; the terminal stage reads
the repartition topic and the labels topic, adds the terminal features, and hands each record
to scoring. Both run in one worker; N workers share them by partition. Event time across the
hop is kept in order by :mod:`~pipeline.worker.state.eventtime`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kafka import TopicPartition

from pipeline.schema import ID_FIELD, RecordError, Transaction, decode, encode, format_event_time
from pipeline.streamfeatures import (
    CALENDAR_FEATURES,
    CUSTOMER_FEATURES,
    DAY_MS,
    EVENT,
    TERMINAL_FEATURES,
    CustomerWindows,
    DuplicateConflict,
    TerminalWindows,
    calendar,
    event_id,
)
from pipeline.streamfeatures import LABEL as LABEL_CHANGE
from pipeline.worker.outputs import Output, processing_error
from pipeline.worker.records import comes_before_hand_back
from pipeline.worker.state.decisions import (
    ALERTED,
    DECIDED,
    GRACE_MS,
    RESOLVE_EVERY_MS,
    RESOLVED,
    Decisions,
    decision_key,
    split_key,
)
from pipeline.worker.state.eventtime import ADMIT_MS, Mark, Watermarks, is_mark
from pipeline.worker.state.fields import CUSTOMER, LABEL, TERMINAL, Bounds, entity_key, fraud_label
from pipeline.worker.state.hop import is_packed, pack, packed_count, unpack
from pipeline.worker.state.labelgate import LabelGate
from pipeline.worker.state.store import Restorer, Store
from pipeline.worker.state.topology import StateTopics

log = logging.getLogger(__name__)

SWEEP_EVERY_MS = DAY_MS  # a store drops its idle entities each time its stream time has moved this far
LATE_LOG_EVERY_S = 60.0
_CUSTOMER_STAGE_FEATURES = (*CALENDAR_FEATURES, *CUSTOMER_FEATURES)
UNCOMMITTED_WARN = 1_000  # batches of one partition staged and not committed: said once, in a WARNING


@dataclass
class Staged:
    """What the customer and label stages made of a batch: repartition records, the records that failed, and
    per input partition the offset handed back (read again later: too far ahead in event time)."""

    outputs: list[Output]
    failed: list[tuple[Any, RecordError]]
    handed_back: dict[TopicPartition, int] = field(default_factory=dict)
    awaiting_commit: bool = False  # some were handed back until earlier batches of their partition are committed


@dataclass
class Resolved:
    """Decisions of one model version whose labels are due: fraud or genuine, with their score ratios."""

    version: str
    ratios: array
    alerted: array
    fraud: list[bool]


def before_hand_back(records: Iterable[Any], handed_back: dict[TopicPartition, int]) -> list[Any]:
    """The records of ``records`` that come before their partition's hand-back (all, where none)."""
    return [r for r in records if comes_before_hand_back(r, handed_back)]


def _floats(values: Sequence[Any]) -> list[Any]:
    """Python numbers of an array (a NumPy scalar costs each comparison and each store into an ``array``)."""
    tolist = getattr(values, "tolist", None)
    return tolist() if tolist is not None else list(values)


class FeatureStages:
    """The two stateful stages and their stores, for the partitions this worker owns."""

    def __init__(self, topics: StateTopics, delay_days: int, restorer: Restorer, metrics: Any,
                 max_record_bytes: int, stop: threading.Event, bounds: Bounds | None = None,
                 wall: Callable[[], float] = time.time, clock: Callable[[], float] = time.monotonic,
                 end_offsets: Callable[[list[TopicPartition]], dict[TopicPartition, int]] | None = None,
                 settle_batches: int = 1, grace_ms: int = GRACE_MS) -> None:
        """``end_offsets``: how to ask the broker for end offsets off the group consumer's connections (the
        restorer's); None: the group consumer's own ``end_offsets``. ``settle_batches``: how many batches after
        its own a batch's outputs are surely acknowledged (at-least-once: ``max_in_flight``; see ``Store``).
        ``grace_ms``: how long past the label delay a decision waits for its label (``decisions``)."""
        self.topics, self.restorer, self.metrics = topics, restorer, metrics
        self.settle_batches, self.grace_ms = settle_batches, grace_ms
        self.delay_ms, self.max_record_bytes, self.stop = delay_days * DAY_MS, max_record_bytes, stop
        self.bounds = bounds or Bounds()
        self.wall, self.clock = wall, clock
        self.watermarks = Watermarks(topics, clock)
        self.gate = LabelGate(topics, metrics, clock, end_offsets)  # the terminal stage reads its labels first
        self._end_offsets = end_offsets
        self.customers: dict[int, Store[CustomerWindows]] = {}
        self.terminals: dict[int, Store[TerminalWindows]] = {}
        self.decisions: dict[int, Store[Decisions]] = {}  # the terminal stage's, awaiting their labels
        self.resolved: list[Resolved] = []  # decisions resolved since the last ``take_resolved``
        self.resolved_until: dict[int, int] = {}  # repartition partition -> event time resolved up to
        self.terminal_times: dict[int, int] = {}  # repartition partition -> newest event time enriched there
        self._terminal_horizon_ms = TerminalWindows(self.delay_ms).horizon_ms
        self._lock = threading.Lock()
        self._stale: set[int] = set()  # partitions whose stores must be restored again (revoked meanwhile)
        # Replays. Per consumed partition: the batches staged and not yet committed (offset after, oldest event
        # time processed), and the oldest event time any of them (or the batch being staged) processed. No
        # window evicts what an event at that time needs: it may be read again (see ``committed``).
        self._uncommitted: dict[TopicPartition, deque[tuple[int, int]]] = {}
        self._oldest: dict[TopicPartition, int] = {}
        self._batch_oldest: dict[TopicPartition, int] = {}
        self.late_events = 0  # as fraud_late_events_total counts them, for the end-of-run summary
        self.late_labels = 0  # as fraud_late_labels_total counts them
        self._late_since_log = 0
        self._late_example = ""
        self._late_logged_at = clock()
        self._late_label_logged_at = -LATE_LOG_EVERY_S

    # -- ownership ----------------------------------------------------------------------
    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Partitions revoked or lost (may run on the consumer's IO thread): restore them if they come back."""
        with self._lock:
            self._stale.update(tp.partition for tp in partitions if tp.topic in self.topics.consumed)

    def discard(self, records: Sequence[Any]) -> None:
        """After an aborted transaction: the stores the batch touched are restored before their next use, and
        what the batch taught of its input partitions' event time is forgotten."""
        touched = {TopicPartition(r.topic, r.partition) for r in records}
        self.forget(touched)
        for tp in touched:
            if tp.topic == self.topics.input:
                self.watermarks.stream.pop(tp.partition, None)
                self.watermarks.heads.pop(tp.partition, None)

    def sync(self, assigned: set[TopicPartition]) -> None:
        """Restore the stores of newly assigned (or stale) partitions; drop those of partitions gone."""
        with self._lock:
            stale, self._stale = self._stale, set()
        customer_parts = {tp.partition for tp in assigned if tp.topic == self.topics.input}
        terminal_parts = {tp.partition for tp in assigned if tp.topic in (self.topics.repartition,
                                                                          self.topics.labels)}
        kinds: list[tuple[dict[int, Store[Any]], set[int], str, str, Callable[[], Any], Any]] = [
            (self.customers, customer_parts, self.topics.customer_changelog, "customer", CustomerWindows,
             CustomerWindows),
            (self.terminals, terminal_parts, self.topics.terminal_changelog, "terminal",
             lambda: TerminalWindows(self.delay_ms), TerminalWindows)]
        if self.topics.decisions_changelog:
            kinds.append((self.decisions, terminal_parts, self.topics.decisions_changelog, "decisions", Decisions,
                          Decisions))
        for stores, owned, topic, name, factory, cls in kinds:
            for partition in [p for p in stores if p not in owned or p in stale]:
                del stores[partition]
                if name == "customer":
                    self._release(TopicPartition(self.topics.input, partition))
                elif name == "terminal":
                    self._release(TopicPartition(self.topics.repartition, partition))
                    self.terminal_times.pop(partition, None)
                elif self.resolved_until.pop(partition, None) is not None:
                    with contextlib.suppress(KeyError):
                        self.metrics.quality_resolved_until.remove(str(partition))
            for partition in sorted(owned - stores.keys()):
                store: Store[Any] = Store(factory, cls.from_bytes, cls.merge, self.settle_batches)
                started = time.monotonic()
                count = self.restorer.restore(topic, partition, store, self.stop)
                seconds = time.monotonic() - started
                stores[partition] = store
                if name == "customer":  # the stream time the bounds check against, until records move it
                    newest = max((n for w in store.entities.values() if (n := w.newest) is not None), default=None)
                    if newest is not None:
                        self.watermarks.stream.setdefault(partition, newest)
                self.metrics.state_restored.labels(name).inc(count)
                self.metrics.state_restore_seconds.labels(name).inc(seconds)
                log.info("restored %s store %d: %d keys from %d changelog records in %.2fs", name, partition,
                         len(store.entities), count, seconds)
            self.metrics.state_entities.labels(name).set(sum(len(s.entities) for s in stores.values()))

    # -- replays ------------------------------------------------------------------------
    def _hold(self, tp: TopicPartition, t: int) -> int:
        """An event at ``t`` of ``tp`` is processed: the oldest event time of ``tp`` that may be read again."""
        if t < self._batch_oldest.get(tp, t + 1):
            self._batch_oldest[tp] = t
        oldest = self._oldest.get(tp)
        if oldest is None or t < oldest:
            self._oldest[tp] = oldest = t
        return oldest

    def staged(self, offsets: dict[TopicPartition, int]) -> None:
        """The batch just staged will be committed at ``offsets``: until then, its events may be read again.

        At-least-once commits after the outputs are acknowledged, and batches are pipelined: when a
        commit is refused (the group moved on), the partition's next owner reads the batch again
        from a state restored from changelogs that already hold later batches. Every window keeps
        what the oldest uncommitted event needs, so the replay is scored as the first reading was.
        """
        for tp, oldest in self._batch_oldest.items():
            batches = self._uncommitted.setdefault(tp, deque())
            batches.append((offsets.get(tp, 1 << 62), oldest))
            if len(batches) == UNCOMMITTED_WARN:  # more than any pipeline holds: commits stopped reaching here
                log.warning("%s[%d]: %d batches staged and none committed; windows keep every event since %s "
                            "until a commit or a rebalance releases them", tp.topic, tp.partition, len(batches),
                            format_event_time(self._oldest[tp]))
        self._batch_oldest = {}

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        """``offsets`` are committed: what came before them will not be read again."""
        for tp, offset in offsets.items():
            batches = self._uncommitted.get(tp)
            if not batches:
                continue
            while batches and batches[0][0] <= offset:
                batches.popleft()
            if batches:
                self._oldest[tp] = min(t for _end, t in batches)
            else:
                del self._uncommitted[tp]
                self._oldest.pop(tp, None)

    def _release(self, tp: TopicPartition) -> None:
        """A store dropped (revoked, or to be restored): its partition starts again from its commit."""
        self._uncommitted.pop(tp, None)
        self._oldest.pop(tp, None)
        self._batch_oldest.pop(tp, None)

    # -- the stages ---------------------------------------------------------------------
    def activity(self, tp: TopicPartition, records: Sequence[Any]) -> int:
        """How many transactions ``records`` carry (watermark marks none: a quiet stream stays quiet)."""
        if tp.topic != self.topics.repartition:
            return len(records)
        return sum(packed_count(r.value) if is_packed(r) else 1 for r in records if not is_mark(r))

    def split(self, records: Sequence[Any]) -> tuple[list[Any], list[Any], list[Any], list[tuple[Any, RecordError]]]:
        """The batch's raw input records, its label records, its records to score (repartitioned, packed ones
        read as one record per transaction), and the repartition records that cannot be read (dead-lettered).
        Watermark marks are taken in here."""
        raw, labels, featured, broken = [], [], [], []
        for record in records:
            if record.topic == self.topics.input:
                raw.append(record)
            elif record.topic == self.topics.labels:
                labels.append(record)
            elif is_mark(record):
                self._hear(record)
            elif is_packed(record):
                try:
                    featured += unpack(record)
                except ValueError as err:
                    broken.append((record, RecordError("corrupt_record", None, str(err))))
            else:
                featured.append(record)
        return raw, labels, featured, broken

    def _hear(self, record: Any) -> None:
        try:
            partition, mark = Mark.decode(record.value or b"")
        except ValueError as err:
            log.warning("%s[%d]@%d: %s; ignored", record.topic, record.partition, record.offset, err)
            return
        self.watermarks.hear(partition, mark)

    def stage(self, raw: Sequence[Any], labels: Sequence[Any]) -> Staged:
        """Customer stage on raw records (repartition records out) and label records into terminal state.

        A partition's records are processed in offset order up to the first one further ahead in
        event time than the other partitions allow (``Watermarks.limits``), or more than
        ``ADMIT_MS`` past the oldest event of its earlier batches not committed yet; that one and the rest
        are handed back, to be read again.

        The second bound is for replays. Batches are pipelined under at-least-once, and a refused
        commit has the partition's next owner read every uncommitted batch again: the customer
        stage writes their transactions to the repartition topic a second time, behind what the
        terminal stage has read since. The terminal windows keep the label delay (7 days) of
        grace: ``ADMIT_MS`` (other partitions ahead) plus at most ``ADMIT_MS`` of uncommitted
        batches plus a day of disorder fits, so the copies are scored as the first reading was.
        Without it, four batches in flight of a backlog spanned up to 12 days (found 2026-12-07 by
        the property test: a copy's terminal 30-day count 83, not 90).
        """
        out = Staged([], [])
        now_ms = int(self.wall() * 1000)
        marks = self.watermarks
        by_partition: dict[int, list[tuple[Any, Transaction | RecordError]]] = {}
        for record in raw:
            by_partition.setdefault(record.partition, []).append((record, self._decode(record)))
        first = {}
        for p, items in by_partition.items():
            for _record, tx in items:
                if isinstance(tx, Transaction) and self.bounds.event_time(
                        tx.event_time_ms, marks.stream.get(p), now_ms) is None:
                    first[p] = tx.event_time_ms
                    break
        limits = marks.limits(first)
        by_commit = set()
        for p, limit in limits.items():  # and never more than ADMIT_MS past the oldest uncommitted event either
            batches = self._uncommitted.get(TopicPartition(self.topics.input, p))
            oldest = min(t for _end, t in batches) if batches else None
            if oldest is not None and oldest + ADMIT_MS < limit:
                limits[p] = oldest + ADMIT_MS
                by_commit.add(p)
        for p, items in by_partition.items():
            limit = limits.get(p)
            resume_at = None
            for i, (record, tx) in enumerate(items):
                if isinstance(tx, Transaction):
                    t = tx.event_time_ms
                    result = self.bounds.event_time(t, marks.stream.get(p), now_ms)
                    if result is None and limit is not None and t > limit:
                        out.handed_back[TopicPartition(record.topic, p)] = record.offset
                        out.awaiting_commit |= p in by_commit
                        self.metrics.handed_back.inc(len(items) - i)
                        resume_at = t
                        break
                    if result is None:
                        result = self._step(record, tx, self._customer)
                        if not isinstance(result, RecordError) and t > marks.stream.get(p, t - 1):
                            marks.stream[p] = t
                else:
                    result = tx
                self._collect(record, result, out)
            marks.processed(p, None, resume_at)
        for record in labels:
            tx = self._decode(record)
            self._collect(record, tx if isinstance(tx, RecordError) else self._step(record, tx, self._label), out)
        if out.outputs:  # the transactions for the terminal stage, packed (see ``hop``)
            out.outputs = pack(self.topics.repartition, self.topics.partitions,
                               [(o.key or b"", o.value or b"") for o in out.outputs])
        return out

    def _decode(self, record: Any) -> Transaction | RecordError:
        try:
            return decode(record.value, self.max_record_bytes)
        except Exception as err:  # one record's failure never stops the batch
            return processing_error("features", err)

    @staticmethod
    def _step(record: Any, tx: Transaction, step: Callable[[Any, Transaction], Output | RecordError | None]
              ) -> Output | RecordError | None:
        try:
            return step(record, tx)
        except DuplicateConflict as err:
            return RecordError("duplicate_conflict", ID_FIELD, str(err))
        except Exception as err:  # one record's failure never stops the batch
            return processing_error("features", err)

    @staticmethod
    def _collect(record: Any, result: Output | RecordError | None, out: Staged) -> None:
        if isinstance(result, RecordError):
            out.failed.append((record, result))
        elif result is not None:
            out.outputs.append(result)

    def _customer(self, record: Any, tx: Transaction) -> Output | RecordError:
        fields = tx.fields
        customer, terminal, amount = (entity_key(fields, CUSTOMER), entity_key(fields, TERMINAL),
                                      self.bounds.amount(fields))
        for checked in (customer, terminal, amount):
            if isinstance(checked, RecordError):
                return checked
        assert isinstance(customer, str) and isinstance(terminal, str) and isinstance(amount, float)
        store = self.customers[record.partition]
        windows = store.entities.get(customer) or store.factory()
        t, eid = tx.event_time_ms, event_id(tx.transaction_id)
        floor = self._hold(TopicPartition(record.topic, record.partition), t)
        derived = (*calendar(t), *windows.update(eid, t, amount, floor))
        if windows.last_new:  # only once the update succeeded, and only what it kept (a replay changes nothing)
            store.change(customer, windows, EVENT, eid, t, amount)
        out = dict(fields)
        out.update(zip(_CUSTOMER_STAGE_FEATURES, derived, strict=True))
        value = encode(out)
        return Output(self.topics.repartition, terminal.encode(), value)

    def _label(self, record: Any, tx: Transaction) -> RecordError | None:
        terminal = entity_key(tx.fields, TERMINAL)
        if isinstance(terminal, RecordError):
            return terminal
        fraud = fraud_label(tx.fields.get(LABEL))
        if fraud is None:
            return RecordError("bad_type", LABEL, f"a label must be 0 or 1, got {tx.fields.get(LABEL)!r}")
        stale = self.bounds.event_time(tx.event_time_ms, None, int(self.wall() * 1000))
        if stale is not None:
            return stale
        store = self.terminals[record.partition]
        windows = store.entities.get(terminal) or store.factory()
        eid, t = event_id(tx.transaction_id), tx.event_time_ms
        newest = windows.newest
        if (newest is not None and self.delay_ms <= newest - t < self._terminal_horizon_ms - self.delay_ms
                and fraud != (eid in windows.frauds) and windows.locate(eid, t) >= 0):
            self._late_label(tx, terminal, newest)  # a window already scored should have known it
        windows.label(eid, t, fraud)
        store.change(terminal, windows, LABEL_CHANGE, eid, t, float(fraud))
        return None

    def _late_label(self, tx: Transaction, terminal: str, newest: int) -> None:
        self.metrics.late_labels.inc()
        self.late_labels += 1
        now = self.clock()
        if now - self._late_label_logged_at >= LATE_LOG_EVERY_S or self.late_labels == 1:
            self._late_label_logged_at = now
            log.warning("%d fraud labels so far reached the terminal stage after a transaction whose terminal risk "
                        "should have counted them was scored, e.g. the label of transaction %s at %s on terminal %s, "
                        "%.1f days before the terminal's newest transaction (labels due at the label delay race "
                        "the transactions of that moment)", self.late_labels, tx.transaction_id,
                        format_event_time(tx.event_time_ms), terminal, (newest - tx.event_time_ms) / DAY_MS)

    def enrich(self, record: Any, tx: Transaction) -> RecordError | None:
        """Terminal stage, per record to score: add the terminal features to its fields."""
        terminal = entity_key(tx.fields, TERMINAL)
        if isinstance(terminal, RecordError):
            return terminal
        store = self.terminals[record.partition]
        windows = store.entities.get(terminal) or store.factory()
        t, eid = tx.event_time_ms, event_id(tx.transaction_id)
        newest = windows.newest
        try:
            derived = windows.update(eid, t, self._hold(TopicPartition(record.topic, record.partition), t))
        except DuplicateConflict as err:
            return RecordError("duplicate_conflict", ID_FIELD, str(err))
        if windows.last_new:
            store.change(terminal, windows, EVENT, eid, t, 0.0)
        if newest is not None and newest - t >= self.delay_ms and (windows.last_new or t <= newest -
                                                                   windows.horizon_ms):
            self._late(tx, terminal, newest)
        if t > self.terminal_times.get(record.partition, t - 1):
            self.terminal_times[record.partition] = t
        tx.fields.update(zip(TERMINAL_FEATURES, derived, strict=True))
        return None

    def _late(self, tx: Transaction, terminal: str, newest: int) -> None:
        """A transaction a window scored earlier should have counted: count it, and say so once a minute."""
        self.metrics.late_events.inc()
        self.late_events += 1
        self._late_since_log += 1
        if not self._late_example:
            self._late_example = (f"transaction {tx.transaction_id} at {format_event_time(tx.event_time_ms)} on "
                                  f"terminal {terminal}, {(newest - tx.event_time_ms) / DAY_MS:.1f} days behind "
                                  "the terminal's newest")
        now = self.clock()
        if now - self._late_logged_at >= LATE_LOG_EVERY_S or self.late_events == 1:
            log.warning("%d transactions reached the terminal stage later than the label delay (%d days) allows "
                        "in the last %.0f s, e.g. %s: features scored before them miss them (input partitions "
                        "out of event-time order beyond what alignment bounds)", self._late_since_log,
                        self.delay_ms // DAY_MS, now - self._late_logged_at, self._late_example)
            self._late_since_log, self._late_example, self._late_logged_at = 0, "", now

    def confirm_idle(self, consumer: Any) -> None:
        """Before a batch is admitted: partitions taken for idle that have records after all hold again."""
        self.watermarks.confirm_idle(consumer, self._end_offsets)

    def align(self, consumer: Any) -> None:
        """Between batches: keep this worker's input partitions aligned in event time with every other
        (``eventtime``), and pause the repartition partitions that wait for labels (``labelgate``)."""
        self.watermarks.align(consumer)
        self.gate.between_batches(consumer)

    def changelog(self) -> list[Output]:
        """The changelog records of every key the batch changed (tombstones for idle entities swept away), to each
        store's own partition, and the watermark marks due."""
        self._sweep()
        self._resolve()
        outputs = []
        for stores, topic in ((self.customers, self.topics.customer_changelog),
                              (self.terminals, self.topics.terminal_changelog),
                              (self.decisions, self.topics.decisions_changelog)):
            for partition, store in stores.items():
                outputs += store.flush(topic, partition)
        return outputs + self.watermarks.marks_due()

    # -- online quality ------------------------------------------------------------------
    def decide(self, scored: Sequence[tuple[Any, Any]], ratios: Sequence[float], alerted: Sequence[bool],
               version: str) -> None:
        """The terminal stage's records just scored (record, transaction), their score ratios and alerts: kept
        until their labels are due (``decisions``)."""
        if not self.decisions:
            return
        prefix = decision_key(version, "")
        repartition, stores, change = self.topics.repartition, self.decisions, Store.change
        for (record, tx), ratio, alert in zip(scored, _floats(ratios), _floats(alerted), strict=True):
            store = stores.get(record.partition) if record.topic == repartition else None
            terminal = tx.fields.get(TERMINAL) if store is not None else None
            if terminal is None or ratio != ratio:  # NaN: a challenger that could not score this row
                continue
            key = prefix + str(terminal)
            held = store.entities.get(key) or Decisions()
            eid, t = event_id(tx.transaction_id), tx.event_time_ms
            if held.decide(eid, t, ratio, alert):
                change(store, key, held, ALERTED if alert else DECIDED, eid, t, ratio)

    def _resolve(self) -> None:
        """Resolve the decisions whose labels are due (their event time the label delay plus ``grace_ms`` behind
        the partition's stream time, and never one that may be read again): fraud when a fraud label reached the
        terminal's windows, genuine otherwise. Each partition once per ``RESOLVE_EVERY_MS`` of its stream time."""
        for partition, store in self.decisions.items():
            now = self.terminal_times.get(partition)
            if now is None or (store.swept_at is not None and now - store.swept_at < RESOLVE_EVERY_MS):
                continue
            store.swept_at = now
            oldest = self._oldest.get(TopicPartition(self.topics.repartition, partition))
            cutoff = min(now, oldest if oldest is not None else now) - self.delay_ms - self.grace_ms
            if cutoff <= self.resolved_until.get(partition, cutoff - 1):
                continue
            windows = self.terminals[partition].entities
            by_version: dict[str, Resolved] = {}  # one per version: the ledger counts each in one go
            for key, held in list(store.entities.items()):
                if not held.times or held.times[0] > cutoff:
                    continue
                eids, ratios, alerted = held.resolve(cutoff)
                version, terminal = split_key(key)
                frauds = state.frauds if (state := windows.get(terminal)) is not None else {}
                part = by_version.get(version)
                if part is None:
                    part = by_version[version] = Resolved(version, array("d"), array("B"), [])
                part.ratios.extend(ratios)
                part.alerted.extend(alerted)
                part.fraud.extend([eid in frauds for eid in eids] if frauds else [False] * len(eids))
                if held.times:
                    store.change(key, held, RESOLVED, 0, cutoff, 0.0)
                else:
                    del store.entities[key]
                    store.dirty.add(key)
            self.resolved += by_version.values()
            self.resolved_until[partition] = cutoff
            self.metrics.quality_resolved_until.labels(str(partition)).set(cutoff / 1000)
            self.metrics.state_entities.labels("decisions").set(sum(len(s.entities) for s in self.decisions.values()))

    def take_resolved(self) -> list[Resolved]:
        """The decisions resolved since the last call (counted once their batch is committed)."""
        resolved, self.resolved = self.resolved, []
        return resolved

    def _sweep(self) -> None:
        for name, stores, times, horizon, topic in (
            ("customer", self.customers, self.watermarks.stream, CustomerWindows.HORIZON_MS, self.topics.input),
            ("terminal", self.terminals, self.terminal_times, self._terminal_horizon_ms, self.topics.repartition),
        ):
            for partition, store in stores.items():
                now = times.get(partition)
                if now is None or (store.swept_at is not None and now - store.swept_at < SWEEP_EVERY_MS):
                    continue
                store.swept_at = now
                oldest = self._oldest.get(TopicPartition(topic, partition))  # what may be read again stays
                # the margin: the bounds let a stream time run up to max_ahead_ms ahead of the true one
                removed = store.sweep(min(now, oldest if oldest is not None else now) - horizon
                                      - self.bounds.max_ahead_ms)
                if removed:
                    self.metrics.state_swept.labels(name).inc(removed)
                    self.metrics.state_entities.labels(name).set(sum(len(s.entities) for s in stores.values()))
