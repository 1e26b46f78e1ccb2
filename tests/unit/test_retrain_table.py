"""``fraud-train retrain``'s table from topic values (``trainer.stream``) and its flags, without a broker."""

from __future__ import annotations

import json
from collections.abc import Iterator

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import ConfigError, InputDataError
from pipeline.schema import format_event_time
from pipeline.streamfeatures import DAY_MS
from trainer.cli import run
from trainer.options import split_days
from trainer.stream import fraud_ids, training_table

NAMES = ("a", "b")
T0 = 1_600_000_000_000 // DAY_MS * DAY_MS  # a midnight


def features(tx: str, day: float, a: float = 1.0, customer: str | None = "c1", **more: object) -> bytes:
    record = {"transaction_id": tx, "event_time": format_event_time(T0 + round(day * DAY_MS)), "a": a, "b": 2.0,
              "score": 0.1, **more}
    if customer is not None:
        record["CUSTOMER_ID"] = customer
    return orjson.dumps(record)


def test_the_table_takes_each_transaction_of_the_range_once_labelled_by_the_labels_topic() -> None:
    values = [features("t1", 0.5), features("t2", 1.5, a=3.0), features("t2", 1.5, a=3.0),  # repeated
              features("t3", 2.5), features("early", -0.5), features("late", 3.0),  # out of range
              b"not json", orjson.dumps({"transaction_id": "t9", "event_time": "yesterday", "a": 1, "b": 2}),
              orjson.dumps({"transaction_id": None, "event_time": format_event_time(T0), "a": 1, "b": 2}),
              features("t7", 0.7, a="1.5"), features("t6", 0.7, a=True),
              orjson.dumps({"transaction_id": "t8", "event_time": format_event_time(T0), "a": 1}),  # no b
              features("newest", 10.0)]
    labels = [orjson.dumps({"transaction_id": "t2", "TX_FRAUD": 1}),
              orjson.dumps({"transaction_id": "t3", "TX_FRAUD": 1}),
              orjson.dumps({"transaction_id": "t3", "TX_FRAUD": 0}),  # taken back
              orjson.dumps({"transaction_id": "t1"}), orjson.dumps({"transaction_id": "t1", "TX_FRAUD": 1.0}),
              orjson.dumps({"transaction_id": "early", "TX_FRAUD": 1}), b"\xff"]
    assert fraud_ids(labels) == {"t2", "early"}
    table = training_table(values, labels, NAMES, T0, T0 + 3 * DAY_MS, delay_days=7)
    frame = table.frame
    assert frame["TRANSACTION_ID"].tolist() == ["t1", "t2", "t3"]
    assert frame["TX_FRAUD"].tolist() == [0, 1, 0]
    assert frame["a"].tolist() == [1.0, 3.0, 1.0]
    assert frame["CUSTOMER_ID"].tolist() == ["c1"] * 3
    assert (table.repeated, table.unreadable, table.features_records, table.labels) == (1, 6, len(values), 2)
    assert table.layout.features == NAMES and table.layout.key_column == "CUSTOMER_ID"
    assert table.newest_ms == T0 + 10 * DAY_MS


def test_a_range_whose_labels_are_not_all_due_is_refused_naming_the_last_day_that_is() -> None:
    values = [features("t1", 0.5), features("newest", 9.5)]  # labels due up to day 2.5: complete for days < 2
    with pytest.raises(InputDataError, match=r"labels are complete up to 2020-09-15 \(pass --until 2020-09-15"):
        training_table(values, [], NAMES, T0, T0 + 3 * DAY_MS, delay_days=7)
    assert len(training_table(values, [], NAMES, T0, T0 + 2 * DAY_MS, delay_days=7).frame) == 1


