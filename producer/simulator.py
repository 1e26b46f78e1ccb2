"""Simulate card transactions with the Fraud Detection Handbook's design, vectorised.

Le Borgne et al., *Reproducible Machine Learning for Credit Card Fraud Detection —
Practical Handbook*, chapters "Transaction data simulator" and "Baseline feature
transformation". Customers and terminals sit on a 100 x 100 grid; a customer pays at
terminals within ``radius`` of itself. Frauds follow the handbook's three scenarios, later
ones overwriting earlier labels: (1) amount above 220; (2) every transaction at a
compromised terminal for 28 days; (3) a random third of a compromised customer's
transactions over 14 days, amount times 5. Compromise rates scale with the population so
the fraud rate stays near 0.8 %. The same config (seed included) gives the same frame.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.errors import ConfigError
from pipeline.streamfeatures import feature_table
from producer.simconfig import SimulatorConfig, start_day

__all__ = ["SimulatorConfig", "simulate"]

AMOUNT_FRAUD_THRESHOLD = 220.0
TERMINAL_COMPROMISE_DAYS = 28
CUSTOMER_COMPROMISE_DAYS = 14
CUSTOMER_FRAUD_SHARE_DIVISOR = 3  # a third of a compromised customer's transactions
CUSTOMER_FRAUD_AMOUNT_FACTOR = 5.0
TIME_OF_DAY_STD_SECONDS = 20_000
DAY_SECONDS = 86_400


def simulate(config: SimulatorConfig) -> pd.DataFrame:
    """Transactions with labels and the handbook's 15 features, sorted by time."""
    rng = np.random.default_rng(config.seed)
    tx = _transactions(config, rng)
    if tx["day"].size == 0:  # e.g. so few terminals that no customer has one within its radius
        raise ConfigError(f"{config.n_customers} customers and {config.n_terminals} terminals over "
                          f"{config.n_days} days make no transactions; simulate more of them")
    _add_frauds(tx, config, rng)
    order = np.argsort(tx["seconds"], kind="stable")
    tx = {name: column[order] for name, column in tx.items()}
    start = np.datetime64(start_day(config.start_date), "ns")  # numpy misreads 20180401 as a number
    frame = pd.DataFrame(
        {
            "TRANSACTION_ID": np.arange(len(order), dtype=np.int64),
            "TX_DATETIME": start + tx["seconds"].astype("timedelta64[s]").astype("m8[ns]"),
            "CUSTOMER_ID": tx["customer"],
            "TERMINAL_ID": tx["terminal"],
            "TX_AMOUNT": np.round(tx["amount"], 2),  # cents, as on the wire
            "TX_TIME_SECONDS": tx["seconds"],
            "TX_TIME_DAYS": tx["day"].astype(np.int32),
            "TX_FRAUD": tx["fraud"].astype(np.int32),
            "TX_FRAUD_SCENARIO": tx["scenario"].astype(np.int32),
        }
    )
    frame = feature_table(frame)  # the code the worker runs on a raw stream
    frame["TX_AMOUNT"] = frame["TX_AMOUNT"].astype(np.float32)
    return frame


