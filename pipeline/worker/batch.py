"""Turn a micro-batch of Kafka records into one float32 matrix plus the records that failed.

Each record is decoded once; its features, in the artifact's order, are checked to be plain
numbers and kept as a tuple; the batch's tuples become one float32 matrix in a single numpy
call (cheaper than filling a row per record). Nothing else is built per record. No record can
raise out of here: one that breaks the decoder itself is kept as a ``processing_error``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import numpy as np

from pipeline.schema import RecordError, Transaction, decode, feature_error
from pipeline.worker.outputs import processing_error
from pipeline.worker.records import ConsumedRecord


@dataclass
class DecodedBatch:
    """Records that can be scored (rows of ``matrix``, same order) and those that cannot."""

    matrix: np.ndarray  # (n_good, n_features) float32, raw units
    good: list[tuple[ConsumedRecord, Transaction]]
    bad: list[tuple[ConsumedRecord, RecordError]]

    @property
    def event_times_ms(self) -> np.ndarray:
        return np.fromiter((tx.event_time_ms for _, tx in self.good), dtype=np.int64, count=len(self.good))


Enrich = Callable[[Any, Transaction], RecordError | None]


def decode_batch(records: Sequence[Any], features: Sequence[str], max_bytes: int,
                 enrich: Enrich | None = None) -> DecodedBatch:
    """Decode and validate every record; bad ones are kept with the reason, never raised.

    ``enrich`` adds computed fields to a decoded transaction before its features are read
    (the terminal stage of raw input), or says why it cannot."""
    values_of = _getter(features)
    rows: list[tuple[Any, ...]] = []
    good: list[tuple[Any, Transaction]] = []
    bad: list[tuple[Any, RecordError]] = []
    for record in records:
        try:
            result = decode(record.value, max_bytes)
            problem = result if isinstance(result, RecordError) else None
            if problem is None and enrich is not None:
                problem = enrich(record, result)
            if problem is None:
                values = _numbers(result.fields, values_of)
                if values is None:
                    problem = feature_error(result, features) or RecordError("bad_type", None, "a feature is not "
                                                                             "a number")
        except Exception as err:  # a bug or an input the decoder did not foresee: this record only
            problem = processing_error("decode", err)
        if problem is not None:
            bad.append((record, problem))
            continue
        good.append((record, result))
        rows.append(values)
    matrix = _float32_rows(rows, len(features))
    finite = np.isfinite(matrix).all(axis=1)
    if not finite.all():  # rare: NaN, or a value beyond float32's range
        keep = np.flatnonzero(finite)
        for i in np.flatnonzero(~finite):
            record, tx = good[i]
            bad.append((record, feature_error(tx, features) or RecordError("not_finite", None, "non-finite")))
        good = [good[i] for i in keep]
        matrix = matrix[keep]
    return DecodedBatch(matrix, good, bad)


_NUMBERS = frozenset({int, float})  # bool is not: JSON true is no feature value


def _getter(features: Sequence[str]) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    """The named fields of a record, as a tuple, in the model's order (KeyError: one is missing)."""
    if len(features) == 1:
        name = features[0]
        return lambda fields: (fields[name],)
    return itemgetter(*features)


def _numbers(fields: dict[str, Any], values_of: Callable[[dict[str, Any]], tuple[Any, ...]]
             ) -> tuple[Any, ...] | None:
    """The feature values when every one is a plain int or float, else None (``feature_error`` says why)."""
    try:
        values = values_of(fields)
    except KeyError:
        return None
    return values if set(map(type, values)) <= _NUMBERS else None


def _float32_rows(rows: list[tuple[Any, ...]], width: int) -> np.ndarray:
    """The rows as one float32 matrix, converted in one call; a value beyond float32 becomes inf, and
    a row numpy cannot convert at all (an integer beyond float64) NaN: both are refused by the caller."""
    with np.errstate(over="ignore"):
        try:
            return np.array(rows, dtype=np.float32).reshape(len(rows), width)
        except (OverflowError, ValueError):
            matrix = np.empty((len(rows), width), dtype=np.float32)
            for i, row in enumerate(rows):
                try:
                    matrix[i] = row
                except (OverflowError, ValueError):
                    matrix[i] = np.nan
            return matrix
