"""``fraud-produce``: simulate transactions or replay a file into Kafka."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd

from pipeline.config import KafkaSettings
from pipeline.errors import FraudPipelineError, InputDataError
from pipeline.features import read_table
from pipeline.topics import ensure_topics
from producer.send import make_producer, send_records
from producer.tables import ReplaySpec, iter_records, resolve_spec

log = logging.getLogger("producer")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    KafkaSettings.add_arguments(common)
    stream = common.add_argument_group("streaming")
    stream.add_argument("--rate", type=float, default=0.0,
                        help="target transactions per second (default 0: as fast as possible)")
    stream.add_argument("--limit", type=int, default=None, help="send at most this many rows")
    stream.add_argument("--drop-label", action="store_true",
                        help="leave the label columns (fraud flag, scenario) out of the stream")
    stream.add_argument("--restamp", action="store_true",
                        help="set event_time to the send time (live traffic, real latency); the table's "
                             "own time travels as source_event_time")
    stream.add_argument("--partitions", type=int, default=3,
                        help="partitions of the input topic when it has to be created")
    stream.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="show a progress bar (default: on a terminal)")

    parser = argparse.ArgumentParser(prog="fraud-produce", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", parents=[common], help="simulate transactions "
                         "(Fraud Detection Handbook design) and stream them, or write a file")
    sim.add_argument("--customers", type=int, default=5000)
    sim.add_argument("--terminals", type=int, default=10000)
    sim.add_argument("--days", type=int, default=183)
    sim.add_argument("--start-date", default="2018-04-01")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--from-day", type=int, default=0,
                     help="emit only days >= this (features still see the earlier days)")
    sim.add_argument("--until-day", type=int, default=None, help="emit only days < this")
    sim.add_argument("--output", type=Path, default=None,
                     help="write the table to this .parquet or .csv instead of streaming")

    rep = sub.add_parser("replay", parents=[common], help="stream a CSV or Parquet file")
    rep.add_argument("file", type=Path)
    rep.add_argument("--layout", default="auto",
                     help="auto (detect), handbook, creditcard or generic")
    rep.add_argument("--id-column", default=None, help="column holding the transaction id")
    rep.add_argument("--time-column", default=None, help="column holding the event time")
    rep.add_argument("--key-column", default=None, help="column used as message key")
    rep.add_argument("--label-column", default=None, help="label column (for --drop-label)")
    return parser


def simulate_table(args: argparse.Namespace) -> pd.DataFrame:
    """Run the simulator and keep the requested days."""
    from producer.simulator import SimulatorConfig, simulate

    config = SimulatorConfig(
        n_customers=args.customers, n_terminals=args.terminals, n_days=args.days,
        start_date=args.start_date, seed=args.seed,
    )
    frame = simulate(config)
    days = frame["TX_TIME_DAYS"]
    keep = days >= args.from_day
    if args.until_day is not None:
        keep &= days < args.until_day
    return frame.loc[keep].reset_index(drop=True)


def write_table(frame: pd.DataFrame, path: Path) -> None:
    """Write a table as Parquet or CSV, chosen by the file name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    elif path.suffix == ".csv" or "".join(path.suffixes).endswith(".csv.gz"):
        frame.to_csv(path, index=False)
    else:
        raise InputDataError(f"{path}: use a .parquet or .csv file name")


def stream_table(frame: pd.DataFrame, spec: ReplaySpec, settings: KafkaSettings,
                 args: argparse.Namespace) -> int:
    """Stream the rows of a table into the input topic; 0 when every record was acknowledged."""
    if args.limit is not None:
        frame = frame.iloc[: args.limit]
    ensure_topics(settings, [settings.input_topic], args.partitions)
    producer = make_producer(settings)
    try:
        report = send_records(
            iter_records(frame, spec, drop_label=args.drop_label,
                         restamp_rate=args.rate if args.restamp else None), settings.input_topic,
            producer, rate=args.rate, total=len(frame), progress=args.progress,
        )
    finally:
        producer.close()
    print(f"sent {report.sent} transactions to '{settings.input_topic}' at "
          f"{settings.bootstrap_servers}: {report.acked} acknowledged, {report.failed} failed, "
          f"{report.seconds:.1f}s ({report.rate:,.0f} tx/s)")
    if report.acked != report.sent:
        print(f"error: {report.sent - report.acked} records were not acknowledged: "
              f"{'; '.join(report.errors) or 'flush timed out'}", file=sys.stderr)
        return 1
    return 0


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.INFO if args.verbose else logging.ERROR)
    try:
        settings = KafkaSettings.build(args)
        if args.command == "simulate":
            frame = simulate_table(args)
            if args.output is not None:
                write_table(frame, args.output)
                print(f"wrote {len(frame)} transactions ({int(frame['TX_FRAUD'].sum())} frauds) "
                      f"to {args.output}")
                return 0
            return stream_table(frame, resolve_spec(frame, "handbook"), settings, args)
        frame = read_table(args.file)
        spec = resolve_spec(frame, args.layout, id_column=args.id_column,
                            time_column=args.time_column, key_column=args.key_column,
                            label_column=args.label_column)
        return stream_table(frame, spec, settings, args)
    except FraudPipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main() -> None:
    """Console-script entry point."""
    sys.exit(run())
