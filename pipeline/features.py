"""Column and feature names shared by the simulator, the trainer and the worker.

Two table layouts are known by name; any other numeric table works when its feature,
id, time and label columns are named by flags.

- ``handbook``: the Fraud Detection Handbook's transformed transactions (the
  simulator writes exactly these columns).
- ``creditcard``: the Kaggle / ULB ``creditcard.csv`` (``Time, V1..V28, Amount, Class``).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import InputDataError

if TYPE_CHECKING:  # pandas costs ~0.8 s to import; the worker never needs it
    import pandas as pd

WINDOWS = (1, 7, 30)

HANDBOOK_FEATURES: tuple[str, ...] = (
    "TX_AMOUNT",
    "TX_DURING_WEEKEND",
    "TX_DURING_NIGHT",
    *(f"CUSTOMER_ID_NB_TX_{w}DAY_WINDOW" for w in WINDOWS),
    *(f"CUSTOMER_ID_AVG_AMOUNT_{w}DAY_WINDOW" for w in WINDOWS),
    *(f"TERMINAL_ID_NB_TX_{w}DAY_WINDOW" for w in WINDOWS),
    *(f"TERMINAL_ID_RISK_{w}DAY_WINDOW" for w in WINDOWS),
)

# Heavy-tailed columns: the trainer log-transforms them on request (`--log-features`); off by
# default, because on the reference data the transform hides what separates frauds.
HANDBOOK_LOG_FEATURES: tuple[str, ...] = (
    "TX_AMOUNT",
    *(f"CUSTOMER_ID_AVG_AMOUNT_{w}DAY_WINDOW" for w in WINDOWS),
    *(f"TERMINAL_ID_NB_TX_{w}DAY_WINDOW" for w in WINDOWS),
)

CREDITCARD_FEATURES: tuple[str, ...] = (*(f"V{i}" for i in range(1, 29)), "Amount")


@dataclass(frozen=True)
class TableLayout:
    """Which columns of a table hold the id, the time, the label, the entity key and the features."""

    name: str
    id_column: str | None
    time_column: str
    label_column: str | None
    key_column: str | None
    features: tuple[str, ...]
    log_features: tuple[str, ...] = ()
    # Time unit when the time column is numeric: "s" seconds since a start, "ms" epoch millis.
    time_unit: str = "ms"


HANDBOOK = TableLayout(
    name="handbook",
    id_column="TRANSACTION_ID",
    time_column="TX_DATETIME",
    label_column="TX_FRAUD",
    key_column="CUSTOMER_ID",
    features=HANDBOOK_FEATURES,
    log_features=HANDBOOK_LOG_FEATURES,
)

CREDITCARD = TableLayout(
    name="creditcard",
    id_column=None,  # rows are numbered
    time_column="Time",
    label_column="Class",
    key_column=None,
    features=CREDITCARD_FEATURES,
    log_features=("Amount",),
    time_unit="s",
)

# Extra handbook columns that are labels or simulator ground truth, never features.
HANDBOOK_LABEL_COLUMNS: tuple[str, ...] = ("TX_FRAUD", "TX_FRAUD_SCENARIO")

LAYOUTS = {layout.name: layout for layout in (HANDBOOK, CREDITCARD)}


def detect_layout(columns: list[str] | tuple[str, ...]) -> TableLayout | None:
    """The known layout whose id/time and feature columns are all present, else None.

    >>> detect_layout(["Time", *CREDITCARD_FEATURES, "Class"]).name
    'creditcard'
    """
    present = set(columns)
    for layout in LAYOUTS.values():
        if layout.time_column in present and set(layout.features) <= present:
            return layout
    return None


def read_table(path: Path | str) -> pd.DataFrame:
    """Read a CSV (optionally gzipped) or Parquet file, with errors that name the problem."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise InputDataError(f"{path}: no such file")
    suffixes = "".join(path.suffixes).lower()
    try:
        if suffixes.endswith(".parquet") or suffixes.endswith(".pq"):
            frame = pd.read_parquet(path)
        elif ".csv" in suffixes or ".tsv" in suffixes:
            frame = pd.read_csv(path, sep="\t" if ".tsv" in suffixes else ",")
        else:
            raise InputDataError(f"{path}: unknown file type; use .csv, .csv.gz or .parquet")
    except (ValueError, OSError, pd.errors.ParserError) as err:
        raise InputDataError(f"{path}: cannot be read as a table: {err}") from err
    if frame.empty:
        raise InputDataError(f"{path}: the table has no rows")
    return frame


