"""``fraud-produce`` answers every misuse with one line and exit code 2, before any I/O."""

from __future__ import annotations

import select
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pandas as pd
import pytest

from pipeline.cliargs import package_version
from pipeline.errors import InputDataError
from producer import jobs
from producer.cli import parse, run
from producer.options import ReplayJob, SimulateJob

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--customers", "50", "--terminals", "100", "--days", "10"]

MISUSES = {
    "rate negative": ["simulate", "--rate", "-1"],
    "rate zero": ["simulate", "--rate", "0"],
    "rate not a number": ["simulate", "--rate", "nan"],
    "limit negative": ["simulate", "--limit", "-1"],
    "limit zero": ["simulate", "--limit", "0"],
    "partitions zero": ["simulate", "--partitions", "0"],
    "from after until": ["simulate", *SMALL, "--from-day", "5", "--until-day", "2"],
    "from past the end": ["simulate", *SMALL, "--from-day", "10"],
    "until past the end": ["simulate", *SMALL, "--until-day", "11"],
    "bad start date": ["simulate", "--start-date", "April"],
    "output of unknown type": ["simulate", "--output", "x.json"],
    "stream flag with output": ["simulate", "--output", "x.parquet", "--rate", "10"],
    "missing file": ["replay", "no-such-file.parquet"],
    "unknown format": ["replay", "pyproject.toml"],
    "a directory": ["replay", "tests"],
    "unknown layout": ["replay", "x.csv", "--layout", "excel"],
    "bad bootstrap port": ["simulate", "--bootstrap-servers", "kafka:abc"],
    "unknown flag": ["simulate", "--colour", "red"],
    "raw with restamp": ["simulate", "--raw", "--restamp"],
    "label delay without raw": ["simulate", "--label-delay-days", "3"],
    "label delay negative": ["simulate", "--raw", "--label-delay-days", "-1"],
    "label delay beyond a year": ["simulate", "--raw", "--label-delay-days", "400"],
    "raw with output": ["simulate", "--output", "x.parquet", "--raw"],
    "no command": [],
}


@pytest.fixture
def no_io() -> Iterator[mock.Mock]:
    """``producer.jobs.execute`` (the only door to I/O) replaced by a mock that reports success."""
    with mock.patch.object(jobs, "execute", return_value=0) as execute:
        yield execute


