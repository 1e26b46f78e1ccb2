"""Streaming features without a broker: one implementation, whatever the arrival order, replays and restores.

The offline table (:func:`feature_table`, what the simulator and the trainer use) is the fold
of the same per-event code in time order. These tests stream it the ways Kafka delivers it:
a customer's events in partition order with replays after a crash, a terminal's events
interleaved by the repartition hop, labels arriving when the bank learns them, state
serialized to the changelog and restored mid-stream. Every feature must equal the table.
"""

from __future__ import annotations

import dataclasses
import json
import random
import threading
import time
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka import TopicPartition
from prometheus_client import CollectorRegistry

from pipeline.errors import ConfigError
from pipeline.schema import RecordError, decode
from pipeline.streamfeatures import (
    CALENDAR_FEATURES,
    CUSTOMER_FEATURES,
    DAY_MS,
    TERMINAL_FEATURES,
    CustomerWindows,
    TerminalWindows,
    calendar,
    event_id,
    feature_table,
)
from pipeline.worker.metrics import WorkerMetrics
from pipeline.worker.state import FeatureStages, StateTopics
from pipeline.worker.state.topology import judge as _judge
from producer.rawfeed import raw_messages
from producer.simulator import SimulatorConfig, simulate
from producer.tables import resolve_spec
from tests.worker_helpers import PausingConsumer, Record, hop_records

DELAY_MS = 7 * DAY_MS
TOPICS = StateTopics("raw", "labels", "g-by-terminal-repartition", "g-customer-windows-changelog",
                     "g-terminal-windows-changelog", 1)
# partition count not known: the alignment sees the partitions owned or heard of (the tests of alignment use 2 or 3)
UNSIZED = dataclasses.replace(TOPICS, partitions=0)


@pytest.fixture(scope="module")
def bank() -> pd.DataFrame:
    """A small bank over 40 days with many compromised terminals (non-zero risks)."""
    frame = simulate(SimulatorConfig(n_customers=60, n_terminals=120, n_days=40, seed=2,
                                     terminals_compromised_per_day=0.3))
    frame["T_MS"] = frame["TX_DATETIME"].to_numpy().astype("datetime64[ms]").astype(np.int64)
    return frame


def _expected(bank: pd.DataFrame, names: tuple[str, ...]) -> np.ndarray:
    return bank[list(names)].to_numpy(np.float32)


def _roundtrip(states: dict[Any, Any], cls: type) -> dict[Any, Any]:
    return {key: cls.from_bytes(state.to_bytes()) for key, state in states.items()}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), replay=st.floats(0, 0.3), restore=st.floats(0, 0.02))
def test_customer_windows_equal_the_table_with_replays_and_restores(bank: pd.DataFrame, seed: int, replay: float,
                                                                    restore: float) -> None:
    """Events in time order (a partition keeps a customer's order); after a crash a stretch is read again
    (replays of events already counted) and state comes back from its serialized form."""
    rng = random.Random(seed)
    expected = _expected(bank, CUSTOMER_FEATURES)
    rows = list(zip(bank["TRANSACTION_ID"].astype(str), bank["CUSTOMER_ID"], bank["T_MS"], bank["TX_AMOUNT"],
                    strict=True))
    states: dict[int, CustomerWindows] = {}
    got = np.zeros_like(expected)
    for i, (tx_id, customer, t_ms, amount) in enumerate(rows):
        windows = states.setdefault(customer, CustomerWindows())
        got[i] = windows.update(event_id(tx_id), int(t_ms), float(amount))
        if rng.random() < replay:  # an earlier event of the same stretch arrives again: same features, no count
            j = rng.randrange(max(0, i - 20), i + 1)
            again = states[rows[j][1]].update(event_id(rows[j][0]), int(rows[j][2]), float(rows[j][3]))
            np.testing.assert_allclose(np.float32(again), expected[j], rtol=2.4e-7)
        if rng.random() < restore:
            states = _roundtrip(states, CustomerWindows)
    np.testing.assert_allclose(got, expected, rtol=2.4e-7)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), jitter_h=st.floats(0, 20), label_early_days=st.floats(0, 6.9),
       restore=st.floats(0, 0.02))
