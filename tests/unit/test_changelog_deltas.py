"""Changelog deltas (``pipeline.worker.state.delta`` and ``Store``), without a broker.

A store's changelog is a batch's changes as delta records plus, now and then, whole states. The
property: whatever the batches did (events in and out of order, labels given and withdrawn, idle
entities swept), a store restored from the changelog, compacted by Kafka or not, computes the
same features as the live one, and no delta is deleted before its changes are in whole states
that ``settle`` batches have had to be acknowledged.
"""

from __future__ import annotations

import itertools
import random
import threading
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from pipeline.streamfeatures import DAY_MS, EVENT, LABEL, CustomerWindows, TerminalWindows
from pipeline.worker.metrics import WorkerMetrics
from pipeline.worker.outputs import Output
from pipeline.worker.state import delta, pages
from pipeline.worker.state.store import Restorer, Store

T0 = 1_522_540_800_000
DELAY = 7 * DAY_MS
HOUR = 3_600_000


def terminal_store(settle: int = 1, lag: int | None = None) -> Store:
    return Store(lambda: TerminalWindows(DELAY), TerminalWindows.from_bytes, TerminalWindows.merge, settle, lag)


def customer_store(settle: int = 1, lag: int | None = None) -> Store:
    return Store(CustomerWindows, CustomerWindows.from_bytes, CustomerWindows.merge, settle, lag)


def compacted(outputs: list[Output], rng: random.Random | None) -> list[tuple[bytes, bytes]]:
    """The changelog as a restore may read it: every record (``rng`` None), or with some records dropped that
    Kafka's compaction may drop (an older record of a key that has a later one; a tombstone with nothing before
    it)."""
    records = [(o.key, o.value) for o in outputs]
    if rng is None:
        return records
    last = {key: i for i, (key, _v) in enumerate(records)}
    kept = []
    for i, (key, value) in enumerate(records):
        if last[key] != i and rng.random() < 0.7:
            continue
        kept.append((key, value))
    earlier: set[bytes] = set()
    out = []
    for key, value in kept:
        if not value and key not in earlier and rng.random() < 0.5:
            continue  # a tombstone past delete.retention.ms, once what it deleted is gone
        earlier.add(key)
        out.append((key, value))
    return out


def restore(records: list[tuple[bytes, bytes]], make: Any) -> Store:
    store = make()
    for key, value in records:
        store.load(key, value)
    assert store.assemble() == []
    return store


def probe(store: Store, key: str, t: int, customer: bool) -> tuple[float, ...]:
    """The features an event at ``t`` would get (on a copy: the store is left as it was)."""
    state = store.entities.get(key)
    state = type(state).from_bytes(state.to_bytes()) if state is not None else store.factory()
    return state.update(-1, t, 1.0) if customer else state.update(-1, t)


@settings(max_examples=120, deadline=None)
@given(data=st.data(), customer=st.booleans(), lag=st.integers(0, 4), settle=st.integers(1, 3))
def test_a_store_restored_from_its_changelog_computes_what_the_live_one_does(
        data: st.DataObject, customer: bool, lag: int, settle: int) -> None:
    rng = random.Random(data.draw(st.integers(0, 2**32)))
    make = (lambda: customer_store(settle, lag)) if customer else (lambda: terminal_store(settle, lag))
    live = make()
    outputs: list[Output] = []
    keys = [f"k{i}" for i in range(data.draw(st.integers(1, 6)))]
    now, eid = T0, 0
    events: list[tuple[str, int, int]] = []
    for batch in range(data.draw(st.integers(1, 25))):
        for _ in range(data.draw(st.integers(0, 12))):
            key = rng.choice(keys)
            if not customer and events and rng.random() < 0.25:  # a label, or one withdrawn
                k, e, t = rng.choice(events)
                fraud = rng.random() < 0.8
                state = live.entities.get(k) or live.factory()
                state.label(e, t, fraud)
                live.change(k, state, LABEL, e, t, float(fraud))
                continue
            now += rng.choice([0, HOUR, DAY_MS, 5 * DAY_MS])
            t = now - rng.choice([0, 0, HOUR, 2 * DAY_MS])
            eid += 1
            if events and rng.random() < 0.1:  # a replay of an event seen before
                key, e, t = rng.choice(events)
            else:
                e = eid
                events.append((key, e, t))
            state = live.entities.get(key) or live.factory()
            amount = round(rng.uniform(0.01, 500.0), 2) if e == eid else state.amounts[state.locate(e, t)] \
                if customer and state.locate(e, t) >= 0 else 1.0
            if customer:
                state.update(e, t, amount)
            else:
                state.update(e, t)
            if state.last_new:
                live.change(key, state, EVENT, e, t, amount)
        if rng.random() < 0.2:
            live.sweep(now - 45 * DAY_MS)
        outputs += live.flush("changelog", 0)
        if rng.random() < 0.15:  # a restart: the next owner restores and goes on writing
            live = restore(compacted(outputs, rng if rng.random() < 0.5 else None), make)
        back = restore(compacted(outputs, rng if rng.random() < 0.5 else None), make)
        for key in keys:
            assert probe(back, key, now + 1, customer) == probe(live, key, now + 1, customer), (batch, key)
    for _ in range(lag + settle + 1):  # quiet batches: every key gets its whole state, every delta its tombstone
        outputs += live.flush("changelog", 0)
    written = {o.key for o in outputs if delta.is_delta_key(o.key) and o.value}
    assert written == {o.key for o in outputs if delta.is_delta_key(o.key) and not o.value}
    back = restore(compacted(outputs, rng), make)
    for key in keys:
        assert probe(back, key, now + 1, customer) == probe(live, key, now + 1, customer), key


