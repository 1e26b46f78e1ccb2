"""Tables become wire records: every column travels, floats exactly, ids and times in form."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.config import KafkaSettings
from pipeline.errors import InputDataError
from pipeline.features import CREDITCARD_FEATURES, HANDBOOK_FEATURES, read_table
from pipeline.schema import Transaction, decode
from producer import send
from producer.header import read_columns
from producer.send import Pacer, make_producer
from producer.tables import check_columns, float32_as_decimal, iter_records, resolve_spec


def handbook_frame(n: int = 50, seed: int = 1) -> pd.DataFrame:
    """A small table in the handbook layout (values random, types as in the reference)."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "TRANSACTION_ID": np.arange(n, dtype=np.int64),
        "TX_DATETIME": pd.Timestamp("2018-04-01") + pd.to_timedelta(np.sort(rng.integers(0, 86400 * 3, n)), unit="s"),
        "CUSTOMER_ID": rng.integers(0, 20, n),
        "TERMINAL_ID": rng.integers(0, 40, n),
    })
    for name in HANDBOOK_FEATURES:
        frame[name] = (rng.random(n) * 100).astype(np.float32)
    frame["TX_FRAUD"] = (rng.random(n) < 0.1).astype(np.int32)
    frame["TX_FRAUD_SCENARIO"] = frame["TX_FRAUD"] * 2
    return frame


def creditcard_frame(n: int = 30) -> pd.DataFrame:
    rng = np.random.default_rng(2)
    frame = pd.DataFrame({"Time": np.arange(n, dtype=np.float64) * 1.5})
    for name in CREDITCARD_FEATURES:
        frame[name] = rng.normal(size=n)
    frame["Class"] = (rng.random(n) < 0.1).astype(int)
    return frame


def decoded(frame: pd.DataFrame, layout: str = "auto", **kw: object) -> list[tuple[bytes | None, Transaction]]:
    spec = resolve_spec(frame, layout)
    out = []
    for key, value in iter_records(frame, spec, chunk_rows=7, **kw):  # type: ignore[arg-type]
        tx = decode(value)
        assert isinstance(tx, Transaction), tx
        out.append((key, tx))
    return out


def test_handbook_rows_travel_intact() -> None:
    frame = handbook_frame()
    records = decoded(frame)
    assert len(records) == len(frame)
    for (key, tx), row in zip(records, frame.itertuples(index=False), strict=True):
        assert tx.transaction_id == str(row.TRANSACTION_ID)
        assert key == str(row.CUSTOMER_ID).encode()
        assert tx.event_time_ms == pd.Timestamp(row.TX_DATETIME, tz="UTC").value // 1_000_000
        for name in HANDBOOK_FEATURES:  # float32 values read back bit-exact
            assert np.float32(tx.fields[name]) == getattr(row, name)
        assert tx.fields["TX_FRAUD"] == row.TX_FRAUD


def test_drop_label_removes_label_and_scenario() -> None:
    (_, tx), *_ = decoded(handbook_frame(), drop_label=True)
    assert "TX_FRAUD" not in tx.fields and "TX_FRAUD_SCENARIO" not in tx.fields
    assert "TX_AMOUNT" in tx.fields


def test_creditcard_layout_numbers_rows_and_offsets_time() -> None:
    frame = creditcard_frame()
    records = decoded(frame)
    assert [tx.transaction_id for _, tx in records] == [str(i) for i in range(len(frame))]
    assert all(key is None for key, _ in records)
    start = records[0][1].event_time_ms
    assert records[3][1].event_time_ms - start == 4500
    assert records[5][1].fields["V3"] == frame["V3"].iloc[5]  # float64 exact


def test_generic_layout_needs_a_time_column() -> None:
    frame = pd.DataFrame({"when": [1, 2], "x": [1.0, 2.0]})
    with pytest.raises(InputDataError, match="--time-column"):
        resolve_spec(frame, "generic")
    spec = resolve_spec(frame, "generic", time_column="when")
    assert spec.time_unit == "s"


@pytest.mark.parametrize("kwargs, message", [
    ({"id_column": "nope"}, "--id-column 'nope': the table has no such column"),
    ({"key_column": "nope"}, "--key-column 'nope'"),
    ({"time_column": "nope"}, "--time-column 'nope'"),
    ({"label_column": "nope"}, "--label-column 'nope'"),  # was ignored: --drop-label then kept the label
])
def test_missing_flagged_column_is_named(kwargs: dict, message: str) -> None:
    with pytest.raises(InputDataError, match=message):
        resolve_spec(handbook_frame(), "auto", **kwargs)
    with pytest.raises(InputDataError, match=message):
        check_columns(list(handbook_frame(1).columns), "auto", **kwargs)


