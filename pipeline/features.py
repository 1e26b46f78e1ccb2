"""Column and feature names shared by the simulator, the trainer and the worker.

Two table layouts are known by name; any other numeric table works when its feature,
id, time and label columns are named by flags.

- ``handbook``: the Fraud Detection Handbook's transformed transactions (the
  simulator writes exactly these columns).
- ``creditcard``: the Kaggle / ULB ``creditcard.csv`` (``Time, V1..V28, Amount, Class``).
"""

from __future__ import annotations

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
