"""The transaction record on the wire: one flat JSON object per Kafka message.

Required fields:

- ``transaction_id``: a non-empty string.
- ``event_time``: RFC 3339 with an offset (``2018-04-01T00:00:31Z``) or epoch milliseconds.

Model features are numeric fields named as in the model artifact; any other field is
passed through to alerts untouched. The message key is the customer or card id when known.

Decoding never raises on bad bytes: it returns a :class:`Transaction` or a
:class:`RecordError` that names the field and the reason.

>>> decode(b'{"transaction_id": "7", "event_time": 1522540831000, "TX_AMOUNT": 57.16}')
Transaction(transaction_id='7', event_time_ms=1522540831000, fields={...})
>>> decode(b'{"transaction_id": 7}')
RecordError(reason='bad_type', field='transaction_id', detail='must be a string, got int')
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

ID_FIELD = "transaction_id"
TIME_FIELD = "event_time"
DEFAULT_MAX_BYTES = 64 * 1024
FLOAT32_MAX = 3.4028234663852886e38
# Epoch milliseconds outside [1990, 2200) are almost certainly seconds or nanoseconds.
_MIN_MS, _MAX_MS = 631_152_000_000, 7_258_118_400_000
_EPOCH, _ONE_MS = datetime(1970, 1, 1, tzinfo=UTC), timedelta(milliseconds=1)


@dataclass(frozen=True, slots=True)
class Transaction:
    """A decoded record: its id, its event time in epoch milliseconds, and all its fields."""

    transaction_id: str
    event_time_ms: int
    fields: dict[str, Any]

    def __repr__(self) -> str:
        return (f"Transaction(transaction_id={self.transaction_id!r}, "
                f"event_time_ms={self.event_time_ms}, fields={{...}})")


@dataclass(frozen=True, slots=True)
class RecordError:
    """Why a record cannot be scored. ``reason`` is a short stable code for metrics and headers."""

    reason: str
    field: str | None
    detail: str

    def __str__(self) -> str:
        where = f"field '{self.field}': " if self.field else ""
        return f"{self.reason}: {where}{self.detail}"


def decode(value: bytes | None, max_bytes: int = DEFAULT_MAX_BYTES) -> Transaction | RecordError:
    """Decode one message value into a Transaction, or say precisely what is wrong with it."""
    if not value:
        return RecordError("empty", None, "message has no value (tombstone or empty bytes)")
    if len(value) > max_bytes:
        return RecordError("oversized", None, f"{len(value)} bytes, limit is {max_bytes}")
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as err:
        return RecordError("not_json", None, f"invalid JSON: {err}")
    if not isinstance(obj, dict):
        return RecordError("not_object", None, f"expected a JSON object, got {type(obj).__name__}")
    tx_id = obj.get(ID_FIELD)
    if tx_id is None:
        return RecordError("missing_field", ID_FIELD, "required field is missing")
    if not isinstance(tx_id, str) or not tx_id:
        return RecordError("bad_type", ID_FIELD, _type_detail("a non-empty string", tx_id))
    raw_time = obj.get(TIME_FIELD)
    if raw_time is None:
        return RecordError("missing_field", TIME_FIELD, "required field is missing")
    try:
        event_ms = parse_event_time(raw_time)
    except ValueError as err:
        return RecordError("bad_time", TIME_FIELD, str(err))
    return Transaction(tx_id, event_ms, obj)


def _type_detail(expected: str, value: Any) -> str:
    if expected == "a non-empty string" and value == "":
        return "must be a non-empty string"
    return f"must be a string, got {type(value).__name__}"


def parse_event_time(value: Any) -> int:
    """Epoch milliseconds from an RFC 3339 string with offset, or from epoch milliseconds."""
    if isinstance(value, bool):
        raise ValueError("must be RFC 3339 or epoch milliseconds, got a boolean")
    if isinstance(value, int | float):
        if not math.isfinite(value) or not _MIN_MS <= value < _MAX_MS:
            raise ValueError(f"epoch milliseconds {value!r} out of range (1990..2200)")
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"must be RFC 3339 or epoch milliseconds, got {type(value).__name__}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as err:
        raise ValueError(f"{value!r} is not RFC 3339") from err
    if parsed.tzinfo is None:
        raise ValueError(f"{value!r} has no UTC offset; RFC 3339 needs 'Z' or '+hh:mm'")
    # exact: ``int(parsed.timestamp() * 1000)`` went through a float and read some times after 2038 1 ms
    # early (0.7 % of the milliseconds of 1990..2200, none sampled before 2037; found 2026-12-07)
    ms = (parsed - _EPOCH) // _ONE_MS
    if not _MIN_MS <= ms < _MAX_MS:
        raise ValueError(f"{value!r} out of range (1990..2200)")
    return ms


def format_event_time(epoch_ms: int) -> str:
    """RFC 3339 in UTC with milliseconds.

    >>> format_event_time(1522540831000)
    '2018-04-01T00:00:31.000Z'
    """
    moment = _EPOCH + timedelta(milliseconds=epoch_ms)  # exact, as parse_event_time reads it
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{epoch_ms % 1000:03d}Z"


def encode(fields: Mapping[str, Any]) -> bytes:
    """Compact JSON bytes (orjson writes NaN and infinities as null)."""
    return orjson.dumps(fields, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)


def feature_error(tx: Transaction, names: Sequence[str]) -> RecordError | None:
    """The first feature of ``tx`` that is missing, not a number, or not a finite float32."""
    for name in names:
        value = tx.fields.get(name)
        if value is None:
            return RecordError("missing_feature", name, "numeric feature is missing or null")
        if isinstance(value, bool) or not isinstance(value, int | float):
            return RecordError("bad_type", name, f"must be a number, got {type(value).__name__}")
        if abs(value) > FLOAT32_MAX or not math.isfinite(value):  # an int too large for a float never meets isfinite
            shown = f"an integer of {value.bit_length()} bits" if isinstance(value, int) else repr(value)
            return RecordError("not_finite", name, f"{shown} is not a finite float32")
    return None
