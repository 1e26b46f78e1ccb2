"""``fraud-train retrain``: a training table from what the workers published, a new version as the challenger.

The workers publish every scored transaction with its features to the features topic
(``FRAUD_FEATURES_TOPIC``: raw input's computed features, or a featured record's own), and the
bank's fraud labels arrive on the labels topic days later. For a date range this module reads
the features topic whole, then the labels topic (each up to its end offsets when its reading
starts; no consumer group, nothing committed), holding only the rows it keeps, joins them by
transaction id, and labels a transaction genuine when no fraud label came for it:
only transactions whose labels are due (event time plus the label delay at or before the newest
event time on the features topic) are taken, so a fraud whose chargeback is still to come is
never learnt as normal. A transaction published more than once (at-least-once) is taken once.

The new version is fitted the way the serving one was (its model, sizes, scoring, input form,
alert rate, log features), validated and calibrated on the days before the newest labelled
``test_days``, then both versions are scored on those days and the new one is published as the
model root's ``challenger``: the workers score it beside the current one, online quality
compares them on the same traffic, and ``fraud-train promote`` serves it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd

from pipeline.artifact import ModelArtifact
from pipeline.config import KafkaSettings
from pipeline.errors import BrokerError, InputDataError
from pipeline.features import TableLayout
from pipeline.schema import parse_event_time
from pipeline.streamfeatures import DAY_MS
from pipeline.worker.state.fields import fraud_label
from trainer.options import when

log = logging.getLogger(__name__)

ID, TIME, LABEL, KEY = "TRANSACTION_ID", "TX_DATETIME", "TX_FRAUD", "CUSTOMER_ID"
READ_IDLE_S = 30.0  # a topic that yields nothing this long before its end offsets: the broker is away


@dataclass(frozen=True)
class StreamTable:
    """The joined table and what went into it."""

    frame: pd.DataFrame  # ID, TIME (UTC datetimes), KEY when published, the features, LABEL (0/1); by time
    layout: TableLayout
    features_records: int  # read from the features topic, in range or not
    repeated: int  # records of a transaction already taken (at-least-once), in range
    unreadable: int  # features records that are not JSON objects with an id, a time and every feature
    labels: int  # transactions the labels topic says were frauds
    newest_ms: int  # the newest event time on the features topic: labels are due up to it minus the delay


def read_values(kafka: KafkaSettings, topic: str) -> Iterator[bytes]:
    """Every committed record value of ``topic`` up to its end offsets when asked (no group, nothing committed),
    as they are read: what the caller keeps of them is all that is held."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(**kafka.client_options(), client_id=f"{kafka.client_id}-retrain", group_id=None,
                             enable_auto_commit=False, isolation_level="read_committed",
                             auto_offset_reset="earliest")
    try:
        found = consumer.partitions_for_topic(topic)
        if not found:
            raise InputDataError(f"topic '{topic}' does not exist on {kafka.bootstrap_servers}")
        parts = [TopicPartition(topic, p) for p in sorted(found)]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        ends = consumer.end_offsets(parts)
        moved = time.monotonic()
        while any(consumer.position(tp) < ends[tp] for tp in parts):
            batch = consumer.poll(timeout_ms=500)
            for records in batch.values():
                yield from (r.value for r in records if r.value is not None)
            if batch:
                moved = time.monotonic()
            elif time.monotonic() - moved > READ_IDLE_S:
                left = sum(ends[tp] - consumer.position(tp) for tp in parts)
                raise BrokerError(f"reading '{topic}': nothing came for {READ_IDLE_S:.0f}s with {left} records "
                                  "still before its end offsets; is the broker up?")
    finally:
        consumer.close(autocommit=False)


def fraud_ids(values: Iterable[bytes]) -> set[str]:
    """Transaction ids the labels topic says were frauds, read as the worker reads them: ``TX_FRAUD`` 1 labels a
    fraud, a later 0 for the same id takes it back (one id's labels share a key, so their order is kept), and a
    record without a 0/1 label is none (the worker dead-letters it)."""
    ids: set[str] = set()
    for value in values:
        try:
            label = orjson.loads(value)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(label, dict) or not isinstance(label.get("transaction_id"), str | int):
            continue
        fraud = fraud_label(label.get(LABEL))
        if fraud is not None:
            (ids.add if fraud else ids.discard)(str(label["transaction_id"]))
    return ids


