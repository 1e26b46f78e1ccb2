"""Read a transactions table, resolve its layout and check every column the trainer uses."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.errors import InputDataError
from pipeline.features import ID_OR_TIME_NAMES, LAYOUTS, TableLayout, check_table, detect_layout, shorten

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayoutFlags:
    """Layout choices from the command line; None means: from the named or detected layout."""

    layout: str | None = None
    features: tuple[str, ...] | None = None
    label_column: str | None = None
    time_column: str | None = None
    id_column: str | None = None
    customer_column: str | None = None
    time_unit: str | None = None
    # None: no log transform (the default); "layout": the layout's heavy-tailed columns; else these names.
    log_features: str | tuple[str, ...] | None = None


def resolve_layout(frame: pd.DataFrame, flags: LayoutFlags) -> TableLayout:
    """The layout named, given by --features, detected from the columns, or else a generic one
    (every numeric column but the label, time, id and customer ones); flags override it. The table is
    checked first by the rules ``fraud-produce replay`` applies too (:func:`pipeline.features.check_table`).

    Log transforms are opt-in: on the reference data they lower every detector's ranking quality.
    """
    columns = list(map(str, frame.columns))
    if flags.layout and flags.layout not in LAYOUTS:
        raise InputDataError(f"unknown layout {flags.layout!r}; known: {', '.join(LAYOUTS)}, or pass --features")
    known = None if flags.features else LAYOUTS[flags.layout] if flags.layout else detect_layout(columns)
    named: dict[str, str | tuple[str, ...] | None] = {**flag_columns(flags), "--features": flags.features}
    if flags.layout and known is not None:
        named[f"--layout {flags.layout}"] = known.features
    check_table(frame, named, flags.features or (known.features if known else None),
                roles={c for c in flag_columns(flags).values() if c})
    if flags.features:
        base = TableLayout("generic", None, flags.time_column or "", None, None, tuple(flags.features))
    else:
        base = known or generic_layout(frame, flags)
    changes = {
        "label_column": flags.label_column, "time_column": flags.time_column, "id_column": flags.id_column,
        "key_column": flags.customer_column, "time_unit": flags.time_unit,
    }
    layout = dataclasses.replace(base, **{k: v for k, v in changes.items() if v is not None})
    if flags.log_features == "layout":
        return layout
    log_features = tuple(flags.log_features or ())
    unknown = [name for name in log_features if name not in layout.features]
    if unknown:
        raise InputDataError(f"--log-features column {unknown[0]!r} is not one of the features")
    return dataclasses.replace(layout, log_features=log_features)


def flag_columns(flags: LayoutFlags) -> dict[str, str | None]:
    """The single columns the command line names, by flag."""
    return {"--label-column": flags.label_column, "--time-column": flags.time_column,
            "--id-column": flags.id_column, "--customer-column": flags.customer_column}


# Column names (lower case) a generic table's label is recognised by when no --label-column is given.
LABEL_NAMES = ("label", "class", "y", "is_fraud", "fraud", "target", "outlier", "anomaly", "is_anomaly")


def _is_binary(column: pd.Series) -> bool:
    values = pd.to_numeric(column, errors="coerce")
    return bool(values.notna().all() and values.isin([0, 1]).all())


def find_label(frame: pd.DataFrame) -> str | None:
    """A 0/1 column with a usual label name (``LABEL_NAMES``, any case), else None."""
    return next((str(c) for c in frame.columns if str(c).lower() in LABEL_NAMES and _is_binary(frame[c])), None)


def generic_layout(frame: pd.DataFrame, flags: LayoutFlags) -> TableLayout:
    """Features: every numeric column but the label, time, id and customer columns (``check_table`` has refused
    a column of numbers with a stray word in it).

    The label is --label-column, or else a 0/1 column with a usual label name (none: unlabelled).
    """
    label = flags.label_column or find_label(frame)
    roles = {label, flags.time_column, flags.id_column, flags.customer_column} - {None}
    features, skipped = [], []
    for name in map(str, frame.columns):
        if name in roles:
            continue
        numeric = pd.api.types.is_numeric_dtype(frame[name]) or pd.api.types.is_bool_dtype(frame[name])
        if numeric and name.lower() not in ID_OR_TIME_NAMES:
            features.append(name)
        else:
            skipped.append(name)
    if not features:
        raise InputDataError("the table has no numeric feature columns; pass --features a,b,c")
    log.info("generic table: %d feature columns (%s), label %s; not used as features: %s", len(features),
             shorten(features), repr(label) if label else "none (unlabelled)", shorten(skipped) or "none")
    return TableLayout("generic", None, flags.time_column or "", label, None, tuple(features))


def check_features(frame: pd.DataFrame, features: tuple[str, ...]) -> np.ndarray:
    """The feature columns as float32 (rows, features); InputDataError names a bad column."""
    for name in features:
        if name not in frame.columns:
            shown = ", ".join(map(str, list(frame.columns)[:30]))
            raise InputDataError(f"column {name!r} not found; the table has: {shown}")
        column = frame[name]
        if not (pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column)):
            example = column.dropna().iloc[0] if column.notna().any() else None
            raise InputDataError(f"column {name!r} is not numeric (dtype {column.dtype}, e.g. {example!r})")
        bad = ~np.isfinite(column.to_numpy(dtype=np.float64))
        if bad.any():
            raise InputDataError(
                f"column {name!r} has {int(bad.sum())} missing or infinite values "
                f"(first at data row {int(np.argmax(bad)) + 1}, 1-based); fill or drop them first"
            )
    return frame[list(features)].to_numpy(dtype=np.float32)


def check_labels(frame: pd.DataFrame, layout: TableLayout) -> np.ndarray | None:
    """Labels as int8 0/1, or None when the layout has no label column or the table lacks it."""
    name = layout.label_column
    if not name or name not in frame.columns:
        return None
    values = pd.to_numeric(frame[name], errors="coerce")
    if values.isna().any() or not values.isin([0, 1]).all():
        raise InputDataError(f"label column {name!r} must hold only 0 and 1")
    return values.to_numpy(dtype=np.int8)


def event_times(frame: pd.DataFrame, layout: TableLayout) -> pd.Series | None:
    """Event times as a datetime64 Series, or None when the layout has no time column (row order)."""
    name = layout.time_column
    if not name:
        return None
    if name not in frame.columns:
        raise InputDataError(f"time column {name!r} not found; pass --time-column")
    column = frame[name]
    try:
        if pd.api.types.is_datetime64_any_dtype(column):
            return column
        if pd.api.types.is_numeric_dtype(column):
            return pd.to_datetime(column, unit=layout.time_unit)
        return pd.to_datetime(column)
    except (ValueError, TypeError, OverflowError) as err:
        raise InputDataError(f"time column {name!r} cannot be read as times ({err})") from err