def test_terminal_windows_equal_the_table_whatever_the_interleaving(bank: pd.DataFrame, seed: int, jitter_h: float,
                                                                   label_early_days: float, restore: float) -> None:
    """The repartition hop interleaves partitions: a terminal's events arrive up to ``jitter_h`` hours out of
    order; each fraud's label arrives between the transaction and the delay (early is harmless)."""
    rng = random.Random(seed)
    expected = _expected(bank, TERMINAL_FEATURES)
    arrivals = []  # (arrival key, kind, row)
    for i, (t_ms, fraud) in enumerate(zip(bank["T_MS"], bank["TX_FRAUD"], strict=True)):
        arrivals.append((int(t_ms) + rng.uniform(0, jitter_h) * 3_600_000, 1, i))
        if fraud:
            arrivals.append((int(t_ms) + DELAY_MS - label_early_days * DAY_MS, 0, i))
    arrivals.sort()
    states: dict[int, TerminalWindows] = {}
    got = np.zeros_like(expected)
    ids = bank["TRANSACTION_ID"].astype(str).tolist()
    for _, kind, i in arrivals:
        terminal, t_ms = bank["TERMINAL_ID"].iat[i], int(bank["T_MS"].iat[i])
        windows = states.setdefault(terminal, TerminalWindows())
        if kind == 0:
            windows.label(event_id(ids[i]), t_ms)
        else:
            got[i] = windows.update(event_id(ids[i]), t_ms)
        if rng.random() < restore:
            states = _roundtrip(states, TerminalWindows)
    assert expected[:, 3:].max() > 0  # some terminal risk is not zero
    np.testing.assert_allclose(got, expected, rtol=2.4e-7)


def test_calendar_features_follow_the_utc_calendar() -> None:
    saturday_5am = pd.Timestamp("2018-04-07T05:59:59Z").value // 1_000_000
    monday_7am = pd.Timestamp("2018-04-09T07:00:00Z").value // 1_000_000
    assert calendar(saturday_5am) == (1.0, 1.0)
    assert calendar(monday_7am) == (0.0, 0.0)


def test_an_event_too_late_to_keep_gets_features_but_no_place() -> None:
    windows = CustomerWindows()
    windows.update(1, 100 * DAY_MS, 10.0)
    late = windows.update(2, 50 * DAY_MS, 30.0)  # 50 days before the newest: beyond the 31-day horizon
    assert late[:3] == (1.0, 1.0, 1.0) and late[3:] == (30.0, 30.0, 30.0)
    assert list(windows.ids) == [1]


def test_a_withdrawn_label_stops_counting() -> None:
    windows = TerminalWindows()
    windows.update(1, 0)
    windows.label(1, 0)
    later = DELAY_MS + DAY_MS // 2  # the 1-day window 7 days back holds the event at 0
    assert windows.update(2, later)[3] == 1.0  # 1 fraud of 1
    windows.label(1, 0, fraud=False)
    assert windows.update(3, later + 1)[3] == 0.0


def test_a_corrupt_changelog_value_is_refused() -> None:
    with pytest.raises(ValueError, match="not a feature state"):
        CustomerWindows.from_bytes(b"\x09garbage")


def test_offline_table_is_unchanged_by_extra_columns_and_keeps_the_handbook_order(bank: pd.DataFrame) -> None:
    again = feature_table(bank.drop(columns=[*CUSTOMER_FEATURES, *TERMINAL_FEATURES]))
    pd.testing.assert_frame_equal(again[list(bank.columns)], bank)


# -- the worker's stages on hostile input ------------------------------------------------------------
class NoRestore:
    def restore(self, topic: str, partition: int, store: Any, stop: threading.Event) -> int:
        return 0


def stages(clock: Any = None, topics: StateTopics = TOPICS) -> FeatureStages:
    made = FeatureStages(topics, 7, NoRestore(), WorkerMetrics(CollectorRegistry()), 65536,  # type: ignore[arg-type]
                         threading.Event(), clock=clock or time.monotonic)
    made.sync({TopicPartition(t, p) for t in topics.consumed for p in range(3)})
    return made


