"""Hostile input against the raw path's state: nothing a producer sends may poison, empty or crash it.

Each test is one bullet of what a producer (or a hand on a changelog topic) was seen to do to the
window stores: a record dated 2100, absurd amounts, a transaction id reused with other content,
garbage in a changelog, customers and terminals that never come back.
"""

from __future__ import annotations

import logging
import math
import random
import threading
from typing import Any

import orjson
import pytest
from kafka import TopicPartition
from prometheus_client import CollectorRegistry

from pipeline.schema import RecordError, decode
from pipeline.streamfeatures import DAY_MS, HOT_EVENTS, CustomerWindows, TerminalWindows
from pipeline.worker.metrics import WorkerMetrics
from pipeline.worker.state import FeatureStages, Restorer, StateTopics, Store
from tests.worker_helpers import Record, hop_records, restored

TOPICS = StateTopics("raw", "labels", "g-by-terminal-repartition", "g-customer-windows-changelog",
                     "g-terminal-windows-changelog", 1)
T0 = 1_522_540_800_000  # 2018-04-01


class NoRestore:
    def restore(self, topic: str, partition: int, store: Any, stop: threading.Event) -> int:
        return 0


def stages() -> FeatureStages:
    made = FeatureStages(TOPICS, 7, NoRestore(), WorkerMetrics(CollectorRegistry()), 65536,  # type: ignore[arg-type]
                         threading.Event())
    made.sync({TopicPartition(t, 0) for t in TOPICS.consumed})
    return made


def raw(tx_id: str, t: Any, customer: Any = 1, terminal: Any = 7, amount: Any = 20.0) -> bytes:
    return orjson.dumps({"transaction_id": tx_id, "event_time": t, "CUSTOMER_ID": customer, "TERMINAL_ID": terminal,
                         "TX_AMOUNT": amount})


class Feed:
    """Records through both stages of one worker; each transaction's features, or its dead-letter reason."""

    def __init__(self) -> None:
        self.stages = stages()
        self.offset = 0

    def send(self, value: bytes) -> dict[str, Any] | str:
        self.offset += 1
        try:
            staged = self.stages.stage([Record(value, self.offset, TOPICS.input, 0)], [])
            if staged.failed:
                return staged.failed[0][1].reason
            (hop,) = hop_records(staged.outputs, self.offset)
            tx = decode(hop.value)
            assert not isinstance(tx, RecordError)
            error = self.stages.enrich(hop, tx)
            return error.reason if error else tx.fields
        finally:  # committed, as the worker does once the outputs are acknowledged
            offsets = {TopicPartition(topic, 0): self.offset + 1 for topic in (TOPICS.input, TOPICS.repartition)}
            self.stages.staged(offsets)
            self.stages.committed(offsets)


def history(feed: Feed, days: int = 20, customer: int = 1) -> list[dict[str, Any] | str]:
    return [feed.send(raw(f"c{customer}-{d}", T0 + d * DAY_MS, customer, 7 + d % 3)) for d in range(days)]


@pytest.mark.parametrize("when", [4_102_444_800_000, "2100-01-01T00:00:00Z", "9999-12-31T00:00:00Z",
                                  "0001-01-01T00:00:00Z", "2024-06-01T00:00:00Z"])
def test_an_event_time_far_from_the_stream_is_dead_lettered_and_moves_no_window(when: Any) -> None:
    clean, poisoned = Feed(), Feed()
    history(clean)
    history(poisoned)
    assert poisoned.send(raw("evil", when)) == "bad_time"
    after = [raw(f"later-{d}", T0 + (20 + d) * DAY_MS, 1, 7) for d in range(10)]
    assert [poisoned.send(v) for v in after] == [clean.send(v) for v in after]


@pytest.mark.parametrize("amount", [3e38, -5.0, 1e10, 1e308])
def test_an_absurd_amount_is_dead_lettered_and_poisons_no_mean(amount: float) -> None:
    clean, poisoned = Feed(), Feed()
    history(clean)
    history(poisoned)
    assert poisoned.send(raw("evil", T0 + 20 * DAY_MS, amount=amount)) == "out_of_range"
    after = [raw(f"later-{d}", T0 + (21 + d) * DAY_MS) for d in range(5)]
    assert [poisoned.send(v) for v in after] == [clean.send(v) for v in after]


