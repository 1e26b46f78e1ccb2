"""Property tests: whatever flags ``fraud-produce`` is given, it never crashes and never does I/O on misuse.

Each command line either is accepted (exit 0, and ``producer.jobs.execute``, the only door to
Kafka and to reading files, receives options that hold every promised invariant) or is refused
(exit 2, one line on stderr, ``execute`` never called). No traceback either way.
"""

from __future__ import annotations

import io
import math
import os
from contextlib import redirect_stderr, redirect_stdout
from unittest import mock

import pandas as pd
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from kafka.cluster import collect_hosts

from pipeline.config import check_bootstrap
from pipeline.errors import ConfigError
from producer import jobs
from producer.cli import run
from producer.options import (
    INT32_MAX,
    MIN_RATE,
    TOPIC_NAME,
    Options,
    SimulateJob,
    table_format,
)

STREAM_FLAGS = ["--rate", "--limit", "--partitions", "--bootstrap-servers", "--input-topic", "--alerts-topic",
                "--dead-letter-topic", "--client-id", "--security-protocol", "--sasl-mechanism",
                "--request-timeout-ms"]
SIMULATE_FLAGS = ["--customers", "--terminals", "--days", "--start-date", "--seed", "--from-day", "--until-day",
                  "--output"]
REPLAY_FLAGS = ["--layout", "--id-column", "--time-column", "--key-column", "--label-column"]
SWITCHES = ["--drop-label", "--restamp", "--progress", "--no-progress", "-v"] * 3 + ["--help", "--version"]

# What a shell can pass: any text but NUL, surrogates only as Python's stand-ins for undecodable bytes.
text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
               | st.sampled_from([chr(c) for c in range(0xDC80, 0xDD00)]), max_size=24)
numbers = st.one_of(
    st.integers(-3, 12).map(str),
    st.integers().map(str),
    st.floats().map(repr),
    st.sampled_from(["0", "-0", "1e9", "1e309", "-inf", "0x10", "1_000", " 7 ", "", "-", "--", "3.5"]),
)
values = st.one_of(numbers, text, st.sampled_from(["a.parquet", "b.csv.gz", "c.json", "2018-04-01", "20180401",
                                                   "handbook", "generic", "PLAINTEXT", "SASL_SSL", "k:9092"]))


