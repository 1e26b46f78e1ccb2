"""Split rows into train, validation and test by time, never at random.

>>> t = pd.Series(pd.date_range("2018-05-01", periods=10, freq="D"))
>>> s = time_split(t, SplitSpec(val_fraction=0.2, test_fraction=0.2))
>>> [int(m.sum()) for m in (s.train, s.val, s.test)]
[6, 2, 2]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.errors import InputDataError


@dataclass(frozen=True)
class SplitSpec:
    """Dates (inclusive starts, exclusive ends) or, where a date is missing, fractions of the rows."""

    start: str | None = None  # rows before are dropped (e.g. feature warm-up)
    val_start: str | None = None
    test_start: str | None = None
    end: str | None = None  # rows from here on are dropped
    val_fraction: float = 0.15
    test_fraction: float | None = 0.2  # None: decided by the caller (fraud-train fit: 0 without labels)

    def __post_init__(self) -> None:
        fractions = (self.val_fraction, self.test_fraction or 0.0)
        if any(not 0 <= f < 1 for f in fractions) or sum(fractions) >= 1:
            raise InputDataError(f"val and test fractions {fractions} must be in [0, 1) and sum below 1")


@dataclass(frozen=True)
class Split:
    """Boolean row masks, disjoint, in time order: train < val < test."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def _stamp(value: str, name: str) -> pd.Timestamp:
    try:
        return pd.Timestamp(value)
    except ValueError as err:
        raise InputDataError(f"--{name.replace('_', '-')} {value!r} is not a date (use YYYY-MM-DD)") from err


def naive_utc(times: pd.Series | np.ndarray) -> np.ndarray:
    """Event times as naive UTC datetime64[ns] (rows,)."""
    if isinstance(times, np.ndarray):
        return times
    if times.dt.tz is not None:
        return times.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy(dtype="datetime64[ns]")
    return times.to_numpy(dtype="datetime64[ns]")


def time_split(times: pd.Series | None, spec: SplitSpec, n_rows: int | None = None) -> Split:
    """Masks for the given event times, or for row order when times is None."""
    if times is None:
        if any((spec.start, spec.val_start, spec.test_start, spec.end)):
            raise InputDataError("date splits need a time column; pass --time-column or use fractions")
        order_key = np.arange(n_rows if n_rows is not None else 0, dtype=np.float64)
        return _fraction_split(order_key, np.ones(len(order_key), bool), spec)
    t = naive_utc(times)
    keep = np.ones(len(t), bool)
    if spec.start:
        keep &= t >= _stamp(spec.start, "start").to_datetime64()
    if spec.end:
        keep &= t < _stamp(spec.end, "end").to_datetime64()
    if spec.val_start and spec.test_start:
        val_at = _stamp(spec.val_start, "val_start").to_datetime64()
        test_at = _stamp(spec.test_start, "test_start").to_datetime64()
        if not val_at <= test_at:
            raise InputDataError("--val-start must not be after --test-start")
        return Split(keep & (t < val_at), keep & (t >= val_at) & (t < test_at), keep & (t >= test_at))
    if spec.val_start or spec.test_start:
        raise InputDataError("give both --val-start and --test-start, or neither (fractions are used then)")
    return _fraction_split(t.astype(np.int64).astype(np.float64), keep, spec)


def _fraction_split(key: np.ndarray, keep: np.ndarray, spec: SplitSpec) -> Split:
    """Cut the kept rows, ordered by key, into the last test and val fractions and the train rest."""
    kept_keys = np.sort(key[keep])
    n = len(kept_keys)
    if n == 0:
        return Split(keep.copy(), keep.copy(), keep.copy())
    test_fraction = spec.test_fraction or 0.0
    val_at = kept_keys[min(n - 1, int(n * (1 - spec.val_fraction - test_fraction)))]
    test_at = kept_keys[min(n - 1, int(n * (1 - test_fraction)))] if test_fraction else np.inf
    return Split(keep & (key < val_at), keep & (key >= val_at) & (key < test_at), keep & (key >= test_at))
