"""The handbook's 14 derived features, computed one event at a time: the only implementation.

The worker calls it per transaction on a raw stream; the simulator and the trainer call
:func:`feature_table`, which folds the same per-event code over a whole table in time order.
Training and serving therefore share one definition: no train/serve skew by construction.

Definitions (Le Borgne et al., *Fraud Detection Handbook*, "Baseline feature transformation"):

- ``TX_DURING_WEEKEND`` (weekday >= 5) and ``TX_DURING_NIGHT`` (hour <= 6), in UTC;
- per customer and window ``w`` days: the number and mean amount of the customer's
  transactions with event time in ``(t - w, t]``, the current one included, later ones at the
  same millisecond not;
- per terminal, with labels known ``delay`` days late: the number of the terminal's
  transactions in ``(t - delay - w, t - delay]`` and the share of them known to be frauds.

State per entity is its events inside the longest look-back plus ``GRACE_MS`` (events up to
that much out of order are placed exactly). Events carry a 64-bit id (a hash of the
transaction id), so an event seen again (a replay after a crash) changes nothing: its features
are computed as of its first arrival. A fraud label may arrive before or after its
transaction; it counts once the window reaches the transaction.
"""

from __future__ import annotations

import hashlib
import math
import struct
from array import array
from bisect import bisect_right
from collections.abc import Iterable
from typing import TYPE_CHECKING

from pipeline.features import WINDOWS

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

DAY_MS = 86_400_000
DELAY_DAYS = 7  # the handbook's label delay for terminal risk
GRACE_MS = DAY_MS  # how far out of event-time order an event may arrive and still be placed exactly

CALENDAR_FEATURES = ("TX_DURING_WEEKEND", "TX_DURING_NIGHT")
CUSTOMER_FEATURES = (*(f"CUSTOMER_ID_NB_TX_{w}DAY_WINDOW" for w in WINDOWS),
                     *(f"CUSTOMER_ID_AVG_AMOUNT_{w}DAY_WINDOW" for w in WINDOWS))
TERMINAL_FEATURES = (*(f"TERMINAL_ID_NB_TX_{w}DAY_WINDOW" for w in WINDOWS),
                     *(f"TERMINAL_ID_RISK_{w}DAY_WINDOW" for w in WINDOWS))
DERIVED_FEATURES = (*CALENDAR_FEATURES, *CUSTOMER_FEATURES, *TERMINAL_FEATURES)

_WINDOWS_MS = tuple(w * DAY_MS for w in WINDOWS)
_FORMAT = 1  # first byte of every serialized state; bump when the layout changes