def test_raw_records_go_through_both_stages_as_the_offline_table_says(bank: pd.DataFrame) -> None:
    """The worker's own stage code over the producer's raw feed: customer stage, repartition (by key
    hash, here by partition 0), labels, terminal stage: features as in the table."""
    spec = resolve_spec(bank.drop(columns=["T_MS"]), "handbook")
    feed = list(raw_messages(bank.drop(columns=["T_MS"]), spec, "raw", "labels", 7.0))
    made = stages()
    featured = []
    for offset, (topic, key, value) in enumerate(feed):
        record = Record(value, offset, topic, 0, key)
        if topic == "labels":
            assert made.stage([], [record]).failed == []
            continue
        staged = made.stage([record], [])
        assert staged.failed == [] and len(staged.outputs) == 1
        (hop,) = hop_records(staged.outputs, offset)
        assert hop.topic == TOPICS.repartition and hop.key == str(orjson.loads(value)["TERMINAL_ID"]).encode()
        tx = decode(hop.value)
        assert not isinstance(tx, RecordError)
        assert made.enrich(hop, tx) is None
        featured.append(tx.fields)
    got = np.array([[f[n] for n in (*CALENDAR_FEATURES, *CUSTOMER_FEATURES, *TERMINAL_FEATURES)] for f in featured],
                   dtype=np.float32)
    np.testing.assert_allclose(got, _expected(bank, (*CALENDAR_FEATURES, *CUSTOMER_FEATURES, *TERMINAL_FEATURES)),
                               rtol=2.4e-7)
    changelog = made.changelog()
    assert {o.topic for o in changelog} == {TOPICS.customer_changelog, TOPICS.terminal_changelog}
    assert all(o.partition == 0 for o in changelog)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=300),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6)


@settings(max_examples=300, deadline=None)
@given(customer=JSON_VALUES, terminal=JSON_VALUES, amount=JSON_VALUES, label=JSON_VALUES,
       drop=st.sets(st.sampled_from(["CUSTOMER_ID", "TERMINAL_ID", "TX_AMOUNT", "TX_FRAUD"])))
def test_every_raw_or_label_record_is_staged_or_refused_never_raised(customer: Any, terminal: Any, amount: Any,
                                                                     label: Any, drop: set[str]) -> None:
    fields = {"transaction_id": "t1", "event_time": 1522540831000, "CUSTOMER_ID": customer,
              "TERMINAL_ID": terminal, "TX_AMOUNT": amount, "TX_FRAUD": label}
    for name in drop:
        del fields[name]
    value = json.dumps(fields).encode()  # the standard library writes integers beyond 64 bits too
    made = stages()
    raw = made.stage([Record(value, 0, "raw", 0)], [])
    labels = made.stage([], [Record(value, 0, "labels", 0)])
    assert len(raw.outputs) + len(raw.failed) == 1  # staged, or refused with a reason
    assert labels.outputs == [] and len(labels.failed) <= 1
    for _record, error in raw.failed + labels.failed:
        assert error.reason in {"missing_field", "bad_type", "out_of_range", "not_json"}, error  # not a crash
    if raw.outputs:
        (hop,) = hop_records(raw.outputs)
        assert hop.key and isinstance(hop.value, bytes)
        staged = orjson.loads(hop.value)
        assert all(name in staged for name in CUSTOMER_FEATURES)
        assert made.changelog()  # its customer's new state goes to the changelog


def test_a_stage_that_breaks_on_one_record_dead_letters_it_and_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    made = stages()
    good = orjson.dumps({"transaction_id": "a", "event_time": 1522540831000, "CUSTOMER_ID": 1, "TERMINAL_ID": 2,
                         "TX_AMOUNT": 3.5})
    bad = good.replace(b'"a"', b'"boom"')
    real = made._customer

    def flaky(record: Any, tx: Any) -> Any:
        if tx.transaction_id == "boom":
            raise RuntimeError("state store broke")
        return real(record, tx)

    monkeypatch.setattr(made, "_customer", flaky)
    staged = made.stage([Record(bad, 0, "raw", 0), Record(good, 1, "raw", 0)], [])
    assert [orjson.loads(r.value)["transaction_id"] for r in hop_records(staged.outputs)] == ["a"]
    assert [(r.offset, e.reason) for r, e in staged.failed] == [(0, "processing_error")]