@pytest.mark.parametrize("name", ["t.parquet", "t.csv", "t.csv.gz", "t.csv.bz2", "t.tsv.xz"])
def test_read_columns_from_the_header_alone(tmp_path: Path, name: str) -> None:
    frame = pd.DataFrame({"when": [1, 2], "amount, EUR": [1.0, 2.0]})
    path = tmp_path / name
    if name.endswith(".parquet"):
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False, sep="\t" if ".tsv" in name else ",")
    assert read_columns(path) == ["when", "amount, EUR"]


def test_read_columns_reports_a_broken_parquet_and_leaves_odd_files_to_the_full_read(tmp_path: Path) -> None:
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputDataError, match="cannot be read as Parquet"):
        read_columns(tmp_path / "bad.parquet")
    (tmp_path / "bad.csv.gz").write_bytes(b"not gzip")
    assert read_columns(tmp_path / "bad.csv.gz") is None
    assert read_columns(tmp_path / "t.csv.zip") is None


def test_producer_delivery_timeout_follows_a_long_request_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    # kafka-python refuses delivery_timeout_ms < linger_ms + request_timeout_ms; its default is 120 s.
    seen: dict = {}
    monkeypatch.setattr(send, "KafkaProducer", lambda **options: seen.update(options))
    make_producer(KafkaSettings.build(environ={}, overrides={"request_timeout_ms": 300_000}))
    assert seen["delivery_timeout_ms"] >= seen["request_timeout_ms"] + seen["linger_ms"]


def test_missing_values_in_nonfeature_columns_become_null() -> None:
    frame = handbook_frame(5)
    frame["note"] = [1.0, np.nan, 3.0, np.nan, 5.0]
    records = decoded(frame)
    assert records[1][1].fields["note"] is None
    assert orjson.loads(orjson.dumps(records[0][1].fields))["note"] == 1.0


def test_read_table_errors(tmp_path: Path) -> None:
    with pytest.raises(InputDataError, match="no such file"):
        read_table(tmp_path / "missing.csv")
    (tmp_path / "x.txt").write_text("a,b\n1,2\n")
    with pytest.raises(InputDataError, match="unknown file type"):
        read_table(tmp_path / "x.txt")
    (tmp_path / "empty.csv").write_text("a,b\n")
    with pytest.raises(InputDataError, match="no rows"):
        read_table(tmp_path / "empty.csv")


def test_float32_as_decimal_is_shortest_and_exact() -> None:
    values = np.random.default_rng(3).normal(scale=1e3, size=10_000).astype(np.float32)
    out = float32_as_decimal(values)
    assert (out.astype(np.float32) == values).all()
    for v in out[:500]:  # at most 9 significant digits: float32 needs no more
        mantissa = repr(abs(float(v))).split("e")[0].replace(".", "").strip("0")
        assert len(mantissa) <= 9, v


