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
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

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