# Never features of a table of no known layout: identifiers and times under their usual names (lower case).
ID_OR_TIME_NAMES = ("id", "index", "unnamed: 0", "transaction_id", "time", "timestamp", "event_time", "datetime")


def check_table(frame: pd.DataFrame, named: Mapping[str, str | Iterable[str] | None],
                features: Sequence[str] | None, roles: Collection[str] = ()) -> None:
    """The rules ``fraud-train`` (fit, evaluate, score) and ``fraud-produce replay`` apply to a table they read,
    before any training or sending; InputDataError (exit 2) says the first broken one in one line.

    1. Each column a flag names (``named``: flag to column or columns) is in the table (:func:`check_named`).
    2. Each cell of a feature column is a number. ``features`` None: a table of no known layout, where every
       column but ``roles`` and the id and time ones (``ID_OR_TIME_NAMES``) is a feature when most of its
       values are numbers; a text column (most values not numbers) is not one.
    """
    check_named(list(map(str, frame.columns)), named)
    if features is None:
        candidates = [c for c in frame.columns if c not in roles and str(c).lower() not in ID_OR_TIME_NAMES]
    else:
        candidates = [c for c in features if c in frame.columns]
    for name in candidates:
        stray = _first_non_number(frame[name], declared=features is not None)
        if stray is not None:
            raise InputDataError(f"column {name!r}, data row {stray[0]} (1-based, header not counted): "
                                 f"{stray[1]!r} is not a number; fix or drop that row"
                                 + ("" if features is not None else ", or leave the column out of the features"))


def check_named(columns: Sequence[str], named: Mapping[str, str | Iterable[str] | None]) -> None:
    """Refuse a column a flag names that the table lacks: one line with the flag, the name and the close matches.

    >>> check_named(["id", "label"], {"--id-column": "id", "--label-column": "Label"})
    Traceback (most recent call last):
    ...
    pipeline.errors.InputDataError: --label-column 'Label': the table has no such column (did you mean 'label'?); \
it has: id, label
    """
    for flag, given in named.items():
        for name in [given] if isinstance(given, str) else given or ():
            if name not in columns:  # a typo must not train or send something silently different
                raise InputDataError(no_such_column(flag, name, columns))


def no_such_column(flag: str, name: str, columns: Sequence[str]) -> str:
    """The line for a column ``flag`` names that the table lacks, with up to three close matches (difflib)."""
    import difflib

    columns = [str(c) for c in columns]
    same_case = [c for c in columns if c.lower() == name.lower()]
    ratios = {c: difflib.SequenceMatcher(None, name, c).ratio() for c in columns}
    close = sorted((c for c in columns if ratios[c] >= 0.6), key=lambda c: -ratios[c])  # ties: table order
    near = list(dict.fromkeys([*same_case, *close]))[:3]
    hint = f" (did you mean {' or '.join(map(repr, near))}?)" if near else ""
    return f"{flag} {name!r}: the table has no such column{hint}; it has: {shorten(columns, 30)}"


def shorten(names: Sequence[str], most: int = 8) -> str:
    """Names for a message: the first ``most``, then how many in all.

    >>> shorten(["a", "b", "c"], 2)
    'a, b, ... (3 in all)'
    """
    return ", ".join(names[:most]) + (f", ... ({len(names)} in all)" if len(names) > most else "")


def _first_non_number(column: pd.Series, declared: bool) -> tuple[int, object] | None:
    """The first (1-based data row, value) of ``column`` that is not a number, if the column is a feature:
    ``declared``, or most of its values are numbers. Missing cells are not looked at here."""
    import pandas as pd

    if pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
        return None
    try:
        numbers = pd.to_numeric(column, errors="coerce")
    except (TypeError, ValueError):  # lists or mappings in the cells: not numbers; check_features says so
        return None
    bad = (numbers.isna() & column.notna()).to_numpy()
    if not bad.any() or (not declared and bad.sum() * 2 > column.notna().sum()):
        return None
    at = int(bad.argmax())
    return at + 1, column.iloc[at]
