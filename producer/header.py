"""A table's column names from its Parquet schema or CSV header, without reading its rows.

``fraud-produce replay`` checks its column flags against these names first, so a typo in
``--id-column`` is answered at once instead of after loading a large file.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import lzma
from collections.abc import Callable
from pathlib import Path

from pipeline.errors import InputDataError

_OPENERS: dict[str, Callable] = {".csv": open, ".tsv": open, ".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def read_columns(path: Path) -> list[str] | None:
    """Column names of a .parquet/.pq, .csv or .tsv table (.gz, .bz2, .xz too).

    None when the header cannot be read this way (another compression, a broken file): the
    full read then reports the problem.
    """
    suffixes = "".join(path.suffixes).lower()
    if suffixes.endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq

        try:
            return [str(name) for name in pq.read_schema(path).names]
        except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid and ArrowIOError derive from these
            raise InputDataError(f"{path}: cannot be read as Parquet: {err}") from err
    opener = _OPENERS.get(path.suffix.lower())
    if opener is None:
        return None
    delimiter = "\t" if ".tsv" in suffixes else ","
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace", newline="") as text:
            return next(csv.reader(text, delimiter=delimiter), None)
    except (OSError, EOFError, lzma.LZMAError, csv.Error):
        return None
