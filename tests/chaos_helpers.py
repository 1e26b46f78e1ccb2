"""What the chaos suites share: worker processes, a paced feed, bad records, and the outcome check
(0 lost, 0 duplicates under exactly-once) against offline scoring of the same rows."""

from __future__ import annotations

import collections
import datetime
import os
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from pipeline.config import KafkaSettings
from tests.kafka_helpers import REPO
from tests.worker_helpers import (
    alert_ids,
    committed_to_end,
    input_progress,
    offline_flags,
    produce_frame,
    read_topic,
    wait_for,
)


class Workers:
    """Worker processes of one group, logging to files."""

    def __init__(self, settings: KafkaSettings, model_dir: Path, group: str, mode: str, tmp: Path,
                 client: str = "kafka-python") -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUD_")}
        self.env.update({"FRAUD_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
                         "FRAUD_INPUT_TOPIC": settings.input_topic, "FRAUD_ALERTS_TOPIC": settings.alerts_topic,
                         "FRAUD_DEAD_LETTER_TOPIC": settings.dead_letter_topic, "FRAUD_METRICS_PORT": "0",
                         "FRAUD_PROCESSING_GUARANTEE": mode, "FRAUD_MAX_RETRY_BACKOFF_S": "1",
                         "FRAUD_KAFKA_CLIENT": client, "PYTHONUNBUFFERED": "1"})
        self.cmd = [sys.executable, "-m", "pipeline", "--model-dir", str(model_dir), "--consumer-group", group,
                    "--device", "cpu", "--reload-interval-s", "0", "--max-batch", "300", "--max-wait-ms", "20"]
        self.tmp, self.started, self.exits = tmp, 0, []

    def start(self, *extra: str) -> tuple[subprocess.Popen, Path]:
        self.started += 1
        log = self.tmp / f"worker-{self.started}.log"
        proc = subprocess.Popen([*self.cmd, *extra], cwd=REPO, env=self.env, stdout=open(log, "wb"),  # noqa: SIM115
                                stderr=subprocess.STDOUT)
        return proc, log

    def drain(self) -> str:
        """A last worker that stops once the topic is quiet; its output."""
        proc, log = self.start("--exit-when-idle", "8")
        proc.wait(timeout=300)
        out = log.read_text()
        assert proc.returncode == 0, out[-3000:]
        return out


