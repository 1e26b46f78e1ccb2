"""Raw transactions in: the handbook features computed in the stream, from state that survives.

A model trained with ``fraud-train fit --input raw`` is served on records that carry only
``transaction_id``, ``event_time``, ``CUSTOMER_ID``, ``TERMINAL_ID`` and ``TX_AMOUNT``, keyed
by customer. Customer windows need customer-keyed state and terminal windows terminal-keyed
state, so the worker runs two stages joined by a repartition topic (the Kafka Streams design;
one process runs both, N processes share them by partition)::

    input topic, key customer                        labels topic, key terminal
           |                                                   |
    [customer stage] -- customer windows -> <group>-customer-windows-changelog
           |                                                   |
    <group>-by-terminal-repartition, key terminal              |
           |                                                   |
    [terminal stage] -- terminal windows + fraud labels -> <group>-terminal-windows-changelog
           |
    scoring -> alerts, dead letters

Every internal topic has the input topic's partition count, so partition N of the
repartition topic and of the labels topic (both keyed by terminal with Kafka's default
partitioner) meet in the same worker (range assignment) and in the same store. Stores live in
memory, one per stage and partition; every key a batch changed is written, whole, to the
store's compacted changelog in the batch's delivery: inside its transaction under
exactly-once, acknowledged before the offsets are committed under at-least-once. A store is
restored from its changelog (read_committed, to the end offset) whenever its partition is
assigned, and after an aborted transaction. Window updates are idempotent by transaction id,
so a batch replayed after a crash counts nothing twice: under at-least-once only alerts and
repartition records can be repeated, never a window count.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from kafka import KafkaConsumer, TopicPartition

from pipeline.config import KafkaSettings
from pipeline.errors import ConfigError, FraudPipelineError
from pipeline.schema import FLOAT32_MAX, RecordError, Transaction, decode, encode
from pipeline.streamfeatures import (
    CALENDAR_FEATURES,
    CUSTOMER_FEATURES,
    DAY_MS,
    TERMINAL_FEATURES,
    CustomerWindows,
    TerminalWindows,
    calendar,
    event_id,
)
from pipeline.worker.delivery import StopWithoutCommit
from pipeline.worker.outputs import Output, processing_error

log = logging.getLogger(__name__)

CUSTOMER, TERMINAL, AMOUNT, LABEL = "CUSTOMER_ID", "TERMINAL_ID", "TX_AMOUNT", "TX_FRAUD"
RAW_FIELDS = (CUSTOMER, TERMINAL, AMOUNT)
MAX_KEY_CHARS = 256
RESTORE_STALL_S = 60.0  # a restore that makes no progress this long stops the worker
ALIGN_MS = 3_600_000  # an input partition more than this ahead in event time waits for the others ...
ALIGN_IDLE_S = 1.0  # ... and for one that has read all it has, this long for more (Kafka Streams' max.task.idle.ms)
ALIGN_UNFETCHED_MAX_S = 30.0  # ... and for one never fetched since assignment, at most this long

W = TypeVar("W", CustomerWindows, TerminalWindows)


class RestoreFailed(FraudPipelineError):
    """A changelog could not be read to its end: the worker stops rather than score from partial state."""


@dataclass(frozen=True)
class StateTopics:
    """The topics of the raw-input topology; internal ones are named after the consumer group."""

    input: str
    labels: str
    repartition: str
    customer_changelog: str
    terminal_changelog: str

    @classmethod
    def for_group(cls, kafka: KafkaSettings, group: str) -> StateTopics:
        return cls(kafka.input_topic, kafka.labels_topic, f"{group}-by-terminal-repartition",
                   f"{group}-customer-windows-changelog", f"{group}-terminal-windows-changelog")

    @property
    def consumed(self) -> list[str]:
        return [self.input, self.repartition, self.labels]


def entity_key(fields: dict[str, Any], name: str) -> str | RecordError:
    """A customer or terminal id as a key: an integer or a non-empty string of at most 256 characters."""
    value = fields.get(name)
    if value is None:
        return RecordError("missing_field", name, "raw transactions need it (the model computes features from it)")
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and 0 < len(value) <= MAX_KEY_CHARS:
        return value
    if isinstance(value, str):
        return RecordError("bad_type", name, f"must be 1 to {MAX_KEY_CHARS} characters, got {len(value)}")
    return RecordError("bad_type", name, f"must be an integer or a string, got {type(value).__name__}")


def amount_of(fields: dict[str, Any]) -> float | RecordError:
    """The transaction amount: a finite number."""
    value = fields.get(AMOUNT)
    if value is None:
        return RecordError("missing_field", AMOUNT, "raw transactions need it")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return RecordError("bad_type", AMOUNT, f"must be a number, got {type(value).__name__}")
    if not abs(value) <= FLOAT32_MAX:
        return RecordError("not_finite", AMOUNT, f"{value!r} is not a finite float32")
    return float(value)


class Store(Generic[W]):
    """One stage's state for one partition: entity key -> windows, and the keys changed since the last flush."""

    def __init__(self, factory: Callable[[], W], parse: Callable[[bytes], W]) -> None:
        self.factory, self.parse = factory, parse
        self.entities: dict[str, W] = {}
        self.dirty: set[str] = set()

    def get(self, key: str) -> W:
        state = self.entities.get(key)
        if state is None:
            state = self.entities[key] = self.factory()
        self.dirty.add(key)
        return state

    def load(self, key: bytes | None, value: bytes | None) -> None:
        """Apply one changelog record (a whole state; an empty value deletes the key)."""
        if key is None:
            return
        name = key.decode("utf-8", "surrogateescape")
        if value:
            self.entities[name] = self.parse(value)
        else:
            self.entities.pop(name, None)

    def flush(self, topic: str, partition: int) -> list[Output]:
        """The changelog records of every key changed since the last flush."""
        outputs = [Output(topic, key.encode("utf-8", "surrogateescape"), self.entities[key].to_bytes(),
                          partition=partition) for key in sorted(self.dirty)]
        self.dirty.clear()
        return outputs