def training_table(features: Iterable[bytes], labels: Iterable[bytes], names: tuple[str, ...], since_ms: int,
                   until_ms: int, delay_days: float) -> StreamTable:
    """The transactions of [since, until) published with every one of ``names``, labelled from the label records.
    InputDataError when labels are not due yet for the whole range, or when no transaction is in it.

    ``labels`` is read only once ``features`` is: read from a topic as they are, the labels then end later than
    the transactions, so that every label due for them is in (a label sent while the features topic was read
    would otherwise be missed, and its fraud learnt as normal)."""
    rows: dict[str, tuple[int, Any, list[float]]] = {}
    read = unreadable = repeated = 0
    newest = None
    for value in features:
        read += 1
        parsed = _row(value, names)
        if parsed is None:
            unreadable += 1
            continue
        tx_id, at, row, record = parsed
        newest = at if newest is None else max(newest, at)
        if since_ms <= at < until_ms:
            if tx_id in rows:
                repeated += 1
            key = record.get(KEY)
            rows[tx_id] = (at, key if isinstance(key, str | int) and not isinstance(key, bool) else None, row)
    if newest is None:
        raise InputDataError("the features topic holds no scored transaction with the model's features")
    due_until = newest - round(delay_days * DAY_MS)
    if until_ms > due_until:
        latest = _day(due_until // DAY_MS * DAY_MS)
        raise InputDataError(
            f"--until {_day(until_ms)} is past the labels that are due: the newest transaction published is of "
            f"{_day(newest)}, so with a label delay of {delay_days:g} days labels are complete up to {latest} "
            f"(pass --until {latest} or earlier)")
    if not rows:
        raise InputDataError(f"no transaction published between {_day(since_ms)} and {_day(until_ms)} "
                             f"(the features topic has {read} records)")
    frauds = fraud_ids(labels)
    ids = list(rows)
    times = np.array([rows[i][0] for i in ids], np.int64)
    frame = pd.DataFrame(np.array([rows[i][2] for i in ids], np.float64), columns=list(names))
    frame.insert(0, ID, ids)
    frame.insert(1, TIME, pd.to_datetime(times, unit="ms", utc=True))
    keys = [rows[i][1] for i in ids]
    with_key = all(k is not None for k in keys)
    if with_key:
        frame.insert(2, KEY, keys)
    frame[LABEL] = np.fromiter((i in frauds for i in ids), bool, len(ids)).astype(np.int8)
    frame = frame.sort_values(TIME, kind="stable").reset_index(drop=True)
    layout = TableLayout("stream", ID, TIME, LABEL, KEY if with_key else None, tuple(names))
    return StreamTable(frame, layout, read, repeated, unreadable, len(frauds), newest)


def _row(value: bytes, names: tuple[str, ...]) -> tuple[str, int, list[float], dict[str, Any]] | None:
    """Id, event time, features and the record of a features record; None unless it has an id, a time and every
    feature as a finite number."""
    try:
        record = orjson.loads(value)
        if not isinstance(record, dict) or not isinstance(record.get("transaction_id"), str | int) \
                or isinstance(record["transaction_id"], bool):
            return None
        at = parse_event_time(record.get("event_time"))
    except (orjson.JSONDecodeError, ValueError):
        return None
    row = [record.get(n) for n in names]
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in row):
        return None
    return str(record["transaction_id"]), at, [float(v) for v in row], record


def _day(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d")


def day_ms(text: str) -> int:
    """Epoch milliseconds of a command-line date (UTC unless it names an offset)."""
    return int(when(text).timestamp() * 1000)


def fit_options_like(current: ModelArtifact) -> dict[str, Any]:
    """FitOptions fields that make a new version the way ``current`` was made."""
    params = {k: v for k, v in (current.manifest.get("hyperparameters") or {}).items() if k != "n_features"}
    score = current.classifier.kind if current.classifier is not None else current.scoring.method
    return {"model": current.model_class, "model_params": params, "score": score, "input_form": current.input_form,
            "alert_rate": current.alert_rate}


def with_log_features(layout: TableLayout, current: ModelArtifact) -> TableLayout:
    """``layout`` with the log transforms of the serving version."""
    return dataclasses.replace(layout, log_features=current.preprocessing.log_features)


def describe(table: StreamTable, root: Path) -> str:
    frame = table.frame
    return (f"training table from the stream: {len(frame)} transactions ({int(frame[LABEL].sum())} frauds) of "
            f"{table.features_records} features records ({table.repeated} repeated, {table.unreadable} unreadable), "
            f"{table.labels} fraud labels; new version for {root}")
