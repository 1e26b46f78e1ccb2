"""What a raw transaction must carry before it may touch state: keys, an amount and a plausible time.

Every check returns a :class:`~pipeline.schema.RecordError` (the record is dead-lettered with
that reason) rather than raising. A value that passed them can neither poison a window (an
amount of 3e38 would make every later mean of that customer out of range) nor move eviction
(a single record dated 2100 would otherwise empty the windows of its customer and terminal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.schema import RecordError, format_event_time
from pipeline.streamfeatures import DAY_MS, CustomerWindows

CUSTOMER, TERMINAL, AMOUNT, LABEL = "CUSTOMER_ID", "TERMINAL_ID", "TX_AMOUNT", "TX_FRAUD"
RAW_FIELDS = (CUSTOMER, TERMINAL, AMOUNT)
MAX_KEY_CHARS = 256
FUTURE_MS = DAY_MS  # an event time this far past the wall clock cannot be a real transaction's


def fraud_label(value: Any) -> bool | None:
    """A label record's ``TX_FRAUD`` as the terminal stage takes it: 0 or 1 (``false``/``true`` too); None for
    anything else (such a label is dead-lettered)."""
    if value not in (0, 1) or isinstance(value, float):
        return None
    return bool(value)


def entity_key(fields: dict[str, Any], name: str) -> str | RecordError:
    """A customer or terminal id as a key: an integer or a non-empty string of at most 256 characters."""
    value = fields.get(name)
    if value is None:
        return RecordError("missing_field", name, "raw transactions need it (the model computes features from it)")
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and 0 < len(value) <= MAX_KEY_CHARS and "\x00" not in value:
        return value
    if isinstance(value, str) and "\x00" in value:
        return RecordError("bad_type", name, "must not contain NUL characters")
    if isinstance(value, str):
        return RecordError("bad_type", name, f"must be 1 to {MAX_KEY_CHARS} characters, got {len(value)}")
    return RecordError("bad_type", name, f"must be an integer or a string, got {type(value).__name__}")


@dataclass(frozen=True)
class Bounds:
    """What the customer stage accepts: amounts in ``[min_amount, max_amount]``; event times no more than
    ``max_ahead_ms`` ahead of the input partition's stream time (0: no such limit), nor past the wall
    clock by a day, nor behind the stream time by more than a customer window holds. A time within a day
    of the wall clock is always accepted (a live stream back after a long outage is not refused)."""

    min_amount: float = 0.0
    max_amount: float = 1e9
    max_ahead_ms: int = 7 * DAY_MS

    def amount(self, fields: dict[str, Any]) -> float | RecordError:
        value = fields.get(AMOUNT)
        if value is None:
            return RecordError("missing_field", AMOUNT, "raw transactions need it")
        if isinstance(value, bool) or not isinstance(value, int | float):
            return RecordError("bad_type", AMOUNT, f"must be a number, got {type(value).__name__}")
        if not self.min_amount <= value <= self.max_amount:  # NaN fails this too
            return RecordError("out_of_range", AMOUNT, f"{value!r} is outside [{self.min_amount:g}, "
                               f"{self.max_amount:g}] (FRAUD_MIN_AMOUNT, FRAUD_MAX_AMOUNT)")
        return float(value)

    def event_time(self, t_ms: int, stream_ms: int | None, now_ms: int) -> RecordError | None:
        """``stream_ms``: the newest event time accepted on this record's input partition (None: none yet)."""
        if t_ms > now_ms + FUTURE_MS:
            return RecordError("bad_time", "event_time", f"{format_event_time(t_ms)} is more than a day past "
                               f"the clock ({format_event_time(now_ms)})")
        if stream_ms is None or abs(t_ms - now_ms) <= FUTURE_MS:  # no reference yet, or a live stream's present
            return None
        if self.max_ahead_ms and t_ms > stream_ms + self.max_ahead_ms:
            return RecordError("bad_time", "event_time", f"{format_event_time(t_ms)} is {_days(t_ms - stream_ms)} "
                               f"days ahead of its partition's stream time {format_event_time(stream_ms)} (limit "
                               f"{_days(self.max_ahead_ms)}: FRAUD_MAX_EVENT_AHEAD_DAYS)")
        if t_ms <= stream_ms - CustomerWindows.HORIZON_MS:
            return RecordError("bad_time", "event_time", f"{format_event_time(t_ms)} is "
                               f"{_days(stream_ms - t_ms)} days behind its partition's stream time "
                               f"{format_event_time(stream_ms)}: older than any window holds")
        return None


def _days(ms: int) -> str:
    return f"{ms / DAY_MS:.1f}"