def feed(settings: KafkaSettings, path: Path, rate: float) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUD_")}
    env.update({"FRAUD_BOOTSTRAP_SERVERS": settings.bootstrap_servers, "FRAUD_INPUT_TOPIC": settings.input_topic})
    return subprocess.Popen([sys.executable, "-m", "producer", "replay", str(path), "--rate", str(rate),
                             "--drop-label", "--no-progress"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


class BadFeed:
    """Undecodable records, one every ``interval_s``, so that every batch has dead letters to deliver."""

    def __init__(self, settings: KafkaSettings, interval_s: float = 0.02) -> None:
        self.settings, self.interval_s, self.sent = settings, interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        producer = KafkaProducer(**self.settings.client_options(), acks="all", enable_idempotence=True,
                                 reconnect_backoff_max_ms=1000, delivery_timeout_ms=600_000)
        futures = []
        while not self._stop.wait(self.interval_s):
            futures.append(producer.send(self.settings.input_topic, value=b'{"bad": %d' % len(futures)))
        producer.flush()
        self.sent = sum(1 for f in futures if f.succeeded())
        producer.close()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=300)
        return self.sent


def assigned(log: Path) -> bool:
    return log.exists() and "partitions assigned: [TopicPartition" in log.read_text(errors="replace")


def empty_assignment_seconds(log: Path) -> float:
    """How long a worker held an empty first assignment before it got partitions (0: it never did)."""
    stamps = []
    for line in log.read_text(errors="replace").splitlines():
        if "partitions assigned: [" in line:
            when = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            stamps.append((when, "[]" in line))
    if not stamps or not stamps[0][1]:
        return 0.0
    first_full = next((t for t, empty in stamps if not empty), None)
    assert first_full is not None, f"{log.name}: never got a partition"
    return first_full - stamps[0][0]


def committed_total(settings: KafkaSettings, group: str) -> int:
    consumer = KafkaConsumer(**settings.client_options(), group_id=group, enable_auto_commit=False)
    try:
        parts = consumer.partitions_for_topic(settings.input_topic) or set()
        return sum(consumer.committed(TopicPartition(settings.input_topic, p)) or 0 for p in parts)
    finally:
        consumer.close(autocommit=False)


def check_outcome(settings: KafkaSettings, model_dir: Path, frame: pd.DataFrame, group: str, mode: str,
                  what: str, bad_sent: int = 0) -> dict:
    """0 lost, and under exactly-once 0 duplicates; the figures for README."""
    assert wait_for(lambda: committed_to_end(settings, group), timeout_s=120), "offsets not committed to the end"
    isolation = "read_committed" if mode == "exactly-once" else "read_uncommitted"
    expected, good = offline_flags(model_dir, frame), ids_of(frame)
    ids = alert_ids(read_topic(settings, settings.alerts_topic, expect=len(expected), isolation_level=isolation,
                               timeout_s=90))
    ids = [i for i in ids if i in good]  # hostile records of the fuzz test may alert too
    counts = collections.Counter(ids)
    lost = expected - set(counts)
    duplicates = sum(n - 1 for n in counts.values())
    figures = {"mode": mode, "records": len(frame), "expected_alerts": len(expected), "lost": len(lost),
               "duplicate_alerts": duplicates}
    if mode == "exactly-once":  # what a reader that ignores transactions would have seen (aborted outputs)
        raw = collections.Counter(i for i in alert_ids(read_topic(settings, settings.alerts_topic, timeout_s=60))
                                  if i in good)
        figures["duplicates_if_read_uncommitted"] = sum(n - 1 for n in raw.values())
    if bad_sent:
        def sources(records: list) -> collections.Counter:
            return collections.Counter((dict(r.headers)["dlq.source.partition"], dict(r.headers)["dlq.source.offset"])
                                       for r in records if r.value.startswith(b'{"bad": '))
        in_topic = sum(r.value.startswith(b'{"bad": ') for r in read_topic(settings, settings.input_topic,
                                                                          timeout_s=120))
        assert in_topic >= bad_sent
        letters = sources(read_topic(settings, settings.dead_letter_topic, expect=in_topic,
                                     isolation_level=isolation, timeout_s=90))
        figures.update(dead_letters_expected=in_topic, dead_letters_lost=in_topic - len(letters),
                       duplicate_dead_letters=sum(n - 1 for n in letters.values()))
        if mode == "exactly-once":
            raw = sources(read_topic(settings, settings.dead_letter_topic, timeout_s=60))
            figures["dead_letter_duplicates_if_read_uncommitted"] = sum(n - 1 for n in raw.values())
    print(f"chaos: {what}: {figures}")
    assert not lost, f"{len(lost)} alerts lost"
    assert set(counts) == expected, "alerts that offline scoring does not give"
    if mode == "exactly-once":
        assert duplicates == 0, f"{duplicates} duplicate alerts under exactly-once"
    if bad_sent:
        assert figures["dead_letters_lost"] == 0, "dead letters lost"
        assert mode != "exactly-once" or figures["duplicate_dead_letters"] == 0, "duplicate dead letters"
    return figures


def input_lag(settings: KafkaSettings, group: str) -> int:
    """Records of the input topic the group has not committed yet."""
    return sum(end - (committed or 0) for end, committed in input_progress(settings, group).values())


def ids_of(frame: pd.DataFrame) -> set[str]:
    return set(frame["TRANSACTION_ID"].astype(str))


def stream_file(stream_frame: pd.DataFrame, settings: KafkaSettings, tmp_path: Path) -> tuple[pd.DataFrame, Path]:
    frame = stream_frame.reset_index(drop=True)
    path = tmp_path / "stream.parquet"
    frame.to_parquet(path)
    produce_frame(settings, frame.iloc[:0])  # creates the topics (3 partitions)
    return frame, path
