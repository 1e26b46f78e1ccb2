"""The worker against a real broker: nothing lost, bad input dead-lettered, alerts as offline."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson
import pandas as pd
import pytest

from deploy.ports import free_port
from pipeline.config import KafkaSettings
from pipeline.topics import ensure_topics
from pipeline.worker.metrics import parse_samples
from tests.kafka_helpers import REPO
from tests.worker_helpers import (
    BAD_RECORDS,
    alert_ids,
    committed_to_end,
    committed_to_end_yet,
    input_progress,
    offline_flags,
    produce_bad,
    produce_frame,
    read_topic,
    start_worker,
    wait_for,
)

pytestmark = pytest.mark.integration


def test_in_process_every_record_accounted_for(kafka_settings: KafkaSettings, model_dir: Path,
                                               stream_frame: pd.DataFrame, kafka_client: str) -> None:
    frame = stream_frame.iloc[:4000]
    produce_frame(kafka_settings, frame)
    produce_bad(kafka_settings)
    group = f"g-{kafka_settings.client_id}"
    worker, thread, box = start_worker(kafka_settings, model_dir, group, kafka_client=kafka_client)
    box["idle_exit_s"] = 3.0
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive()
    stats = box["stats"]
    total = len(frame) + len(BAD_RECORDS)
    assert stats.consumed == total
    assert (stats.scored, stats.invalid) == (len(frame), len(BAD_RECORDS))

    expected = offline_flags(model_dir, frame)
    assert expected, "the simulated stream must contain transactions the model flags"
    alerts = read_topic(kafka_settings, kafka_settings.alerts_topic, expect=len(expected))
    assert sorted(alert_ids(alerts)) == sorted(expected)  # same decisions as offline, no duplicates
    alert = orjson.loads(alerts[0].value)
    assert alert["score"] > alert["threshold"] and alert["model_version"]
    assert len(alert["top_features"]) == 3
    assert {"name", "value", "reconstruction", "z"} <= set(alert["top_features"][0])
    assert "CUSTOMER_ID" in alert["fields"] and "TX_FRAUD" not in alert["fields"]

    letters = read_topic(kafka_settings, kafka_settings.dead_letter_topic, expect=len(BAD_RECORDS))
    reasons = sorted(dict(r.headers)["dlq.error.reason"].decode() for r in letters)
    assert reasons == sorted(reason for _, reason in BAD_RECORDS)
    for record in letters:
        headers = dict(record.headers)
        assert headers["dlq.source.topic"].decode() == kafka_settings.input_topic
        assert headers["origin"].startswith(b"test-")  # original headers kept
        original = next(v for v, _ in BAD_RECORDS if v == record.value)
        assert record.value == original  # original bytes kept
    assert committed_to_end(kafka_settings, group)
    assert worker.metrics.registry.get_sample_value("fraud_transactions_total", {"outcome": "scored"}) == len(frame)


def test_two_workers_share_the_partitions(kafka_settings: KafkaSettings, model_dir: Path,
                                          stream_frame: pd.DataFrame, kafka_client: str) -> None:
    frame = stream_frame.iloc[:6000]
    produce_frame(kafka_settings, frame.iloc[:10])
    group = f"g2-{kafka_settings.client_id}"
    pairs = [start_worker(kafka_settings, model_dir, group, kafka_client=kafka_client) for _ in range(2)]
    for _worker, thread, _box in pairs:
        thread.start()
    assert wait_for(lambda: all(w.consumer is not None and w.consumer.assignment() for w, _, _ in pairs))
    produce_frame(kafka_settings, frame.iloc[10:])
    assert wait_for(lambda: committed_to_end(kafka_settings, group), timeout_s=90)
    for worker, thread, _box in pairs:
        worker.stop.set()
        thread.join(timeout=60)
    consumed = [box["stats"].consumed for _, _, box in pairs]
    assert sum(consumed) == len(frame), consumed  # each record scored by exactly one worker
    assert all(n > 0 for n in consumed), consumed
    alerts = read_topic(kafka_settings, kafka_settings.alerts_topic)
    assert sorted(alert_ids(alerts)) == sorted(offline_flags(model_dir, frame))


def _worker_cmd(model_dir: Path, group: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "--model-dir", str(model_dir), "--consumer-group", group,
            "--device", "cpu", "--reload-interval-s", "0", *extra]


def test_sigterm_mid_stream_then_restart_loses_nothing(kafka_settings: KafkaSettings, kafka_env: dict,
                                                       model_dir: Path, stream_frame: pd.DataFrame,
                                                       tmp_path: Path, kafka_client: str) -> None:
    frame = stream_frame
    path = tmp_path / "stream.parquet"
    frame.to_parquet(path)
    produce_frame(kafka_settings, frame.iloc[:0])  # creates the topics
    group = f"g3-{kafka_settings.client_id}"
    env = {**kafka_env, "FRAUD_METRICS_PORT": "0", "FRAUD_KAFKA_CLIENT": kafka_client}
    cmd = _worker_cmd(model_dir, group, "--max-batch", "200", "--max-wait-ms", "20")
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    feeder = subprocess.Popen([sys.executable, "-m", "producer", "replay", str(path), "--rate", "600",
                               "--drop-label"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    assert wait_for(lambda: len(read_topic(kafka_settings, kafka_settings.alerts_topic, timeout_s=2)) > 0,
                    timeout_s=90), "the worker produced no alert"
    first.send_signal(signal.SIGTERM)
    out, _ = first.communicate(timeout=60)
    assert first.returncode == 0, out
    assert feeder.poll() is None, "the stream must still be flowing when SIGTERM lands"
    consumed_first = int(out.rsplit("consumed ", 1)[1].split(":")[0])
    assert 0 < consumed_first < len(frame)
    assert "finishing the batch in hand" in out
    feeder_out, _ = feeder.communicate(timeout=120)
    assert feeder.returncode == 0, feeder_out

    second = subprocess.run([*cmd, "--exit-when-idle", "3"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=180, check=False)
    assert second.returncode == 0, second.stdout + second.stderr
    consumed_second = int(second.stdout.rsplit("consumed ", 1)[1].split(":")[0])
    assert consumed_first + consumed_second == len(frame)  # clean hand-over: no gap, no repeat
    assert committed_to_end(kafka_settings, group)
    alerts = read_topic(kafka_settings, kafka_settings.alerts_topic)
    assert sorted(alert_ids(alerts)) == sorted(offline_flags(model_dir, frame))


def test_hot_reload_swaps_models_and_refuses_a_corrupted_one(kafka_settings: KafkaSettings, model_dir: Path,
                                                             tmp_path: Path, stream_frame: pd.DataFrame,
                                                             second_model_dir: Path) -> None:
    from pipeline.artifact import publish_current
    from pipeline.worker.reload import ModelWatcher

    root = tmp_path / "models"
    shutil.copytree(model_dir, root / model_dir.name)
    publish_current(root, root / model_dir.name)
    group = f"g4-{kafka_settings.client_id}"
    worker, thread, _box = start_worker(kafka_settings, root, group)
    from tests.worker_helpers import Scorer, load_artifact

    watcher = ModelWatcher(root, lambda p: Scorer(load_artifact(p), device="cpu"), worker.metrics, interval_s=0.1)
    worker.take_new_scorer = watcher.take
    watcher.start()
    thread.start()
    produce_frame(kafka_settings, stream_frame.iloc[:500])
    first_version = worker.scorer.artifact.version

    shutil.copytree(second_model_dir, root / second_model_dir.name)
    publish_current(root, root / second_model_dir.name)
    produce_frame(kafka_settings, stream_frame.iloc[500:1000])
    assert wait_for(lambda: worker.scorer.artifact.version != first_version, timeout_s=30)
    assert worker.metrics.registry.get_sample_value("fraud_model_reloads_total", {"result": "ok"}) == 1

    bad = root / "corrupted"
    shutil.copytree(second_model_dir, bad)
    weights = next(p for p in bad.iterdir() if p.name.startswith("weights"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    publish_current(root, bad)
    assert wait_for(lambda: worker.metrics.registry.get_sample_value("fraud_model_reloads_total",
                                                                     {"result": "refused"}) == 1, timeout_s=30)
    produce_frame(kafka_settings, stream_frame.iloc[1000:1500])
    assert wait_for(lambda: committed_to_end(kafka_settings, group), timeout_s=60)
    assert worker.scorer.artifact.version != first_version  # the good new model keeps serving
    worker.stop.set()
    thread.join(timeout=60)
    watcher.close()


def test_metrics_endpoint_exposes_the_series(kafka_settings: KafkaSettings, kafka_env: dict, model_dir: Path,
                                              stream_frame: pd.DataFrame) -> None:
    frame = stream_frame.iloc[:3000]
    produce_frame(kafka_settings, frame)
    produce_bad(kafka_settings)
    port = free_port()
    env = {**kafka_env, "FRAUD_METRICS_PORT": str(port), "FRAUD_METRICS_HOST": "127.0.0.1"}
    proc = subprocess.Popen(_worker_cmd(model_dir, f"g5-{kafka_settings.client_id}"), cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def scrape() -> str:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            except OSError:
                return ""
        total = len(frame) + len(BAD_RECORDS)
        assert wait_for(lambda: f'fraud_transactions_total{{outcome="scored"}} {float(len(frame))}' in scrape(),
                        timeout_s=90)
        text = scrape()
        samples = parse_samples(text)
        assert samples['fraud_transactions_total{outcome="invalid"}'] == len(BAD_RECORDS)
        assert samples["fraud_batch_size_sum"] == total
        assert samples["fraud_alerts_total"] >= 1
        assert samples['fraud_dead_letters_total{reason="not_json"}'] == 1
        assert samples["fraud_batches_total"] >= 1
        assert samples["fraud_scoring_seconds_count"] >= 1
        assert samples["fraud_end_to_end_latency_seconds_count"] == len(frame)
        assert samples["fraud_anomaly_score_count"] == len(frame)
        assert samples["fraud_model_threshold"] > 0
        assert 0 < samples["fraud_model_alert_rate"] < 0.1
        assert samples["fraud_loop_heartbeat_timestamp_seconds"] > 0
        assert samples["process_resident_memory_bytes"] > 0
        assert samples["fraud_score_drift_psi"] >= 0
        assert any(k.startswith("fraud_consumer_lag{") for k in samples)
        assert samples["fraud_assigned_partitions"] == 3  # the only worker in its group owns them all
        assert 'fraud_model_info{device="cpu"' in text and 'engine="numpy"' in text  # no GPU: served without torch
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "on cpu (NumPy, " in out


def test_bad_model_dir_is_refused_at_start(kafka_env: dict, tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{}")
    done = subprocess.run(_worker_cmd(tmp_path, "g6"), cwd=REPO, env={**kafka_env, "FRAUD_METRICS_PORT": "0"},
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "fraud-worker: error:" in done.stderr and "Traceback" not in done.stderr
    assert os.fspath(tmp_path) in done.stderr or "manifest" in done.stderr
    time.sleep(0)


def test_topics_with_fewer_replicas_than_configured_are_refused_at_start(kafka_settings: KafkaSettings,
                                                                          kafka_env: dict, model_dir: Path) -> None:
    """FRAUD_REPLICATION_FACTOR=2 with the output topics on one replica (the session broker has one node): one
    line naming each topic and its replicas, exit 2, before any record is read."""
    ensure_topics(kafka_settings, [kafka_settings.input_topic, kafka_settings.alerts_topic,
                                   kafka_settings.dead_letter_topic], 3)
    done = subprocess.run(_worker_cmd(model_dir, "g-rf"), cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**kafka_env, "FRAUD_METRICS_PORT": "0", "FRAUD_REPLICATION_FACTOR": "2"},
                          check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("fraud-worker: error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr
    assert f"{kafka_settings.alerts_topic} (1)" in errors[0] and f"{kafka_settings.dead_letter_topic} (1)" in errors[0]


def test_a_misspelled_input_topic_is_named_with_the_topic_meant(kafka_settings: KafkaSettings, kafka_env: dict,
                                                                model_dir: Path) -> None:
    """A typo in FRAUD_INPUT_TOPIC used to create an empty topic and idle with an INFO line: now a WARNING says
    the topic did not exist and names the existing one meant."""
    ensure_topics(kafka_settings, [kafka_settings.input_topic], 3)
    typo = kafka_settings.input_topic[:-1] + ("x" if not kafka_settings.input_topic.endswith("x") else "y")
    done = subprocess.run(_worker_cmd(model_dir, "g-typo", "--exit-when-idle", "1"), cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False,
                          env={**kafka_env, "FRAUD_METRICS_PORT": "0", "FRAUD_INPUT_TOPIC": typo})
    assert done.returncode == 0, done.stderr[-2000:]
    (line,) = [x for x in done.stderr.splitlines() if "does not exist" in x]
    assert " WARNING " in line and f"'{typo}'" in line and f"did you mean '{kafka_settings.input_topic}'?" in line


def test_broker_outage_mid_stream_loses_nothing(kafka_settings: KafkaSettings, kafka_env: dict, model_dir: Path,
                                                stream_frame: pd.DataFrame, broker_pid: int, kafka_client: str
                                                ) -> None:
    """The broker freezes (SIGSTOP) while the worker works through a backlog in small batches, so the freeze
    lands on a publish or a commit, never on an idle poll. 18 s: longer than the request timeout (3 s),
    the session timeout (10 s) and kafka-python's producer retries (5 x 3 s), each of which kafka-python
    otherwise rides out without a word (an 8-s freeze that landed on a publish went unnoticed once)."""
    frame = stream_frame
    produce_frame(kafka_settings, frame)
    group = f"g7-{kafka_settings.client_id}"
    env = {**kafka_env, "FRAUD_METRICS_PORT": "0", "FRAUD_REQUEST_TIMEOUT_MS": "3000",
           "FRAUD_MAX_RETRY_BACKOFF_S": "1", "FRAUD_KAFKA_CLIENT": kafka_client}
    # No idle exit: an outage is not idleness; the worker is stopped with SIGTERM at the end.
    cmd = _worker_cmd(model_dir, group, "--max-batch", "5", "--max-wait-ms", "10")
    worker = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Freeze as soon as the worker has committed something and not yet everything. (Waiting for its first
        # alert instead, through 2-s topic reads, once let the confluent client finish the backlog first.)
        seen: dict[int, tuple[int, int | None]] = {}

        def committed_some() -> bool:
            seen.update(input_progress(kafka_settings, group))
            return any(committed for _end, committed in seen.values())

        assert wait_for(committed_some, timeout_s=90, every_s=0.02), "the worker committed nothing"
        os.kill(broker_pid, signal.SIGSTOP)
        assert not all(committed == end for end, committed in seen.values()), \
            f"the worker must still be working when the broker freezes: {seen}"
        time.sleep(18)
    finally:
        os.kill(broker_pid, signal.SIGCONT)
    try:
        assert wait_for(lambda: committed_to_end_yet(kafka_settings, group), timeout_s=240)
    finally:
        worker.send_signal(signal.SIGTERM)
        out, _ = worker.communicate(timeout=120)
    assert worker.returncode == 0, out
    # The outage was felt (the worker's own retries, or a rebalance it caused) and survived.
    felt = ("publishing outputs failed", "committing offsets failed", "commit refused", "not acknowledged after")
    assert any(message in out for message in felt), out[-3000:]
    assert "Traceback" not in out
    alerts = set(alert_ids(read_topic(kafka_settings, kafka_settings.alerts_topic)))
    assert alerts == offline_flags(model_dir, frame)  # duplicates allowed (at-least-once), losses not
