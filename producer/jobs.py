"""What ``fraud-produce`` does once its flags are checked: simulate or read a table, then write or stream it.

This is where pandas, the simulator and the Kafka client are imported; ``producer.cli`` imports
this module only after :func:`producer.options.check` has accepted the command line.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.cliargs import print_error
from pipeline.config import KafkaSettings
from pipeline.errors import ConfigError, InputDataError
from pipeline.features import read_table
from producer.header import read_columns
from producer.options import Options, ReplayJob, SimulateJob, StreamOptions
from producer.tables import ReplaySpec, check_columns, iter_records, resolve_spec


def execute(options: Options) -> int:
    """Run a checked command line; the exit code (0 when every record was acknowledged)."""
    job = options.job
    if isinstance(job, SimulateJob):
        if job.output is None:
            reach_kafka(options.settings)
        frame = simulate_table(job)
        if job.output is not None:
            write_table(frame, job.output)
            print(f"wrote {len(frame)} transactions ({int(frame['TX_FRAUD'].sum())} frauds) to {job.output}")
            return 0
        return stream_table(frame, resolve_spec(frame, "handbook"), options.settings, options.stream)
    check_header(job, options.stream.restamp)
    if options.stream.raw:
        from producer.rawfeed import check_raw_columns

        columns = read_columns(job.file)
        if columns is not None:
            check_raw_columns(columns)
    reach_kafka(options.settings)
    frame, spec = load_table(job, options.stream.restamp)
    return stream_table(frame, spec, options.settings, options.stream)


def reach_kafka(settings: KafkaSettings) -> None:
    """Before the slow part (reading, simulating): a wrong broker address is said within seconds."""
    from pipeline.topics import wait_for_kafka

    wait_for_kafka(settings)


def simulate_table(job: SimulateJob) -> pd.DataFrame:
    """Run the simulator and keep the requested days."""
    from producer.simulator import simulate

    frame = simulate(job.config)
    days = frame["TX_TIME_DAYS"]
    frame = frame.loc[(days >= job.from_day) & (days < job.until_day)].reset_index(drop=True)
    if frame.empty:
        raise ConfigError(f"days {job.from_day} to {job.until_day - 1} of this simulation hold no "
                          "transactions; simulate more customers or keep more days")
    return frame


def write_table(frame: pd.DataFrame, path: Path) -> None:
    """Write a table as Parquet or CSV, chosen by the file name (checked by ``check_output``)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.name.lower().endswith(".parquet"):
            frame.to_parquet(path, index=False)
        else:
            frame.to_csv(path, index=False)
    except OSError as err:
        raise InputDataError(f"cannot write {path}: {err.strerror or err}") from err


def _column_flags(job: ReplayJob) -> dict[str, str | None]:
    return dict(id_column=job.id_column, time_column=job.time_column, key_column=job.key_column,
                label_column=job.label_column)


def check_header(job: ReplayJob, restamp: bool = False) -> None:
    """Check the column flags against the file's header, without reading the rows."""
    columns = read_columns(job.file)
    if columns is not None:
        check_columns(columns, job.layout, **_column_flags(job), restamp=restamp)


def load_table(job: ReplayJob, restamp: bool = False) -> tuple[pd.DataFrame, ReplaySpec]:
    """Read the table and work out its columns (``check_header`` first)."""
    frame = read_table(job.file)
    return frame, resolve_spec(frame, job.layout, **_column_flags(job), restamp=restamp)


def stream_table(frame: pd.DataFrame, spec: ReplaySpec, settings: KafkaSettings, stream: StreamOptions) -> int:
    """Stream the rows of a table into the input topic; 0 when every record was acknowledged."""
    from pipeline.topics import ensure_topics, visible_partition_counts
    from producer.send import make_producer, send_records

    if stream.limit is not None:
        frame = frame.iloc[: stream.limit]
    rate = stream.rate or 0.0
    topics = [settings.input_topic, settings.labels_topic] if stream.raw else [settings.input_topic]
    ensure_topics(settings, [settings.input_topic], stream.partitions)
    if stream.raw:  # the worker meets labels and transactions by partition: the labels topic takes the input's count
        counts = visible_partition_counts(settings, [settings.input_topic])
        ensure_topics(settings, [settings.labels_topic], counts[settings.input_topic])
    producer = make_producer(settings)
    try:
        if stream.raw:
            from producer.rawfeed import raw_messages

            records = raw_messages(frame, spec, settings.input_topic, settings.labels_topic,
                                   stream.label_delay_days)
        else:
            records = iter_records(frame, spec, drop_label=stream.drop_label,
                                   restamp_rate=rate if stream.restamp else None)
        report = send_records(records, settings.input_topic, producer, rate=rate, total=len(frame),
                              progress=stream.progress)
    finally:
        producer.close()
    what = "raw transactions and fraud labels" if stream.raw else "transactions"
    names = "', '".join(topics)
    print(f"sent {report.sent} {what} to '{names}' at "
          f"{settings.bootstrap_servers}: {report.acked} acknowledged, {report.failed} failed, "
          f"{report.seconds:.1f}s ({report.rate:,.0f} tx/s)")
    if report.acked != report.sent:
        print_error("fraud-produce", f"{report.sent - report.acked} records were not acknowledged: "
                    f"{'; '.join(report.errors) or 'flush timed out'}")
        return 1
    return 0
