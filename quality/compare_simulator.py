"""Compare the simulator with the handbook's published data; print markdown tables.

    python quality/compare_simulator.py [--seed 0] [--days 122]

Simulates April–July 2018 (122 days) at the handbook's size and, when
``../shared/data/fdh-transactions-2018-04-to-07.parquet`` is present, sets it beside the
reference; without it only the simulated column is shown.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.features import HANDBOOK_FEATURES
from producer.simconfig import SimulatorConfig

if TYPE_CHECKING:  # pandas and the simulator load once the flags are parsed: `--help` answers at once
    import pandas as pd

REFERENCE = (
    Path(__file__).resolve().parent.parent.parent
    / "shared"
    / "data"
    / "fdh-transactions-2018-04-to-07.parquet"
)
QUANTILES = (0.01, 0.25, 0.5, 0.75, 0.99)


def summary(df: pd.DataFrame) -> dict[str, float]:
    """Headline statistics of one transactions table, by row name."""
    per_day = df.groupby("TX_TIME_DAYS").size()
    rows: dict[str, float] = {
        "transactions": len(df),
        "customers with transactions": df["CUSTOMER_ID"].nunique(),
        "terminals with transactions": df["TERMINAL_ID"].nunique(),
        "transactions per day, mean": per_day.mean(),
        "transactions per day, std": per_day.std(),
        "fraud rate overall (%)": 100 * df["TX_FRAUD"].mean(),
    }
    for scenario in (1, 2, 3):
        share = (df["TX_FRAUD_SCENARIO"] == scenario).mean()
        rows[f"fraud rate scenario {scenario} (%)"] = 100 * share
    amount = df["TX_AMOUNT"].astype("float64")
    rows["amount mean"], rows["amount std"] = amount.mean(), amount.std()
    for q in QUANTILES:
        rows[f"amount q{q:g}"] = amount.quantile(q)
    for name in HANDBOOK_FEATURES[1:]:
        values = df[name].astype("float64")
        for stat in ("mean", "std", "min", "max"):
            rows[f"{name} {stat}"] = getattr(values, stat)()
    return rows


def table(columns: dict[str, dict[str, float]]) -> str:
    """A markdown table with one row per statistic and one column per dataset."""
    names = list(columns)
    lines = ["| statistic | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for stat in next(iter(columns.values())):
        cells = [_number(columns[name][stat]) for name in names]
        lines.append(f"| {stat} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _number(value: float) -> str:
    return f"{value:,.0f}" if value == int(value) else f"{value:,.4g}"


def run(argv: list[str] | None = None) -> int:
    """Simulate, summarise, compare; print markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--days", type=int, default=122, help="122 = April to July 2018")
    args = parser.parse_args(argv)
    import pandas as pd

    from producer.simulator import simulate

    config = SimulatorConfig(n_days=args.days, seed=args.seed)
    started = time.perf_counter()
    simulated = simulate(config)
    elapsed = time.perf_counter() - started
    columns = {f"simulated (seed {args.seed})": summary(simulated)}
    if REFERENCE.exists():
        columns["handbook reference"] = summary(pd.read_parquet(REFERENCE))
    print(f"Simulated {len(simulated):,} transactions ({config.n_customers} customers, "
          f"{config.n_terminals} terminals, {config.n_days} days) in {elapsed:.1f} s "
          f"on {os.cpu_count()} CPUs.\n")
    print(table(columns))
    return 0


if __name__ == "__main__":
    sys.exit(run())