def test_pacer_spaces_events_and_catches_up() -> None:
    now = [100.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    pacer = Pacer(10.0, clock=lambda: now[0], sleep=sleep)
    pacer.wait(0)
    pacer.wait(1)
    assert slept == [pytest.approx(0.1)]
    now[0] += 1.0  # fell behind: no sleeping until on schedule again
    pacer.wait(2)
    assert len(slept) == 1
    Pacer(0.0, clock=lambda: 0.0, sleep=sleep).wait(5)
    assert len(slept) == 1


class _Future:
    """A send's future as kafka-python gives it: done once acknowledged (here: on flush, or when the test
    says the broker answered on its own)."""

    def __init__(self) -> None:
        self.is_done = False
        self._callbacks: list = []

    def add_callback(self, fn: Callable[[object], None]) -> _Future:
        if self.is_done:
            fn(None)
        else:
            self._callbacks.append(fn)
        return self

    def add_errback(self, _fn: object) -> _Future:
        return self

    def ack(self) -> None:
        if not self.is_done:
            self.is_done = True
            for fn in self._callbacks:
                fn(None)


class _OrderProducer:
    """Records what each send found already acknowledged."""

    def __init__(self, acked_alone: list[bool]) -> None:
        self.futures: list[tuple[str, _Future]] = []
        self.flushes = 0
        self.acked_alone = iter(acked_alone)
        self.unacked_labels_at_tx: list[int] = []

    def send(self, topic: str, key: bytes | None, value: bytes) -> _Future:
        if topic == "tx":
            self.unacked_labels_at_tx.append(sum(not f.is_done for t, f in self.futures if t == "labels"))
        future = _Future()
        self.futures.append((topic, future))
        if next(self.acked_alone, False):  # the broker answered before the next send
            future.ack()
        return future

    def flush(self, timeout: float | None = None) -> None:
        self.flushes += 1
        for _, future in self.futures:
            future.ack()


@given(st.lists(st.tuples(st.sampled_from(["tx", "labels"]), st.booleans()), max_size=60))
def test_each_label_is_acknowledged_before_the_next_transaction_is_sent(feed: list[tuple[str, bool]]) -> None:
    producer = _OrderProducer([alone for _, alone in feed])
    records = [(topic, b"k", b"v") if topic == "labels" else (b"k", b"v") for topic, _ in feed]
    report = send.send_records(records, "tx", producer, progress=False)  # type: ignore[arg-type]
    assert report.sent == report.acked == len(feed)
    assert producer.unacked_labels_at_tx == [0] * sum(topic == "tx" for topic, _ in feed)
    # a wait only where a label sent since the last transaction was still unacknowledged
    needed = 0
    pending = False
    for topic, alone in feed:
        if topic == "tx":
            needed += pending
            pending = False
        else:
            pending = pending or not alone
    assert report.side_waits == needed


def test_restamp_uses_send_time_and_keeps_the_original() -> None:
    frame = handbook_frame(600)
    spec = resolve_spec(frame, "handbook")
    records = [decode(v) for _, v in iter_records(frame, spec, restamp_rate=100.0, clock=lambda: 2_000_000_000.0)]
    assert all(isinstance(r, Transaction) for r in records)
    first, second, late = records[0], records[1], records[300]
    assert first.event_time_ms == 2_000_000_000_000
    assert second.event_time_ms - first.event_time_ms == 10  # 100 tx/s
    assert late.event_time_ms >= 2_000_000_000_000  # stamped when its chunk was built
    original = pd.Timestamp(frame["TX_DATETIME"].iloc[0], tz="UTC")
    assert first.fields["source_event_time"] == original.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def test_a_table_of_no_known_layout_takes_a_column_named_like_a_time() -> None:
    """`fraud-train fit` leaves a `time` column out of the features; `replay` now takes it as the time column
    (it said `no time column` before)."""
    frame = pd.DataFrame({"amount": [1.0, 2.0], "Timestamp": ["2024-01-01T00:00:00Z", "2024-01-01T00:00:01Z"]})
    spec = resolve_spec(frame)
    assert spec.time_column == "Timestamp"
    values = [orjson.loads(v) for _k, v in iter_records(frame, spec)]
    assert [v["event_time"] for v in values] == ["2024-01-01T00:00:00.000Z", "2024-01-01T00:00:01.000Z"]


def test_a_table_without_time_replays_with_restamp_and_says_how_without() -> None:
    frame = pd.DataFrame({"amount": [1.0, 2.0, 3.0], "merchant": ["a", "b", "c"]})
    with pytest.raises(InputDataError, match="--restamp"):
        resolve_spec(frame)
    spec = resolve_spec(frame, restamp=True)
    assert spec.time_column is None
    values = [orjson.loads(v) for _k, v in iter_records(frame, spec, restamp_rate=0, clock=lambda: 1_700_000_000.0)]
    assert [v["event_time"] for v in values] == ["2023-11-14T22:13:20.000Z"] * 3
    assert [v["amount"] for v in values] == [1.0, 2.0, 3.0] and "source_event_time" not in values[0]


def test_an_unknown_column_names_the_flag_and_the_close_matches() -> None:
    frame = pd.DataFrame({"when": [1, 2], "amount": [1.0, 2.0], "label": [0, 1]})
    with pytest.raises(InputDataError) as refused:
        resolve_spec(frame, "auto", time_column="when", label_column="Label")
    assert str(refused.value) == ("--label-column 'Label': the table has no such column (did you mean 'label'?); "
                                  "it has: when, amount, label")


def test_replay_refuses_a_word_in_a_feature_column_with_the_line_fit_says() -> None:
    """Replay sent such a table as it was (the worker dead-lettered its rows); fit refused it. Now both refuse
    it with one line, from one function (pipeline.features.check_table)."""
    from trainer.data import LayoutFlags, resolve_layout

    frame = pd.DataFrame({"when": np.arange(9), "amount": np.arange(9.0), "note": "text"}).astype({"amount": object})
    frame.loc[[2, 5], "amount"] = ["abc", "x"]
    with pytest.raises(InputDataError) as replayed:
        resolve_spec(frame, "auto", time_column="when")
    assert str(replayed.value).startswith("column 'amount', data row 3 (1-based, header not counted): 'abc' is not")
    with pytest.raises(InputDataError) as fitted:
        resolve_layout(frame, LayoutFlags(time_column="when"))
    assert str(fitted.value) == str(replayed.value)
    handbook = handbook_frame().astype({"TX_AMOUNT": object})
    handbook.loc[7, "TX_AMOUNT"] = "twelve"  # a known layout: any word in a feature column
    with pytest.raises(InputDataError, match=r"column 'TX_AMOUNT', data row 8 .*'twelve' is not a number"):
        resolve_spec(handbook, "auto")
