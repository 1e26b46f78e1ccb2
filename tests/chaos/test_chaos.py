"""Chaos on a real broker (``make chaos``): workers killed, the broker killed, the group reshaped,
100,000 hostile records; in both processing guarantees.

Each test streams simulated transactions at a steady pace while it does its damage, then
lets a last worker drain the topic and checks, against offline scoring of the same rows:
0 lost (every expected alert present, offsets committed to the end), 0 crashes (every
worker that was not killed exits 0), and under exactly-once 0 duplicate alerts for a
``read_committed`` reader. Each test prints one ``chaos:`` line with its figures.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import random
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pandas as pd
import pytest
from kafka import KafkaProducer

from deploy.kafka.local import LocalKafka, wait_until_ready
from pipeline.config import KafkaSettings
from tests.chaos_helpers import (
    BadFeed,
    Workers,
    assigned,
    check_outcome,
    committed_total,
    empty_assignment_seconds,
    feed,
    input_lag,
    stream_file,
)
from tests.kafka_helpers import with_shared_jars
from tests.worker_helpers import committed_to_end, produce_frame, read_topic, wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.timeout(1200)]
MODES = ["at-least-once", "exactly-once"]
# the worker's Kafka clients too, where the failure touches the client: confluent runs at-least-once only
BOTH_CLIENTS = [pytest.param("at-least-once", "kafka-python", id="at-least-once"),
                pytest.param("exactly-once", "kafka-python", id="exactly-once"),
                pytest.param("at-least-once", "confluent", id="at-least-once-confluent",
                             marks=pytest.mark.skipif(importlib.util.find_spec("confluent_kafka") is None,
                                                      reason="confluent-kafka is not installed"))]


class Broker:
    """A broker of this module's own, which the tests may kill -9 and start again on the same ports."""

    def __init__(self, home: Path) -> None:
        self.local = LocalKafka(home)
        state = self.local.start()
        self.bootstrap, self.pid = state.bootstrap_servers, state.pid
        self.cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes().split(b"\0")[:-1]
        self.log = state.log_file

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:  # not our child: wait until it is gone
            while Path(f"/proc/{self.pid}").exists():
                time.sleep(0.1)

    def restart(self) -> None:
        with open(self.log, "ab") as out:
            proc = subprocess.Popen(self.cmdline, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.pid = proc.pid
        wait_until_ready(self.bootstrap, 90, proc)

    def stop(self) -> None:
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and Path(f"/proc/{self.pid}").exists():
            time.sleep(0.2)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    home = tmp_path_factory.mktemp("chaos-kafka")
    with_shared_jars(home)
    b = Broker(home)
    yield b
    b.stop()


@pytest.fixture
def settings(broker: Broker) -> KafkaSettings:
    """Fresh topics on the chaos broker."""
    tag = uuid.uuid4().hex[:10]
    return KafkaSettings.build(environ={}, overrides={
        "bootstrap_servers": broker.bootstrap, "input_topic": f"tx-{tag}", "alerts_topic": f"alerts-{tag}",
        "dead_letter_topic": f"dlq-{tag}", "client_id": f"chaos-{tag}"})


@pytest.mark.parametrize(("mode", "client"), BOTH_CLIENTS)
def test_worker_killed_ten_times_mid_stream(settings: KafkaSettings, model_dir: Path, stream_frame: pd.DataFrame,
                                            tmp_path: Path, mode: str, client: str) -> None:
    frame, path = stream_file(stream_frame, settings, tmp_path)
    group = f"kill-{settings.client_id}"
    workers = Workers(settings, model_dir, group, mode, tmp_path, client)
    feeder = feed(settings, path, rate=len(frame) / 100)
    bad = BadFeed(settings)
    rng = random.Random(7)
    kills = 0
    for _ in range(10):
        proc, log = workers.start()
        assert wait_for(lambda log=log: assigned(log), timeout_s=120), log.read_text()[-2000:]
        time.sleep(rng.uniform(0.5, 3.0))
        assert proc.poll() is None, log.read_text()[-3000:]  # alive until killed: no crash
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        kills += 1
    bad_sent = bad.stop()
    feeder_out, _ = feeder.communicate(timeout=300)
    assert feeder.returncode == 0, feeder_out
    workers.drain()
    waits = [empty_assignment_seconds(workers.tmp / f"worker-{i}.log") for i in range(1, workers.started + 1)]
    print(f"chaos: {workers.started} worker starts, {sum(w > 0 for w in waits)} began with an empty "
          f"assignment, longest wait for partitions {max(waits):.1f}s")
    assert max(waits) < 90  # the stall watchdog (30 s) or the metadata refresh (15 s) ends it
    figures = check_outcome(settings, model_dir, frame, group, mode, "kill -9 the worker x10", bad_sent)
    assert figures["records"] > 0 and kills == 10


@pytest.mark.parametrize(("mode", "client"), BOTH_CLIENTS)
def test_broker_killed_and_restarted_mid_stream(broker: Broker, settings: KafkaSettings, model_dir: Path,
                                                stream_frame: pd.DataFrame, tmp_path: Path, mode: str, client: str
                                                ) -> None:
    frame, path = stream_file(stream_frame, settings, tmp_path)
    group = f"broker-{settings.client_id}"
    workers = Workers(settings, model_dir, group, mode, tmp_path, client)
    proc, log = workers.start()  # no idle exit: an outage is not idleness
    assert wait_for(lambda: assigned(log), timeout_s=120), log.read_text()[-2000:]
    feeder = feed(settings, path, rate=len(frame) / 40)
    bad = BadFeed(settings)
    time.sleep(8)
    assert feeder.poll() is None, "the stream must still flow when the broker dies"
    broker.kill()
    time.sleep(5)
    broker.restart()
    back, before = time.monotonic(), committed_total(settings, group)
    assert wait_for(lambda: committed_total(settings, group) > before, timeout_s=120, every_s=0.1), \
        log.read_text()[-3000:]
    first_commit_s = time.monotonic() - back
    feeder_out, _ = feeder.communicate(timeout=300)
    assert feeder.returncode == 0, feeder_out
    bad_sent = bad.stop()
    assert wait_for(lambda: committed_to_end(settings, group), timeout_s=180), log.read_text()[-3000:]
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    out = log.read_text()
    assert proc.returncode == 0, out[-3000:]  # rode out the outage, no crash, left cleanly
    assert "Traceback" not in out
    errors = sum(" ERROR " in line for line in out.splitlines())
    warnings = sum(" WARNING " in line for line in out.splitlines())
    print(f"chaos: broker back -> first new commit {first_commit_s:.1f}s; worker log: {errors} ERROR, "
          f"{warnings} WARNING lines, no traceback ({mode}, {client})")
    check_outcome(settings, model_dir, frame, group, mode, "kill -9 and restart the broker", bad_sent)


@pytest.mark.parametrize(("mode", "client"), BOTH_CLIENTS)
def test_rebalance_one_three_one_while_streaming(settings: KafkaSettings, model_dir: Path,
                                                 stream_frame: pd.DataFrame, tmp_path: Path, mode: str, client: str
                                                ) -> None:
    frame, path = stream_file(stream_frame, settings, tmp_path)
    group = f"reb-{settings.client_id}"
    workers = Workers(settings, model_dir, group, mode, tmp_path, client)
    first, first_log = workers.start("--exit-when-idle", "10")
    assert wait_for(lambda: assigned(first_log), timeout_s=120)
    feeder = feed(settings, path, rate=len(frame) / 60)
    bad = BadFeed(settings)
    time.sleep(5)
    extra = [workers.start() for _ in range(2)]
    assert wait_for(lambda: all(assigned(log) for _, log in extra), timeout_s=120)
    time.sleep(10)
    for proc, _log in extra:
        proc.send_signal(signal.SIGTERM)
    for proc, log in extra:
        proc.wait(timeout=120)
        assert proc.returncode == 0, log.read_text()[-3000:]  # left cleanly, not killed by the signal
    feeder_out, _ = feeder.communicate(timeout=300)
    assert feeder.returncode == 0, feeder_out
    bad_sent = bad.stop()
    first.wait(timeout=300)
    assert first.returncode == 0, first_log.read_text()[-3000:]
    check_outcome(settings, model_dir, frame, group, mode, "rebalance 1 -> 3 -> 1", bad_sent)


def hostile_values(rng: random.Random, n: int, features: tuple[str, ...]) -> Iterator[tuple[bytes, list]]:
    """Fast seeded fuzz: bytes, JSON of every shape, wrong types, extreme numbers, deep nesting, unicode."""
    numbers = [3e38, -3.4e38, 1e308, 5e-324, 0.0, -0.0, 2**63 - 1, -(2**63), 1e-45]
    for i in range(n):
        kind = rng.randrange(8)
        headers = [(f"h{rng.randrange(3)}", rng.randbytes(rng.randrange(6)))] if rng.random() < 0.3 else []
        base = {"transaction_id": f"fz-{i}", "event_time": 1_527_811_200_000 + i,
                **{f: rng.choice(numbers) if rng.random() < 0.2 else rng.random() * 100 for f in features}}
        if kind == 0:
            value = rng.randbytes(rng.randrange(1, 300))
        elif kind == 1:
            value = orjson.dumps(rng.choice([[1, 2], "text", 42, None, {"a": {"b": [1]}}, True]))
        elif kind == 2:
            base[rng.choice(features)] = rng.choice(["12", None, [1], {"x": 1}, True])
            value = orjson.dumps(base)
        elif kind == 3:
            base["event_time"] = rng.choice(["yesterday", -1, 1e30, "2018-06-01T00:00:00", ""])
            value = orjson.dumps(base)
        elif kind == 4:
            depth = rng.choice([10, 300, 2000])
            value = orjson.dumps(base)[:-1] + b',"deep":' + b"[" * depth + b"]" * depth + b"}"
        elif kind == 5:
            value = orjson.dumps(base).replace(b'"fz-', "\"\u00e9\U0001f4a5\u202e-".encode(), 1)
        elif kind == 6:
            value = orjson.dumps(base)[:-1] + rng.choice([b',"x":NaN}', b',"x":Infinity}', b',"x":1e999}'])
        else:
            value = orjson.dumps(base)  # may be scored, may be out of range
        yield value, headers


@pytest.mark.parametrize("mode", MODES)
def test_hundred_thousand_hostile_records_among_good_ones(settings: KafkaSettings, model_dir: Path,
                                                          stream_frame: pd.DataFrame, tmp_path: Path,
                                                          mode: str) -> None:
    frame = stream_frame.reset_index(drop=True).iloc[:5000]
    produce_frame(settings, frame.iloc[:2500])
    from pipeline.artifact import load_artifact

    features = tuple(load_artifact(model_dir).feature_names)
    producer = KafkaProducer(**settings.client_options(), linger_ms=20, batch_size=256 * 1024)
    n_hostile = 100_000
    for value, headers in hostile_values(random.Random(11), n_hostile, features):
        producer.send(settings.input_topic, value=value, headers=headers)
    producer.flush()
    producer.close()
    produce_frame(settings, frame.iloc[2500:])
    group = f"fuzz-{settings.client_id}"
    workers = Workers(settings, model_dir, group, mode, tmp_path)
    out = workers.drain()
    consumed, scored, invalid = (int(x) for x in _summary(out))
    total = len(frame) + n_hostile
    assert consumed == total and scored + invalid == total, out[-2000:]
    letters = read_topic(settings, settings.dead_letter_topic, expect=invalid, timeout_s=120,
                         isolation_level="read_committed")
    assert len(letters) == invalid
    sources = {(dict(r.headers)["dlq.source.partition"], dict(r.headers)["dlq.source.offset"]) for r in letters}
    assert len(sources) == invalid  # each hostile record dead-lettered once
    print(f"chaos: {n_hostile} hostile records among {len(frame)} good ({mode}): {scored} scored, "
          f"{invalid} dead-lettered, worker exit 0")
    check_outcome(settings, model_dir, frame, group, mode, "100,000 hostile records among good ones")


class ChangingPace(threading.Thread):
    """Sends ``(topic, key, value)`` messages at ``rate`` per second, a rate the test may change meanwhile."""

    def __init__(self, messages: list, producer: KafkaProducer, rate: float, chunk: int = 50) -> None:
        super().__init__(daemon=True)
        self.messages, self.producer, self.rate, self.chunk = messages, producer, rate, chunk
        self.acked, self.errors = 0, []

    def _ok(self, _meta: object) -> None:
        self.acked += 1

    def run(self) -> None:
        for start in range(0, len(self.messages), self.chunk):
            for topic, key, value in self.messages[start: start + self.chunk]:
                self.producer.send(topic, key=key, value=value).add_callback(self._ok).add_errback(
                    self.errors.append)
            time.sleep(self.chunk / self.rate)
        self.producer.flush(timeout=60)


def _summary(out: str) -> tuple[str, str, str]:
    line = out.rsplit("consumed ", 1)[1].splitlines()[0]  # consumed N: S scored, I dead-lettered, ...
    consumed, rest = line.split(":", 1)
    parts = rest.split(",")
    return consumed, parts[0].split()[0], parts[1].split()[0]


@pytest.mark.parametrize("mode", MODES)
def test_raw_features_survive_kill_and_rebalance(settings: KafkaSettings, raw_model_dir: Path, mode: str,
                                                 tmp_path: Path) -> None:
    """Raw transactions streamed while the worker is killed -9 (state restored from the changelogs by the
    next one) and a second worker joins and leaves (stores move with their partitions): every streamed
    feature equals the offline table; under exactly-once each transaction's features appear once.

    The stream is paced at one simulated day per second until the restarted worker has its partitions,
    so that it catches up a backlog of days (one worker keeps its own partitions aligned in event time
    whatever the backlog), then at one day per 4 s while the second worker joins and leaves mid-stream:
    a rebalance then moves two workers' partitions about a day apart in event time, well within the
    7-day label delay, as a live stream's move seconds apart. Several workers catching up a backlog
    longer than the delay at once could skew the repartition topic by more than the delay, and count
    such transactions in ``fraud_late_events_total``. On a mismatch the failure says how many
    transactions were scored before an event of their window was (event-time skew) and how many
    late events the workers counted; a mismatch with neither would be lost state."""
    from producer.send import make_producer, send_records
    from producer.simulator import SimulatorConfig, simulate
    from tests.integration.test_stream_features_kafka import (
        assert_equal_to_offline,
        scored_before_their_window,
        split_messages,
        streamed_features,
    )

    frame = simulate(SimulatorConfig(n_customers=600, n_terminals=1200, n_days=40, seed=5,
                                     terminals_compromised_per_day=0.5))
    per_day = len(frame) / 40
    settings = dataclasses.replace(settings, labels_topic=f"labels-{settings.client_id}",
                                   features_topic=f"features-{settings.client_id}")
    labels, transactions = split_messages(settings, frame)
    produce_frame(settings, frame.iloc[:0])  # creates the input and output topics (3 partitions)
    producer = make_producer(settings)
    send_records(labels, settings.input_topic, producer, progress=False)  # the bank's labels, known beforehand
    group = f"raw-{settings.client_id}"
    workers = Workers(settings, raw_model_dir, group, mode, tmp_path)
    workers.env.update({"FRAUD_LABELS_TOPIC": settings.labels_topic, "FRAUD_FEATURES_TOPIC": settings.features_topic})
    sender = ChangingPace(transactions, producer, rate=per_day)  # one simulated day per second
    first, first_log = workers.start()
    assert wait_for(lambda: assigned(first_log), 90), first_log.read_text()[-3000:]
    sender.start()
    time.sleep(2.5)
    first.kill()  # kill -9 mid-stream: its stores are rebuilt from the changelogs by the next owner
    first.wait()
    second, second_log = workers.start()
    # it catches up the backlog the kill left (one worker keeps its partitions aligned in event time) ...
    assert wait_for(lambda: assigned(second_log), 90), second_log.read_text()[-3000:]
    # ... while the stream goes on at a day per 4 s: a rebalance then moves event time by about a day, not
    # by more than the 7-day label delay (live, a rebalance moves it by seconds)
    sender.rate = per_day / 4
    time.sleep(2)
    assert wait_for(lambda: input_lag(settings, group) < per_day, 120), second_log.read_text()[-3000:]
    third, third_log = workers.start()  # ... then the partitions and their stores split between two workers ...
    assert wait_for(lambda: assigned(third_log), 90), third_log.read_text()[-3000:]
    assert sender.is_alive(), "the stream ended before the rebalance: nothing was in flight when stores moved"
    time.sleep(2)
    third.send_signal(signal.SIGTERM)  # ... and come back to one
    assert third.wait(60) == 0, third_log.read_text()[-3000:]
    sender.rate = per_day * 2
    sender.join(180)
    assert sender.acked == len(transactions), sender.errors
    producer.close()
    second.send_signal(signal.SIGTERM)
    assert second.wait(60) == 0, second_log.read_text()[-3000:]
    workers.drain()
    assert wait_for(lambda: committed_to_end(settings, group), timeout_s=120), "offsets not committed to the end"
    scored_at: dict[str, int] = {}
    seen = streamed_features(settings, len(transactions), scored_at)
    copies = sum(len(c) for c in seen.values())
    late = sum(int(n) for log in tmp_path.glob("worker-*.log")
               for n in re.findall(r"(\d+) late events", log.read_text()))
    print(f"chaos: raw input, kill -9 + rebalance 1 -> 2 -> 1: {{'mode': '{mode}', 'transactions': "
          f"{len(transactions)}, 'labels': {len(labels)}, 'features_records': {copies}, "
          f"'repeated': {copies - len(seen)}, 'late_events': {late}}}")
    try:
        assert_equal_to_offline(frame, seen)
    except AssertionError as err:
        skewed = scored_before_their_window(frame, scored_at)
        raise AssertionError(f"{late} late events counted by the workers that stopped cleanly; {len(skewed)} "
                             f"transactions scored before an event of their window (first: "
                             f"{sorted(skewed.items())[:3]})\n{err}") from None
    if mode == "exactly-once":
        assert copies == len(seen), f"{copies - len(seen)} transactions scored twice under exactly-once"


@pytest.mark.parametrize("mode", ["at-least-once", "exactly-once"])
def test_raw_backlog_replayed_unpaced_with_three_kills(settings: KafkaSettings, raw_model_dir: Path, mode: str,
                                                      tmp_path: Path) -> None:
    """62 simulated days of raw transactions and labels wait on the topics (an unpaced replay); a worker
    reading them in batches of 4,096 is killed -9 three times, each time a few seconds after it got its
    partitions, and a last one finishes. Every transaction's features equal the offline table (state
    restored from the changelogs, watermark alignment across each restart), no late events, and under
    exactly-once each transaction's features appear once."""
    from producer.send import make_producer, send_records
    from producer.simulator import SimulatorConfig, simulate
    from tests.integration.test_stream_features_kafka import assert_equal_to_offline, split_messages, streamed_features

    frame = simulate(SimulatorConfig(n_customers=400, n_terminals=800, n_days=62, seed=9,
                                     terminals_compromised_per_day=0.5))
    settings = dataclasses.replace(settings, labels_topic=f"labels-{settings.client_id}",
                                   features_topic=f"features-{settings.client_id}")
    labels, transactions = split_messages(settings, frame)
    produce_frame(settings, frame.iloc[:0])  # creates the input and output topics (3 partitions)
    producer = make_producer(settings)
    report = send_records(labels + transactions, settings.input_topic, producer, progress=False)
    producer.close()
    assert report.acked == len(labels) + len(transactions)
    group = f"rawkill-{settings.client_id}"
    workers = Workers(settings, raw_model_dir, group, mode, tmp_path)
    workers.env.update({"FRAUD_LABELS_TOPIC": settings.labels_topic, "FRAUD_FEATURES_TOPIC": settings.features_topic})
    rng = random.Random(mode)
    for _ in range(3):
        proc, log = workers.start("--max-batch", "4096")
        assert wait_for(lambda log=log: assigned(log), 90), log.read_text()[-3000:]
        time.sleep(rng.uniform(1.0, 4.0))
        proc.kill()
        proc.wait()
    out = workers.drain()
    assert wait_for(lambda: committed_to_end(settings, group), timeout_s=120), "offsets not committed to the end"
    seen = streamed_features(settings, len(transactions))
    copies = sum(len(c) for c in seen.values())
    late = [int(n) for n in re.findall(r"(\d+) late events", out)]
    print(f"chaos: raw backlog, 3 kills: {{'mode': '{mode}', 'transactions': {len(transactions)}, "
          f"'features_records': {copies}, 'repeated': {copies - len(seen)}, 'late_events_last_worker': {late}}}")
    assert late == [0]
    assert_equal_to_offline(frame, seen)
    if mode == "exactly-once":
        assert copies == len(seen), f"{copies - len(seen)} transactions scored twice under exactly-once"
