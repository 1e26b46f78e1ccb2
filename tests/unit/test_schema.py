"""The wire format: good records decode, bad ones get a precise error and never raise."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.schema import (
    RecordError,
    Transaction,
    decode,
    encode,
    format_event_time,
    parse_event_time,
)
from pipeline.worker.batch import decode_batch
from tests.worker_helpers import Record

GOOD = {"transaction_id": "t1", "event_time": "2018-04-01T00:00:31Z", "TX_AMOUNT": 57.16,
        "TX_DURING_NIGHT": 1, "CUSTOMER_ID": 596}


def test_good_record_decodes_with_all_fields() -> None:
    tx = decode(encode(GOOD))
    assert isinstance(tx, Transaction)
    assert tx.transaction_id == "t1"
    assert tx.event_time_ms == 1522540831000
    assert tx.fields == GOOD


@pytest.mark.parametrize("when, expected", [
    ("2018-04-01T00:00:31Z", 1522540831000),
    ("2018-04-01T02:00:31.250+02:00", 1522540831250),
    (1522540831000, 1522540831000),
    (1522540831000.0, 1522540831000),
])
def test_event_time_forms(when: object, expected: int) -> None:
    assert parse_event_time(when) == expected


@settings(max_examples=2000, deadline=None)
@given(ms=st.integers(631_152_000_000, 7_258_118_399_999))
def test_event_time_round_trips_through_rfc3339(ms: int) -> None:
    """Every millisecond from 1990 to 2200, exactly (a float on the way read 0.7 % of them 1 ms early, all
    after 2038)."""
    assert parse_event_time(format_event_time(ms)) == ms
    if ms - 19_800_000 >= 631_152_000_000:
        assert parse_event_time(format_event_time(ms).replace("Z", "+05:30")) == ms - 19_800_000


@pytest.mark.parametrize("when, expected", [
    ("2039-08-28T14:33:09.430Z", 2198154789430),  # 2198154789429 before the fix
    ("2018-04-01T00:00:31.999999Z", 1522540831999),  # below a millisecond: floored
    ("2018-04-01T00:00:31.0005Z", 1522540831000),
])
def test_event_time_is_read_to_the_millisecond(when: str, expected: int) -> None:
    assert parse_event_time(when) == expected


@pytest.mark.parametrize("raw, reason, field", [
    (b"", "empty", None),
    (None, "empty", None),
    (b"{not json", "not_json", None),
    (b"\xff\xfe\x00", "not_json", None),
    (b"[1, 2]", "not_object", None),
    (b'{"event_time": 1522540831000}', "missing_field", "transaction_id"),
    (b'{"transaction_id": 7, "event_time": 1522540831000}', "bad_type", "transaction_id"),
    (b'{"transaction_id": "", "event_time": 1522540831000}', "bad_type", "transaction_id"),
    (b'{"transaction_id": "a"}', "missing_field", "event_time"),
    (b'{"transaction_id": "a", "event_time": "2018-04-01T00:00:31"}', "bad_time", "event_time"),
    (b'{"transaction_id": "a", "event_time": "yesterday"}', "bad_time", "event_time"),
    (b'{"transaction_id": "a", "event_time": 1522540831}', "bad_time", "event_time"),
    (b'{"transaction_id": "a", "event_time": true}', "bad_time", "event_time"),
    (b'{"transaction_id": "a", "event_time": NaN}', "not_json", None),
])
def test_bad_records_get_precise_errors(raw: bytes | None, reason: str, field: str | None) -> None:
    result = decode(raw)
    assert isinstance(result, RecordError), result
    assert (result.reason, result.field) == (reason, field)
    assert reason in str(result)


def test_oversized_record_is_refused_before_parsing() -> None:
    big = encode({**GOOD, "note": "x" * 2000})
    result = decode(big, max_bytes=1000)
    assert isinstance(result, RecordError) and result.reason == "oversized"
    assert str(len(big)) in result.detail


@pytest.mark.parametrize("value, reason", [
    (None, "missing_feature"),
    ("12.5", "bad_type"),
    (True, "bad_type"),
    ([1], "bad_type"),
    (1e39, "not_finite"),
])
def test_a_bad_feature_is_named(value: object, reason: str) -> None:
    fields = {**GOOD, "TX_DURING_NIGHT": value}
    if value is None:
        del fields["TX_DURING_NIGHT"]
    batch = decode_batch([Record(encode(GOOD), 0), Record(encode(fields), 1)], ["TX_AMOUNT", "TX_DURING_NIGHT"],
                         max_bytes=10_000)
    assert [r.offset for r, _ in batch.good] == [0] and batch.matrix.shape == (1, 2)
    ((record, error),) = batch.bad
    assert record.offset == 1 and (error.reason, error.field) == (reason, "TX_DURING_NIGHT")


def test_features_are_read_in_the_given_order() -> None:
    batch = decode_batch([Record(encode(GOOD))], ["TX_DURING_NIGHT", "TX_AMOUNT"], max_bytes=10_000)
    assert batch.matrix.dtype == np.float32 and batch.matrix.tolist() == [[1.0, pytest.approx(57.16)]]
    one = decode_batch([Record(encode(GOOD))], ["TX_AMOUNT"], max_bytes=10_000)  # a one-feature model
    assert one.matrix.tolist() == [[pytest.approx(57.16)]]


def test_a_value_numpy_cannot_convert_costs_its_record_only() -> None:
    """An integer beyond float64 (JSON cannot carry one; a computed field could) fails the batch's
    one-call conversion: the rows are converted one by one and only that record is refused."""
    def huge(record: Record, tx: Transaction) -> None:
        if record.offset == 1:
            tx.fields["TX_AMOUNT"] = 10**400

    batch = decode_batch([Record(encode(GOOD), n) for n in range(3)], ["TX_AMOUNT"], max_bytes=10_000,
                         enrich=huge)
    assert [r.offset for r, _ in batch.good] == [0, 2]
    assert [(r.offset, e.reason, e.field) for r, e in batch.bad] == [(1, "not_finite", "TX_AMOUNT")]


def test_infinity_literal_is_not_json() -> None:
    assert isinstance(decode(b'{"transaction_id":"a","event_time":1522540831000,"x":Infinity}'),
                      RecordError)
    assert not math.isnan(0.0)
