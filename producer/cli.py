"""``fraud-produce``: simulate transactions or replay a file into Kafka.

Flags are parsed and checked before any I/O (:mod:`producer.options`); a misuse is answered
with one line on stderr and exit code 2. pandas, pyarrow, the simulator and the Kafka client
are imported only once the command line is accepted (:mod:`producer.jobs`).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from pathlib import Path

from pipeline.cliargs import OneLineParser, VersionAction, print_error
from pipeline.config import KafkaSettings
from pipeline.errors import FraudPipelineError
from producer.argparsing import iso_day, number
from producer.options import INT32_MAX, LAYOUT_NAMES, MAX_LABEL_DELAY_DAYS, MIN_RATE, Options, check

PROG = "fraud-produce"
EPILOG = "A misuse (bad flag, missing file, unknown column) stops with one line on stderr and exit code 2."


def build_parser() -> argparse.ArgumentParser:
    """The ``fraud-produce`` command line; building it imports nothing heavy."""
    common = OneLineParser(add_help=False)
    KafkaSettings.add_arguments(common)
    stream = common.add_argument_group("streaming")
    stream.add_argument("--rate", type=number(float, MIN_RATE, f"must be transactions per second, at least {MIN_RATE}",
                                              hint=" (leave --rate out to send as fast as possible)"),
                        help="target transactions per second, > 0 (default: as fast as possible)")
    stream.add_argument("--limit", type=number(int, 1, "must be a whole number of rows, at least 1"),
                        help="send at most this many rows (default: all)")
    stream.add_argument("--drop-label", action="store_true", default=None,
                        help="leave the label columns (fraud flag, scenario) out of the stream")
    stream.add_argument("--restamp", action="store_true", default=None,
                        help="set event_time to the send time (live traffic, real latency); the table's "
                             "own time travels as source_event_time")
    stream.add_argument("--raw", action="store_true", default=None,
                        help="send raw transactions (transaction_id, event_time, CUSTOMER_ID, TERMINAL_ID, "
                             "TX_AMOUNT) keyed by customer, for a model trained with fraud-train fit --input raw; "
                             "and each fraud's label to the labels topic (FRAUD_LABELS_TOPIC), keyed by terminal, "
                             "--label-delay-days after it")
    stream.add_argument("--label-delay-days", type=number(float, 0, "must be a number of days, at least 0",
                                                          high=MAX_LABEL_DELAY_DAYS),
                        help="with --raw: simulated days between a fraud and its label (default: 7, the handbook's)")
    stream.add_argument("--partitions", type=number(int, 1, f"must be a whole number from 1 to {INT32_MAX}",
                                                    high=INT32_MAX),
                        help="partitions of the input topic when it has to be created (default: 3)")
    stream.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="show a progress bar (default: on a terminal)")

    parser = OneLineParser(prog=PROG, description=__doc__.split("\n")[0], epilog=EPILOG)
    parser.add_argument("--version", action=VersionAction)
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{simulate,replay}")
    add_simulate(sub.add_parser("simulate", parents=[common], epilog=EPILOG, help="simulate transactions "
                                "(Fraud Detection Handbook design) and stream them, or write a file"))
    add_replay(sub.add_parser("replay", parents=[common], epilog=EPILOG, help="stream a CSV or Parquet file"))
    return parser


def add_simulate(sim: argparse.ArgumentParser) -> None:
    """The simulator's population, period and the days to emit."""
    whole = "must be a whole number, at least"
    sim.add_argument("--customers", type=number(int, 1, f"{whole} 1"), default=5000,
                     help="customers (default: %(default)s)")
    sim.add_argument("--terminals", type=number(int, 1, f"{whole} 1"), default=10000,
                     help="terminals (default: %(default)s)")
    sim.add_argument("--days", type=number(int, 1, f"{whole} 1"), default=183,
                     help="days to simulate, from --start-date (default: %(default)s)")
    sim.add_argument("--start-date", type=iso_day, default="2018-04-01",
                     help="first day, YYYY-MM-DD (default: %(default)s)")
    sim.add_argument("--seed", type=number(int, 0, f"{whole} 0"), default=0,
                     help="random seed; the same flags give the same transactions (default: %(default)s)")
    sim.add_argument("--from-day", type=number(int, 0, f"{whole} 0"), default=0,
                     help="emit only days >= this (features still see the earlier days)")
    sim.add_argument("--until-day", type=number(int, 1, f"{whole} 1"), default=None,
                     help="emit only days < this (default: --days)")
    sim.add_argument("--output", type=Path, default=None,
                     help="write the table to this .parquet, .csv or .csv.gz instead of streaming")


def add_replay(rep: argparse.ArgumentParser) -> None:
    """The file and how to read its columns."""
    rep.add_argument("file", type=Path, help="a .csv, .csv.gz, .tsv or .parquet table")
    rep.add_argument("--layout", default="auto", choices=LAYOUT_NAMES,
                     help="auto (detect), handbook, creditcard or generic (default: auto)")
    rep.add_argument("--id-column", default=None, help="column holding the transaction id")
    rep.add_argument("--time-column", default=None, help="column holding the event time")
    rep.add_argument("--key-column", default=None, help="column used as message key")
    rep.add_argument("--label-column", default=None, help="label column (for --drop-label)")


def parse(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> Options:
    """Parse and check a command line without I/O; ``SystemExit`` for --help, --version and bad syntax."""
    return check(build_parser().parse_args(argv), environ)


def run(argv: list[str] | None = None) -> int:
    """``fraud-produce``; returns the exit code."""
    # before the settings are built: a misspelled FRAUD_* variable is one WARNING line, as in the other commands
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        options = parse(argv)
    except SystemExit as done:  # --help, --version, or a syntax error already printed on one line
        return 0 if done.code is None else done.code if isinstance(done.code, int) else 2
    except FraudPipelineError as err:
        print_error(PROG, str(err))
        return 2
    logging.getLogger().setLevel(logging.INFO if options.verbose else logging.WARNING)
    logging.getLogger("kafka").setLevel(logging.INFO if options.verbose else logging.ERROR)
    try:
        from producer.jobs import execute  # pandas, pyarrow, the simulator, kafka-python: only now

        return execute(options)
    except FraudPipelineError as err:
        print_error(PROG, str(err))
        return 2
    except KeyboardInterrupt as stop:
        sent = getattr(stop, "report", None)  # producer.send.Interrupted: what went out before Ctrl-C
        print_error(PROG, "interrupted" if sent is None else
                    f"interrupted: {sent.acked} records acknowledged of {sent.sent} sent ({sent.failed} failed)")
        return 130


def main() -> None:
    """Console-script entry point."""
    raise SystemExit(run())
