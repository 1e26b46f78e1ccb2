"""The kafka-python driver (kafka-python 3.0.12; ``pyproject.toml`` pins ``>=3.0.12,<3.1``).

kafka-python's consumer and producer are the interface already (see the package). What this
driver adds, each a workaround for 3.0.12 with the test that fails without it:

- **a join that outlives its poll** is awaited by the next one (``KafkaPythonConsumer``'s
  docstring; found in the benchmark and once in CI);
- **a resumed partition left parked** in the fetcher is put back (``_unpark_resumed``);
- **records it cannot parse** become unreadable records (below).

Records it cannot parse. Some records are legal on the wire but refused by kafka-python's
parser inside ``poll()``: a header key that is not UTF-8 (any producer can send one; ``kcat -H``
does) raises ``CorruptRecordError``, with no partition or offset in the error, on every poll
and after every restart. Left alone, that one record stops its partition for good. Like Java's
client, kafka-python returns the records before the bad one and raises on the bad one at the
next poll. The frames of that exception still hold where it happened: the fetch (its
partition) and the record being read (its offset, key and value bytes, read before the
headers). :func:`locate` reads them from the traceback; ``poll`` returns the record as
``unreadable`` and moves the partition past it. Where a whole batch is unreadable (a CRC
failure), the record stands at the batch's first offset with ``skip_to`` past its last.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import CorruptRecordError

from pipeline.worker.records import Record


class KafkaPythonConsumer(KafkaConsumer):
    """kafka-python's consumer with the two rebalance hooks of the interface, and one repair.

    The repair: kafka-python 3.0.12 drops the result of a join that outlives the ``poll`` that
    started it. ``poll`` re-awaits a join in flight only while ``need_rejoin()`` is true, and that
    turns false as soon as the join is prepared (after a metadata change: the snapshots it compares
    are reset) or the leader has computed the assignment, before the SyncGroup answer is in. The
    answer is then never applied: the member holds nothing while the group lists partitions for it,
    with heartbeats off, until the stall watchdog joins again (30 s at start, seen in the benchmark
    and once in CI). Here ``need_rejoin()`` also holds while a join is under way (``rejoining``,
    set when it is prepared, cleared when its result is applied), so the next poll awaits it.
    """

    before_revoke: Callable[[], None] | None = None  # not called: kafka-python revokes on its IO thread

    def __init__(self, *topics: str, **options: Any) -> None:
        super().__init__(*topics, **options)
        coordinator = getattr(self, "_coordinator", None)
        plain = getattr(coordinator, "need_rejoin", None)
        if plain is not None and hasattr(coordinator, "rejoining"):
            coordinator.need_rejoin = lambda: bool(coordinator.rejoining) or plain()  # type: ignore[union-attr]

    def poll(self, *args: Any, **kwargs: Any) -> Any:
        """kafka-python's poll; a record it cannot parse comes back alone, as an unreadable record, and its
        partition moves on past it. One whose position cannot be found raises (``CorruptRecordError``)."""
        self._unpark_resumed()
        try:
            return super().poll(*args, **kwargs)
        except CorruptRecordError as err:
            found = locate(err, f"kafka-python cannot parse it: {err}")
            if found is None:
                raise
            tp = TopicPartition(found.topic, found.partition)
            self.seek(tp, found.skip_to if found.skip_to is not None else found.offset + 1)
            return {tp: [found]}

    def _unpark_resumed(self) -> None:
        """Work around kafka-python 3.0.12: records parked while their partition was paused are put back
        only when the fetcher's in-line slot is None, but a drained slot is left empty (falsy), not None,
        so a resumed partition could stay parked (and unfetched) for good. Empty the drained slot."""
        fetcher = getattr(self, "_fetcher", None)
        slot = getattr(fetcher, "_next_partition_records", None)
        if slot is not None and not slot:
            fetcher._next_partition_records = None  # type: ignore[union-attr]

    def rebalance_coming(self) -> bool:
        """Whether the next poll will rejoin the group (the coordinator says so; if kafka-python's internals
        change, every poll counts as one that may, and in-flight batches are committed before each poll)."""
        coordinator = getattr(self, "_coordinator", None)
        need = getattr(coordinator, "need_rejoin", None)
        return need is None or bool(getattr(coordinator, "rejoin_needed", True)) or bool(need())


def _frames(err: BaseException | None) -> Iterator[Any]:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        tb: TracebackType | None = err.__traceback__
        while tb is not None:
            yield tb.tb_frame
            tb = tb.tb_next
        err = err.__context__


def locate(err: BaseException, why: str) -> Record | None:
    """The record (or batch) that made ``poll()`` raise ``err``, as an unreadable record (``why``)."""
    tp: Any = None
    record: dict[str, Any] | None = None
    batch: Any = None
    for frame in _frames(err):
        local = frame.f_locals
        owner = local.get("self")
        if tp is None and hasattr(owner, "topic_partition"):
            tp = owner.topic_partition
        if frame.f_code.co_name == "_read_msg" and "offset" in local:
            record = {"offset": local["offset"], "key": local.get("key"), "value": local.get("value")}
        if frame.f_code.co_name == "_unpack_records" and local.get("batch") is not None:
            batch = local["batch"]
    if tp is None:
        return None
    if record is not None:
        return Record(tp.topic, tp.partition, int(record["offset"]), -1, _bytes(record["key"]),
                      _bytes(record["value"]), [], why)
    if batch is not None and hasattr(batch, "base_offset") and hasattr(batch, "next_offset"):
        return Record(tp.topic, tp.partition, int(batch.base_offset), -1, None, None, [], why,
                      skip_to=int(batch.next_offset))
    return None


def _bytes(value: Any) -> bytes | None:
    return bytes(value) if isinstance(value, bytes | bytearray | memoryview) else None
