"""argparse pieces for ``fraud-produce``: errors on one line, value types that say what is wrong, ``--version``.

The one-line parser and ``--version`` are shared with the other commands (``pipeline.cliargs``).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from pipeline.errors import ConfigError
from producer.simconfig import start_day


def number(kind: type, low: float, what: str, *, high: float = math.inf, hint: str = "") -> Callable[[str], float]:
    """An argparse ``type=``: ``kind`` from text, finite and within ``[low, high]``, else a clear error."""

    def convert(text: str) -> float:
        try:
            value = kind(text)
        except (ValueError, OverflowError):
            value = None
        if value is None or not math.isfinite(value) or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{what}{hint}, got {text!r}")
        return value

    return convert


def iso_day(text: str) -> str:
    """An argparse ``type=`` for ``--start-date``: the date as YYYY-MM-DD, in the range the simulator handles."""
    try:
        return start_day(text).isoformat()
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err).replace("start_date ", "")) from err