# -- the start-up check of the input form ----------------------------------------------------------
class Model:
    version = "v1"

    def __init__(self, form: str) -> None:
        from pipeline.features import HANDBOOK_FEATURES

        self.input_form, self.feature_names = form, HANDBOOK_FEATURES


RAW = orjson.dumps({"transaction_id": "1", "event_time": 1522540831000, "CUSTOMER_ID": 1, "TERMINAL_ID": 2,
                    "TX_AMOUNT": 3.0})


def test_a_features_model_on_a_raw_topic_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"look like raw transactions.*--input raw"):
        _judge([RAW, b"garbage"], Model("features"), "tx")


def test_a_raw_model_on_records_without_raw_fields_is_refused() -> None:
    record = orjson.dumps({"transaction_id": "1", "event_time": 1522540831000, "V1": 1.0})
    with pytest.raises(ConfigError, match=r"expects raw transactions.*no CUSTOMER_ID"):
        _judge([record], Model("raw"), "tx")


def test_garbage_or_an_empty_topic_says_nothing_at_start() -> None:
    _judge([], Model("raw"), "tx")
    _judge([b"{not json", b"[1]"], Model("features"), "tx")
    _judge([RAW], Model("raw"), "tx")


class StuckChangelog:
    """A consumer whose changelog partition has 10 records that never arrive."""

    def assign(self, partitions: list) -> None: ...

    def seek_to_beginning(self, tp: TopicPartition) -> None: ...

    def end_offsets(self, partitions: list) -> dict:
        return {tp: 10 for tp in partitions}

    def position(self, tp: TopicPartition) -> int:
        return 0

    def poll(self, timeout_ms: int) -> dict:
        return {}


def test_a_stop_during_restore_never_leaves_a_half_restored_store_in_service() -> None:
    from pipeline.config import KafkaSettings
    from pipeline.worker.delivery import StopWithoutCommit
    from pipeline.worker.state import Restorer, Store

    restorer = Restorer(KafkaSettings.build(environ={}, overrides={}), "w", {})
    restorer.consumer = StuckChangelog()  # type: ignore[assignment]
    stop = threading.Event()
    stop.set()
    with pytest.raises(StopWithoutCommit, match="restoring"):
        restorer.restore("changelog", 0, Store(CustomerWindows, CustomerWindows.from_bytes), stop)


# -- event-time alignment of a worker's input partitions ------------------------------------------------
class AligningConsumer(PausingConsumer):
    """What ``FeatureStages.align`` reads and sets on a consumer: positions, high watermarks, pauses."""

    def __init__(self, partitions: int = 3) -> None:
        super().__init__([TopicPartition(TOPICS.input, p) for p in range(partitions)])
        self.ends: dict[TopicPartition, int | None] = dict.fromkeys(self.parts)  # None: not fetched yet

    def assignment(self) -> set[TopicPartition]:
        return {*self.parts, TopicPartition(TOPICS.repartition, 0)}

    def highwater(self, tp: TopicPartition) -> int | None:
        return self.ends[tp]


HOUR = 3_600_000


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def aligned(made: FeatureStages, consumer: AligningConsumer, clock: Clock, now: float) -> set[TopicPartition]:
    clock.now = now
    made.align(consumer)
    return consumer.held