def event_id(transaction_id: str) -> int:
    """A stable signed 64-bit id for a transaction id (the same in every process and version)."""
    digest = hashlib.blake2b(transaction_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def calendar(t_ms: int) -> tuple[float, float]:
    """``(TX_DURING_WEEKEND, TX_DURING_NIGHT)`` of an epoch-millisecond time, in UTC."""
    weekday = (t_ms // DAY_MS + 3) % 7  # 1970-01-01 was a Thursday (Monday = 0)
    hour = t_ms // 3_600_000 % 24
    return float(weekday >= 5), float(hour <= 6)


class CustomerWindows:
    """One customer's recent events: time (ms), amount, id; sorted by time, arrival order for ties."""

    __slots__ = ("amounts", "ids", "times")
    HORIZON_MS = max(_WINDOWS_MS) + GRACE_MS

    def __init__(self) -> None:
        self.times, self.amounts, self.ids = array("q"), array("d"), array("q")

    def update(self, eid: int, t_ms: int, amount: float) -> tuple[float, ...]:
        """Add an event (once) and return its 6 features: counts, then mean amounts, per window."""
        times, amounts, ids = self.times, self.amounts, self.ids
        late = False
        if eid in ids:  # seen before: as of its first arrival
            end = ids.index(eid) + 1
            t_ms = times[end - 1]
        else:
            newest = times[-1] if times else t_ms
            cutoff = (newest if newest > t_ms else t_ms) - self.HORIZON_MS
            if times[0] <= cutoff if times else False:
                _evict(cutoff, times, amounts, ids)
            if not times or t_ms >= times[-1]:  # the usual case: events in time order
                times.append(t_ms)
                amounts.append(amount)
                ids.append(eid)
                end = len(times)
            else:
                end = bisect_right(times, t_ms)
                times.insert(end, t_ms)
                amounts.insert(end, amount)
                ids.insert(end, eid)
                end += 1
            late = t_ms <= cutoff  # too late to keep: its features from what is kept, then dropped
        counts, means = [], []
        for window in _WINDOWS_MS:
            lo = bisect_right(times, t_ms - window, 0, end - 1)
            counts.append(float(end - lo))
            means.append(math.fsum(amounts[lo:end]) / (end - lo))
        if late:
            for column in (times, amounts, ids):
                del column[end - 1]
        return (*counts, *means)

    def to_bytes(self) -> bytes:
        return struct.pack("<BI", _FORMAT, len(self.times)) + self.times.tobytes() + self.amounts.tobytes() \
            + self.ids.tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> CustomerWindows:
        n = _header(data)
        state = cls()
        state.times.frombytes(data[5: 5 + 8 * n])
        state.amounts.frombytes(data[5 + 8 * n: 5 + 16 * n])
        state.ids.frombytes(data[5 + 16 * n: 5 + 24 * n])
        return state


class TerminalWindows:
    """One terminal's events (time, id; sorted by time) and the fraud labels known for it (id -> time)."""

    __slots__ = ("delay_ms", "frauds", "ids", "times")

    def __init__(self, delay_ms: int = DELAY_DAYS * DAY_MS) -> None:
        self.delay_ms = delay_ms
        self.times, self.ids = array("q"), array("q")
        self.frauds: dict[int, int] = {}

    @property
    def horizon_ms(self) -> int:
        return self.delay_ms + max(_WINDOWS_MS) + GRACE_MS

    def update(self, eid: int, t_ms: int) -> tuple[float, ...]:
        """Add an event (once) and return its 6 features: counts, then fraud shares, per window."""
        times, ids = self.times, self.ids
        if eid not in ids:
            newest = times[-1] if times else t_ms
            cutoff = (newest if newest > t_ms else t_ms) - self.horizon_ms
            if times[0] <= cutoff if times else False:
                self._evict(cutoff)
            if t_ms > cutoff:
                at = bisect_right(times, t_ms)
                times.insert(at, t_ms)
                ids.insert(at, eid)
        hi = bisect_right(times, t_ms - self.delay_ms)
        counts, risks = [], []
        frauds = self.frauds
        for window in _WINDOWS_MS:
            lo = bisect_right(times, t_ms - self.delay_ms - window, 0, hi)
            n = hi - lo
            counts.append(float(n))
            risks.append(sum(1 for j in range(lo, hi) if ids[j] in frauds) / n if frauds and n else 0.0)
        return (*counts, *risks)

    def label(self, eid: int, t_ms: int, fraud: bool = True) -> None:
        """A label for the transaction ``eid`` (at ``t_ms``): fraud, or not (a label withdrawn)."""
        if fraud:
            self.frauds[eid] = t_ms
        else:
            self.frauds.pop(eid, None)

    def _evict(self, cutoff: int) -> None:
        _evict(cutoff, self.times, self.ids)
        if self.frauds:
            for eid in [e for e, t in self.frauds.items() if t <= cutoff]:
                del self.frauds[eid]

    def to_bytes(self) -> bytes:
        labels = array("q", [x for item in self.frauds.items() for x in item])
        return struct.pack("<BIIq", _FORMAT, len(self.times), len(self.frauds), self.delay_ms) \
            + self.times.tobytes() + self.ids.tobytes() + labels.tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> TerminalWindows:
        n = _header(data)
        (m, delay_ms) = struct.unpack_from("<Iq", data, 5)
        state = cls(delay_ms)
        body = 17
        state.times.frombytes(data[body: body + 8 * n])
        state.ids.frombytes(data[body + 8 * n: body + 16 * n])
        labels = array("q")
        labels.frombytes(data[body + 16 * n: body + 16 * n + 16 * m])
        state.frauds = dict(zip(labels[::2], labels[1::2], strict=True))
        return state


def _header(data: bytes) -> int:
    if len(data) < 5 or data[0] != _FORMAT:
        raise ValueError(f"not a feature state of format {_FORMAT} ({len(data)} bytes)")
    return struct.unpack_from("<I", data, 1)[0]


def _evict(cutoff: int, times: array, *others: array) -> None:
    k = bisect_right(times, cutoff)
    if k:
        for column in (times, *others):
            del column[:k]


def feature_rows(
    customers: Iterable[object], terminals: Iterable[object], times_ms: Iterable[int],
    amounts: Iterable[float], frauds: Iterable[int], delay_days: int = DELAY_DAYS,
) -> list[tuple[float, ...]]:
    """The 14 derived features of each event of a table sorted by time, in ``DERIVED_FEATURES`` order.

    Each event's fraud label is treated as known from the start (the terminal windows only
    look at events ``delay_days`` old, whose labels a bank knows by then).
    """
    cust: dict[object, CustomerWindows] = {}
    term: dict[object, TerminalWindows] = {}
    delay_ms = delay_days * DAY_MS
    rows = []
    for eid, (c, k, t, amount, fraud) in enumerate(zip(customers, terminals, times_ms, amounts, frauds,
                                                        strict=True)):
        c_state = cust.get(c)
        if c_state is None:
            c_state = cust[c] = CustomerWindows()
        k_state = term.get(k)
        if k_state is None:
            k_state = term[k] = TerminalWindows(delay_ms)
        row = (*calendar(t), *c_state.update(eid, t, amount), *k_state.update(eid, t))
        if fraud:
            k_state.label(eid, t)
        rows.append(row)
    return rows


def feature_table(tx: pd.DataFrame, delay_days: int = DELAY_DAYS) -> pd.DataFrame:
    """``tx`` with the 14 derived feature columns (float32, the calendar ones int32) appended.

    ``tx`` must be sorted by time and hold ``TX_DATETIME``, ``CUSTOMER_ID``, ``TERMINAL_ID``,
    ``TX_AMOUNT`` and ``TX_FRAUD``.
    """
    import numpy as np
    import pandas as pd

    times = _epoch_ms(tx["TX_DATETIME"])
    rows = feature_rows(tx["CUSTOMER_ID"].tolist(), tx["TERMINAL_ID"].tolist(), times.tolist(),
                        tx["TX_AMOUNT"].astype(np.float64).tolist(), tx["TX_FRAUD"].tolist(), delay_days)
    values = np.array(rows, dtype=np.float64).reshape(len(tx), len(DERIVED_FEATURES))
    derived = pd.DataFrame(values.astype(np.float32), columns=list(DERIVED_FEATURES), index=tx.index)
    derived[list(CALENDAR_FEATURES)] = derived[list(CALENDAR_FEATURES)].astype(np.int32)
    derived = derived[[*CALENDAR_FEATURES, *_interleaved(CUSTOMER_FEATURES), *_interleaved(TERMINAL_FEATURES)]]
    return pd.concat([tx.drop(columns=[c for c in DERIVED_FEATURES if c in tx.columns]), derived], axis=1)


def _interleaved(names: tuple[str, ...]) -> list[str]:
    """Count and mean (or risk) of each window side by side, as the handbook's tables order them."""
    half = len(names) // 2
    return [name for pair in zip(names[:half], names[half:], strict=True) for name in pair]


def _epoch_ms(column: pd.Series) -> np.ndarray:
    import numpy as np

    values = column.to_numpy()
    if values.dtype.kind == "M":
        return values.astype("datetime64[ms]").astype(np.int64)
    return np.asarray(values, dtype=np.int64)