def test_a_transaction_id_reused_with_other_content_is_dead_lettered() -> None:
    feed = Feed()
    history(feed, 5)
    first = feed.send(raw("dup", T0 + 5 * DAY_MS, amount=10.0))
    assert feed.send(raw("dup", T0 + 5 * DAY_MS, amount=10.0)) == first  # a replay: its first features
    assert feed.send(raw("dup", T0 + 5 * DAY_MS, amount=99.0)) == "duplicate_conflict"
    assert feed.send(raw("dup", T0 + 6 * DAY_MS, amount=10.0)) == "duplicate_conflict"


class Changelog:
    """A restore consumer over a fixed list of changelog records."""

    def __init__(self, records: list[Record]) -> None:
        self.records, self.at = records, 0

    def assign(self, partitions: list) -> None: ...

    def seek_to_beginning(self, tp: TopicPartition) -> None:
        self.at = 0

    def end_offsets(self, partitions: list) -> dict:
        return {tp: len(self.records) for tp in partitions}

    def position(self, tp: TopicPartition) -> int:
        return self.at

    def poll(self, timeout_ms: int) -> dict:
        got, self.at = self.records[self.at:], len(self.records)
        return {TopicPartition(TOPICS.customer_changelog, 0): got}


def test_garbage_in_a_changelog_is_skipped_with_an_error_line_and_a_metric(caplog: pytest.LogCaptureFixture) -> None:
    from pipeline.config import KafkaSettings

    good = CustomerWindows()
    good.update(1, T0, 5.0)
    records = [Record(good.to_bytes(), 0, TOPICS.customer_changelog, 0, b"alice"),
               Record(b"\x01garbag", 1, TOPICS.customer_changelog, 0, b"bob"),
               Record(b"{}", 2, TOPICS.customer_changelog, 0, None),
               Record(good.to_bytes(), 3, TOPICS.customer_changelog, 0, b"carol")]
    metrics = WorkerMetrics(CollectorRegistry())
    restorer = Restorer(KafkaSettings.build(environ={}, overrides={}), "w", {}, metrics)
    restorer.consumer = Changelog(records)  # type: ignore[assignment]
    store: Store[CustomerWindows] = Store(CustomerWindows, CustomerWindows.from_bytes)
    with caplog.at_level(logging.ERROR):
        assert restorer.restore(TOPICS.customer_changelog, 0, store, threading.Event()) == 4
    assert set(store.entities) == {"alice", "carol"}
    assert metrics.registry.get_sample_value("fraud_state_corrupt_records_total",
                                             {"topic": TOPICS.customer_changelog}) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(f"{TOPICS.customer_changelog}[0]@1 is not a window state" in m for m in errors), errors


def test_customers_and_terminals_that_never_come_back_are_swept_with_tombstones() -> None:
    feed = Feed()
    for c in range(200):  # one-time customers on one-time terminals
        feed.send(raw(f"once-{c}", T0 + c * 1000, 1000 + c, 5000 + c))
    feed.stages.stage([], [Record(orjson.dumps({"transaction_id": "x", "event_time": T0, "TERMINAL_ID": 99999,
                                                "TX_FRAUD": 1}), 0, TOPICS.labels, 0)])  # a terminal never seen
    feed.stages.changelog()
    assert len(feed.stages.customers[0].entities) == 200 and len(feed.stages.terminals[0].entities) == 201
    tombstones = set()
    for d in range(60):  # one regular customer goes on for 60 days
        feed.send(raw(f"r-{d}", T0 + d * DAY_MS, 1, 7))
        tombstones |= {(o.topic, o.key) for o in feed.stages.changelog() if o.value == b""}
    assert {(TOPICS.customer_changelog, b"1000"), (TOPICS.terminal_changelog, b"5000"),
            (TOPICS.terminal_changelog, b"99999")} <= tombstones
    assert set(feed.stages.customers[0].entities) == {"1"}
    assert set(feed.stages.terminals[0].entities) == {"7"}
    registry = feed.stages.metrics.registry
    assert registry.get_sample_value("fraud_state_swept_entities_total", {"store": "customer"}) == 200
    assert registry.get_sample_value("fraud_state_swept_entities_total", {"store": "terminal"}) == 201


