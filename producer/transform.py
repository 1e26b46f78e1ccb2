"""The Fraud Detection Handbook's baseline feature transformation, vectorised.

Same values as the handbook's ``groupby(...).apply(rolling(...))`` code, computed with
one sort and ``searchsorted``/``cumsum`` per entity kind, so a million rows take seconds:

- ``TX_DURING_WEEKEND`` (weekday >= 5) and ``TX_DURING_NIGHT`` (hour <= 6);
- per customer and window ``w`` days: the number and mean amount of the customer's
  transactions in ``(t - w, t]``, up to and including the current row (pandas ``'wd'``
  rolling windows);
- per terminal, with labels known ``delay`` days late: the number of transactions in
  ``(t - delay - w, t - delay]`` and the share of them that are frauds (0 when none).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.features import WINDOWS

DAY_SECONDS = 86_400
DEFAULT_DELAY_DAYS = 7


def add_features(
    tx: pd.DataFrame, windows: tuple[int, ...] = WINDOWS, delay_days: int = DEFAULT_DELAY_DAYS
) -> pd.DataFrame:
    """Return ``tx`` with the handbook's 14 derived feature columns appended.

    ``tx`` must be sorted by time and hold ``TX_DATETIME``, ``TX_TIME_SECONDS`` (whole
    seconds), ``CUSTOMER_ID``, ``TERMINAL_ID``, ``TX_AMOUNT`` and ``TX_FRAUD``.
    """
    out = tx.copy()
    out["TX_DURING_WEEKEND"] = (out["TX_DATETIME"].dt.day_of_week >= 5).astype(np.int32)
    out["TX_DURING_NIGHT"] = (out["TX_DATETIME"].dt.hour <= 6).astype(np.int32)
    seconds = out["TX_TIME_SECONDS"].to_numpy(np.int64)
    amount = out["TX_AMOUNT"].to_numpy(np.float64)
    fraud = out["TX_FRAUD"].to_numpy(np.float64)
    longest = (max(windows) + delay_days) * DAY_SECONDS

    cust = _EntityWindows(out["CUSTOMER_ID"].to_numpy(np.int64), seconds, longest)
    for w in windows:
        count, total = cust.trailing(w * DAY_SECONDS, amount)
        out[f"CUSTOMER_ID_NB_TX_{w}DAY_WINDOW"] = count.astype(np.float32)
        out[f"CUSTOMER_ID_AVG_AMOUNT_{w}DAY_WINDOW"] = (total / count).astype(np.float32)

    term = _EntityWindows(out["TERMINAL_ID"].to_numpy(np.int64), seconds, longest)
    delay = delay_days * DAY_SECONDS
    for w in windows:
        count, frauds = term.delayed(delay, w * DAY_SECONDS, fraud)
        risk = np.divide(frauds, count, out=np.zeros_like(frauds), where=count > 0)
        out[f"TERMINAL_ID_NB_TX_{w}DAY_WINDOW"] = count.astype(np.float32)
        out[f"TERMINAL_ID_RISK_{w}DAY_WINDOW"] = risk.astype(np.float32)
    return out


class _EntityWindows:
    """Rows sorted by (entity, time), keyed so one ``searchsorted`` finds window bounds.

    The key is ``entity_rank * span + time``, with ``span`` larger than any time plus the
    longest look-back, so a window never reaches into the previous entity's rows.
    """

    def __init__(self, entity: np.ndarray, seconds: np.ndarray, longest: int) -> None:
        self.order = np.argsort(entity, kind="stable")  # rows already in time order
        _, rank = np.unique(entity[self.order], return_inverse=True)
        time = seconds[self.order] - seconds.min()
        span = int(time.max()) + longest + 1
        if (int(rank.max()) + 1) * span >= 2**62:
            raise OverflowError("too many entities times time span for int64 window keys")
        self.key = rank.astype(np.int64) * span + time  # (rows,) ascending
        self.position = np.arange(len(entity))

    def _sum(self, values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        # Extended precision keeps the differences of a long running sum exact to ~1e-10.
        cumsum = np.concatenate(([0.0], np.cumsum(values[self.order], dtype=np.longdouble)))
        return (cumsum[hi] - cumsum[lo]).astype(np.float64)

    def _unsort(self, sorted_values: np.ndarray) -> np.ndarray:
        result = np.empty_like(sorted_values)
        result[self.order] = sorted_values
        return result

    def trailing(self, window: int, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Count and sum of ``values`` over rows in ``(t - window, t]`` up to this row."""
        lo = np.searchsorted(self.key, self.key - window, side="right")
        hi = self.position + 1
        count = (hi - lo).astype(np.float64)
        return self._unsort(count), self._unsort(self._sum(values, lo, hi))

    def delayed(
        self, delay: int, window: int, values: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Count and sum of ``values`` over rows in ``(t - delay - window, t - delay]``."""
        lo = np.searchsorted(self.key, self.key - delay - window, side="right")
        hi = np.searchsorted(self.key, self.key - delay, side="right")
        count = (hi - lo).astype(np.float64)
        return self._unsort(count), self._unsort(self._sum(values, lo, hi))
