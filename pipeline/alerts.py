"""The two messages the worker writes: alerts (JSON) and dead letters (original bytes + headers).

An alert, keyed by transaction id::

    {"transaction_id": "42", "event_time": "2018-07-01T10:00:00.000Z",
     "score": 3.2, "threshold": 1.1, "model_version": "20261123T011500Z-ab12cd",
     "scored_at": "2026-11-23T01:15:02.123Z",
     "top_features": [{"name": "TX_AMOUNT", "value": 1210.5, "reconstruction": 61.2, "z": 41.3}, ...],
     "fields": {"CUSTOMER_ID": 596, "TERMINAL_ID": 3156}}

``fields`` carries every input field that is neither a model feature nor id or time.

A dead letter keeps the input's key, value and headers and adds ``dlq.*`` headers naming
the error (reason, field, message), where the record came from (topic, partition, offset),
which worker refused it, and when.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from pipeline.schema import FLOAT32_MAX, ID_FIELD, TIME_FIELD, RecordError, Transaction, format_event_time


def alert_value(
    tx: Transaction,
    score: float,
    threshold: float,
    model_version: str,
    scored_at_ms: int,
    top_features: list[dict[str, Any]],
    feature_names: frozenset[str],
) -> bytes:
    """The JSON bytes of one alert."""
    skip = feature_names | {ID_FIELD, TIME_FIELD}
    passthrough = {k: v for k, v in tx.fields.items() if k not in skip}
    return orjson.dumps({
        "transaction_id": tx.transaction_id,
        "event_time": format_event_time(tx.event_time_ms),
        "score": min(float(score), FLOAT32_MAX),  # an overflowing error is still a number
        "threshold": float(threshold),
        "model_version": model_version,
        "scored_at": format_event_time(scored_at_ms),
        "top_features": top_features,
        "fields": passthrough,
    })


def dead_letter_headers(
    record: Any, error: RecordError, worker_id: str, failed_at_ms: int
) -> list[tuple[str, bytes]]:
    """Original headers plus ``dlq.*`` headers that say what was wrong and where it came from."""
    original: Sequence[tuple[str, bytes]] = record.headers or []
    added = [
        ("dlq.error.reason", error.reason),
        ("dlq.error.field", error.field or ""),
        ("dlq.error.message", str(error)),
        ("dlq.source.topic", record.topic),
        ("dlq.source.partition", str(record.partition)),
        ("dlq.source.offset", str(record.offset)),
        ("dlq.worker", worker_id),
        ("dlq.failed_at", format_event_time(failed_at_ms)),
    ]
    return [*original, *((k, v.encode()) for k, v in added)]