class Restorer:
    """Reads a changelog partition to its end with a group-less, read_committed consumer."""

    def __init__(self, kafka: KafkaSettings, client_id: str, options: dict[str, Any]) -> None:
        self.kafka, self.client_id, self.options = kafka, client_id, options
        self.consumer: KafkaConsumer | None = None

    def restore(self, topic: str, partition: int, store: Store[Any], stop: threading.Event) -> int:
        """Load every record of ``topic``[``partition``] into ``store``; the number of records read."""
        if self.consumer is None:
            self.consumer = KafkaConsumer(**self.options, client_id=f"{self.client_id}-restore", group_id=None,
                                          enable_auto_commit=False, isolation_level="read_committed",
                                          max_partition_fetch_bytes=8 * 1024 * 1024)
        tp = TopicPartition(topic, partition)
        consumer = self.consumer
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        end = consumer.end_offsets([tp])[tp]  # read_committed: the last stable offset
        count, progress_at = 0, time.monotonic()
        while consumer.position(tp) < end and not stop.is_set():
            got = consumer.poll(timeout_ms=500).get(tp, [])
            for record in got:
                store.load(record.key, record.value)
            count += len(got)
            if got:
                progress_at = time.monotonic()
            elif time.monotonic() - progress_at > RESTORE_STALL_S:
                raise RestoreFailed(f"restoring {topic}[{partition}] stalled at offset "
                                    f"{consumer.position(tp)} of {end} for {RESTORE_STALL_S:.0f}s")
        if stop.is_set() and consumer.position(tp) < end:  # never score from a half-restored store
            raise StopWithoutCommit(f"asked to stop while restoring {topic}[{partition}]")
        return count

    def close(self) -> None:
        if self.consumer is not None:
            self.consumer.close(autocommit=False)
            self.consumer = None


@dataclass
class Staged:
    """What the customer and label stages made of a batch: repartition records and the records that failed."""

    outputs: list[Output]
    failed: list[tuple[Any, RecordError]]