def test_a_partition_not_fetched_yet_holds_the_others_past_the_idle_limit(caplog: pytest.LogCaptureFixture) -> None:
    """Just assigned, partition 0 has read a day of its backlog while 1 and 2 were not fetched yet (a slow
    first batch): 0 waits for them, however long past IDLE_S, until they are read, or until
    UNFETCHED_MAX_S if they never are (then with one warning)."""
    clock = Clock()
    made, consumer = stages(clock, UNSIZED), AligningConsumer()
    p0, p1, p2 = consumer.parts
    made.watermarks.stream[0] = 24 * HOUR
    consumer.ends[p0], consumer.positions[p0] = 9000, 3000
    for now in (0.0, 0.5, 5.0, 29.0):
        assert aligned(made, consumer, clock, now) == {p0}, now
    consumer.ends[p1], consumer.positions[p1] = 8000, 0  # fetched: records to read, event time not known yet
    assert aligned(made, consumer, clock, 29.5) == {p0}
    made.watermarks.stream[1] = HOUR  # read: 23 h behind partition 0
    assert aligned(made, consumer, clock, 40.0) == {p0}  # partition 2 never fetched: given up on, with a warning
    made.watermarks.stream[1] = 23 * HOUR + 1
    assert aligned(made, consumer, clock, 41.0) == set()
    assert [r.getMessage() for r in caplog.records].count(
        f"input partition {p2} not fetched 40 s after assignment; the others go on without it (its late "
        "transactions count in fraud_late_events_total)") == 1


def test_a_partition_revoked_and_assigned_again_within_one_poll_waits_anew_to_be_fetched() -> None:
    """Partition 1 was unfetched for a moment after the first assignment, then read; 100 s later it is revoked
    and assigned again inside one poll (the worker sees the same partitions before and after), so it is not
    fetched again yet. It holds partition 0 for UNFETCHED_MAX_S from then, not from the first assignment."""
    clock = Clock()
    made, consumer = stages(clock, UNSIZED), AligningConsumer(2)
    p0, p1 = consumer.parts
    made.watermarks.stream[0] = 24 * HOUR
    consumer.ends[p0], consumer.positions[p0] = 9000, 3000
    assert aligned(made, consumer, clock, 0.0) == {p0}  # partition 1 not fetched yet
    consumer.ends[p1], consumer.positions[p1] = 100, 0
    made.watermarks.stream[1] = HOUR
    assert aligned(made, consumer, clock, 1.0) == {p0}  # fetched, behind: it holds 0
    consumer.ends[p1] = None  # reassigned within one poll: its fetch position and high watermark are gone
    made.watermarks.stream.pop(1)
    assert aligned(made, consumer, clock, 100.0) == {p0}
    assert aligned(made, consumer, clock, 129.0) == {p0}
    assert aligned(made, consumer, clock, 130.0) == set()  # given up on, 30 s after the reassignment


def test_a_partition_with_records_to_read_holds_the_others_however_long() -> None:
    clock = Clock()
    made, consumer = stages(clock, UNSIZED), AligningConsumer(2)
    p0, p1 = consumer.parts
    made.watermarks.stream.update({0: 10 * HOUR, 1: 2 * HOUR})
    consumer.ends.update({p0: 500, p1: 500})
    consumer.positions.update({p0: 100, p1: 100})
    for now in (0.0, 10.0, 100.0):
        assert aligned(made, consumer, clock, now) == {p0}
    consumer.positions[p1] = 500  # read all it has: it holds partition 0 for IDLE_S, no longer
    assert aligned(made, consumer, clock, 100.5) == {p0}
    assert aligned(made, consumer, clock, 101.6) == set()
    consumer.ends[p1] = 600  # more arrives, behind partition 0: it holds again
    assert aligned(made, consumer, clock, 102.0) == {p0}


def test_alignment_timers_start_again_when_a_partition_comes_back() -> None:
    clock = Clock()
    made, consumer = stages(clock, UNSIZED), AligningConsumer(2)
    p0, p1 = consumer.parts
    made.watermarks.stream[0] = 10 * HOUR
    consumer.ends[p0] = 500
    aligned(made, consumer, clock, 0.0)
    assert aligned(made, consumer, clock, 31.0) == set()  # partition 1 never fetched: given up on
    consumer.parts = [p0]  # revoked, then assigned again: a new wait
    aligned(made, consumer, clock, 31.5)
    consumer.parts = [p0, p1]
    aligned(made, consumer, clock, 32.0)
    assert aligned(made, consumer, clock, 40.0) == {p0}


