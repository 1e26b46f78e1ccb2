"""What the worker does when partitions move: release the records in hand, never publish.

kafka-python 3 runs rebalance listeners on its IO thread while the main thread waits in
``poll()``, and refuses blocking calls there. The batch being filled holds records that
were polled but not yet scored: nothing was published for them and nothing committed. On
revocation (or loss) those records are released; the new owner reads them again from the
committed offset. Since kafka-python keeps the fetch position of a partition that is
revoked and assigned straight back (the eager protocol does that on every rebalance), the
listener seeks such a partition back to its first released record, so nothing is skipped.
Seeking only sets the position: it does not block.

An exception in a listener is kept and raised by the worker's main loop; it is never dropped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from kafka import AsyncConsumerRebalanceListener, TopicPartition

from pipeline.worker.delivery import first_offsets

log = logging.getLogger(__name__)


class PendingRecords:
    """The records of the batch being filled, shared by the main loop and the listener."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.records: list[Any] = []

    def extend(self, records: list[Any]) -> None:
        with self._lock:
            self.records.extend(records)

    def take(self) -> list[Any]:
        with self._lock:
            records, self.records = self.records, []
        return records

    def __len__(self) -> int:
        return len(self.records)

    def release(self, partitions: set[TopicPartition]) -> tuple[dict[TopicPartition, int], int]:
        """Drop the records of ``partitions``: the first offset dropped per partition, and how many."""
        with self._lock:
            dropped = [r for r in self.records if TopicPartition(r.topic, r.partition) in partitions]
            if dropped:
                self.records = [r for r in self.records if TopicPartition(r.topic, r.partition) not in partitions]
        return first_offsets(dropped), len(dropped)


class ReleaseOnRevoke(AsyncConsumerRebalanceListener):
    """Releases pending records of partitions that move; rewinds partitions that come back."""

    def __init__(self, pending: PendingRecords, consumer: Callable[[], Any], fail: Callable[[BaseException], None],
                 forget: Callable[[set[TopicPartition]], None], joined: threading.Event | None = None) -> None:
        self.pending, self.consumer, self.fail, self.forget = pending, consumer, fail, forget
        # set while the member holds a settled assignment (even an empty one), clear from a revoke until the
        # next assignment: the worker's idle clock runs only while it is set
        self.joined = joined or threading.Event()
        self.rewind: dict[TopicPartition, int] = {}

    def rewind_on_assignment(self, offsets: dict[TopicPartition, int]) -> None:
        """After an aborted transaction: if these partitions come back before they are committed again, read them
        from here. The worker seeks at once too, but a partition the group has just taken away (the seek is
        refused) and then gives straight back keeps kafka-python's position past the aborted batch: with the
        group coordinator's node paused 30 s on a cluster, 17 aborted batches (600 records) were skipped so."""
        for tp, offset in offsets.items():
            self.rewind[tp] = min(self.rewind.get(tp, offset), offset)

    def committed(self, partitions: set[TopicPartition]) -> None:
        """Offsets of ``partitions`` were committed: whatever was aborted before is settled."""
        for tp in partitions:
            self.rewind.pop(tp, None)

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.joined.clear()  # a rebalance has begun
        self._release(set(revoked), "revoked")

    async def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        self._release(set(lost), "lost")

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        try:
            log.info("partitions assigned: %s", sorted(assigned))
            self.joined.set()
            consumer = self.consumer()
            for tp in set(assigned) & self.rewind.keys():
                consumer.seek(tp, self.rewind[tp])  # kafka-python kept its position past the released records
            self.rewind.clear()
        except Exception as err:
            self.fail(err)

    def _release(self, partitions: set[TopicPartition], how: str) -> None:
        try:
            self.forget(partitions)
            released, count = self.pending.release(partitions)
            for tp, offset in released.items():
                self.rewind[tp] = min(self.rewind.get(tp, offset), offset)
            log.info("partitions %s %s%s", sorted(partitions), how,
                     f": released {count} unscored records to the next owner" if count else "")
        except Exception as err:
            self.fail(err)