def test_keys_changed_every_batch_are_written_whole_once_per_lag_not_once_per_batch() -> None:
    store = terminal_store(settle=5)
    per_batch = []
    t = T0
    for batch in range(200):
        for k in range(300):
            state = store.entities.get(f"t{k}") or store.factory()
            t += 1000
            state.update(batch * 1000 + k, t)
            store.change(f"t{k}", state, EVENT, batch * 1000 + k, t, 0.0)
        per_batch.append(store.flush("changelog", 0))
    whole = sum(len(pages.decode(o.value)) for out in per_batch for o in out if pages.is_page_key(o.key) and o.value)
    deltas = sum(1 for out in per_batch for o in out if delta.is_delta_key(o.key) and o.value)
    assert deltas == 200  # one delta record per batch (300 changes of ~35 bytes: far below DELTA_BYTES)
    assert whole == 300 * 3  # each key whole at batches 64, 129 and 194 (lag 64: changed since 0, 65, 130)
    assert all(pages.is_page_key(o.key) or delta.is_delta_key(o.key) for out in per_batch for o in out)
    assert sum(len(out) for out in per_batch) < 200 * 3  # deltas, pages, their tombstones: no record per key


def test_a_delta_is_deleted_only_settle_batches_after_the_whole_states_that_replace_it() -> None:
    store = terminal_store(settle=5, lag=2)
    written: dict[bytes, int] = {}
    t = T0
    for batch in range(30):
        state = store.entities.get("busy") or store.factory()
        t += 1000
        state.update(batch, t)
        store.change("busy", state, EVENT, batch, t, 0.0)
        for o in store.flush("changelog", 0):
            if o.value:
                written[o.key] = batch
            elif delta.is_delta_key(o.key):
                # whole at batch b covers the deltas of b-2 .. b (lag 2: whole every third batch); gone at b + 5
                assert 5 <= batch - written[o.key] <= 2 + 5, (o.key, written[o.key], batch)
            else:  # a page, replaced by the next page 3 batches on, gone 5 batches after that
                assert pages.is_page_key(o.key) and batch - written[o.key] == 3 + 5, (o.key, written[o.key], batch)
    assert sum(pages.is_page_key(key) for key in written) == 10


def test_a_million_events_of_one_key_in_one_batch_fit_in_bounded_delta_records() -> None:
    store = terminal_store()
    state = store.factory()
    for i in range(1_000_000):
        store.changes.append(("busy-merchant", EVENT, i, T0 + 3 * i, 0.0))
    store.entities["busy-merchant"] = state
    outputs = [o for o in store.flush("changelog", 0) if delta.is_delta_key(o.key)]
    assert len(outputs) > 100 and max(len(o.value) for o in outputs) <= delta.DELTA_BYTES
    assert sum(1 for o in outputs for _ in delta.Delta(o.value).changes()) == 1_000_000
    assert len({o.key for o in outputs}) == len(outputs)


@pytest.mark.parametrize("value", [b"\x00D\x01\x05\x00\x00\x00", b"\x00D\x02" + bytes(20), b"\x00", b"garbage!"])
def test_a_delta_that_cannot_be_read_is_skipped_with_an_error_line_and_a_metric(value: bytes,
                                                                                caplog: pytest.LogCaptureFixture
                                                                                ) -> None:
    from pipeline.config import KafkaSettings
    from tests.unit.test_state_hostile import TOPICS, Changelog
    from tests.worker_helpers import Record

    good = customer_store()
    state = CustomerWindows()
    state.update(1, T0, 5.0)
    good.change("alice", state, EVENT, 1, T0, 5.0)
    first = good.flush(TOPICS.customer_changelog, 0)
    records = [Record(o.value, i, TOPICS.customer_changelog, 0, o.key) for i, o in enumerate(first)]
    records.append(Record(value, len(records), TOPICS.customer_changelog, 0, b"\x00dbadbadbadbad/7"))
    metrics = WorkerMetrics(CollectorRegistry())
    restorer = Restorer(KafkaSettings.build(environ={}, overrides={}), "w", {}, metrics)
    restorer.consumer = Changelog(records)  # type: ignore[assignment]
    store = customer_store()
    restorer.restore(TOPICS.customer_changelog, 0, store, threading.Event())
    assert list(store.entities) == ["alice"] and store.entities["alice"].times.tolist() == [T0]
    assert metrics.registry.get_sample_value("fraud_state_corrupt_records_total",
                                             {"topic": TOPICS.customer_changelog}) == 1
    assert any("is not a window state" in r.getMessage() for r in caplog.records)