class FeatureStages:
    """The two stateful stages and their stores, for the partitions this worker owns."""

    def __init__(self, topics: StateTopics, delay_days: int, restorer: Restorer, metrics: Any,
                 max_record_bytes: int, stop: threading.Event) -> None:
        self.topics, self.restorer, self.metrics = topics, restorer, metrics
        self.delay_ms, self.max_record_bytes, self.stop = delay_days * DAY_MS, max_record_bytes, stop
        self.customers: dict[int, Store[CustomerWindows]] = {}
        self.terminals: dict[int, Store[TerminalWindows]] = {}
        self._lock = threading.Lock()
        self._stale: set[int] = set()  # partitions whose stores must be restored again (revoked meanwhile)
        self.event_times: dict[int, int] = {}  # input partition -> latest event time its records carried
        self._idle_since: dict[TopicPartition, float] = {}
        self._unfetched_since: dict[TopicPartition, float] = {}
        self._gave_up: set[TopicPartition] = set()  # never fetched for ALIGN_UNFETCHED_MAX_S: warned once
        self.late_events = 0  # as fraud_late_events_total counts them, for the end-of-run summary

    # -- ownership ----------------------------------------------------------------------
    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Partitions revoked or lost (called on the consumer's IO thread): restore them if they come back."""
        partitions = set(partitions)
        with self._lock:
            self._stale.update(tp.partition for tp in partitions if tp.topic in self.topics.consumed)
        for tp in partitions:  # alignment timers start again at the next assignment
            self._idle_since.pop(tp, None)
            self._unfetched_since.pop(tp, None)
            self._gave_up.discard(tp)

    def discard(self, records: Sequence[Any]) -> None:
        """After an aborted transaction: the stores the batch touched are restored before their next use."""
        self.forget(TopicPartition(r.topic, r.partition) for r in records)

    def sync(self, assigned: set[TopicPartition]) -> None:
        """Restore the stores of newly assigned (or stale) partitions; drop those of partitions gone."""
        with self._lock:
            stale, self._stale = self._stale, set()
        customer_parts = {tp.partition for tp in assigned if tp.topic == self.topics.input}
        terminal_parts = {tp.partition for tp in assigned if tp.topic in (self.topics.repartition,
                                                                          self.topics.labels)}
        for stores, owned, topic, name, factory, parse in (
            (self.customers, customer_parts, self.topics.customer_changelog, "customer", CustomerWindows,
             CustomerWindows.from_bytes),
            (self.terminals, terminal_parts, self.topics.terminal_changelog, "terminal",
             lambda: TerminalWindows(self.delay_ms), TerminalWindows.from_bytes),
        ):
            for partition in [p for p in stores if p not in owned or p in stale]:
                del stores[partition]
                if stores is self.customers:
                    self.event_times.pop(partition, None)
            for partition in sorted(owned - stores.keys()):
                store: Store[Any] = Store(factory, parse)
                started = time.monotonic()
                count = self.restorer.restore(topic, partition, store, self.stop)
                seconds = time.monotonic() - started
                stores[partition] = store
                self.metrics.state_restored.labels(name).inc(count)
                self.metrics.state_restore_seconds.labels(name).inc(seconds)
                log.info("restored %s store %d: %d keys from %d changelog records in %.2fs", name, partition,
                         len(store.entities), count, seconds)
            self.metrics.state_entities.labels(name).set(sum(len(s.entities) for s in stores.values()))

    # -- the stages ---------------------------------------------------------------------
    def split(self, records: Sequence[Any]) -> tuple[list[Any], list[Any], list[Any]]:
        """The batch's raw input records, its label records, and its records to score (repartitioned)."""
        raw, labels, featured = [], [], []
        for record in records:
            if record.topic == self.topics.input:
                raw.append(record)
            elif record.topic == self.topics.labels:
                labels.append(record)
            else:
                featured.append(record)
        return raw, labels, featured

    def stage(self, raw: Sequence[Any], labels: Sequence[Any]) -> Staged:
        """Customer stage on raw records (repartition records out) and label records into terminal state."""
        out = Staged([], [])
        for record in raw:
            self._isolated(record, out, self._customer)
        for record in labels:
            self._isolated(record, out, self._label)
        return out

    def _isolated(self, record: Any, out: Staged, step: Callable[[Any, Transaction], Output | RecordError | None],
                  ) -> None:
        try:
            tx = decode(record.value, self.max_record_bytes)
            result = tx if isinstance(tx, RecordError) else step(record, tx)
        except Exception as err:  # one record's failure never stops the batch
            result = processing_error("features", err)
        if isinstance(result, RecordError):
            out.failed.append((record, result))
        elif result is not None:
            out.outputs.append(result)

    def _customer(self, record: Any, tx: Transaction) -> Output | RecordError:
        fields = tx.fields
        customer, terminal, amount = entity_key(fields, CUSTOMER), entity_key(fields, TERMINAL), amount_of(fields)
        for checked in (customer, terminal, amount):
            if isinstance(checked, RecordError):
                return checked
        assert isinstance(customer, str) and isinstance(terminal, str) and isinstance(amount, float)
        if tx.event_time_ms > self.event_times.get(record.partition, tx.event_time_ms - 1):
            self.event_times[record.partition] = tx.event_time_ms
        windows = self.customers[record.partition].get(customer)
        derived = (*calendar(tx.event_time_ms), *windows.update(event_id(tx.transaction_id), tx.event_time_ms,
                                                                  amount))
        value = encode({**fields, **dict(zip((*CALENDAR_FEATURES, *CUSTOMER_FEATURES), derived, strict=True))})
        return Output(self.topics.repartition, terminal.encode(), value)

    def _label(self, record: Any, tx: Transaction) -> RecordError | None:
        terminal = entity_key(tx.fields, TERMINAL)
        if isinstance(terminal, RecordError):
            return terminal
        fraud = tx.fields.get(LABEL)
        if fraud not in (0, 1) or isinstance(fraud, float):
            return RecordError("bad_type", LABEL, f"a label must be 0 or 1, got {fraud!r}")
        store = self.terminals[record.partition]
        store.get(terminal).label(event_id(tx.transaction_id), tx.event_time_ms, bool(fraud))
        return None

    def enrich(self, record: Any, tx: Transaction) -> RecordError | None:
        """Terminal stage, per record to score: add the terminal features to its fields."""
        terminal = entity_key(tx.fields, TERMINAL)
        if isinstance(terminal, RecordError):
            return terminal
        windows = self.terminals[record.partition].get(terminal)
        eid = event_id(tx.transaction_id)
        if windows.times and windows.times[-1] - tx.event_time_ms >= self.delay_ms and eid not in windows.ids:
            self.metrics.late_events.inc()  # a transaction scored earlier should have counted this one
            self.late_events += 1
        derived = windows.update(eid, tx.event_time_ms)
        tx.fields.update(zip(TERMINAL_FEATURES, derived, strict=True))
        return None

    def align(self, consumer: Any, now: float | None = None) -> None:
        """Keep this worker's input partitions within ``ALIGN_MS`` of each other in event time.

        A backlog (or a producer replaying history faster than real time) would otherwise be
        read one partition after another, and the repartition topic would carry a terminal's
        transactions days out of order: a window that looks 7 days back would miss some. A
        partition ahead of the slowest one waits (paused) until that one catches up.

        Which partitions hold the others back (Kafka Streams' rule, KIP-695): one with records
        on the broker not read yet (position below the last high watermark seen), or whose
        high watermark is not known yet (not fetched since assignment), holds them until it has
        read them, however long that takes; a partition whose event time is not known yet holds
        every other one. Only a partition that has read all it has holds them for no more than
        ``ALIGN_IDLE_S`` (``max.task.idle.ms``): a quiet partition must not stop a live stream.
        A partition never fetched at all stops holding after ``ALIGN_UNFETCHED_MAX_S``, with a
        warning, so that one unreachable partition cannot stop the others for good.
        """
        now = time.monotonic() if now is None else now
        waiting = {}
        for tp in consumer.assignment():
            if tp.topic != self.topics.input:
                continue
            known = self.event_times.get(tp.partition)
            at = known if known is not None else -ALIGN_MS  # unknown: hold everyone
            end = consumer.highwater(tp)
            if end is None:  # not fetched since assignment: how much it has is not known yet
                since = self._unfetched_since.setdefault(tp, now)
                if now - since < ALIGN_UNFETCHED_MAX_S:
                    waiting[tp] = at
                elif tp not in self._gave_up:
                    self._gave_up.add(tp)
                    log.warning("input partition %s not fetched %.0f s after assignment; the others go on "
                                "without it (its late transactions count in fraud_late_events_total)",
                                tp, now - since)
            elif consumer.position(tp) < end:  # records to read: hold the others until they are read
                self._idle_since.pop(tp, None)
                self._gave_up.discard(tp)
                waiting[tp] = at
            elif now - self._idle_since.setdefault(tp, now) < ALIGN_IDLE_S:
                waiting[tp] = at
        floor = min(waiting.values(), default=None)
        ahead = {tp for tp, t in waiting.items() if floor is not None and t > floor + ALIGN_MS}
        paused = {tp for tp in consumer.paused() if tp.topic == self.topics.input}  # of the current assignment
        if ahead != paused:
            consumer.resume(*(paused - ahead))
            consumer.pause(*(ahead - paused))
        _unpark_resumed(consumer)


    def changelog(self) -> list[Output]:
        """The changelog records of every key the batch changed, to each store's own partition."""
        outputs = []
        for stores, topic in ((self.customers, self.topics.customer_changelog),
                              (self.terminals, self.topics.terminal_changelog)):
            for partition, store in stores.items():
                outputs += store.flush(topic, partition)
        return outputs


def check_partitioning(counts: dict[str, int], topics: StateTopics) -> None:
    """Every topic of the topology needs the input topic's partition count (co-partitioning)."""
    expected = counts[topics.input]
    for topic in (topics.labels, topics.repartition, topics.customer_changelog, topics.terminal_changelog):
        if counts[topic] != expected:
            raise ConfigError(
                f"topic '{topic}' has {counts[topic]} partitions but the input topic '{topics.input}' has "
                f"{expected}; raw input needs the same count on both (partition N of each must meet in one "
                f"worker); recreate '{topic}' with {expected} partitions or use another consumer group")


def prepare_topics(kafka: KafkaSettings, group: str) -> StateTopics:
    """Create the topology's topics that are missing (changelogs compacted), then check co-partitioning."""
    from pipeline.topics import ensure_topics, partition_counts

    topics = StateTopics.for_group(kafka, group)
    partitions = partition_counts(kafka, [topics.input])[topics.input]
    if partitions < 1:
        raise ConfigError(f"input topic '{topics.input}' does not exist; create it before starting the worker")
    compacted = {"cleanup.policy": "compact"}
    ensure_topics(kafka, [topics.labels, topics.repartition, topics.customer_changelog, topics.terminal_changelog],
                  partitions, configs={topics.customer_changelog: compacted, topics.terminal_changelog: compacted})
    check_partitioning(partition_counts(kafka, [topics.input, *topics.consumed, topics.customer_changelog,
                                                topics.terminal_changelog]), topics)
    return topics


def check_input_form(kafka: KafkaSettings, artifact: Any, sample: int = 5, wait_s: float = 3.0) -> None:
    """Refuse to start when the latest input records do not fit the model's input form.

    Reads up to ``sample`` of the newest records of each input partition (nothing is
    committed). Records that are not transactions at all are ignored here: they become dead
    letters. If every transaction seen lacks what the model needs, the worker would only
    dead-letter; it stops at once instead, saying which form the topic carries.
    """
    from kafka.errors import KafkaError

    consumer = KafkaConsumer(**kafka.client_options(), client_id=f"{kafka.client_id}-peek", group_id=None,
                             enable_auto_commit=False, isolation_level="read_committed")
    try:
        partitions = [TopicPartition(kafka.input_topic, p)
                      for p in sorted(consumer.partitions_for_topic(kafka.input_topic) or ())]
        if not partitions:
            return
        consumer.assign(partitions)
        ends = consumer.end_offsets(partitions)
        starts = consumer.beginning_offsets(partitions)
        wanted = 0
        for tp in partitions:
            consumer.seek(tp, max(starts[tp], ends[tp] - sample))
            wanted += ends[tp] - max(starts[tp], ends[tp] - sample)
        values: list[bytes] = []
        deadline = time.monotonic() + wait_s
        while len(values) < wanted and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                values += [r.value for r in records if r.value]
    except KafkaError as err:
        log.warning("could not read the newest input records to check their form: %s", err)
        return
    finally:
        consumer.close(autocommit=False)
    _judge(values, artifact, kafka.input_topic)


def _judge(values: list[bytes], artifact: Any, topic: str) -> None:
    transactions = [tx for tx in (decode(v) for v in values) if isinstance(tx, Transaction)]
    if not transactions:
        return
    if artifact.input_form == "raw":
        needed = ("transaction_id", "event_time", *RAW_FIELDS)
        if any(all(name in tx.fields for name in RAW_FIELDS) for tx in transactions):
            return
        missing = next(name for name in RAW_FIELDS if not all(name in tx.fields for tx in transactions))
        raise ConfigError(f"model {artifact.version} expects raw transactions ({', '.join(needed)}) but the newest "
                          f"records of '{topic}' have no {missing}; send raw transactions (fraud-produce "
                          "simulate --raw) or serve a model trained with fraud-train fit --input features")
    features = artifact.feature_names
    if any(all(name in tx.fields for name in features) for tx in transactions):
        return
    missing = next(name for name in features if not all(name in tx.fields for tx in transactions))
    raw = any(all(name in tx.fields for name in RAW_FIELDS) for tx in transactions)
    hint = ("they look like raw transactions: serve a model trained with fraud-train fit --input raw, which "
            "computes the features in the stream" if raw else "send records that carry the model's features")
    raise ConfigError(f"model {artifact.version} expects records with its {len(features)} features but the newest "
                      f"records of '{topic}' have no {missing}; {hint}")


def _unpark_resumed(consumer: Any) -> None:
    """Work around kafka-python 3.0.12: records parked while their partition was paused are put back
    only when the fetcher's in-line slot is None, but a drained slot is left empty (falsy), not None,
    so a resumed partition could stay parked (and unfetched) for good. Empty the drained slot."""
    fetcher = getattr(consumer, "_fetcher", None)
    slot = getattr(fetcher, "_next_partition_records", None)
    if slot is not None and not slot:
        fetcher._next_partition_records = None  # type: ignore[union-attr]
