"""Turn a micro-batch of Kafka records into one float32 matrix plus the records that failed.

Each record is decoded once; its features go straight into a preallocated row of the
matrix in the artifact's feature order. Nothing else is built per record. No record can
raise out of here: one that breaks the decoder itself is kept as a ``processing_error``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from pipeline.schema import RecordError, Transaction, decode, feature_error, fill_features
from pipeline.worker.outputs import processing_error


class KafkaRecord(Protocol):
    """The parts of kafka-python's ConsumerRecord the worker reads."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]] | None


@dataclass
class DecodedBatch:
    """Records that can be scored (rows of ``matrix``, same order) and those that cannot."""

    matrix: np.ndarray  # (n_good, n_features) float32, raw units
    good: list[tuple[KafkaRecord, Transaction]]
    bad: list[tuple[KafkaRecord, RecordError]]

    @property
    def event_times_ms(self) -> np.ndarray:
        return np.fromiter((tx.event_time_ms for _, tx in self.good), dtype=np.int64, count=len(self.good))


Enrich = Callable[[Any, Transaction], RecordError | None]


def decode_batch(records: Sequence[Any], features: Sequence[str], max_bytes: int,
                 enrich: Enrich | None = None) -> DecodedBatch:
    """Decode and validate every record; bad ones are kept with the reason, never raised.

    ``enrich`` adds computed fields to a decoded transaction before its features are read
    (the terminal stage of raw input), or says why it cannot."""
    matrix = np.empty((len(records), len(features)), dtype=np.float32)
    good: list[tuple[Any, Transaction]] = []
    bad: list[tuple[Any, RecordError]] = []
    with np.errstate(over="ignore"):  # a value beyond float32 becomes inf and is refused below
        for record in records:
            try:
                result = decode(record.value, max_bytes)
                problem = result if isinstance(result, RecordError) else None
                if problem is None and enrich is not None:
                    problem = enrich(record, result)
                if problem is None:
                    problem = fill_features(result, features, matrix[len(good)], check_finite=False)
            except Exception as err:  # a bug or an input the decoder did not foresee: this record only
                problem = processing_error("decode", err)
            if problem is not None:
                bad.append((record, problem))
                continue
            good.append((record, result))
    matrix = matrix[: len(good)]
    finite = np.isfinite(matrix).all(axis=1)
    if not finite.all():  # rare: NaN, or a value beyond float32's range
        keep = np.flatnonzero(finite)
        for i in np.flatnonzero(~finite):
            record, tx = good[i]
            bad.append((record, feature_error(tx, features) or RecordError("not_finite", None, "non-finite")))
        good = [good[i] for i in keep]
        matrix = matrix[keep]
    return DecodedBatch(matrix, good, bad)
