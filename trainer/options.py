"""Flag types, defaults and cross-flag checks of ``fraud-train``: standard library only.

Everything here runs before any table is read or any model built, so a bad value costs
the user a fraction of a second (torch, scikit-learn and pandas are imported later, by the
subcommands that need them).

>>> positive_int("3"), unit_rate("0.01"), fraction("0")
(3, 0.01, 0.0)
>>> unit_rate("2")
Traceback (most recent call last):
argparse.ArgumentTypeError: expected a number strictly between 0 and 1, got '2'
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import math
from collections.abc import Callable

from pipeline.errors import ConfigError

# Registry names of pipeline.models.MODELS (a test checks they agree), without importing torch.
MODEL_CHOICES = ("autoencoder", "denoising", "memae")
DEFAULT_MODEL = "autoencoder"
DEFAULT_ALERT_RATE = 0.005
SCORE_CHOICES = ("auto", "hybrid", "reconstruction")  # trainer.hybrid.SCORE_CHOICES, without scikit-learn
BANK_ROWS = 2048  # trainer.hybrid.BANK_ROWS
LABEL_SCORES = ("finetuned", "stacked")  # pipeline.classifier.KINDS: the scores fitted with labels
DEFAULT_LABEL_DELAY_DAYS = 7  # trainer.labels.DEFAULT_LABEL_DELAY_DAYS
DEFAULT_TEST_FRACTION = 0.2  # only for labelled tables: an unlabelled one has nothing to test on


def _number(kind: Callable[[str], float], value: str, what: str, ok: Callable[[float], bool]) -> float:
    try:
        number = kind(value)
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and ok(number)):
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
    return number


def positive_int(value: str) -> int:
    """An integer >= 1."""
    return int(_number(int, value, "an integer >= 1", lambda v: v >= 1))


def non_negative_int(value: str) -> int:
    """An integer >= 0."""
    return int(_number(int, value, "an integer >= 0", lambda v: v >= 0))


def positive_float(value: str) -> float:
    """A finite number > 0."""
    return _number(float, value, "a number > 0", lambda v: v > 0)


def unit_rate(value: str) -> float:
    """A number strictly between 0 and 1 (an alert rate)."""
    return _number(float, value, "a number strictly between 0 and 1", lambda v: 0 < v < 1)


def fraction(value: str) -> float:
    """A share of rows in [0, 1)."""
    return _number(float, value, "a fraction in [0, 1)", lambda v: 0 <= v < 1)


def names(value: str) -> tuple[str, ...]:
    """A comma-separated list of column names."""
    listed = tuple(v.strip() for v in value.split(",") if v.strip())
    if not listed:
        raise argparse.ArgumentTypeError("expected a comma-separated list of column names")
    return listed


def widths(value: str) -> tuple[int, ...]:
    """Comma-separated layer widths, each >= 1."""
    try:
        listed = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        listed = ()
    if not listed or min(listed) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {value!r}")
    return listed


def log_features(value: str) -> str | tuple[str, ...]:
    """``layout`` (the layout's heavy-tailed columns) or a list of column names."""
    return value if value == "layout" else names(value)


def date(value: str) -> str:
    """A date (YYYY-MM-DD, optionally with a time), kept as text for the splitter."""
    try:
        dt.datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date such as 2018-05-01, got {value!r}") from None
    return value


def check_dates(start: str | None, val_start: str | None, test_start: str | None, end: str | None) -> None:
    """Refuse date flags that cannot describe a split, before anything is read."""
    if (val_start is None) != (test_start is None):
        raise ConfigError("give both --val-start and --test-start, or neither (fractions are used then)")
    given = [(flag, dt.datetime.fromisoformat(v)) for flag, v in
             (("--start", start), ("--val-start", val_start), ("--test-start", test_start), ("--end", end)) if v]
    for (flag_a, a), (flag_b, b) in itertools.pairwise(given):
        if a > b or (flag_b == "--end" and a == b):
            raise ConfigError(f"{flag_a} {a.date()} must come before {flag_b} {b.date()}")


def check_fractions(val_fraction: float, test_fraction: float | None) -> None:
    """Validation and test shares must leave rows to train on."""
    if val_fraction <= 0:
        raise ConfigError("--val-fraction must be > 0: early stopping and the threshold need validation rows")
    if val_fraction + (test_fraction or 0.0) >= 1:
        raise ConfigError(f"--val-fraction {val_fraction} and --test-fraction {test_fraction} must sum below 1")


def when(text: str) -> dt.datetime:
    """A date (or date and time) of the command line, in UTC when it names no offset."""
    moment = dt.datetime.fromisoformat(text)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)


def split_days(since: str, until: str, test_days: int) -> tuple[str, str]:
    """Validation and test starts: the test is the newest ``test_days``; validation the last fifth of the days
    before it (at least one). ConfigError when the range leaves no day to train on."""
    start, end = when(since), when(until)
    if start >= end:
        raise ConfigError(f"--since {since} must be before --until {until}")
    days = (end - start) / dt.timedelta(days=1)
    if days < test_days + 2:
        raise ConfigError(f"--since {since} to --until {until} is {days:g} days: it needs the {test_days} test "
                          "days (--test-days) and at least 2 before them (training and validation)")
    test = end - dt.timedelta(days=test_days)
    val = test - dt.timedelta(days=max(1, int(days - test_days) // 5))
    return val.isoformat(), test.isoformat()
