"""The two messages the worker writes: alerts (JSON) and dead letters (original bytes + headers).

An alert, keyed by transaction id::

    {"transaction_id": "42", "event_time": "2018-07-01T10:00:00.000Z",
     "score": 3.2, "threshold": 1.1, "model_version": "20261123T011500Z-ab12cd",
     "scored_at": "2026-11-23T01:15:02.123Z",
     "top_features": [{"name": "TX_AMOUNT", "value": 1210.5, "reconstruction": 61.2, "z": 41.3}, ...],
     "fields": {"CUSTOMER_ID": 596, "TERMINAL_ID": 3156}}

``fields`` carries every input field that is neither a model feature nor id or time. An
alert whose score is not a finite number (an input beyond what the model's arithmetic can
hold) carries ``"out_of_range": true`` and the largest float32 as its score.

A dead letter keeps the input's key, value and headers and adds ``dlq.*`` headers naming
the error (reason, field, message), where the record came from (topic, partition, offset),
which worker refused it, and when. Null header values (legal in Kafka) travel as empty
values, named in ``dlq.headers.null``.

Every output knows a smaller form of itself, sent when the broker refuses it as too large:
an alert without its pass-through ``fields``; a dead letter with its value truncated and its
original headers dropped, then with ``dlq.*`` headers alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from pipeline.schema import FLOAT32_MAX, ID_FIELD, TIME_FIELD, RecordError, Transaction, format_event_time

TRUNCATED_VALUE_BYTES = 16 * 1024  # what a too-large dead letter keeps of the original value
TRUNCATED_KEY_BYTES = 1024  # ... and of its key
MAX_MESSAGE_CHARS = 1000  # error messages in headers are cut here


@dataclass(frozen=True)
class Output:
    """One message a batch must get acknowledged before its offsets are committed."""

    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]] | None = None
    smaller: Callable[[], Output | None] | None = None  # a smaller form, for a broker that refuses this size
    partition: int | None = None  # None: the producer's partitioner picks it from the key

    def shrink(self) -> Output | None:
        """The next smaller form of this output, or None when there is none."""
        return self.smaller() if self.smaller is not None else None


def alert_value(
    tx: Transaction,
    score: float,
    threshold: float,
    model_version: str,
    scored_at_ms: int,
    top_features: list[dict[str, Any]],
    feature_names: frozenset[str],
    *,
    with_fields: bool = True,
) -> bytes:
    """The JSON bytes of one alert."""
    in_range = score == score and abs(score) <= FLOAT32_MAX  # False for NaN and infinities
    alert: dict[str, Any] = {
        "transaction_id": tx.transaction_id,
        "event_time": format_event_time(tx.event_time_ms),
        "score": float(score) if in_range else FLOAT32_MAX,
        "threshold": float(threshold),
        "model_version": model_version,
        "scored_at": format_event_time(scored_at_ms),
        "top_features": top_features,
    }
    if not in_range:
        alert["out_of_range"] = True
    if with_fields:
        skip = feature_names | {ID_FIELD, TIME_FIELD}
        alert["fields"] = {k: v for k, v in tx.fields.items() if k not in skip}
    else:
        alert["fields_dropped"] = True
    return orjson.dumps(alert)


def alert_output(topic: str, tx: Transaction, encode: Callable[..., bytes]) -> Output:
    """An alert message; ``encode(with_fields=...)`` gives its value. Pass-through fields the encoder cannot
    write (nested deeper than orjson's 255 levels, which it reads up to 1,024) make the alert go out in its
    smaller form, ``fields_dropped: true``: a fraud is raised whatever else its record carries."""
    key = tx.transaction_id.encode()

    def without_fields() -> Output:
        return Output(topic, key, encode(with_fields=False))

    try:
        value = encode(with_fields=True)
    except (TypeError, ValueError, RecursionError):  # orjson.JSONEncodeError is a TypeError
        return without_fields()
    return Output(topic, key, value, smaller=without_fields)


def clean_headers(headers: Sequence[tuple[Any, Any]] | None) -> tuple[list[tuple[str, bytes]], list[str]]:
    """Headers as (str, bytes) pairs a producer accepts, and the names of those whose value was null."""
    cleaned: list[tuple[str, bytes]] = []
    null: list[str] = []
    for name, value in headers or ():
        name = name if isinstance(name, str) else bytes(name).decode("utf-8", "replace")
        if value is None:
            null.append(name)
            value = b""
        cleaned.append((name, bytes(value)))
    return cleaned, null


def dead_letter(topic: str, record: Any, error: RecordError, worker_id: str, failed_at_ms: int) -> Output:
    """A dead letter for ``record``: its key, value and headers plus ``dlq.*`` headers."""
    original, null = clean_headers(record.headers)
    added = [
        ("dlq.error.reason", error.reason),
        ("dlq.error.field", error.field or ""),
        ("dlq.error.message", str(error)[:MAX_MESSAGE_CHARS]),
        ("dlq.source.topic", str(record.topic)),
        ("dlq.source.partition", str(record.partition)),
        ("dlq.source.offset", str(record.offset)),
        ("dlq.worker", worker_id),
        ("dlq.failed_at", format_event_time(failed_at_ms)),
    ]
    if isinstance(error, ProcessingError):
        added += [("dlq.error.stage", error.stage), ("dlq.error.exception", error.exception)]
    if null:
        added.append(("dlq.headers.null", ",".join(null)[:MAX_MESSAGE_CHARS]))
    dlq = [(k, v.encode("utf-8", "replace")) for k, v in added]
    value = bytes(record.value or b"")
    key = bytes(record.key) if record.key is not None else None

    def headers_only() -> Output:
        note = f"value of {len(value)} bytes and {len(original)} original headers dropped"
        return Output(topic, None, b"", [*dlq, ("dlq.truncated", note.encode())])

    def truncated() -> Output | None:
        if len(value) <= TRUNCATED_VALUE_BYTES and not original:
            return headers_only()
        note = f"value cut from {len(value)} to {min(len(value), TRUNCATED_VALUE_BYTES)} bytes; " \
               f"{len(original)} original headers dropped"
        short_key = key[:TRUNCATED_KEY_BYTES] if key is not None else None
        return Output(topic, short_key, value[:TRUNCATED_VALUE_BYTES], [*dlq, ("dlq.truncated", note.encode())],
                      smaller=headers_only)

    return Output(topic, key, value, [*original, *dlq], smaller=truncated)


@dataclass(frozen=True, slots=True)
class ProcessingError(RecordError):
    """A record on which the worker's own code raised; dead-lettered as ``processing_error``."""

    stage: str = ""
    exception: str = ""


def processing_error(stage: str, err: BaseException) -> ProcessingError:
    """The dead-letter error of a record that raised ``err`` at ``stage`` (decode, scoring, alert)."""
    name = type(err).__name__
    return ProcessingError("processing_error", None, f"{stage} failed: {name}: {err}", stage, name)