def naive_terminal(events: list[tuple[int, int]], frauds: set[int], t: int, delay: int) -> tuple[float, ...]:
    counts, risks = [], []
    for w in (1, 7, 30):
        held = [e for e, te in events if t - delay - w * DAY_MS < te <= t - delay]
        counts.append(float(len(held)))
        risks.append(sum(e in frauds for e in held) / len(held) if held else 0.0)
    return (*counts, *risks)


@pytest.mark.parametrize("seed", range(4))
def test_a_busy_terminal_counts_as_a_brute_force_count_does(seed: int) -> None:
    """Hundreds of events (past HOT_EVENTS: ids in a set), labels before and after their events, withdrawn
    and given again, a state round trip: every feature as a full scan computes it."""
    rng = random.Random(seed)
    delay = 7 * DAY_MS
    windows, events, frauds = TerminalWindows(delay), [], set()
    for i in range(4 * HOT_EVENTS + rng.randint(0, 200)):
        t = T0 + i * 3_600_000
        if rng.random() < 0.1:
            label = rng.randrange(i + 3)  # an event already held, or one still to come
            fraud = rng.random() < 0.8
            windows.label(label, T0 + label * 3_600_000, fraud)
            frauds.discard(label) if not fraud else frauds.add(label)
        got = windows.update(i, t)
        events.append((i, t))
        events = [(e, te) for e, te in events if te > t - windows.horizon_ms]
        assert got == pytest.approx(naive_terminal(events, frauds, t, delay)), i
        if rng.random() < 0.02:
            windows = TerminalWindows.from_bytes(windows.to_bytes())


def naive_customer(events: list[tuple[int, float]], t: int) -> tuple[float, ...]:
    counts, means = [], []
    for w in (1, 7, 30):
        held = [a for te, a in events if t - w * DAY_MS < te <= t]
        counts.append(float(len(held)))
        means.append(math.fsum(held) / len(held))
    return (*counts, *means)


@pytest.mark.parametrize("seed", range(4))
def test_a_busy_customer_means_as_an_exact_sum_does(seed: int) -> None:
    """Hundreds of events (past HOT_EVENTS: running sums), amounts from cents to a billion, events up to a
    few hours out of order, replays, state round trips: every mean as ``math.fsum`` over the window."""
    rng = random.Random(seed)
    windows = CustomerWindows()
    events: dict[int, tuple[int, float]] = {}
    first: dict[int, tuple[float, ...]] = {}
    t = T0
    for i in range(6 * HOT_EVENTS):
        t += rng.randint(0, 6 * 3_600_000)
        te = t - rng.randint(0, 3 * 3_600_000) if rng.random() < 0.2 else t
        amount = rng.choice([0.01, 1e9, 3.7, 12345.678]) * rng.random()
        first[i] = windows.update(i, te, amount)
        events[i] = (te, amount)
        newest = max(e for e, _a in events.values())
        events = {k: v for k, v in events.items() if v[0] > newest - CustomerWindows.HORIZON_MS}
        assert first[i] == pytest.approx(naive_customer(list(events.values()), te), rel=1e-12), i
        j = rng.choice(list(events)[-10:])
        if (rng.random() < 0.05 and newest - events[j][0] < DAY_MS  # within the grace, nothing evicted since
                and all(events[k][0] > events[j][0] for k in events if k > j)):
            assert windows.update(j, *events[j]) == first[j]  # a replay: its first features, nothing counted twice
        if rng.random() < 0.02:
            windows = CustomerWindows.from_bytes(windows.to_bytes())


