"""``feature_rows`` on one simulated bank, with uniform terminals and with one terminal carrying a share of the
traffic (a large online merchant): what a hot key costs the feature code, per event.

    .venv/bin/python bench/hot_key.py                      # this checkout
    git worktree add /tmp/old REV && .venv/bin/python bench/hot_key.py --root /tmp/old   # another revision
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent,
                   help="the checkout whose feature code is measured")
    p.add_argument("--share", type=float, default=0.12, help="share of the transactions on the hot terminal")
    p.add_argument("--customers", type=int, default=5000)
    p.add_argument("--terminals", type=int, default=10000)
    p.add_argument("--days", type=int, default=51)
    args = p.parse_args(argv)
    sys.path.insert(0, str(args.root))
    import numpy as np

    import pipeline.streamfeatures as sf
    from producer.simulator import SimulatorConfig, simulate

    frame = simulate(SimulatorConfig(n_customers=args.customers, n_terminals=args.terminals, n_days=args.days,
                                     seed=7))
    hot = frame.copy()
    hot.loc[np.random.default_rng(7).random(len(hot)) < args.share, "TERMINAL_ID"] = int(hot["TERMINAL_ID"].max()) + 1
    for name, table in (("uniform terminals", frame), (f"one terminal with {args.share:.0%}", hot)):
        times = table["TX_DATETIME"].to_numpy().astype("datetime64[ms]").astype(np.int64)
        columns = (table["CUSTOMER_ID"].tolist(), table["TERMINAL_ID"].tolist(), times.tolist(),
                   table["TX_AMOUNT"].astype(np.float64).tolist(), table["TX_FRAUD"].tolist())
        started = time.perf_counter()
        sf.feature_rows(*columns)
        seconds = time.perf_counter() - started
        print(f"{sf.__file__}: {name}: {len(table):,} events in {seconds:.1f} s, {len(table) / seconds:,.0f} events/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