@pytest.fixture(scope="module")
def tables(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Paths a replay may be pointed at: tables, a non-table, a directory, nothing."""
    root = tmp_path_factory.mktemp("tables")
    frame = pd.DataFrame({"when": [1, 2], "x": [0.5, 1.5]})
    frame.to_csv(root / "t.csv", index=False)
    frame.to_parquet(root / "t.parquet")
    (root / "notes.txt").write_text("hello\n")
    return [str(root / "t.csv"), str(root / "t.parquet"), str(root / "notes.txt"), str(root),
            str(root / "missing.csv")]


def plausible(*choices: object) -> st.SearchStrategy[str]:
    return st.sampled_from([str(c) for c in choices])


days = st.integers(-2, 14).map(str)
PLAUSIBLE = {
    "--rate": plausible(0, -1, 0.0005, 0.001, 1, 250.5, 1e9, "nan", "inf") | st.floats().map(repr),
    "--limit": st.integers(-2, 5).map(str),
    "--partitions": st.integers(-2, 5).map(str) | plausible(INT32_MAX, INT32_MAX + 1),
    "--customers": st.integers(-1, 300).map(str), "--terminals": st.integers(-1, 300).map(str),
    "--days": days, "--from-day": days, "--until-day": days, "--seed": st.integers(-2, 2**70).map(str),
    "--start-date": plausible("2018-04-01", "20180401", "1969-12-31", "2200-12-31", "2201-01-01", "April"),
    "--output": plausible("x.parquet", "x.csv", "x.CSV.GZ", "x.json", "tests", ""),
    "--bootstrap-servers": plausible("k:9092", "k:abc", ",", "[::1]:9", "", "h:0", "PLAINTEXT://k"),
    "--input-topic": plausible("tx", "a b", "", "x" * 250, ".", "transactions"),
    "--alerts-topic": plausible("tx", "alerts"), "--dead-letter-topic": plausible("tx", "dlq"),
    "--request-timeout-ms": st.integers(-5, 2**33).map(str), "--client-id": text,
    "--security-protocol": plausible("PLAINTEXT", "SSL", "SASL_SSL", "bogus"), "--sasl-mechanism": plausible("PLAIN"),
    "--layout": plausible("auto", "handbook", "creditcard", "generic", "excel"),
    **{f"--{role}-column": plausible("when", "x", "", "nope") for role in ("id", "time", "key", "label")},
}


@st.composite
def command_lines(draw: st.DrawFn, tables: list[str]) -> list[str]:
    """Mostly well-formed command lines with values near the limits; one draw in ten is anything at all."""
    command = draw(st.sampled_from(["simulate"] * 9 + ["replay"] * 9 + ["", "play"]))
    argv = [command] if command else []
    flags = STREAM_FLAGS + (SIMULATE_FLAGS if command == "simulate" else REPLAY_FLAGS)
    if command == "replay" and draw(st.integers(0, 9)):
        argv.append(draw(st.sampled_from(tables) | text))
    for flag in draw(st.lists(st.sampled_from(flags), max_size=4)):
        value = draw(PLAUSIBLE[flag] if draw(st.integers(0, 9)) else values)
        argv += draw(st.sampled_from([[flag, value]] * 8 + [[f"{flag}={value}"], [flag]]))
    argv += draw(st.lists(st.sampled_from(SWITCHES) if draw(st.integers(0, 9)) else text, max_size=2))
    return argv


def run_without_io(argv: list[str]) -> tuple[int, str, str, mock.Mock]:
    out, err = io.StringIO(), io.StringIO()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FRAUD_")}
    with mock.patch.object(jobs, "execute", return_value=0) as execute, \
            mock.patch.dict(os.environ, clean, clear=True), redirect_stdout(out), redirect_stderr(err):
        code = run(argv)
    return code, out.getvalue(), err.getvalue(), execute


def assert_invariants(options: Options) -> None:
    stream = options.stream
    assert stream.rate is None or (math.isfinite(stream.rate) and stream.rate >= MIN_RATE)
    assert stream.limit is None or stream.limit >= 1
    assert 1 <= stream.partitions <= INT32_MAX
    assert TOPIC_NAME.fullmatch(options.settings.input_topic)
    job = options.job
    if isinstance(job, SimulateJob):
        assert 0 <= job.from_day < job.until_day <= job.config.n_days
        if job.output is not None:
            assert job.output.name.lower().endswith((".parquet", ".csv", ".csv.gz"))
            assert stream.rate is None and stream.limit is None and not stream.restamp
    else:
        assert job.file.is_file() and table_format(job.file) is not None


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_command_line_is_accepted_whole_or_refused_in_one_line(tables: list[str], data: st.DataObject) -> None:
    argv = data.draw(command_lines(tables), label="argv")
    code, out, err, execute = run_without_io(argv)
    event(f"exit {code}" + (" (executed)" if execute.called else ""))
    assert code in (0, 2), (code, err)
    assert "Traceback" not in err
    if code == 2:
        assert err.count("\n") == 1 and err.endswith("\n"), err
        assert err.startswith("fraud-produce: error: "), err
        execute.assert_not_called()
    elif execute.called:
        (options,), _ = execute.call_args
        assert_invariants(options)
        assert err == ""
    else:  # --help or --version
        assert out and err == ""


@settings(max_examples=300, deadline=None)
@given(servers=st.text(st.sampled_from("ab19:[]., /-x"), max_size=16) | text)
def test_accepted_bootstrap_lists_are_ones_kafka_python_can_parse(servers: str) -> None:
    try:
        check_bootstrap(servers)
    except ConfigError:
        return
    collect_hosts([s.strip() for s in servers.split(",")])  # kafka-python's own parser must not raise


def test_valid_command_lines_reach_execute_and_nothing_else(tables: list[str]) -> None:
    """The happy path through the same helper, so the property test above is known to see both outcomes."""
    code, _, err, execute = run_without_io(["simulate", "--days", "5", "--from-day", "2"])
    assert (code, err, execute.call_count) == (0, "", 1)
    code, _, err, execute = run_without_io(["replay", tables[0], "--time-column", "when", "--rate", "3"])
    assert (code, err, execute.call_count) == (0, "", 1)