def test_a_delta_of_the_wrong_kind_is_skipped_at_restore_not_a_crash(caplog: pytest.LogCaptureFixture) -> None:
    """Well formed, but a label change in a customer store: the change cannot be replayed."""
    store = customer_store()
    [value] = delta.encode([("alice", LABEL, 1, T0, 1.0)])
    store.load(delta.delta_key(b"abcdefabcdef", 1), value)
    assert store.assemble() == [delta.delta_key(b"abcdefabcdef", 1).decode()]
    assert "cannot be replayed" in caplog.text


def test_old_pages_kept_alive_by_idle_keys_are_cleaned_so_the_changelog_stays_near_the_live_state() -> None:
    """Each batch writes one key that never changes again beside 99 that change every batch: every page keeps one
    live state among 99 dead ones. The store writes the live keys of its oldest pages again while dead entries
    outnumber live ones, so the pages a restore reads stay within about twice the live state."""
    store = customer_store(lag=0)
    outputs: list[Output] = []
    t = T0
    for batch in range(300):
        for key in [f"idle-{batch}", *(f"hot-{j}" for j in range(99))]:
            state = store.entities.get(key) or store.factory()
            t += 1000
            state.update(batch * 1000 + len(outputs), t, 10.0)
            store.change(key, state, EVENT, batch * 1000 + len(outputs), t, 10.0)
        outputs += store.flush("changelog", 0)
        assert store.dead <= len(store.home) + 100, batch
        assert len(store.home) == min(batch + 1, 300) + 99
    outputs += store.flush("changelog", 0)  # the pages freed by the last batch get their tombstones
    tombstoned = {o.key for o in outputs if not o.value}
    alive = [o for o in outputs if pages.is_page_key(o.key) and o.value and o.key not in tombstoned]
    entries = sum(len(pages.decode(o.value)) for o in alive)
    assert entries <= 2 * len(store.home) + 100, (entries, len(store.home))
    back = restore(compacted(outputs, random.Random(3)), lambda: customer_store(lag=0))
    assert set(back.entities) == set(store.entities)
    for key in store.entities:
        assert probe(back, key, t + 1, True) == probe(store, key, t + 1, True)


def test_a_page_that_cannot_be_read_is_skipped_with_an_error_line_and_a_metric(
        caplog: pytest.LogCaptureFixture) -> None:
    from pipeline.config import KafkaSettings
    from tests.unit.test_state_hostile import TOPICS, Changelog
    from tests.worker_helpers import Record

    good = customer_store(lag=0)
    for name in ("alice", "bob"):
        state = CustomerWindows()
        state.update(1, T0, 5.0)
        good.change(name, state, EVENT, 1, T0, 5.0)
    first = good.flush(TOPICS.customer_changelog, 0)
    [page] = [o for o in first if pages.is_page_key(o.key)]
    records = [Record(o.value, i, TOPICS.customer_changelog, 0, o.key) for i, o in enumerate(first)]
    records.append(Record(page.value[:-3], len(records), TOPICS.customer_changelog, 0, b"\x00pbadbadbadbad/9"))
    metrics = WorkerMetrics(CollectorRegistry())
    restorer = Restorer(KafkaSettings.build(environ={}, overrides={}), "w", {}, metrics)
    restorer.consumer = Changelog(records)  # type: ignore[assignment]
    store = customer_store()
    restorer.restore(TOPICS.customer_changelog, 0, store, threading.Event())
    assert sorted(store.entities) == ["alice", "bob"]
    assert metrics.registry.get_sample_value("fraud_state_corrupt_records_total",
                                             {"topic": TOPICS.customer_changelog}) == 1
    assert any("is not a window state" in r.getMessage() for r in caplog.records)


@settings(max_examples=300, deadline=None)
@given(sizes=st.lists(st.integers(1, 300), max_size=50), limit=st.integers(1, 400))
def test_records_are_cut_into_consecutive_runs_within_the_size_limit(sizes: list[int], limit: int) -> None:
    """The one cutting rule of deltas and pages: every item once, in order, a run over the limit only alone."""
    cut = list(delta.runs(sizes, limit))
    assert [i for start, end in cut for i in range(start, end)] == list(range(len(sizes)))
    assert all(end - start == 1 or sum(sizes[start:end]) <= limit for start, end in cut)
    assert all(sum(sizes[a:b]) + sizes[b] > limit for (a, b), _ in itertools.pairwise(cut))  # none cut early
