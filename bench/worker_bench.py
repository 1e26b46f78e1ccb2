"""Throughput, latency, scoring speed and memory of the streaming worker, in one run.

    python bench/worker_bench.py --json runs/bench/worker.json

Simulates a bank, trains a small model on a history window, fills one 3-partition topic
with every later transaction (labels dropped) through the project's producer, and then
measures against that same topic:

1. the ceiling: a bare kafka-python consumer that only fetches and decodes each value;
2. the worker as a subprocess (``python -m pipeline``), fresh consumer group, from
   process start (and from partition assignment) to the last commit;
3. a naive one-message-at-a-time consumer, as tutorials write it, on a prefix;
4. end-to-end latency at fixed input rates (event time = send time);
5. ``Scorer.score`` alone on prebuilt float32 matrices;
6. the worker's peak RSS;
7. ``fraud-worker --processes N`` for each N of ``--processes``, fresh group, from the first
   partition assignment to the last commit.

The worker's time to ready (process start to settings parsed, model served, partitions
assigned) comes with each worker run. Each measurement is a module of ``bench.worker``.

Prints a markdown table and writes every number to ``--json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, required=True, help="write all results here")
    p.add_argument("--customers", type=int, default=20000)
    p.add_argument("--terminals", type=int, default=40000)
    p.add_argument("--warmup-days", type=int, default=30, help="feature warm-up, neither trained on nor streamed")
    p.add_argument("--train-days", type=int, default=7, help="training window after the warm-up")
    p.add_argument("--stream-days", type=int, default=14, help="days after the training window, streamed")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--score", default="reconstruction", choices=("reconstruction", "hybrid", "auto"),
                   help="the model's score (fit --score); reconstruction keeps the figures comparable with "
                        "earlier runs, hybrid adds a kNN distance that costs CPU per record")
    p.add_argument("--naive-records", type=int, default=20000, help="prefix the naive consumer reads")
    p.add_argument("--rates", default="1000,10000", help="input rates (tx/s) for the latency runs")
    p.add_argument("--latency-seconds", type=float, default=20.0, help="feeding time per latency run")
    p.add_argument("--max-wait-ms", type=int, default=None,
                   help="the worker's --max-wait-ms in the latency runs (default: the worker's own, 50)")
    p.add_argument("--second-batch", type=int, default=16384, help="max_batch of the second worker row; 0 skips")
    p.add_argument("--modes", default="at-least-once,exactly-once",
                   help="processing guarantees to measure the worker and its latency in")
    p.add_argument("--in-flight", default="1",
                   help="extra at-least-once worker and latency rows with these --max-in-flight values "
                        "(1: wait for each batch's acknowledgements), comma-separated; empty skips")
    p.add_argument("--clients", default="kafka-python,confluent",
                   help="worker Kafka clients (--kafka-client); each besides kafka-python adds an at-least-once "
                        "worker row and latency rows (confluent runs at-least-once only)")
    p.add_argument("--devices", default="cpu",
                   help="scoring devices of the worker rows (fraud-worker --device), comma-separated: each worker "
                        "row runs once per device, e.g. cpu,cuda; the other measurements stay on cpu")
    p.add_argument("--processes", default="1,2",
                   help="worker process counts to compare (fraud-worker --processes N), comma-separated; "
                        "empty skips")
    p.add_argument("--profile-records", type=int, default=100_000,
                   help="cProfile an in-process worker over this many records; 0 skips")
    p.add_argument("--bootstrap-servers", default=None, help="use this broker instead of starting one")
    p.add_argument("--kafka-home", type=Path, default=Path(tempfile.gettempdir()) / "worker-bench-kafka")
    p.add_argument("--max-load", type=float, default=1.5, help="wait while the 1-min load average is above")
    p.add_argument("--max-load-wait", type=float, default=300.0,
                   help="longest wait for a quiet machine before each measurement (s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from bench.worker.harness import run  # NumPy, pandas, kafka-python: only once the flags are good

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
