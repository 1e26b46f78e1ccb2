"""Labels before the transactions that need them: the terminal stage waits for its labels partition.

A fraud label and the later transactions whose terminal risk counts it reach the terminal stage
by different roads: the label straight from the labels topic, the transactions through the
customer stage and the repartition topic. A label produced first normally arrives first, but
not when the consumer's fetch of the labels partition lags behind that of the repartition
partition: its leader moved (a rolling restart), the connection to its node is backing off, or
the fetcher served other partitions first. The transaction is then scored without the label, and
the label counts in ``fraud_late_labels_total`` when it comes (seen 2026-12-07 in the cluster
chaos test under exactly-once: a terminal risk of 0 where the offline table has 1).

Kafka Streams synchronises the partitions of a task by record timestamp and waits on an empty
one whose lag is not known (KIP-695, ``max.task.idle.ms``). The terminal stage does the same with
offsets, which need no clock: before it scores the repartition records of partition ``p``, it asks
the broker for the end offset of labels partition ``p`` (one ListOffsets request per batch, for
all of them, on a connection of its own) and scores them once the consumer has read the labels
partition to that end. Every
label on the broker before its transactions were read is applied before they are scored.

- Records that wait are handed back (read again later) and their repartition partition is
  paused until the labels partition reaches the end offset asked; the records read before the
  asking are then scored without asking again, so a steady flow of labels cannot hold them for
  good.
- A labels partition that makes no progress towards that end for ``WAIT_MAX_S`` (its leader
  away, its producer's transaction left open) stops holding, with a warning, until its position
  moves again; the labels it delivers late count in ``fraud_late_labels_total``.
- A label produced *after* a transaction that needed it (a producer's retry after a leader move
  can reorder two partitions) is not on the broker when the transaction is scored: no consumer
  can wait for it. It counts in ``fraud_late_labels_total``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kafka import TopicPartition

from pipeline.worker.records import comes_before_hand_back
from pipeline.worker.state.topology import StateTopics

log = logging.getLogger(__name__)

WAIT_MAX_S = 30.0  # a labels partition that makes no progress this long stops holding its transactions


@dataclass
class _Wait:
    """Repartition records of one partition waiting for its labels partition to be read to ``target`` (None:
    the end offset could not be asked; asked again with the next batch); ``covers``: the records below this
    offset were read before the asking, so reaching ``target`` is enough for them."""

    target: int | None
    covers: int
    since: float  # when the labels partition last made progress towards the target (or the wait began)
    position: int | None


class LabelGate:
    """Which repartition records the terminal stage may score now, for the partitions this worker owns."""

    def __init__(self, topics: StateTopics, metrics: Any, clock: Callable[[], float] = time.monotonic,
                 end_offsets: Callable[[list[TopicPartition]], dict[TopicPartition, int]] | None = None) -> None:
        """``end_offsets``: how to ask the broker (None: the group consumer's ``end_offsets``; the worker asks on
        the restore consumer's connections, which no long-polling fetch holds)."""
        self.topics, self.metrics, self.clock, self.end_offsets = topics, metrics, clock, end_offsets
        self.waits: dict[int, _Wait] = {}
        self.gave_up: dict[int, int | None] = {}  # labels partition -> its position when its wait was given up

    def admit(self, consumer: Any, featured: Sequence[Any], broken: Sequence[tuple[Any, Any]]
              ) -> tuple[list[Any], list[tuple[Any, Any]], dict[TopicPartition, int]]:
        """The records to score now (and the unreadable ones to dead-letter now), and per repartition partition
        the offset handed back: the first record that waits for labels."""
        offsets: dict[int, list[int]] = {}
        for record in [*featured, *(r for r, _err in broken)]:
            offsets.setdefault(record.partition, []).append(record.offset)
        if not offsets:
            return list(featured), list(broken), {}
        assigned, now = consumer.assignment(), self.clock()
        positions = _Positions(consumer, self.topics.labels)  # each labels partition's, read once per batch
        below: dict[int, float] = {}  # per partition: its records below this offset are scored now
        ask = []
        for p, offs in offsets.items():
            if TopicPartition(self.topics.labels, p) not in assigned:  # not co-assigned (range assignment
                below[p] = math.inf  # does): no labels of it to wait for
                continue
            if p in self.gave_up:  # not waited for again until it moves
                if positions[p] == self.gave_up[p]:
                    below[p] = math.inf
                    continue
                del self.gave_up[p]
            wait = self.waits.get(p)
            if wait is not None and self._timed_out(p, wait, positions[p], now):
                below[p] = math.inf
                continue
            if wait is not None and wait.target is not None:
                if not _reached(positions[p], wait.target):
                    below[p] = -math.inf
                    continue
                below[p] = wait.covers
                del self.waits[p]
                if max(offs) < wait.covers:
                    continue
            ask.append(p)
        ends = self._ends(consumer, ask)
        for p in ask:
            end = ends.get(p)
            if end == 0 or (end is not None and _reached(positions[p], end)):  # 0: nothing to read
                below[p] = math.inf
                self.waits.pop(p, None)
                continue
            old = self.waits.get(p)
            self.waits[p] = _Wait(end, max(offsets[p]) + 1, old.since if old else now, positions[p])
            below.setdefault(p, -math.inf)
        handed_back = {}
        for p, limit in below.items():
            later = [o for o in offsets[p] if o >= limit]
            if later:
                handed_back[TopicPartition(self.topics.repartition, p)] = min(later)
        if not handed_back:
            return list(featured), list(broken), {}
        now_featured = [r for r in featured if comes_before_hand_back(r, handed_back)]
        self.metrics.held_for_labels.inc(len(featured) - len(now_featured))
        return now_featured, [(r, e) for r, e in broken if comes_before_hand_back(r, handed_back)], handed_back

    def between_batches(self, consumer: Any) -> None:
        """Pause the repartition partitions that wait for labels, resume the others; forget partitions gone."""
        assigned, now = consumer.assignment(), self.clock()
        wanted = set()
        for p, wait in list(self.waits.items()):
            labels, repartition = TopicPartition(self.topics.labels, p), TopicPartition(self.topics.repartition, p)
            if labels not in assigned or repartition not in assigned:
                del self.waits[p]
                self.gave_up.pop(p, None)
                continue
            position = _position(consumer, labels)
            if (wait.target is not None and not _reached(position, wait.target)
                    and not self._timed_out(p, wait, position, now)):
                wanted.add(repartition)
        paused = {tp for tp in consumer.paused() if tp.topic == self.topics.repartition}
        if paused - wanted:
            consumer.resume(*(paused - wanted))
        if wanted - paused:
            consumer.pause(*(wanted - paused))

    def _timed_out(self, p: int, wait: _Wait, position: int | None, now: float) -> bool:
        """Whether the labels partition (read to ``position``) made no progress for WAIT_MAX_S (then the wait is
        given up, said once)."""
        if position is not None and position != wait.position:
            wait.position, wait.since = position, now
            return False
        if now - wait.since < WAIT_MAX_S:
            return False
        del self.waits[p]
        self.gave_up[p] = position
        log.warning("labels partition %s[%d] read to offset %s made no progress towards offset %s for %.0f s; its "
                    "transactions are scored without waiting for it until it moves (labels that come later count "
                    "in fraud_late_labels_total)", self.topics.labels, p, position, wait.target, now - wait.since)
        return True

    def _ends(self, consumer: Any, partitions: list[int]) -> dict[int, int]:
        if not partitions:
            return {}
        tps = [TopicPartition(self.topics.labels, p) for p in partitions]
        try:
            ends = (self.end_offsets or consumer.end_offsets)(tps)
        except Exception as err:  # cannot tell: the records wait (asked again with the next batch)
            log.debug("could not read the end offsets of labels partitions %s: %s", partitions, err)
            return {}
        return {tp.partition: end for tp, end in ends.items() if end is not None}


class _Positions(dict):  # type: ignore[type-arg]
    """Labels partition -> the consumer's position in it (None: unknown), asked on first use only (the
    confluent driver asks the broker for a partition that has returned no record yet)."""

    def __init__(self, consumer: Any, topic: str) -> None:
        super().__init__()
        self.consumer, self.topic = consumer, topic

    def __missing__(self, partition: int) -> int | None:
        position = self[partition] = _position(self.consumer, TopicPartition(self.topic, partition))
        return position


def _reached(position: int | None, target: int) -> bool:
    return position is not None and position >= target


def _position(consumer: Any, tp: TopicPartition) -> int | None:
    try:
        return int(consumer.position(tp))
    except Exception as err:  # no position yet (being reset): unknown
        log.debug("no position for %s: %s", tp, err)
        return None
