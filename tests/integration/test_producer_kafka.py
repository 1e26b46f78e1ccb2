"""The producer against a real broker, read back by an independent client (kcat)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest

from pipeline.config import KafkaSettings
from pipeline.features import HANDBOOK_FEATURES
from tests.kafka_helpers import REPO, kcat_read, run_cli
from tests.unit.test_producer_tables import creditcard_frame, handbook_frame

pytestmark = pytest.mark.integration


def assert_handbook_intact(messages: list[dict], frame: pd.DataFrame, drop_label: bool) -> None:
    assert len(messages) == len(frame)
    by_id = {}
    for message in messages:
        record = orjson.loads(message["payload"])
        by_id[record["transaction_id"]] = (message["key"], record)
    assert len(by_id) == len(frame), "transaction ids must be unique"
    for row in frame.itertuples(index=False):
        key, record = by_id[str(row.TRANSACTION_ID)]
        assert key == str(row.CUSTOMER_ID)
        expected_time = pd.Timestamp(row.TX_DATETIME).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        assert record["event_time"] == expected_time
        for name in HANDBOOK_FEATURES:
            assert np.float32(record[name]) == getattr(row, name), name
        assert ("TX_FRAUD" in record) != drop_label


@pytest.mark.parametrize("drop_label", [False, True])
def test_replay_parquet_arrives_intact(tmp_path: Path, kafka_settings: KafkaSettings,
                                       kafka_env: dict[str, str], kcat: str, drop_label: bool) -> None:
    frame = handbook_frame(500)
    path = tmp_path / "tx.parquet"
    frame.to_parquet(path)
    args = ["replay", str(path), *(["--drop-label"] if drop_label else [])]
    done = run_cli("producer", *args, env=kafka_env)
    assert "500 acknowledged, 0 failed" in done.stdout
    messages = kcat_read(kcat, kafka_settings.bootstrap_servers, kafka_settings.input_topic)
    assert_handbook_intact(messages, frame, drop_label)
    assert {m["partition"] for m in messages} == {0, 1, 2}  # keyed by customer over 3 partitions


def test_replay_creditcard_csv_at_a_rate(tmp_path: Path, kafka_settings: KafkaSettings,
                                         kafka_env: dict[str, str], kcat: str) -> None:
    frame = creditcard_frame(40)
    path = tmp_path / "creditcard.csv.gz"
    frame.to_csv(path, index=False)
    run_cli("producer", "replay", str(path), "--rate", "400", "--partitions", "1", env=kafka_env)
    messages = kcat_read(kcat, kafka_settings.bootstrap_servers, kafka_settings.input_topic)
    records = [orjson.loads(m["payload"]) for m in messages]
    assert [r["transaction_id"] for r in records] == [str(i) for i in range(40)]  # one partition: in order
    expected = pd.read_csv(path)
    for record, (_, row) in zip(records, expected.iterrows(), strict=True):
        assert record["V7"] == row["V7"] and record["Amount"] == row["Amount"]
        assert record["Class"] == row["Class"]


def test_bad_file_and_flags_stop_with_a_message(tmp_path: Path, kafka_env: dict[str, str]) -> None:
    done = run_cli("producer", "replay", str(tmp_path / "nope.parquet"), env=kafka_env, check=False)
    assert done.returncode == 2 and "nope.parquet: no such file" in done.stderr
    path = tmp_path / "plain.csv"
    pd.DataFrame({"a": [1, 2]}).to_csv(path, index=False)
    done = run_cli("producer", "replay", str(path), env=kafka_env, check=False)
    assert done.returncode == 2 and "--time-column" in done.stderr
    assert "Traceback" not in done.stderr
    env = {**kafka_env, "FRAUD_REQUEST_TIMEOUT_MS": "soon"}
    done = run_cli("producer", "replay", str(path), "--time-column", "a", env=env, check=False)
    assert done.returncode == 2 and "FRAUD_REQUEST_TIMEOUT_MS" in done.stderr


def test_simulate_streams_the_simulators_rows(kafka_settings: KafkaSettings, kafka_env: dict[str, str],
                                              kcat: str) -> None:
    from producer.simulator import SimulatorConfig, simulate

    args = ["--customers", "60", "--terminals", "120", "--days", "12", "--seed", "3", "--from-day", "5"]
    done = run_cli("producer", "simulate", *args, env=kafka_env)
    frame = simulate(SimulatorConfig(n_customers=60, n_terminals=120, n_days=12, seed=3))
    frame = frame[frame["TX_TIME_DAYS"] >= 5]
    assert f"{len(frame)} acknowledged, 0 failed" in done.stdout
    messages = kcat_read(kcat, kafka_settings.bootstrap_servers, kafka_settings.input_topic)
    assert_handbook_intact(messages, frame, drop_label=False)


def test_ctrl_c_says_how_many_records_went_out(tmp_path: Path, kafka_settings: KafkaSettings,
                                               kafka_env: dict[str, str], kcat: str) -> None:
    """SIGINT mid-replay: exit 130 and one line with the records acknowledged by then (was: 'interrupted')."""
    frame = handbook_frame(5000)
    path = tmp_path / "tx.parquet"
    frame.to_parquet(path)
    # Ctrl-C as a terminal delivers it: a runner started in the background without job control passes SIGINT on
    # ignored, and Python then installs no KeyboardInterrupt at all (the producer honours an ignored SIGINT)
    proc = subprocess.Popen([sys.executable, "-m", "producer", "replay", str(path), "--rate", "500"], cwd=REPO,
                            env=kafka_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(6)  # start-up, then about 1,000 records at 500/s
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    acked, sent = map(int, re.search(r"interrupted: (\d+) records acknowledged of (\d+) sent", lines[0]).groups())
    assert 0 < acked <= sent < 5000
    assert len(kcat_read(kcat, kafka_settings.bootstrap_servers, kafka_settings.input_topic)) >= acked


def test_a_raw_stream_creates_its_labels_topic_with_the_input_topics_partition_count(
        tmp_path: Path, kafka_settings: KafkaSettings, kafka_env: dict[str, str]) -> None:
    """The worker joins labels and transactions by partition. With the input topic made beforehand with 6
    partitions (as the compose stack's kafka-init does) and no labels topic yet, a producer that started before
    the worker created the labels topic with its default 3, and the worker refused both for good (compose
    cluster test, fresh-clone CI 2026-12-07)."""
    from pipeline.topics import ensure_topics, partition_counts

    ensure_topics(kafka_settings, [kafka_settings.input_topic], 6)
    frame = handbook_frame(200)
    path = tmp_path / "tx.parquet"
    frame.to_parquet(path)
    done = run_cli("producer", "replay", str(path), "--raw", env=kafka_env)
    assert "0 failed" in done.stdout, done.stdout + done.stderr
    counts = partition_counts(kafka_settings, [kafka_settings.input_topic, kafka_settings.labels_topic])
    assert counts == {kafka_settings.input_topic: 6, kafka_settings.labels_topic: 6}
