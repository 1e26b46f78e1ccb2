"""The Kafka client behind the worker's group consumer and output producer: one of two.

- ``kafka-python`` (the default): pure Python, the client of every example in the docs.
- ``confluent`` (``pip install 'fraud-pipeline[confluent]'``): confluent-kafka, Python on
  librdkafka (the client Quix Streams and Bytewax use); it fetches and parses records in C,
  where kafka-python spends most of the worker's time (docs/benchmarks.md).
  :mod:`~pipeline.worker.confluent` gives it the shape below. At-least-once only for now.

The interface is the part of kafka-python's API the worker uses, and no more:

- consumer: ``subscribe(topics, listener)`` with kafka-python's rebalance listener,
  ``poll(timeout_ms, max_records)`` returning ``{TopicPartition: [record]}`` (records with
  ``topic``, ``partition``, ``offset``, ``key``, ``value``, ``headers``, ``timestamp``),
  ``assignment``, ``commit(offsets)`` (synchronous), ``committed``, ``seek``, ``position``,
  ``highwater``, ``beginning_offsets``, ``end_offsets``, ``pause``, ``resume``, ``paused``,
  ``close(autocommit=False)``; errors are kafka-python's classes (:mod:`kafka.errors`), so
  :func:`pipeline.worker.delivery.classify` reads both clients alike;
- two rebalance hooks, because the clients rebalance at different moments:
  ``rebalance_coming()`` says whether the next ``poll`` will rejoin the group (kafka-python
  rejoins inside ``poll`` and runs listeners on its IO thread: the worker commits what is in
  flight before that poll), and ``before_revoke`` (settable) is called on the worker's own
  thread before partitions are revoked (librdkafka revokes inside ``poll`` on the calling
  thread: the worker commits there);
- producer: ``send(topic, key, value, headers, partition)`` returning a future with
  ``is_done`` and ``get(timeout)``, ``flush``, ``close(timeout)``.

Group-less helpers off the hot path (state restore, the start-up peek, the stall watchdog's
admin client, the exactly-once transactional producer) use kafka-python with either client.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from kafka import KafkaConsumer, KafkaProducer

CLIENTS = ("kafka-python", "confluent")
T = TypeVar("T")


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
        self._unpark_resumed()
        return super().poll(*args, **kwargs)

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


def consumer(client: str, **options: Any) -> Any:
    """A group consumer of the named client, built from kafka-python's option names."""
    if client == "confluent":
        from pipeline.worker.confluent import ConfluentConsumer

        return ConfluentConsumer(**options)
    return KafkaPythonConsumer(**options)


def producer(client: str, **options: Any) -> Any:
    """An output producer of the named client, built from kafka-python's option names."""
    if client == "confluent":
        from pipeline.worker.confluent import ConfluentProducer

        return ConfluentProducer(**options)
    return KafkaProducer(**options)


class Call(Generic[T]):
    """A blocking call run on a helper thread, so that the caller can stop waiting for it.

    For client calls that take no timeout (kafka-python's transactional calls) or ignore the one
    they take (a librdkafka commit on a wedged connection): ``wait`` returns whether it finished,
    ``result`` returns its value or raises its exception.
    """

    def __init__(self, call: Callable[[], T], name: str) -> None:
        self._box: dict[str, Any] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(call,), name=name, daemon=True)
        self._thread.start()

    def _run(self, call: Callable[[], T]) -> None:
        try:
            self._box["value"] = call()
        except BaseException as err:
            self._box["error"] = err
        finally:
            self._done.set()

    def wait(self, timeout_s: float) -> bool:
        return self._done.wait(max(0.0, timeout_s))

    def result(self) -> T:
        assert self._done.is_set(), "Call.result before the call finished"
        if "error" in self._box:
            raise self._box["error"]
        return self._box["value"]

    def within(self, timeout_s: float, on_timeout: Callable[[], BaseException]) -> T:
        """The result, or ``on_timeout()`` raised when the call takes longer than ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        if not self.wait(deadline - time.monotonic()):
            raise on_timeout()
        return self.result()