def test_a_replay_after_later_events_gets_its_first_features() -> None:
    """Windows evict by the newest event, floored by the oldest event that may still be read again."""
    from pipeline.streamfeatures import DAY_MS, CustomerWindows

    windows, t0 = CustomerWindows(), 1_530_000_000_000
    for day in range(36):  # one transaction a day, days 0-35
        windows.update(1000 + day, t0 + day * DAY_MS, 10.0)
    floor = t0 + 35 * DAY_MS  # day 35's transaction is not committed yet
    first = windows.update(1035, t0 + 35 * DAY_MS, 10.0, floor)  # 30 in its 30-day window (days 6-35)
    windows.update(2000, t0 + 38 * DAY_MS, 10.0, floor)  # a later batch of the same partition, already applied
    assert windows.update(1035, t0 + 35 * DAY_MS, 10.0, floor) == first  # the replay of the refused batch
    windows.update(2001, t0 + 39 * DAY_MS, 10.0)  # committed since: eviction catches up
    assert windows.update(1035, t0 + 35 * DAY_MS, 10.0) != first


def test_the_stages_keep_what_an_uncommitted_batch_needs_until_it_is_committed() -> None:
    """The worker's path (issue 18, found 2026-12-06): pipelined batches N and N+1 of one input partition are
    staged, N's commit is refused and N is read again. Before, N+1 (3 days later) had evicted the oldest days
    of N's windows and the replay was scored from them (28 transactions in the 30-day window, not 30)."""
    made, t0 = stages(), 1_530_000_000_000
    tp = TopicPartition(TOPICS.input, 0)

    def tx(offset: int, day: int) -> Record:
        value = orjson.dumps({"transaction_id": f"t{offset}", "event_time": t0 + day * DAY_MS, "CUSTOMER_ID": 7,
                              "TERMINAL_ID": offset, "TX_AMOUNT": 10.0})
        return Record(value, offset, TOPICS.input, 0, b"7")

    def customer_features(staged: Any) -> list[float]:
        (hop,) = hop_records(staged.outputs)
        return [orjson.loads(hop.value)[n] for n in CUSTOMER_FEATURES]

    for day in range(35):  # days 0-34, committed
        made.stage([tx(day, day)], [])
        made.staged({tp: day + 1})
        made.committed({tp: day + 1})
    first = customer_features(made.stage([tx(35, 35)], []))  # batch N
    made.staged({tp: 36})
    made.stage([tx(36, 38)], [])  # batch N+1, in flight
    made.staged({tp: 37})
    made.changelog()  # the sweep, as after every batch, keeps them too
    assert first[2] == 30.0  # the 30-day count
    assert customer_features(made.stage([tx(35, 35)], [])) == first  # N read again: as the first time
    made.staged({tp: 36})
    made.committed({tp: 37})  # all committed now: the next event evicts what no window needs
    made.stage([tx(37, 39)], [])
    assert made.customers[0].entities["7"].times[0] == t0 + 9 * DAY_MS  # days 0-8 gone


def test_batches_that_are_never_committed_are_named_in_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """Windows keep what uncommitted batches need; commits that stop arriving would make that memory grow
    without a word."""
    from pipeline.worker.state.stages import UNCOMMITTED_WARN

    made, t0 = stages(), 1_530_000_000_000
    tp = TopicPartition(TOPICS.input, 0)
    for offset in range(UNCOMMITTED_WARN):
        value = orjson.dumps({"transaction_id": f"t{offset}", "event_time": t0 + offset * 60_000, "CUSTOMER_ID": 7,
                              "TERMINAL_ID": 1, "TX_AMOUNT": 10.0})
        made.stage([Record(value, offset, TOPICS.input, 0, b"7")], [])
        made.staged({tp: offset + 1})
    (line,) = [r.getMessage() for r in caplog.records if "none committed" in r.getMessage()]
    assert line.startswith(f"raw[0]: {UNCOMMITTED_WARN} batches staged") and "2018-06-26" in line
