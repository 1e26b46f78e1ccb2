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
import itertools
import math
import struct
from array import array
from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterable
from functools import lru_cache
from typing import TYPE_CHECKING

from pipeline.features import WINDOWS

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

DAY_MS = 86_400_000
DELAY_DAYS = 7  # the handbook's label delay for terminal risk
GRACE_MS = DAY_MS  # how far out of event-time order a customer's event may arrive and still be placed exactly
HOT_EVENTS = 256  # an entity holding more events than this keeps its ids sorted too, and running sums
SEGMENT_MS = 3_600_000  # a big entity's changelog is written in segments of this much event time ...
CHUNK_EVENTS = 16_384  # ... each cut into records of at most this many events (well under Kafka's 1 MB)

CALENDAR_FEATURES = ("TX_DURING_WEEKEND", "TX_DURING_NIGHT")
CUSTOMER_FEATURES = (*(f"CUSTOMER_ID_NB_TX_{w}DAY_WINDOW" for w in WINDOWS),
                     *(f"CUSTOMER_ID_AVG_AMOUNT_{w}DAY_WINDOW" for w in WINDOWS))
TERMINAL_FEATURES = (*(f"TERMINAL_ID_NB_TX_{w}DAY_WINDOW" for w in WINDOWS),
                     *(f"TERMINAL_ID_RISK_{w}DAY_WINDOW" for w in WINDOWS))
DERIVED_FEATURES = (*CALENDAR_FEATURES, *CUSTOMER_FEATURES, *TERMINAL_FEATURES)

_WINDOWS_MS = tuple(w * DAY_MS for w in WINDOWS)
_ID = struct.Struct("=q")  # an id as ``array("q")`` holds it
EVENT, LABEL = 0, 1  # the kinds of change a changelog delta holds (``apply``)
_FORMAT = 1  # first byte of every serialized state; bump when the layout changes
SEGMENTED = 2  # first byte of a big entity's head record (its state lives in segment records)


class DuplicateConflict(ValueError):
    """A transaction id seen before with other content (another time, or another amount)."""


