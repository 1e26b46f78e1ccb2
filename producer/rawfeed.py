"""Raw transactions and the fraud labels a bank learns later, merged in event-time order.

A card issuer's stream carries the transaction alone: id, time, customer (card), terminal
(merchant) and amount, keyed by customer. The worker computes the handbook's features from
it (``pipeline.streamfeatures``). Whether a transaction was a fraud is learnt days later
(a chargeback): each fraud's label goes to the labels topic, keyed by terminal, once the
stream reaches the transaction's time plus the label delay (7 days by default, the
handbook's). Labels due after the last transaction are sent at the end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import orjson
import pandas as pd

from pipeline.errors import InputDataError
from producer.tables import ReplaySpec, _rfc3339, event_times_ms, iter_records

RAW_COLUMNS = ("CUSTOMER_ID", "TERMINAL_ID", "TX_AMOUNT")
DAY_MS = 86_400_000

Message = tuple[str, bytes | None, bytes]


def check_raw_columns(columns: list[str]) -> None:
    """A table sent raw needs a customer, a terminal and an amount column."""
    missing = [c for c in RAW_COLUMNS if c not in columns]
    if missing:
        raise InputDataError(f"--raw needs the columns {', '.join(RAW_COLUMNS)}; the table has no "
                             f"{', '.join(missing)}")


def raw_messages(frame: pd.DataFrame, spec: ReplaySpec, input_topic: str, labels_topic: str,
                 delay_days: float) -> Iterator[Message]:
    """Every row as a raw transaction for ``input_topic``, with fraud labels for ``labels_topic`` in between."""
    check_raw_columns(list(frame.columns))
    times = event_times_ms(frame, spec)
    columns = [c for c in (spec.id_column, spec.time_column, *RAW_COLUMNS) if c]
    raw_spec = dataclasses.replace(spec, key_column="CUSTOMER_ID", label_columns=())
    labels = _labels(frame, spec, times, delay_days)
    due = labels[0] if labels else np.zeros(0, np.int64)
    next_label = 0
    for time_ms, (key, value) in zip(times.tolist(), iter_records(frame[columns], raw_spec), strict=True):
        while next_label < len(due) and due[next_label] <= time_ms:
            yield labels_topic, *labels[1][next_label]
            next_label += 1
        yield input_topic, key, value
    for message in labels[1][next_label:] if labels else ():
        yield labels_topic, *message


def _labels(frame: pd.DataFrame, spec: ReplaySpec, times: np.ndarray,
            delay_days: float) -> tuple[np.ndarray, list[tuple[bytes, bytes]]] | None:
    """When each fraud's label is due (sorted) and its (key, value); None without a label column."""
    label = next((c for c in spec.label_columns if c in frame.columns), None)
    if label is None:
        return None
    rows = np.flatnonzero(frame[label].to_numpy() == 1)
    ids = frame[spec.id_column].iloc[rows].astype(str).tolist() if spec.id_column else [str(r) for r in rows]
    terminals = frame["TERMINAL_ID"].iloc[rows].tolist()
    stamps = _rfc3339(times[rows])
    due = times[rows] + round(delay_days * DAY_MS)
    order = np.argsort(due, kind="stable")
    messages = [(str(terminals[i]).encode(), orjson.dumps({"transaction_id": ids[i], "event_time": stamps[i],
                                                           "TERMINAL_ID": terminals[i], "TX_FRAUD": 1}))
                for i in order]
    return due[order], messages