@pytest.mark.parametrize("argv", MISUSES.values(), ids=MISUSES.keys())
def test_misuse_is_one_line_and_exit_2_without_io(argv: list[str], no_io: mock.Mock,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(REPO)
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fraud-produce: error: "), err
    no_io.assert_not_called()


def test_a_valid_command_line_reaches_execute_with_checked_options(no_io: mock.Mock) -> None:
    assert run(["simulate", *SMALL, "--from-day", "3", "--rate", "250", "--bootstrap-servers", "k:9"]) == 0
    (options,), _ = no_io.call_args
    assert isinstance(options.job, SimulateJob)
    assert (options.job.from_day, options.job.until_day, options.job.config.n_days) == (3, 10, 10)
    assert options.stream.rate == 250 and options.stream.partitions == 3 and options.stream.limit is None
    assert options.settings.bootstrap_servers == "k:9"


def test_defaults_mean_unpaced_all_days(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_text("a\n1\n")
    options = parse(["replay", str(table), "--time-column", "a"], environ={})
    assert isinstance(options.job, ReplayJob) and options.job.time_column == "a"
    assert options.stream.rate is None and options.settings.bootstrap_servers == "localhost:9092"
    assert parse(["simulate", "--days", "7"], environ={}).job.until_day == 7  # type: ignore[union-attr]


def test_environment_settings_are_checked_too(capsys: pytest.CaptureFixture[str], no_io: mock.Mock,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRAUD_REQUEST_TIMEOUT_MS", "soon")
    assert run(["simulate"]) == 2
    assert "FRAUD_REQUEST_TIMEOUT_MS" in capsys.readouterr().err
    no_io.assert_not_called()


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--version"]) == 0
    assert capsys.readouterr().out == f"fraud-produce {package_version()}\n"
    assert run(["replay", "--help"]) == 0
    assert "FRAUD_BOOTSTRAP_SERVERS" in capsys.readouterr().out


def test_parsing_imports_nothing_heavy(tmp_path: Path) -> None:
    table = tmp_path / "t.parquet"
    table.write_bytes(b"not read")
    code = (
        "import sys; from producer.cli import parse, run\n"
        f"parse(['replay', {str(table)!r}, '--rate', '5'], environ={{}})\n"
        "parse(['simulate', '--days', '3', '--output', 'x.csv'], environ={})\n"
        "assert run(['--help']) == 0 and run(['simulate', '--rate', '0']) == 2\n"
        "heavy = ('pandas', 'pyarrow', 'numpy', 'torch', 'kafka', 'tqdm', 'producer.simulator', 'producer.jobs')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[-1] == "[]"


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A TCP port that accepts connections but never answers: a broker that would hang any client."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server


def connection_pending(server: socket.socket) -> bool:
    readable, _, _ = select.select([server], [], [], 0)
    return bool(readable)


@pytest.mark.parametrize("argv", [MISUSES[k] for k in ("rate zero", "limit negative", "partitions zero",
                                                       "from after until", "missing file", "unknown format")])
def test_the_installed_command_connects_to_nothing_on_misuse(argv: list[str], listener: socket.socket) -> None:
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    done = subprocess.run([sys.executable, "-m", "producer", *argv, "--bootstrap-servers", address],
                          cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert not connection_pending(listener)
    socket.create_connection(listener.getsockname()).close()  # the probe does see a connection
    assert connection_pending(listener)


def test_unknown_column_is_refused_from_the_header_before_the_rows_are_read(tmp_path: Path) -> None:
    path = tmp_path / "t.csv.gz"
    pd.DataFrame({"when": [1, 2], "x": [1.0, 2.0]}).to_csv(path, index=False)
    options = parse(["replay", str(path), "--time-column", "when", "--label-column", "fraud"], environ={})
    with mock.patch.object(jobs, "read_table", side_effect=AssertionError("read the rows")), \
            pytest.raises(InputDataError, match="--label-column 'fraud': the table has no such column"):
        jobs.execute(options)


def test_raw_feed_sends_each_fraud_label_after_its_delay_keyed_by_terminal() -> None:
    from producer.rawfeed import raw_messages
    from producer.simulator import SimulatorConfig, simulate
    from producer.tables import resolve_spec

    frame = simulate(SimulatorConfig(n_customers=60, n_terminals=120, n_days=30, seed=4,
                                     terminals_compromised_per_day=0.3))
    feed = list(raw_messages(frame, resolve_spec(frame, "handbook"), "tx", "labels", 2.0))
    import orjson

    sent_at: dict[str, int] = {}
    position = 0
    times = frame.set_index(frame["TRANSACTION_ID"].astype(str))["TX_DATETIME"]
    for topic, key, value in feed:
        body = orjson.loads(value)
        if topic == "tx":
            assert set(body) == {"transaction_id", "event_time", "CUSTOMER_ID", "TERMINAL_ID", "TX_AMOUNT"}
            assert key == str(body["CUSTOMER_ID"]).encode()
            sent_at[body["transaction_id"]] = position
            position += 1
        else:
            assert key == str(body["TERMINAL_ID"]).encode() and body["TX_FRAUD"] == 1
            tx_time = times[body["transaction_id"]]
            sent_before = frame["TX_DATETIME"].iloc[:position]
            # sent once the stream passed the fraud's time plus 2 days, not before
            assert body["transaction_id"] in sent_at
            assert position == len(frame) or frame["TX_DATETIME"].iloc[position] >= tx_time + pd.Timedelta(days=2)
            assert sent_before.empty or sent_before.iloc[-1] < tx_time + pd.Timedelta(days=2) or position == 0
    assert position == len(frame)
    assert sum(topic == "labels" for topic, _, _ in feed) == int(frame["TX_FRAUD"].sum()) > 0