def _transactions(config: SimulatorConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Unsorted, unlabelled transactions of every customer and day (handbook's tables)."""
    n_c = config.n_customers
    customer_xy = rng.uniform(0, 100, size=(n_c, 2))
    mean_amount = rng.uniform(5, 100, size=n_c)
    std_amount = mean_amount / 2
    mean_nb_tx = rng.uniform(0, 4, size=n_c)
    terminal_xy = rng.uniform(0, 100, size=(config.n_terminals, 2))
    offsets, n_available, flat = _available_terminals(customer_xy, terminal_xy, config.radius)

    nb_tx = rng.poisson(mean_nb_tx[:, None], size=(n_c, config.n_days))  # (customers, days)
    customer, day = np.divmod(np.repeat(np.arange(nb_tx.size), nb_tx.ravel()), config.n_days)
    time_of_day = rng.normal(DAY_SECONDS / 2, TIME_OF_DAY_STD_SECONDS, customer.size)
    time_of_day = time_of_day.astype(np.int64)  # truncation, as the handbook's int()
    amount = rng.normal(mean_amount[customer], std_amount[customer])
    negative = amount < 0
    amount[negative] = rng.uniform(0, 2 * mean_amount[customer[negative]])
    pick = (rng.random(customer.size) * n_available[customer]).astype(np.int64)
    has_terminal = n_available[customer] > 0
    terminal = flat[np.where(has_terminal, offsets[customer] + pick, 0)] if flat.size else pick

    keep = (time_of_day > 0) & (time_of_day < DAY_SECONDS) & has_terminal
    customer, day = customer[keep], day[keep]
    return {
        "customer": customer.astype(np.int64),
        "terminal": terminal[keep].astype(np.int64),
        "amount": np.round(amount[keep], 2),
        "day": day,
        "seconds": day * DAY_SECONDS + time_of_day[keep],
    }


def _available_terminals(
    customer_xy: np.ndarray, terminal_xy: np.ndarray, radius: float, chunk: int = 256
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Terminals strictly within ``radius`` of each customer, as CSR (offsets, counts, ids)."""
    counts = np.zeros(len(customer_xy), dtype=np.int64)
    ids = []
    for first in range(0, len(customer_xy), chunk):
        block = customer_xy[first : first + chunk]
        distance = np.sqrt(((block[:, None, :] - terminal_xy[None, :, :]) ** 2).sum(axis=2))
        rows, cols = np.nonzero(distance < radius)  # row-major: ids grouped by customer
        counts[first : first + len(block)] = np.bincount(rows, minlength=len(block))
        ids.append(cols)
    offsets = np.concatenate(([0], np.cumsum(counts)[:-1]))
    return offsets, counts, np.concatenate(ids).astype(np.int64)


def _add_frauds(tx: dict[str, np.ndarray], config: SimulatorConfig, rng: np.random.Generator):
    """Label the three scenarios in place, in the handbook's order (later ones overwrite)."""
    fraud = np.zeros(tx["amount"].size, dtype=np.int32)
    scenario = np.zeros_like(fraud)
    scenario[tx["amount"] > AMOUNT_FRAUD_THRESHOLD] = 1

    days, terminals = _daily_draws(rng, config.n_days, config.n_terminals, config.terminal_rate)
    active = np.zeros((config.n_terminals, config.n_days + 1), dtype=np.int64)
    np.add.at(active, (terminals, days), 1)
    np.add.at(active, (terminals, np.minimum(days + TERMINAL_COMPROMISE_DAYS, config.n_days)), -1)
    scenario[np.cumsum(active, axis=1)[tx["terminal"], tx["day"]] > 0] = 2

    days, customers = _daily_draws(rng, config.n_days, config.n_customers, config.customer_rate)
    times_chosen = _customer_fraud_picks(tx, days, customers, config.n_days, rng)
    tx["amount"] = tx["amount"] * CUSTOMER_FRAUD_AMOUNT_FACTOR**times_chosen
    scenario[times_chosen > 0] = 3
    fraud[scenario > 0] = 1
    tx["fraud"], tx["scenario"] = fraud, scenario


def _daily_draws(
    rng: np.random.Generator, n_days: int, population: int, rate: float
) -> tuple[np.ndarray, np.ndarray]:
    """(day, id) of compromise events: Poisson(rate) distinct ids each day."""
    per_day = np.minimum(rng.poisson(rate, n_days), population)
    ids = [rng.choice(population, size=k, replace=False) for k in per_day]
    return np.repeat(np.arange(n_days), per_day), np.concatenate([*ids, []]).astype(np.int64)


def _customer_fraud_picks(
    tx: dict[str, np.ndarray],
    days: np.ndarray,
    customers: np.ndarray,
    n_days: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """How many compromise events picked each transaction (a random third of each event's)."""
    order = np.lexsort((tx["day"], tx["customer"]))
    key = tx["customer"][order] * n_days + tx["day"][order]  # (rows,) ascending
    lo = np.searchsorted(key, customers * n_days + days, side="left")
    end_day = np.minimum(days + CUSTOMER_COMPROMISE_DAYS, n_days)
    hi = np.searchsorted(key, customers * n_days + end_day, side="left")
    size = hi - lo
    event = np.repeat(np.arange(size.size), size)  # (pairs,) event of each candidate row
    rank_in_event = np.arange(event.size) - np.repeat(np.cumsum(size) - size, size)
    shuffled = np.lexsort((rng.random(event.size), event))  # random order within each event
    position = np.empty_like(rank_in_event)
    position[shuffled] = rank_in_event  # random rank of each candidate within its event
    chosen = position < (size // CUSTOMER_FRAUD_SHARE_DIVISOR)[event]
    rows = order[lo[event[chosen]] + rank_in_event[chosen]]
    return np.bincount(rows, minlength=tx["day"].size)
