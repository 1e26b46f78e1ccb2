"""Event time across the repartition hop: watermarks that keep every worker's input partitions aligned.

The terminal stage sees a terminal's transactions in the order the repartition topic holds
them, written by every worker's customer stage as it reads its input partitions. A backlog,
a replay faster than real time, several workers starting at different moments: any of them
lets one input partition run days of event time ahead of another, and the repartition topic
then carries a terminal's transactions days out of order.

The fix is Flink's watermark alignment (FLIP-182), with Kafka Streams' rule for partitions
whose backlog is not known yet (KIP-695):

- **Watermarks travel with the data.** After every batch (and every ``MARK_EVERY_S`` while
  quiet, and after every rebalance) each worker writes, for each input partition it owns, a
  *mark* into every partition of the repartition topic: the partition's low watermark (the
  event time of the next record it will process: no record of it older than that follows, if
  the input partition is in time order) and whether it is idle. Marks are repartition records
  with an empty key, which no transaction has (terminal keys are never empty); they go in the
  batch's delivery, so under exactly-once a mark is visible only with the records before it.
- **Admission.** The customer stage processes a record of partition ``p`` at event time ``t``
  only if ``t <= floor(p) + ADMIT_MS``, where ``floor(p)`` is the lowest watermark among the
  other input partitions, heard in marks or known locally. The rest of ``p``'s batch is handed
  back (the consumer seeks to it) and read again once the others have caught up. So a record
  written to the repartition topic after one at ``t`` is no older than ``t - ADMIT_MS`` (plus
  the input's own disorder), whatever the batch size, the replay speed or the worker count.
- **Pausing.** A partition more than ``ALIGN_MS`` ahead of ``floor(p)`` is paused, so that it is
  not fetched only to be handed back. The partition holding the lowest watermark is never
  paused and its next record is always admitted: the group cannot wait on itself.
- **Idleness.** A partition that has read all it has for ``IDLE_S`` is idle and holds nobody
  (a quiet partition must not stop a live stream). One whose backlog is not known yet (not
  fetched since assignment), or one no mark was ever heard of, holds the others: the first
  for up to ``UNFETCHED_MAX_S``, the second for up to ``UNHEARD_MAX_S``, then each stops
  holding with a warning, so that one unreachable partition cannot stop the others for good.

The terminal windows keep the label delay (7 days) of grace, more than ``ADMIT_MS`` plus a day
of input disorder, so every record within that bound is placed exactly; one beyond it is
counted in ``fraud_late_events_total`` and named in the log.
"""

from __future__ import annotations

import logging
import math
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kafka import TopicPartition

from pipeline.streamfeatures import DAY_MS
from pipeline.worker.outputs import Output
from pipeline.worker.state.topology import StateTopics

log = logging.getLogger(__name__)

ALIGN_MS = 3_600_000  # a partition this far ahead of the others' lowest watermark is paused
ADMIT_MS = 3 * DAY_MS  # ... and a record further ahead than this is not processed yet
IDLE_S = 1.0  # a partition that has read all it has holds the others this long (Kafka Streams' max.task.idle.ms)
UNFETCHED_MAX_S = 30.0  # one never fetched since assignment holds them at most this long
UNHEARD_MAX_S = 30.0  # one no mark was ever heard of (no owner yet) likewise
MARK_EVERY_S = 10.0  # marks are written again this often while nothing changes

MARK_KEY = b""
_MARK = struct.Struct("<Biq?q")  # format, input partition, low watermark (ms), idle, position
_FORMAT = 1
_UNKNOWN = -(2**63)
_GAVE_UP = 2**62  # the position an idle mark carries for a partition never fetched (see UNFETCHED_MAX_S)


@dataclass(frozen=True)
class Mark:
    """An input partition's low watermark (None: not known yet), whether it is idle, and (idle) the offset its
    owner had read to: a reader that finds records past it on the broker knows it is idle no longer."""

    low: int | None
    idle: bool = False
    position: int = -1

    def encode(self, partition: int) -> bytes:
        return _MARK.pack(_FORMAT, partition, _UNKNOWN if self.low is None else self.low, self.idle, self.position)

    @staticmethod
    def decode(value: bytes) -> tuple[int, Mark]:
        if len(value) != _MARK.size or value[0] != _FORMAT:
            raise ValueError(f"not a watermark record ({len(value)} bytes)")
        _, partition, low, idle, position = _MARK.unpack(value)
        return partition, Mark(None if low == _UNKNOWN else low, idle, position)


def is_mark(record: Any) -> bool:
    return not record.key


