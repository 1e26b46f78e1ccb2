"""Which rows count as labelled when a version is fitted with labels: the label delay, and the
classifier's own time split of the labelled rows.

A fraud label becomes known days after the transaction (a chargeback, an investigation). A row
whose label was not yet known when training ended is treated as unlabelled everywhere: the
autoencoder may train on it and calibration counts it as normal, as on an unlabelled table, and
the classifier never sees it.

>>> from trainer.split import time_split
>>> times = pd.Series(pd.date_range("2018-05-01", periods=10, freq="D"))
>>> split = time_split(times, SplitSpec(val_start="2018-05-08", test_start="2018-05-10"))
>>> known_labels(times, split, SplitSpec(val_start="2018-05-08", test_start="2018-05-10"), 3).astype(int).tolist()
[1, 1, 1, 1, 1, 1, 0, 0, 0, 0]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from pipeline.errors import InputDataError
from trainer.split import Split, SplitSpec, naive_utc

DEFAULT_LABEL_DELAY_DAYS = 7
CLASSIFIER_VAL_FRACTION = 0.15  # the last labelled training rows, by time: the classifier's early stopping


def training_end(times: np.ndarray, split: Split, spec: SplitSpec) -> np.datetime64:
    """When training happens (exclusive): the test start, else just after the last train or validation row."""
    if spec.test_start:
        return pd.Timestamp(spec.test_start).to_datetime64()
    if split.test.any():
        return times[split.test].min()
    return times[split.train | split.val].max() + np.timedelta64(1, "ns")


def known_labels(times: pd.Series | None, split: Split, spec: SplitSpec, delay_days: int) -> np.ndarray:
    """(rows,) bool: the rows whose label was known when training ended, ``delay_days`` after the row.

    Without a time column only a zero delay has a meaning (every label known).
    """
    if times is None:
        if delay_days:
            raise InputDataError("--label-delay-days needs event times: pass --time-column, or --label-delay-days 0 "
                                 "if every label is known at once")
        return np.ones(len(split.train), bool)
    t = naive_utc(times)
    return t < training_end(t, split, spec) - np.timedelta64(delay_days, "D")


@dataclass(frozen=True)
class LabelledRows:
    """The classifier's rows: labelled training rows before its validation part, and that part."""

    fit: np.ndarray  # (rows,) bool
    val: np.ndarray  # (rows,) bool, the last CLASSIFIER_VAL_FRACTION of the labelled training rows by time
    known: np.ndarray  # (rows,) bool, every row whose label was known at training time (known_labels)
    delay_days: int
    cutoff: str | None  # rows from this time on were unlabelled at training time (None: row order)

    def describe(self, labels: np.ndarray) -> dict[str, Any]:
        """JSON-ready counts for the manifest."""
        return {"label_delay_days": self.delay_days, "label_cutoff": self.cutoff,
                "classifier_rows": int(self.fit.sum()), "classifier_frauds": int(labels[self.fit].sum()),
                "classifier_validation_rows": int(self.val.sum()),
                "classifier_validation_frauds": int(labels[self.val].sum())}


def labelled_rows(times: pd.Series | None, split: Split, spec: SplitSpec, labels: np.ndarray, known: np.ndarray,
                  delay_days: int) -> LabelledRows:
    """The training rows whose label was known, cut by time into the classifier's fit and validation
    parts; refuses a part without frauds or without normal rows."""
    rows = split.train & known
    key = np.arange(len(rows), dtype=np.float64) if times is None else naive_utc(times).astype(np.int64)
    cutoff = None
    if times is not None:
        t = naive_utc(times)
        cutoff = str(pd.Timestamp(training_end(t, split, spec) - np.timedelta64(delay_days, "D")))
    if rows.sum() < 2:
        raise InputDataError(f"no labelled training rows: every training row is within the {delay_days}-day label "
                             "delay of the end of training; move --val-start/--test-start or lower --label-delay-days")
    at = np.sort(key[rows])[min(int(rows.sum()) - 1, int(rows.sum() * (1 - CLASSIFIER_VAL_FRACTION)))]
    part = LabelledRows(rows & (key < at), rows & (key >= at), known, delay_days, cutoff)
    for name, mask in (("training", part.fit), ("validation (the last 15 %)", part.val)):
        frauds = int(labels[mask].sum())
        if frauds == 0 or frauds == mask.sum():
            raise InputDataError(
                f"the classifier's {name} rows (labelled before {cutoff or 'the end'}, label delay {delay_days} days) "
                f"hold {frauds} frauds in {int(mask.sum())} rows; it needs both frauds and normal rows: train on a "
                "longer period or use an unsupervised --score")
    return part
