"""The one owner of the commit: a batch's outputs acknowledged (or in its transaction), then its offsets.

Each batch goes through the same sequence, whichever the processing guarantee
(:meth:`Checkpoint.commit`):

1. Its outputs (alerts, dead letters, features records; for raw input also repartition
   records, changelog records and watermark marks) are handed to the producer. Under
   exactly-once they go into one transaction with the batch's offsets
   (:mod:`~pipeline.worker.transactions`); under at-least-once they are sent on their own
   (:mod:`~pipeline.worker.delivery`), and with ``max_in_flight > 1`` the next batch is read and
   scored while they are acknowledged.
2. At-least-once: once every output of the batch and of every earlier one is acknowledged, the
   offsets are committed, oldest batch first. A commit the group refuses (it moved on) commits
   nothing: the partition's next owner reads the batch again.
3. Committed: the batch is counted (:class:`~pipeline.worker.ledger.Ledger`), raw input's stages
   release what their windows kept for a replay of it, and the rebalance listener forgets the
   rewind targets an earlier abort left.
4. Exactly-once, the transaction aborted: the raw-input stores the batch touched are restored
   before their next use, and the batch is read again where this worker still owns it.

Nothing else in the worker commits: the loop decides *when* (a batch is full, a rebalance is
coming, the worker stops) and calls :meth:`commit`, :meth:`settle` or :meth:`publish`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

from kafka import TopicPartition
from kafka.errors import KafkaError

from pipeline.worker.delivery import AtLeastOnce, Delivery, first_offsets
from pipeline.worker.ledger import Ledger
from pipeline.worker.outputs import Output
from pipeline.worker.processing import BatchOutcome


class Checkpoint:
    """Commits batches through ``delivery`` in the order of the sequence above.

    ``consumer``, ``stages`` and ``listener`` are read when needed: the worker replaces its consumer (and
    listener) when it joins the group again.
    """

    def __init__(self, delivery: Delivery, ledger: Ledger, consumer: Callable[[], Any],
                 stages: Callable[[], Any], listener: Callable[[], Any], *, exactly_once: bool) -> None:
        self.delivery, self.ledger, self.exactly_once = delivery, ledger, exactly_once
        self._consumer, self._stages, self._listener = consumer, stages, listener

    @property
    def pipelined(self) -> bool:
        return isinstance(self.delivery, AtLeastOnce) and self.delivery.max_in_flight > 1

    @property
    def in_flight(self) -> bool:
        """Batches handed to the producer whose offsets are not committed yet (pipelined at-least-once)."""
        return isinstance(self.delivery, AtLeastOnce) and bool(self.delivery.in_flight)

    def commit(self, outputs: list[Output], offsets: dict[TopicPartition, int], records: Sequence[Any],
               consumed: int, outcome: BatchOutcome) -> None:
        """Steps 1-4 for one batch: ``records`` read, ``consumed`` of them counted, ``outcome`` what scoring made
        of them, committed at ``offsets``."""
        if self.pipelined:
            self.delivery.submit(outputs, offsets,  # type: ignore[attr-defined]
                                 lambda: self._committed(consumed, outcome, offsets))
        elif self.delivery.deliver(outputs, offsets):
            self._committed(consumed, outcome, offsets)
            listener = self._listener()
            if listener is not None:
                listener.committed(set(offsets))
        elif self.exactly_once:  # the transaction was aborted
            stages = self._stages()
            if stages is not None:
                stages.discard(records)  # the aborted batch's state changes are gone with it
            self._rewind(records)

    def publish(self, outputs: list[Output]) -> None:
        """Outputs that go with no offsets (raw input's watermark marks between batches), after what is in
        flight."""
        self.settle()
        self.delivery.deliver(outputs, {})

    def settle(self, block: bool = True) -> None:
        """Commit the batches in flight whose outputs are acknowledged (``block``: wait for all of them)."""
        if self.in_flight:
            self.delivery.settle(block=block)  # type: ignore[attr-defined]

    def _committed(self, consumed: int, outcome: BatchOutcome, offsets: dict[TopicPartition, int]) -> None:
        self.ledger.committed(consumed, outcome, offsets, self._consumer())
        stages = self._stages()
        if stages is not None:
            stages.committed(offsets)

    def _rewind(self, records: Sequence[Any]) -> None:
        """After an aborted transaction: read the batch again where this worker still owns it."""
        targets = first_offsets(records)
        consumer = self._consumer()
        for tp, offset in targets.items():
            with contextlib.suppress(ValueError, KafkaError):  # no longer ours: the new owner reads it again
                consumer.seek(tp, offset)
        listener = self._listener()
        if listener is not None:  # ... unless it is ours again before anything of it is committed
            listener.rewind_on_assignment(targets)
