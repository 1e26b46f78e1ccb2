"""What ``fraud-produce`` is asked to do, checked before any I/O.

Everything here is pure: it checks parsed flags, touches no broker, reads no file (it only
asks whether a named file exists) and imports neither pandas, pyarrow nor the simulator, so
every misuse is answered at once, with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import KafkaSettings, env_name
from pipeline.errors import ConfigError
from producer.simconfig import SimulatorConfig

LAYOUT_NAMES = ("auto", "handbook", "creditcard", "generic")
INT32_MAX = 2**31 - 1  # Kafka's partition count and request timeout are int32 on the wire
MIN_RATE = 0.001  # one transaction per 1,000 s: a floor that keeps the pacer's sleeps finite
TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")
STREAM_ONLY = ("rate", "limit", "partitions", "drop_label", "restamp", "raw", "label_delay_days")
MAX_LABEL_DELAY_DAYS = 365


class UsageError(ConfigError):
    """The command line asks for something that cannot be done; the message says what to change."""


@dataclass(frozen=True)
class StreamOptions:
    """How to send: pace, how many, topic partitions, label and time handling, progress bar."""

    rate: float | None = None  # transactions per second; None: as fast as possible
    limit: int | None = None
    partitions: int = 3
    drop_label: bool = False
    restamp: bool = False
    progress: bool | None = None
    raw: bool = False  # raw transactions keyed by customer, and fraud labels to the labels topic
    label_delay_days: float = 7.0  # how long after a transaction its fraud label is sent (simulated time)


@dataclass(frozen=True)
class SimulateJob:
    """Simulate ``config`` and keep days ``[from_day, until_day)``; write ``output`` or stream."""

    config: SimulatorConfig
    from_day: int
    until_day: int
    output: Path | None = None


@dataclass(frozen=True)
class ReplayJob:
    """Stream the table in ``file``, reading its columns as ``layout`` and the column flags say."""

    file: Path
    layout: str = "auto"
    id_column: str | None = None
    time_column: str | None = None
    key_column: str | None = None
    label_column: str | None = None


@dataclass(frozen=True)
class Options:
    """A whole, checked ``fraud-produce`` command line."""

    settings: KafkaSettings
    stream: StreamOptions
    job: SimulateJob | ReplayJob
    verbose: bool = False


def check(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Options:
    """Turn parsed flags into :class:`Options`, or raise :class:`ConfigError` saying what to fix."""
    settings = KafkaSettings.build(args, environ=environ)
    check_topic(settings.input_topic)
    if settings.request_timeout_ms > INT32_MAX:
        raise UsageError(f"request_timeout_ms={settings.request_timeout_ms} is more than Kafka's limit "
                         f"{INT32_MAX}; set --request-timeout-ms or {env_name('request_timeout_ms')} lower")
    if args.command == "simulate":
        job: SimulateJob | ReplayJob = check_simulate(args)
    else:
        job = check_replay(args)
    if args.label_delay_days is not None and not args.raw:
        raise UsageError("--label-delay-days applies only with --raw (labels are sent only beside raw transactions)")
    if args.raw and args.restamp:
        raise UsageError("--raw and --restamp do not go together: the worker's windows use the table's event "
                         "times, which --restamp would replace; leave --restamp out")
    if args.raw:
        check_topic(settings.labels_topic)
    stream = StreamOptions(rate=args.rate, limit=args.limit, partitions=args.partitions or 3,
                           drop_label=bool(args.drop_label), restamp=bool(args.restamp), progress=args.progress,
                           raw=bool(args.raw), label_delay_days=7.0 if args.label_delay_days is None
                           else args.label_delay_days)
    return Options(settings=settings, stream=stream, job=job, verbose=args.verbose)


def check_topic(name: str) -> None:
    """Refuse a topic name Kafka would refuse: 1 to 249 of ASCII letters, digits, '.', '_' and '-'.

    >>> check_topic("transactions.v1")
    """
    if not TOPIC_NAME.fullmatch(name) or name in {".", ".."}:
        raise UsageError(f"input topic {name!r}: Kafka topic names are 1 to 249 of ASCII letters, digits, "
                         f"'.', '_' and '-'; set --input-topic or {env_name('input_topic')}")


def check_simulate(args: argparse.Namespace) -> SimulateJob:
    """The simulation, the days to keep and where they go; contradictions refused."""
    config = SimulatorConfig(n_customers=args.customers, n_terminals=args.terminals, n_days=args.days,
                             start_date=args.start_date, seed=args.seed)
    until = args.days if args.until_day is None else args.until_day
    if args.from_day >= args.days:
        raise UsageError(f"--from-day {args.from_day} is past the last simulated day "
                         f"(--days {args.days} simulates days 0 to {args.days - 1})")
    if until > args.days:
        raise UsageError(f"--until-day {until} is past the simulation: --days {args.days} "
                         f"simulates days 0 to {args.days - 1}; use --until-day {args.days} or less")
    if until <= args.from_day:
        raise UsageError(f"--from-day {args.from_day} --until-day {until} selects no day: "
                         "--until-day must be greater than --from-day")
    if args.output is not None:
        check_output(args.output)
        given = [name for name in STREAM_ONLY if getattr(args, name) not in (None, False)]
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            verb, pronoun = ("applies", "it") if len(given) == 1 else ("apply", "them")
            raise UsageError(f"{flags} {verb} only when streaming; leave {pronoun} out with --output")
    return SimulateJob(config=config, from_day=args.from_day, until_day=until, output=args.output)


def check_output(path: Path) -> None:
    """A table name ``fraud-produce simulate --output`` can write: .parquet, .csv or .csv.gz."""
    name = path.name.lower()
    if not name.endswith((".parquet", ".csv", ".csv.gz")):
        raise UsageError(f"--output {path}: use a .parquet, .csv or .csv.gz file name")
    if path.is_dir():
        raise UsageError(f"--output {path} is a directory; name a file in it")


def table_format(path: Path) -> str | None:
    """``parquet`` or ``csv`` from the file name (as ``pipeline.features.read_table`` reads them), else None.

    >>> table_format(Path("x.csv.gz")), table_format(Path("x.pq")), table_format(Path("x.json"))
    ('csv', 'parquet', None)
    """
    suffixes = "".join(path.suffixes).lower()
    if suffixes.endswith((".parquet", ".pq")):
        return "parquet"
    if ".csv" in suffixes or ".tsv" in suffixes:
        return "csv"
    return None


def check_replay(args: argparse.Namespace) -> ReplayJob:
    """The file exists and has a known format; column flags name a column. Nothing is read."""
    path: Path = args.file
    try:
        kind = "file" if path.is_file() else "directory" if path.is_dir() else None
    except ValueError:  # a name no file system can hold (a NUL byte)
        kind = None
    except OSError as err:
        raise UsageError(f"{path}: cannot be read: {err.strerror}") from err
    if kind is None:
        raise UsageError(f"{path}: no such file")
    if kind == "directory":
        raise UsageError(f"{path} is a directory; name a .csv or .parquet file")
    if table_format(path) is None:
        raise UsageError(f"{path}: unknown file type; use .csv, .csv.gz, .tsv or .parquet")
    for role in ("id", "time", "key", "label"):
        if getattr(args, f"{role}_column") == "":
            raise UsageError(f"--{role}-column needs a column name")
    return ReplayJob(file=path, layout=args.layout, id_column=args.id_column, time_column=args.time_column,
                     key_column=args.key_column, label_column=args.label_column)