class Watermarks:
    """This worker's view of every input partition's low watermark, and what it does with it."""

    def __init__(self, topics: StateTopics, clock: Callable[[], float] = time.monotonic) -> None:
        self.topics, self.clock = topics, clock
        self.owned: set[int] = set()
        self.stream: dict[int, int] = {}  # owned input partition -> newest event time accepted (its stream time)
        self.heads: dict[int, int] = {}  # owned input partition -> event time of the record it resumes at
        self.idle: set[int] = set()  # owned input partitions idle (read all they have for IDLE_S), or given up
        self.heard: dict[int, Mark] = {}  # input partition -> latest mark heard (or left behind by a revoke)
        self._sent: dict[int, Mark] = {}
        self._positions: dict[int, int] = {}  # owned input partition -> position when last found idle
        self._sent_at = -math.inf
        self._idle_since: dict[int, float] = {}
        self._unfetched_since: dict[int, float] = {}
        self._gave_up: set[int] = set()
        self._unheard_since: float | None = None
        self._warned_unheard: set[int] = set()

    # -- what is known ------------------------------------------------------------------
    def local(self, partition: int) -> Mark:
        low = self.heads.get(partition, self.stream.get(partition))
        if low is None and partition in self.heard:
            low = self.heard[partition].low  # the previous owner's progress: a lower bound
        idle = partition in self.idle
        if partition in self._gave_up:  # never fetched: no position to check against; the others go on too
            return Mark(low, idle, _GAVE_UP)
        return Mark(low, idle, self._positions.get(partition, -1) if idle else -1)

    def _partitions(self) -> Iterable[int]:
        return range(self.topics.partitions) if self.topics.partitions else self.owned | self.heard.keys()

    def _lows(self, batch: dict[int, int] | None = None) -> dict[int, float]:
        """Every non-idle partition's low watermark (-inf: unknown, holds everyone)."""
        now = self.clock()
        lows: dict[int, float] = {}
        for p in self._partitions():
            if batch and p in batch:
                lows[p] = batch[p]
                continue
            mark = self.local(p) if p in self.owned else self.heard.get(p)
            if mark is None:
                if self._unheard_since is None:
                    self._unheard_since = now
                if now - self._unheard_since < UNHEARD_MAX_S:
                    lows[p] = -math.inf
                elif p not in self._warned_unheard:
                    self._warned_unheard.add(p)
                    log.warning("no watermark heard of input partition %d for %.0f s (no worker owns it?); the "
                                "others go on without it (its late transactions count in "
                                "fraud_late_events_total)", p, now - self._unheard_since)
                continue
            if not mark.idle:
                lows[p] = -math.inf if mark.low is None else mark.low
        return lows

    @staticmethod
    def _floor(lows: dict[int, float], partition: int) -> float:
        return min((low for p, low in lows.items() if p != partition), default=math.inf)

    # -- the customer stage -------------------------------------------------------------
    def limits(self, first: dict[int, int]) -> dict[int, float]:
        """The latest event time each owned partition may process in this batch; ``first``: the event time of
        each partition's first record in the batch (its low watermark now). A batch never runs more than
        ADMIT_MS past its own first record either: what is known of the others may be a batch old."""
        lows = self._lows(first)
        return {p: min(self._floor(lows, p), first[p]) + ADMIT_MS for p in first}

    def confirm_idle(self, consumer: Any,
                     end_offsets: Callable[[list[TopicPartition]], dict[TopicPartition, int]] | None = None) -> None:
        """Ask the broker whether the partitions taken for idle still have nothing to read.

        A partition's high watermark as the consumer knows it comes with its last fetch: one that
        was empty when fetched (a topic filled just after the worker started, a producer that
        paused) can hold records the consumer has not heard of yet. Taken for idle, it would let
        the others run ahead of records that are already there. Called before each batch is
        admitted, for the idle ones only (one ListOffsets request, through ``end_offsets`` when given: a
        connection no long-polling fetch holds)."""
        assigned = {tp.partition for tp in consumer.assignment() if tp.topic == self.topics.input}
        mine = sorted(self.idle & self.owned & assigned - self._gave_up)  # a partition revoked since: not asked
        theirs = [p for p, mark in sorted(self.heard.items()) if mark.idle and p not in self.owned]
        if not mine and not theirs:
            return
        tps = [TopicPartition(self.topics.input, p) for p in mine + theirs]
        try:
            ends = (end_offsets or consumer.end_offsets)(tps)
        except Exception as err:  # cannot tell: hold the others rather than release them
            log.debug("could not read the end offsets of idle partitions: %s", err)
            ends = {tp: math.inf for tp in tps}
        for tp in tps:
            p, end = tp.partition, ends.get(tp, math.inf)
            if p in mine and consumer.position(tp) < end:
                self.idle.discard(p)
                self._idle_since.pop(p, None)
            elif p in theirs and self.heard[p].position < end:  # its owner has not read these yet
                self.heard[p] = Mark(self.heard[p].low, False, self.heard[p].position)

    def processed(self, partition: int, newest: int | None, resume_at: int | None) -> None:
        """A batch of ``partition`` processed up to event time ``newest``; ``resume_at``: the event time of the
        first record handed back (None: all processed)."""
        if newest is not None and newest > self.stream.get(partition, newest - 1):
            self.stream[partition] = newest
        if resume_at is None:
            self.heads.pop(partition, None)
        else:
            self.heads[partition] = resume_at

    # -- ownership ----------------------------------------------------------------------
    def forget(self, partitions: Iterable[int]) -> None:
        """Input partitions revoked: what was known of them stays as if heard (a lower bound for the new owner)."""
        for p in partitions:
            if p in self.owned:
                self.heard[p] = self.local(p)
            self.owned.discard(p)
            for table in (self.stream, self.heads, self._sent, self._idle_since, self._unfetched_since,
                          self._positions):
                table.pop(p, None)
            self.idle.discard(p)
            self._gave_up.discard(p)
        self._sent_at = -math.inf  # a new owner of a repartition partition must hear every mark again

    def hear(self, partition: int, mark: Mark) -> None:
        """A mark read from the repartition topic (this worker's own partitions: what it knows is newer)."""
        if partition in self.owned:
            return
        old = self.heard.get(partition)
        if old is not None and old.low is not None and (mark.low is None or mark.low < old.low):
            mark = Mark(old.low, mark.idle, mark.position)  # watermarks only move forward
        self.heard[partition] = mark

    # -- between batches ----------------------------------------------------------------
    def align(self, consumer: Any) -> None:
        """Note which owned partitions are idle, then pause those too far ahead and resume the others."""
        now = self.clock()
        owned = {tp.partition for tp in consumer.assignment() if tp.topic == self.topics.input}
        if owned != self.owned:
            self.forget(self.owned - owned)
            self.owned = owned
            self._sent_at = -math.inf
        for p in owned:
            tp = TopicPartition(self.topics.input, p)
            end = consumer.highwater(tp)
            if end is None:  # not fetched since assignment: how much it has is not known yet
                since = self._unfetched_since.setdefault(p, now)
                if now - since >= UNFETCHED_MAX_S and p not in self._gave_up:
                    self._gave_up.add(p)
                    log.warning("input partition %s not fetched %.0f s after assignment; the others go on "
                                "without it (its late transactions count in fraud_late_events_total)", tp,
                                now - since)
                idle = p in self._gave_up
            else:
                # fetched: its wait is over (a revoke and a reassignment within one poll, which ``owned`` does not
                # show, leave it unfetched again: a new wait starts then, not at the first assignment)
                self._unfetched_since.pop(p, None)
                if consumer.position(tp) < end or p in self.heads:  # records to read: it holds the others
                    self._idle_since.pop(p, None)
                    self._gave_up.discard(p)
                    idle = False
                else:
                    idle = now - self._idle_since.setdefault(p, now) >= IDLE_S
                    self._positions[p] = end
            if idle:
                self.idle.add(p)
            else:
                self.idle.discard(p)
        lows = self._lows()
        ahead = set()
        for p in owned:
            low = self.local(p).low
            if low is not None and low > self._floor(lows, p) + ALIGN_MS:
                ahead.add(TopicPartition(self.topics.input, p))
        paused = {tp for tp in consumer.paused() if tp.topic == self.topics.input}
        if ahead != paused:
            if paused - ahead:
                consumer.resume(*(paused - ahead))
            if ahead - paused:
                consumer.pause(*(ahead - paused))

    def marks_due(self) -> list[Output]:
        """The marks to write now: of each owned partition whose mark changed, or of all every MARK_EVERY_S."""
        if not self.topics.partitions:
            return []
        now = self.clock()
        every = now - self._sent_at >= MARK_EVERY_S
        changed = {}
        for p in sorted(self.owned):
            mark = self.local(p)
            if every or self._sent.get(p) != mark:
                changed[p] = mark
        if not changed:
            return []
        if every:
            self._sent_at = now
        self._sent.update(changed)
        return [Output(self.topics.repartition, MARK_KEY, mark.encode(p), partition=q)
                for p, mark in changed.items() for q in range(self.topics.partitions)]
