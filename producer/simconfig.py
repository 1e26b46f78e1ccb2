"""The simulator's settings, apart from the simulator so that checking them imports neither numpy nor pandas.

``fraud-produce`` builds a :class:`SimulatorConfig` while it checks its flags, before any I/O;
only a valid one reaches :func:`producer.simulator.simulate`.
"""

from __future__ import annotations

import datetime as dt
import math
import numbers
from dataclasses import dataclass

from pipeline.errors import ConfigError

FIRST_START, LAST_START = dt.date(1970, 1, 1), dt.date(2200, 12, 31)  # nanosecond timestamps end in 2262


@dataclass(frozen=True)
class SimulatorConfig:
    """Population, period and seed of one simulation; refused at construction when invalid.

    ``terminals_compromised_per_day`` and ``customers_compromised_per_day`` are Poisson
    means; None scales the handbook's 2 per 10,000 terminals and 3 per 5,000 customers.
    """

    n_customers: int = 5000
    n_terminals: int = 10000
    n_days: int = 183
    start_date: str = "2018-04-01"
    radius: float = 5.0
    seed: int = 0
    terminals_compromised_per_day: float | None = None
    customers_compromised_per_day: float | None = None

    def __post_init__(self) -> None:
        for name in ("n_customers", "n_terminals", "n_days"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not _is_number(self.radius) or not 0 < self.radius < math.inf:
            raise ConfigError(f"radius must be a positive finite number, got {self.radius!r}")
        for name in ("terminals_compromised_per_day", "customers_compromised_per_day"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or not 0 <= value < math.inf):
                raise ConfigError(f"{name} must be None or a finite number >= 0, got {value!r}")
        start_day(self.start_date)

    @property
    def terminal_rate(self) -> float:
        """Expected number of terminals compromised per day."""
        rate = self.terminals_compromised_per_day
        return 2.0 * self.n_terminals / 10_000 if rate is None else float(rate)

    @property
    def customer_rate(self) -> float:
        """Expected number of customers compromised per day."""
        rate = self.customers_compromised_per_day
        return 3.0 * self.n_customers / 5_000 if rate is None else float(rate)


def start_day(text: str) -> dt.date:
    """The first simulated day from ``YYYY-MM-DD``, within the years timestamps handle (1970 to 2200).

    >>> start_day("2018-04-01")
    datetime.date(2018, 4, 1)
    """
    try:
        day = dt.date.fromisoformat(text)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"start_date must be a date written YYYY-MM-DD, got {text!r}") from err
    if not FIRST_START <= day <= LAST_START:
        raise ConfigError(f"start_date must be between {FIRST_START} and {LAST_START}, got {text!r}")
    return day


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
