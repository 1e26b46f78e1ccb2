"""Read transaction tables (CSV or Parquet) and turn their rows into wire records.

Every column travels: the id column becomes ``transaction_id`` (a string), the time
column becomes ``event_time`` (RFC 3339, UTC), the key column becomes the message key,
and the label column is dropped on request. Rows are encoded a chunk at a time with
orjson, whose floats are the shortest text that reads back exactly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import orjson
import pandas as pd

from pipeline.errors import InputDataError
from pipeline.features import LAYOUTS, TableLayout, check_named, check_table, detect_layout
from pipeline.schema import ID_FIELD, TIME_FIELD

DEFAULT_EPOCH = "2018-04-01T00:00:00Z"  # origin for tables whose time is seconds since a start


@dataclass(frozen=True)
class ReplaySpec:
    """How to read one table: which columns are id, time, key and label."""

    id_column: str | None
    time_column: str | None  # None: no time in the table (``--restamp`` stamps each record when it is sent)
    key_column: str | None
    label_columns: tuple[str, ...]
    time_unit: str  # "datetime", "s" (seconds since epoch_origin) or "ms" (epoch millis)
    epoch_origin: str = DEFAULT_EPOCH


def check_columns(
    columns: list[str],
    layout_name: str = "auto",
    *,
    id_column: str | None = None,
    time_column: str | None = None,
    key_column: str | None = None,
    label_column: str | None = None,
    restamp: bool = False,
) -> None:
    """Refuse a layout or column flag that the table's column names cannot satisfy.

    Works on names alone (a file's header or schema), so a typo is caught before the rows are read.

    >>> check_columns(["when", "x"], "generic", time_column="when", label_column="fraud")
    Traceback (most recent call last):
    ...
    pipeline.errors.InputDataError: --label-column 'fraud': the table has no such column; it has: when, x
    """
    _plan(list(columns), layout_name, id_column, time_column, key_column, label_column, restamp)


def resolve_spec(
    frame: pd.DataFrame,
    layout_name: str = "auto",
    *,
    id_column: str | None = None,
    time_column: str | None = None,
    key_column: str | None = None,
    label_column: str | None = None,
    restamp: bool = False,
) -> ReplaySpec:
    """Work out the columns to use from a named or detected layout plus explicit flags; the table must pass the
    rules ``fraud-train fit`` applies (:func:`pipeline.features.check_table`)."""
    layout, spec = _plan(list(frame.columns), layout_name, id_column, time_column, key_column, label_column,
                         restamp)
    roles = {spec.id_column, spec.time_column, spec.key_column, *spec.label_columns} - {None}
    check_table(frame, {}, layout.features if layout else None, roles=roles)  # the names were checked by _plan
    if spec.id_column and frame[spec.id_column].isna().any():
        raise InputDataError(f"id column {spec.id_column!r} has missing values")
    if spec.time_column is None:
        return spec
    spec = replace(spec, time_unit=_time_unit(frame, spec.time_column, layout))
    if frame[spec.time_column].isna().any():
        raise InputDataError(f"time column {spec.time_column!r} has missing values")
    return spec


def _plan(
    columns: list,
    layout_name: str,
    id_column: str | None,
    time_column: str | None,
    key_column: str | None,
    label_column: str | None,
    restamp: bool = False,
) -> tuple[TableLayout | None, ReplaySpec]:
    """The layout and the columns in each role (time unit still unknown), every named one present. A table of
    no known layout takes a column named like a time (``TIME_NAMES``, any case) as its time column, as
    ``fraud-train fit`` leaves such a column out of the features; with ``restamp`` it needs none."""
    layout: TableLayout | None
    if layout_name == "auto":
        layout = detect_layout(columns)
    elif layout_name in LAYOUTS:
        layout = LAYOUTS[layout_name]
    elif layout_name == "generic":
        layout = None
    else:
        raise InputDataError(f"unknown layout {layout_name!r}; use auto, generic, "
                             + ", ".join(LAYOUTS))
    given = {"id": id_column, "time": time_column, "key": key_column, "label": label_column}
    check_named(columns, {f"--{role}-column": column for role, column in given.items()})
    tcol = time_column or (layout.time_column if layout else None) or _time_named(columns)
    if tcol is None and not restamp:
        raise InputDataError("no time column: pass --time-column, or --restamp to stamp each record with the "
                             "time it is sent (the table matches no known layout and has no column named "
                             f"{', '.join(TIME_NAMES)}; its columns are {', '.join(map(str, columns[:12]))}...)")
    spec = ReplaySpec(
        id_column=id_column or (layout.id_column if layout else None),
        time_column=tcol,
        key_column=key_column or (layout.key_column if layout else None),
        label_columns=_labels(label_column, layout),
        time_unit="datetime",
    )
    derived = {"id": spec.id_column, "time": spec.time_column, "key": spec.key_column}
    check_named(columns, {f"the {layout.name} layout's {role} column": column for role, column in derived.items()
                          if layout and column and not given[role]})
    return layout, spec


TIME_NAMES = ("event_time", "timestamp", "time", "datetime")


def _time_named(columns: list) -> str | None:
    """The first column named like a time, any case (``Time``, ``TIMESTAMP``)."""
    by_name = {str(c).lower(): c for c in columns}
    return next((by_name[name] for name in TIME_NAMES if name in by_name), None)


def _labels(label_column: str | None, layout: TableLayout | None) -> tuple[str, ...]:
    if label_column:
        return (label_column,)
    if layout and layout.name == "handbook":
        return ("TX_FRAUD", "TX_FRAUD_SCENARIO")
    return (layout.label_column,) if layout and layout.label_column else ()


def _time_unit(frame: pd.DataFrame, column: str, layout: TableLayout | None) -> str:
    series = frame[column]
    if pd.api.types.is_datetime64_any_dtype(series) or series.dtype == object or pd.api.types.is_string_dtype(series):
        return "datetime"
    if layout is not None:
        return layout.time_unit
    # Generic numeric times: epoch milliseconds if they look like it, else seconds from origin.
    return "ms" if float(series.max()) > 1e11 else "s"


def event_times_ms(frame: pd.DataFrame, spec: ReplaySpec) -> np.ndarray:
    """Epoch milliseconds (int64) for every row."""
    series = frame[spec.time_column]
    if spec.time_unit == "datetime":
        try:
            stamps = pd.to_datetime(series, utc=True)
        except (ValueError, TypeError) as err:
            raise InputDataError(f"time column {spec.time_column!r}: {err}") from err
        # Whatever the column's resolution (s, ms, ns), go through datetime64[ms] explicitly.
        return stamps.dt.tz_localize(None).to_numpy().astype("datetime64[ms]").astype(np.int64)
    if not pd.api.types.is_numeric_dtype(series):
        raise InputDataError(f"time column {spec.time_column!r} is neither dates nor numbers")
    if spec.time_unit == "ms":
        return series.to_numpy(dtype=np.int64)
    origin_ms = pd.Timestamp(spec.epoch_origin).value // 1_000_000
    return origin_ms + np.round(series.to_numpy(dtype=np.float64) * 1000).astype(np.int64)


def iter_records(
    frame: pd.DataFrame,
    spec: ReplaySpec,
    *,
    drop_label: bool = False,
    chunk_rows: int = 20_000,
    restamp_rate: float | None = None,
    clock: Callable[[], float] = time.time,
) -> Iterator[tuple[bytes | None, bytes]]:
    """Yield ``(key, value)`` message bytes for every row, in table order.

    With ``restamp_rate`` (tx/s, 0 = unpaced) each record's ``event_time`` becomes the time it
    is due to be sent, so latency measured downstream is real; the table's own time travels as
    ``source_event_time``. Chunks are then small, so stamps are taken just before sending.
    """
    if spec.time_column is None and restamp_rate is None:
        raise InputDataError("the table has no time column: restamp it (--restamp) or name one (--time-column)")
    times = event_times_ms(frame, spec) if spec.time_column is not None else None
    drop = [spec.time_column, *(spec.label_columns if drop_label else ())]
    body = frame.drop(columns=[c for c in drop if c in frame.columns])
    if restamp_rate is not None:
        chunk_rows = min(chunk_rows, 256)
    for start in range(0, len(frame), chunk_rows):
        chunk = body.iloc[start : start + chunk_rows]
        chunk_times = times[start : start + chunk_rows] if times is not None else None
        if restamp_rate is not None:
            if chunk_times is not None:
                chunk = chunk.assign(source_event_time=_rfc3339(chunk_times))
            spacing_ms = 1000.0 / restamp_rate if restamp_rate > 0 else 0.0
            chunk_times = int(clock() * 1000) + np.round(np.arange(len(chunk)) * spacing_ms).astype(np.int64)
        lines = _chunk_json(chunk, spec, chunk_times, start)
        keys = _chunk_keys(chunk, spec)
        for i, line in enumerate(lines):
            yield (keys[i] if keys is not None else None), line


def _rfc3339(times_ms: np.ndarray) -> list[str]:
    return (np.datetime_as_string(times_ms.astype("datetime64[ms]"), unit="ms") + "Z").tolist()


def _chunk_json(chunk: pd.DataFrame, spec: ReplaySpec, times: np.ndarray, offset: int) -> list[bytes]:
    if spec.id_column:
        ids = chunk[spec.id_column].astype(str).tolist()
    else:
        ids = [str(offset + i) for i in range(len(chunk))]
    stamps = _rfc3339(times)
    rest = chunk.drop(columns=[spec.id_column] if spec.id_column else [])
    names = [ID_FIELD, TIME_FIELD, *map(str, rest.columns)]
    columns = [ids, stamps, *(_json_ready(rest[name]) for name in rest.columns)]
    return [orjson.dumps(dict(zip(names, row, strict=True))) for row in zip(*columns, strict=True)]


def _json_ready(series: pd.Series) -> list:
    """Plain Python values for orjson: floats exact, NaN as null, datetimes as RFC 3339."""
    if series.dtype == np.float32:
        series = pd.Series(float32_as_decimal(series.to_numpy()), index=series.index)
    if pd.api.types.is_datetime64_any_dtype(series):
        series = pd.to_datetime(series, utc=True).dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if series.hasnans:
        return [None if v != v else v for v in series.tolist()]
    return series.tolist()


def _chunk_keys(chunk: pd.DataFrame, spec: ReplaySpec) -> list[bytes] | None:
    if spec.key_column is None:
        return None
    return [str(k).encode() for k in chunk[spec.key_column].tolist()]


def float32_as_decimal(values: np.ndarray) -> np.ndarray:
    """float64 holding the shortest decimal (7 to 9 digits) that reads back as the same float32.

    Without this, float32 57.16 would travel as 57.15999984741211.

    >>> float32_as_decimal(np.array([57.16, 0.0, -1e-7], dtype=np.float32)).tolist()
    [57.16, 0.0, -1e-07]
    """
    x64 = values.astype(np.float64)
    out = x64.copy()
    todo = np.isfinite(x64) & (x64 != 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        exponent = np.floor(np.log10(np.abs(np.where(todo, x64, 1.0))))
    for digits in (7, 8, 9):
        scale = 10.0 ** (digits - 1 - exponent[todo])
        rounded = np.round(x64[todo] * scale) / scale
        exact = rounded.astype(np.float32) == values[todo]
        idx = np.flatnonzero(todo)[exact]
        out[idx] = rounded[exact]
        todo[idx] = False
        if not todo.any():
            break
    return out