def test_an_empty_range_and_a_topic_without_the_features_are_refused() -> None:
    with pytest.raises(InputDataError, match="no transaction published between"):
        training_table([features("newest", 20.0)], [], NAMES, T0, T0 + 3 * DAY_MS, delay_days=7)
    with pytest.raises(InputDataError, match="no scored transaction with the model's features"):
        training_table([features("t1", 0.5)], [], ("a", "missing"), T0, T0 + 3 * DAY_MS, delay_days=7)


def test_without_a_customer_on_every_record_the_table_has_no_key_column() -> None:
    table = training_table([features("t1", 0.5), features("t2", 0.6, customer=None), features("n", 20.0)], [],
                           NAMES, T0, T0 + 3 * DAY_MS, delay_days=7)
    assert table.layout.key_column is None and "CUSTOMER_ID" not in table.frame.columns
    odd = orjson.dumps({"transaction_id": "t3", "event_time": format_event_time(T0 + 1000), "a": 1.0, "b": 2.0,
                        "CUSTOMER_ID": ["not", "a", "key"]})
    table = training_table([features("t1", 0.5), odd, features("n", 20.0)], [], NAMES, T0, T0 + 3 * DAY_MS,
                           delay_days=7)
    assert table.layout.key_column is None and len(table.frame) == 2


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=40), st.dictionaries(
    st.sampled_from(["transaction_id", "event_time", "a", "b", "CUSTOMER_ID"]),
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12),
              st.lists(st.integers(), max_size=2))).map(lambda d: json.dumps(d).encode())), max_size=12))
def test_any_values_on_the_topics_give_a_table_or_one_input_error(values: list[bytes]) -> None:
    """Whatever a producer put on the features and labels topics: a table or InputDataError, never a crash."""
    values = [*values, features("t1", 0.5), features("newest", 20.0)]
    try:
        table = training_table(values, values, NAMES, T0, T0 + 3 * DAY_MS, delay_days=7)
    except InputDataError:
        return
    assert table.frame["TRANSACTION_ID"].is_unique and len(table.frame) >= 1


def test_split_days_keep_the_newest_days_for_the_test_and_a_fifth_before_them_for_validation() -> None:
    assert split_days("2018-05-01", "2018-06-02", 7) == ("2018-05-21T00:00:00+00:00", "2018-05-26T00:00:00+00:00")
    with pytest.raises(ConfigError, match="needs the 7 test days"):
        split_days("2018-05-01", "2018-05-09", 7)
    with pytest.raises(ConfigError, match="must be before"):
        split_days("2018-05-09", "2018-05-01", 7)


@pytest.mark.parametrize(("flags", "said"), [
    (["--since", "2018-05-09", "--until", "2018-05-01"], "must be before --until"),
    (["--since", "2018-05-01", "--until", "2018-05-05"], "needs the 7 test days"),
    (["--since", "May", "--until", "2018-05-05"], "expected a date"),
    (["--since", "2018-04-01", "--until", "2018-05-05"], "set --features-topic or FRAUD_FEATURES_TOPIC"),
])
def test_bad_retrain_flags_stop_with_one_line_and_exit_2_before_any_io(
        flags: list[str], said: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FRAUD_FEATURES_TOPIC", raising=False)
    # no broker listens there: any I/O would fail otherwise, after its connect timeout
    assert run(["retrain", *flags, "--bootstrap-servers", "127.0.0.1:9", "--model", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and said in err, err


def test_the_labels_are_read_only_once_the_features_are() -> None:
    """Labels read from a topic after the transactions end later than them: every label due for them is in."""
    read: list[str] = []

    def topic(name: str, values: list[bytes]) -> Iterator[bytes]:
        for value in values:
            read.append(name)
            yield value

    labels = topic("labels", [orjson.dumps({"transaction_id": "t1", "TX_FRAUD": 1})])
    table = training_table(topic("features", [features("t1", 0.5), features("newest", 20.0)]), labels, NAMES, T0,
                           T0 + 3 * DAY_MS, delay_days=7)
    assert read == ["features", "features", "labels"]
    assert table.frame["TX_FRAUD"].tolist() == [1]