def test_a_terminal_of_a_million_events_fits_kafka_and_comes_back_whole() -> None:
    """A whole-state record of a million events would be 16 MB, refused by the broker (1 MB by default). The
    changelog writes a big entity as hour segments of bounded records, a batch rewrites only the hours it
    changed, and a restore puts it together again."""
    from array import array

    from pipeline.worker.state.store import BIG_ENTRIES

    n, step = 1_000_000, 3_000  # one event every 3 s: 35 days
    big = TerminalWindows(7 * DAY_MS)
    big.times, big.ids = array("q", range(T0, T0 + n * step, step)), array("q", range(n))
    big._reindex()
    for eid in range(0, n, 997):
        big.label(eid, T0 + eid * step)
    store: Store = Store(lambda: TerminalWindows(7 * DAY_MS), TerminalWindows.from_bytes, TerminalWindows.merge)
    store.keep("busy", big)
    store.keep("small", TerminalWindows(7 * DAY_MS))
    first = store.flush("changelog", 0)
    assert max(len(o.value) for o in first) < 300_000 and len(first) > 800
    assert big.size > BIG_ENTRIES
    later = T0 + n * step + 60_000
    big.update(n + 1, later)  # one more event: its hour's record (and the hours eviction emptied, if any)
    store.dirty.add("busy")
    second = store.flush("changelog", 0)
    assert 1 <= len(second) <= 3 and all(o.key.startswith(b"busy\x00") for o in second)
    back = restored(first + second, lambda: TerminalWindows(7 * DAY_MS), TerminalWindows)
    again = back.entities["busy"]
    assert again.times == big.times and again.ids == big.ids and again.frauds == big.frauds
    assert again.update(n + 2, later + 1) == big.update(n + 2, later + 1)
    del store.entities["busy"]  # swept: the head and every segment get tombstones
    store.dirty.add("busy")
    gone = store.flush("changelog", 0)
    assert len(gone) == len({o.key for o in first + second if o.value}) - 1 and all(o.value == b"" for o in gone)
    assert "busy" not in restored(first + second + gone, TerminalWindows, TerminalWindows).entities


def held_alike(back: Any, live: Any) -> bool:
    """A restored state holds what the live one does, and perhaps events the live one evicted since its last whole
    state (a restore replays deltas without evicting: the next update does, with its own replay floor)."""
    extra = len(back.times) - len(live.times)
    return (extra >= 0 and back.times[extra:] == live.times and back.ids[extra:] == live.ids
            and all(t <= live.times[-1] - CustomerWindows.HORIZON_MS for t in back.times[:extra]))


@pytest.mark.parametrize("lag", [0, 64])
def test_a_customer_that_grows_big_then_small_again_is_restored_each_time(lag: int, monkeypatch: Any) -> None:
    """lag 0: every changed key's whole state each batch (segments, then a single record again); 64 (the default):
    deltas, whole states rarely."""
    monkeypatch.setattr("pipeline.worker.state.store.SNAPSHOT_LAG", lag)
    feed = Feed()
    outputs = []
    for i in range(5000):  # a corporate card: 5,000 transactions in 5 days, then quiet for a month
        feed.send(raw(f"card-{i}", T0 + i * 86_000, 42, 7))
        if i % 700 == 0:
            outputs += feed.stages.changelog()
    outputs += feed.stages.changelog()
    segments = [o for o in outputs if o.topic == TOPICS.customer_changelog and o.key.startswith(b"42\x00")]
    assert bool(segments) == (lag == 0)
    assert held_alike(restored([o for o in outputs if o.topic == TOPICS.customer_changelog], CustomerWindows,
                               CustomerWindows).entities["42"], feed.stages.customers[0].entities["42"])
    for day in range(11, 42, 6):  # a month later most of it is evicted: a single record again
        assert isinstance(feed.send(raw(f"later-{day}", T0 + day * DAY_MS, 42, 7)), dict)
        outputs += feed.stages.changelog()
    back = restored([o for o in outputs if o.topic == TOPICS.customer_changelog], CustomerWindows, CustomerWindows)
    assert held_alike(back.entities["42"], feed.stages.customers[0].entities["42"])
    assert back.segmented == {}
