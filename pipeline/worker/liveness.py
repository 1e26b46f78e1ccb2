"""Noticing a worker that makes no progress, and what the consumer group looks like meanwhile.

Two signals, both in metrics and logs:

- ``fraud_loop_heartbeat_timestamp_seconds``: set on every turn of the main loop (idle
  turns included). A stale value means the loop is stuck, for example retrying a broker
  that is away; ``fraud_errors_total`` says which retry.
- A member that has owned no partition for ``stall_timeout_s`` while some input partition is
  owned by no member of its group (seen once: a start right after the topic was created, the
  member believing it had joined with nothing to do) is stalled. It leaves and joins again
  (a new consumer), counted as ``fraud_errors_total{kind="stalled"}``. A member idle because
  its group has more members than partitions is not stalled, and is left alone. Partitions the
  group lists for this very member while its consumer holds none count as unowned: kafka-python
  3.0.12 can drop the result of a join that finishes while a short poll times out, and the
  member then logs an empty assignment that the group does not know about.
- An assigned partition that is not paused, has records to read, and whose position did not
  move for ``FETCH_STALL_S`` is not being fetched: the client holds it paused without saying
  so (librdkafka keeps a pause through a revoke and a reassignment; the terminal stage stopped
  reading a repartition partition for good that way in a cluster chaos run, 2026-12-07). A
  WARNING names it, ``fraud_errors_total{kind="fetch_stalled"}`` counts it, and it is resumed.
  A broker away (its end offsets cannot be read) or a main loop held up starts every wait again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from kafka import TopicPartition
from kafka.errors import KafkaError

log = logging.getLogger(__name__)


class StallWatchdog:
    """Says when an unassigned member should rejoin: unassigned for too long, and partitions unowned."""

    def __init__(self, timeout_s: float, unowned: Callable[[], int], clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.timeout_s, self.unowned, self.clock = timeout_s, unowned, clock
        self._since: float | None = clock()

    def check(self, assigned: int) -> bool:
        """True when the member should leave and join again (and the clock restarts)."""
        now = self.clock()
        if assigned or self.timeout_s <= 0:
            self._since = None
            return False
        if self._since is None:
            self._since = now
            return False
        if now - self._since < self.timeout_s:
            return False
        self._since = now  # look again only after another timeout
        missing = self.unowned()
        if missing <= 0:
            return False
        log.warning("no partition assigned for %.0fs while %d input partitions have no owner in the group; "
                    "joining again", self.timeout_s, missing)
        return True


FETCH_STALL_S = 120.0  # an unpaused partition with records to read, its position still: not being fetched


class FetchWatchdog:
    """Finds assigned, unpaused partitions with records to read whose position has not moved for ``timeout_s``
    (looked at every ``timeout_s / 4``; the end offsets are asked only of partitions that did not move)."""

    def __init__(self, timeout_s: float = FETCH_STALL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s, self.clock = timeout_s, clock
        self._seen: dict[TopicPartition, tuple[int, float]] = {}  # position, and since when
        self._looked = clock()

    def check(self, consumer: Any) -> list[TopicPartition]:
        """The partitions found not fetched (each said once per ``timeout_s``; the caller resumes them)."""
        now = self.clock()
        if self.timeout_s <= 0 or now - self._looked < self.timeout_s / 4:
            return []
        if now - self._looked > self.timeout_s / 2:  # the loop itself stood still (the heartbeat says so): not
            self._seen.clear()  # the client's doing; every wait starts again
        self._looked = now
        watched = consumer.assignment() - consumer.paused()
        self._seen = {tp: seen for tp, seen in self._seen.items() if tp in watched}
        still = []
        try:
            for tp in sorted(watched):
                position = consumer.position(tp)
                seen = self._seen.get(tp)
                if seen is None or seen[0] != position:
                    self._seen[tp] = (position, now)
                elif now - seen[1] >= self.timeout_s:
                    still.append(tp)
            ends = consumer.end_offsets(still) if still else {}
        except KafkaError as err:  # a broker away: nothing is fetched then, and the loop's own retries say so;
            log.debug("could not look at the fetch positions: %s", err)  # the waits start again once it is back
            self._seen.clear()
            return []
        stalled = []
        for tp in still:
            position, since = self._seen[tp]
            if (ends.get(tp) or 0) > position:
                log.warning("partition %s[%d] has %d records to read from offset %d but nothing was fetched from "
                            "it for %.0fs while it is not paused; resuming it", tp.topic, tp.partition,
                            ends[tp] - position, position, now - since)
                stalled.append(tp)
            self._seen[tp] = (position, now)
        return stalled


def unowned_partitions(admin: Any, group: str, topic: str, me: str | None = None) -> int:
    """How many partitions of ``topic`` no member of ``group`` owns (kafka-python 3 admin shapes); those
    the group gives the member whose client id is ``me`` (one that holds none) count as unowned."""
    partitions = {p["partition_index"] for p in admin.describe_topics([topic])[0].get("partitions") or []}
    owned: set[int] = set()
    for member in (admin.describe_groups([group]).get(group) or {}).get("members") or []:
        if me is not None and member.get("client_id") == me:
            continue
        assignment = member.get("member_assignment") or {}
        for assigned in assignment.get("assigned_partitions") or []:
            if assigned.get("topic") == topic:
                owned.update(assigned.get("partitions") or [])
    return len(partitions - owned)