@lru_cache(maxsize=1 << 14)  # asked by the customer stage, then by the terminal stage in the same batch
def event_id(transaction_id: str) -> int:
    """A stable signed 64-bit id for a transaction id (the same in every process and version)."""
    digest = hashlib.blake2b(transaction_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def calendar(t_ms: int) -> tuple[float, float]:
    """``(TX_DURING_WEEKEND, TX_DURING_NIGHT)`` of an epoch-millisecond time, in UTC."""
    weekday = (t_ms // DAY_MS + 3) % 7  # 1970-01-01 was a Thursday (Monday = 0)
    hour = t_ms // 3_600_000 % 24
    return float(weekday >= 5), float(hour <= 6)


def _discard(index: array, eid: int) -> None:
    i = bisect_left(index, eid)
    if i < len(index) and index[i] == eid:
        del index[i]


class Events:
    """An entity's events sorted by time (arrival order for ties), with their ids.

    Finding an id costs O(log n) once the entity holds more than ``HOT_EVENTS`` (a busy
    merchant): its ids are also kept sorted (8 bytes an event; a set would cost about 100), then
    a binary search by the event's time finds it. Below that a linear scan of the ids in C is
    cheaper than the memory an index takes, for the 60 events a customer holds on average.
    """

    __slots__ = ("_index", "ids", "last_new", "times", "touched")

    def __init__(self) -> None:
        self.times, self.ids = array("q"), array("q")
        self._index: array | None = None  # the ids, sorted (hot entities only)
        self.touched: set[int] | None = None  # segments changed since the changelog last wrote them (big ones)
        self.last_new = False  # whether the last update kept its event (False: a replay, or too late to keep)

    @property
    def size(self) -> int:
        """Events held (and labels, for a terminal): what its changelog record carries."""
        return len(self.times)

    def segments(self) -> set[int]:
        """The segments (event time // SEGMENT_MS) that hold something."""
        return {t // SEGMENT_MS for t in self.times}

    def _touch(self, first_ms: int, last_ms: int | None = None) -> None:
        if self.touched is not None:
            self.touched.update(range(first_ms // SEGMENT_MS, (last_ms if last_ms is not None else first_ms)
                                      // SEGMENT_MS + 1))

    def _span(self, segment: int) -> tuple[int, int]:
        """The positions of the events of ``segment``."""
        return (bisect_left(self.times, segment * SEGMENT_MS), bisect_left(self.times, (segment + 1) * SEGMENT_MS))

    @property
    def newest(self) -> int | None:
        return self.times[-1] if self.times else None

    def expired(self, cutoff: int) -> bool:
        """Whether nothing of it is after ``cutoff``: no window of an event still to come can reach it."""
        return not self.times or self.times[-1] <= cutoff

    def locate(self, eid: int, t_ms: int) -> int:
        """Where event ``eid`` is held (looked for at ``t_ms`` first, then at any time); -1 when it is not."""
        times, ids, index = self.times, self.ids, self._index
        if index is not None:
            for at in range(bisect_left(times, t_ms), bisect_right(times, t_ms)):
                if ids[at] == eid:
                    return at
            i = bisect_left(index, eid)
            if i == len(index) or index[i] != eid:
                return -1
            return ids.index(eid)
        if not ids:
            return -1
        # ``eid in ids`` makes an int object of every id it passes (2 us for a customer's 60, twice per
        # transaction: 9 % of the raw worker's main thread in a py-spy profile, 2026-12-07); a search of the
        # ids' bytes for the id's 8 bytes runs in C, and a match counts only at a multiple of 8
        held, needle = ids.tobytes(), _ID.pack(eid)
        at = held.find(needle)
        while at > 0 and at % 8:
            at = held.find(needle, at + 1)
        return at >> 3 if at >= 0 else -1

    def find(self, eid: int, t_ms: int) -> int:
        """The position of event ``eid`` (at ``t_ms``), or -1 when unseen; DuplicateConflict when the id
        was seen at another time."""
        at = self.locate(eid, t_ms)
        if at >= 0 and self.times[at] != t_ms:
            raise DuplicateConflict(f"transaction seen before at {self.times[at]} ms, now at {t_ms} ms")
        return at

    def _insert(self, eid: int, t_ms: int, *values: tuple[array, float]) -> int:
        """Place a new event; the position after it."""
        times, ids = self.times, self.ids
        if not times or t_ms >= times[-1]:  # the usual case: events in time order
            at = len(times)
            times.append(t_ms)
            ids.append(eid)
            for column, value in values:
                column.append(value)
        else:
            at = bisect_right(times, t_ms)
            times.insert(at, t_ms)
            ids.insert(at, eid)
            for column, value in values:
                column.insert(at, value)
        if self._index is not None:
            insort(self._index, eid)
        elif len(ids) > HOT_EVENTS:
            self._index = array("q", sorted(ids))
        self._touch(t_ms)
        return at + 1

    def _remove(self, at: int, *others: array) -> None:
        self._touch(self.times[at])
        if self._index is not None:
            _discard(self._index, self.ids[at])
        for column in (self.times, self.ids, *others):
            del column[at]

    def _evict(self, cutoff: int, *others: array) -> None:
        """Drop the events at or before ``cutoff``."""
        k = bisect_right(self.times, cutoff)
        if not k:
            return
        self._touch(self.times[0], self.times[k - 1])
        if self._index is not None:
            for eid in self.ids[:k]:
                _discard(self._index, eid)
        for column in (self.times, self.ids, *others):
            del column[:k]
        if self._index is not None and len(self.ids) <= HOT_EVENTS // 2:
            self._index = None

    def _reindex(self) -> None:
        self._index = array("q", sorted(self.ids)) if len(self.ids) > HOT_EVENTS else None


def _evict_cutoff(newest: int, t_ms: int, floor_ms: int | None, horizon_ms: int) -> int:
    """Events at or before the returned time may go: those a look-back plus grace behind the newest time
    known, but never any that an event at ``floor_ms`` needs. An event replayed after later ones were
    applied (a batch read again after its commit was refused, its later batches' state already in the
    changelog) must get the features it got the first time: evicting by the newest time alone cut its
    windows (issue 18, found 2026-12-06)."""
    top = newest if newest > t_ms else t_ms
    if floor_ms is not None and floor_ms < top:
        top = floor_ms
    return top - horizon_ms


class _PrefixSums:
    """Running sums of a busy customer's amounts, in double-double precision: a window's sum is a difference
    of two of them (O(1)) and as exact as ``math.fsum`` for any amounts the bounds let in."""

    __slots__ = ("base", "hi", "lo")

    def __init__(self, amounts: array) -> None:
        self.hi, self.lo = array("d"), array("d")
        self.base = (0.0, 0.0)  # the sum of everything evicted so far
        self.rebuild(0, amounts)

    def rebuild(self, start: int, amounts: array) -> None:
        """Recompute the sums from position ``start`` on (after an insertion or removal there)."""
        del self.hi[start:], self.lo[start:]
        hi, lo = (self.hi[start - 1], self.lo[start - 1]) if start else self.base
        for x in amounts[start:]:
            hi, lo = _dd_add(hi, lo, x)
            self.hi.append(hi)
            self.lo.append(lo)

    def append(self, x: float) -> None:
        hi, lo = _dd_add(*((self.hi[-1], self.lo[-1]) if self.hi else self.base), x)
        self.hi.append(hi)
        self.lo.append(lo)

    def drop_front(self, k: int) -> None:
        self.base = (self.hi[k - 1], self.lo[k - 1])
        del self.hi[:k], self.lo[:k]

    def between(self, lo: int, end: int) -> float:
        """The sum of amounts[lo:end]."""
        a_hi, a_lo = self.hi[end - 1], self.lo[end - 1]
        b_hi, b_lo = (self.hi[lo - 1], self.lo[lo - 1]) if lo else self.base
        s = a_hi - b_hi  # two-difference, then the low parts
        bb = s - a_hi
        err = (a_hi - (s - bb)) - (b_hi + bb)
        return s + (err + (a_lo - b_lo))


def _dd_add(hi: float, lo: float, x: float) -> tuple[float, float]:
    s = hi + x
    bp = s - hi
    err = (hi - (s - bp)) + (x - bp) + lo
    total = s + err
    return total, err - (total - s)


class CustomerWindows(Events):
    """One customer's recent events: time (ms), amount, id; sorted by time, arrival order for ties.

    Past ``HOT_EVENTS`` events (a busy corporate card) the amounts also keep running sums, so a
    window's mean costs O(log n) however busy the customer; below that a sum over the window is
    cheaper than the memory the running sums would take.
    """

    __slots__ = ("_sums", "amounts")
    HORIZON_MS = max(_WINDOWS_MS) + GRACE_MS

    def __init__(self) -> None:
        super().__init__()
        self.amounts = array("d")
        self._sums: _PrefixSums | None = None

    def update(self, eid: int, t_ms: int, amount: float, floor_ms: int | None = None) -> tuple[float, ...]:
        """Add an event (once) and return its 6 features: counts, then mean amounts, per window.

        An event seen before (a replay) changes nothing and gets its first features back; one
        with the same id but another time or amount raises DuplicateConflict. ``floor_ms``: the
        oldest event time that may still be replayed (the oldest uncommitted one of its input
        partition); nothing that event's windows reach is evicted, however far later events
        have moved on (see ``_evict_cutoff``).
        """
        times, amounts = self.times, self.amounts
        late = False
        self.last_new = False
        end = self.find(eid, t_ms) + 1
        if end:  # seen before: as of its first arrival
            if amounts[end - 1] != amount:
                raise DuplicateConflict(f"transaction seen before with amount {amounts[end - 1]!r}, now {amount!r}")
        else:
            cutoff = _evict_cutoff(times[-1] if times else t_ms, t_ms, floor_ms, self.HORIZON_MS)
            if times and times[0] <= cutoff:
                held = len(times)
                self._evict(cutoff, amounts)
                if self._sums is not None:
                    self._sums.drop_front(held - len(times))
                    if len(times) <= HOT_EVENTS // 2:
                        self._sums = None
            end = self._place(eid, t_ms, amount)
            late = t_ms <= cutoff  # too late to keep: its features from what is kept, then dropped
            self.last_new = not late
        counts, means = [], []
        sums = self._sums
        for window in _WINDOWS_MS:
            lo = bisect_right(times, t_ms - window, 0, end - 1)
            counts.append(float(end - lo))
            means.append((sums.between(lo, end) if sums is not None else math.fsum(amounts[lo:end])) / (end - lo))
        if late:
            self._remove(end - 1, amounts)
            if self._sums is not None:
                self._sums.rebuild(end - 1, amounts)
        return (*counts, *means)

    def apply(self, kind: int, eid: int, t_ms: int, value: float) -> None:
        """Replay one change a changelog delta holds (``EVENT`` only): the event is placed as ``update`` placed
        it, unless held already; nothing is evicted (the next update evicts with its own replay floor)."""
        if kind != EVENT:
            raise ValueError(f"a customer delta holds events only, not change kind {kind}")
        if self.locate(eid, t_ms) < 0:
            self._place(eid, t_ms, value)

    def _place(self, eid: int, t_ms: int, amount: float) -> int:
        """Insert a new event, its running sums too; the position after it."""
        end = self._insert(eid, t_ms, (self.amounts, amount))
        self._sum_inserted(end - 1)
        return end

    def _sum_inserted(self, at: int) -> None:
        sums = self._sums
        if sums is None:
            if len(self.amounts) > HOT_EVENTS:
                self._sums = _PrefixSums(self.amounts)
        elif at == len(self.amounts) - 1:
            sums.append(self.amounts[at])
        else:
            sums.rebuild(at, self.amounts)

    def to_bytes(self) -> bytes:
        return self._pack(0, len(self.times))

    def _pack(self, lo: int, hi: int) -> bytes:
        return struct.pack("<BI", _FORMAT, hi - lo) + self.times[lo:hi].tobytes() + self.amounts[lo:hi].tobytes() \
            + self.ids[lo:hi].tobytes()

    def head(self) -> bytes:
        """The changelog record under a big customer's own key: its state is in segment records."""
        return bytes([SEGMENTED, ord("C")])

    def segment_records(self, segment: int) -> list[bytes]:
        """The events of one segment, in records of at most CHUNK_EVENTS events (none: the segment is empty)."""
        lo, hi = self._span(segment)
        return [self._pack(at, min(at + CHUNK_EVENTS, hi)) for at in range(lo, hi, CHUNK_EVENTS)]

    @classmethod
    def merge(cls, head: bytes, parts: list[bytes]) -> CustomerWindows:
        """A big customer from its head and segment records (in segment order)."""
        if head != bytes([SEGMENTED, ord("C")]):
            raise ValueError(f"not a customer head record ({len(head)} bytes)")
        state = cls()
        for part in map(cls.from_bytes, parts):
            state.times.extend(part.times)
            state.amounts.extend(part.amounts)
            state.ids.extend(part.ids)
        check_order(state.times)
        state._derive()
        return state

    def _derive(self) -> None:
        """What a restored state computes from its arrays: the id index and running sums of a busy one."""
        self._reindex()
        self._sums = _PrefixSums(self.amounts) if len(self.times) > HOT_EVENTS else None

    @classmethod
    def from_bytes(cls, data: bytes) -> CustomerWindows:
        n = read_header(data, 5, 24, exact=True)
        state = cls()
        state.times.frombytes(data[5: 5 + 8 * n])
        state.amounts.frombytes(data[5 + 8 * n: 5 + 16 * n])
        state.ids.frombytes(data[5 + 16 * n: 5 + 24 * n])
        state._derive()
        return state


class TerminalWindows(Events):
    """One terminal's events (time, id; sorted by time) and the fraud labels known for it (id -> time).

    Events up to the label delay out of event-time order are placed exactly (the store keeps
    ``delay`` of grace beyond the look-back): an event later than that is one a transaction
    already scored should have counted, which the worker counts as a late event. The times of
    the labelled events held are kept sorted too, so a window's fraud share is two binary
    searches however busy the terminal.
    """

    __slots__ = ("_fraud_times", "delay_ms", "frauds")

    def __init__(self, delay_ms: int = DELAY_DAYS * DAY_MS) -> None:
        super().__init__()
        self.delay_ms = delay_ms
        self.frauds: dict[int, int] = {}
        self._fraud_times: array | None = None  # times of the held events that carry a fraud label, sorted

    @property
    def horizon_ms(self) -> int:
        return 2 * self.delay_ms + max(_WINDOWS_MS)

    def update(self, eid: int, t_ms: int, floor_ms: int | None = None) -> tuple[float, ...]:
        """Add an event (once) and return its 6 features: counts, then fraud shares, per window.
        ``floor_ms`` as for ``CustomerWindows.update``."""
        times = self.times
        self.last_new = False
        if self.find(eid, t_ms) < 0:
            cutoff = _evict_cutoff(times[-1] if times else t_ms, t_ms, floor_ms, self.horizon_ms)
            if times and times[0] <= cutoff:
                self._evict_to(cutoff)
            if t_ms > cutoff:
                self._place(eid, t_ms)
                self.last_new = True
        top = t_ms - self.delay_ms
        hi = bisect_right(times, top)
        fraud_times = self._fraud_times
        frauds_hi = bisect_right(fraud_times, top) if fraud_times else 0
        counts, risks = [], []
        for window in _WINDOWS_MS:
            lo = bisect_right(times, top - window, 0, hi)
            n = hi - lo
            counts.append(float(n))
            risks.append((frauds_hi - bisect_right(fraud_times, top - window, 0, frauds_hi)) / n
                         if frauds_hi and n else 0.0)
        return (*counts, *risks)

    def apply(self, kind: int, eid: int, t_ms: int, value: float) -> None:
        """Replay one change a changelog delta holds: an event (placed as ``update`` placed it, unless held
        already; nothing evicted) or a label (``value`` 1.0: fraud, 0.0: withdrawn)."""
        if kind == LABEL:
            self.label(eid, t_ms, bool(value))
        elif kind != EVENT:
            raise ValueError(f"unknown change kind {kind} in a terminal delta")
        elif self.locate(eid, t_ms) < 0:
            self._place(eid, t_ms)

    def _place(self, eid: int, t_ms: int) -> None:
        """Insert a new event, and its time among the labelled ones if its label came first."""
        self._insert(eid, t_ms)
        if eid in self.frauds:
            self._add_fraud_time(t_ms)

    def label(self, eid: int, t_ms: int, fraud: bool = True) -> None:
        """A label for the transaction ``eid`` (at ``t_ms``): fraud, or not (a label withdrawn)."""
        if fraud == (eid in self.frauds):
            return
        self._touch(t_ms if fraud else self.frauds[eid])
        at = self.locate(eid, t_ms if fraud else self.frauds[eid])
        if fraud:
            self.frauds[eid] = t_ms
            if at >= 0:
                self._add_fraud_time(self.times[at])
        else:
            del self.frauds[eid]
            if at >= 0 and self._fraud_times is not None:
                fraud_times = self._fraud_times
                del fraud_times[bisect_left(fraud_times, self.times[at])]

    def _add_fraud_time(self, t_ms: int) -> None:
        if self._fraud_times is None:
            self._fraud_times = array("q")
        insort(self._fraud_times, t_ms)

    def _evict_to(self, cutoff: int) -> None:
        self._evict(cutoff)
        fraud_times = self._fraud_times
        if fraud_times and fraud_times[0] <= cutoff:
            del fraud_times[:bisect_right(fraud_times, cutoff)]

    def expired(self, cutoff: int) -> bool:
        """Drop the labels of transactions at or before ``cutoff`` (no window reaches them any more), then say
        whether nothing of it is left after ``cutoff``."""
        if self.frauds:
            for t in {t for t in self.frauds.values() if t <= cutoff}:
                self._touch(t)
            self.frauds = {eid: t for eid, t in self.frauds.items() if t > cutoff}
        return not self.frauds and super().expired(cutoff)

    @property
    def size(self) -> int:
        return len(self.times) + len(self.frauds)

    def segments(self) -> set[int]:
        return super().segments() | {t // SEGMENT_MS for t in self.frauds.values()}

    def head(self) -> bytes:
        """The changelog record under a big terminal's own key: its state is in segment records."""
        return bytes([SEGMENTED, ord("T")]) + struct.pack("<q", self.delay_ms)

    def segment_records(self, segment: int) -> list[bytes]:
        """The events and labels of one segment, in records of at most CHUNK_EVENTS events (labels in the first)."""
        lo, hi = self._span(segment)
        start, end = segment * SEGMENT_MS, (segment + 1) * SEGMENT_MS
        labels = [(eid, t) for eid, t in self.frauds.items() if start <= t < end]
        return [self._pack(at, min(at + CHUNK_EVENTS, hi), labels if at == lo else [])
                for at in [*range(lo, hi, CHUNK_EVENTS)] or ([lo] if labels else [])]

    @classmethod
    def merge(cls, head: bytes, parts: list[bytes]) -> TerminalWindows:
        """A big terminal from its head and segment records (in segment order)."""
        if len(head) != 10 or head[:2] != bytes([SEGMENTED, ord("T")]):
            raise ValueError(f"not a terminal head record ({len(head)} bytes)")
        state = cls(struct.unpack_from("<q", head, 2)[0])
        for part in map(cls.from_bytes, parts):
            state.times.extend(part.times)
            state.ids.extend(part.ids)
            state.frauds.update(part.frauds)
        check_order(state.times)
        state._derive()
        return state

    def _derive(self) -> None:
        """What a restored state computes from its arrays: the id index, and the times of its labelled events."""
        self._reindex()
        held = [self.times[at] for at in itertools.starmap(self.locate, self.frauds.items()) if at >= 0]
        self._fraud_times = array("q", sorted(held)) if held else None

    def to_bytes(self) -> bytes:
        return self._pack(0, len(self.times), list(self.frauds.items()))

    def _pack(self, lo: int, hi: int, labels: list[tuple[int, int]]) -> bytes:
        flat = array("q", [x for item in labels for x in item])
        return struct.pack("<BIIq", _FORMAT, hi - lo, len(labels), self.delay_ms) + self.times[lo:hi].tobytes() \
            + self.ids[lo:hi].tobytes() + flat.tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> TerminalWindows:
        n = read_header(data, 17, 16, exact=False)
        (m, delay_ms) = struct.unpack_from("<Iq", data, 5)
        if len(data) != 17 + 16 * n + 16 * m or delay_ms <= 0:
            raise ValueError(f"not a feature state of format {_FORMAT} ({len(data)} bytes)")
        state = cls(delay_ms)
        body = 17
        state.times.frombytes(data[body: body + 8 * n])
        state.ids.frombytes(data[body + 8 * n: body + 16 * n])
        labels = array("q")
        labels.frombytes(data[body + 16 * n: body + 16 * n + 16 * m])
        state.frauds = dict(zip(labels[::2], labels[1::2], strict=True))
        state._derive()
        return state


def read_header(data: bytes, head: int, per_event: int, *, exact: bool) -> int:
    """The event count of a serialized state, checked against its length (``exact``: nothing follows the
    events; else a caller checks what does)."""
    if len(data) < head or data[0] != _FORMAT:
        raise ValueError(f"not a feature state of format {_FORMAT} ({len(data)} bytes)")
    n = struct.unpack_from("<I", data, 1)[0]
    if len(data) < head + per_event * n or (exact and len(data) != head + per_event * n):
        raise ValueError(f"not a feature state of format {_FORMAT} ({len(data)} bytes, {n} events)")
    return n


def check_order(times: array) -> None:
    if any(a > b for a, b in itertools.pairwise(times)):
        raise ValueError("segments out of time order")


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
