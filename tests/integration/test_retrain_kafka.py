"""``fraud-train retrain`` on a real broker: a raw-input worker streams a simulated bank with its labels and publishes
every scored transaction's features; retrain reads the features and labels topics into a training table (joined by
transaction id), fits a new version like the current one, compares the two on the newest labelled week and
publishes the new one as the model root's challenger."""

from __future__ import annotations

import dataclasses
import json
import shutil
import uuid
from pathlib import Path

import pandas as pd
import pytest

from pipeline.artifact import CHALLENGER, CURRENT, load_artifact, publish_current
from pipeline.config import KafkaSettings
from pipeline.topics import ensure_topics
from producer.rawfeed import raw_messages
from producer.tables import resolve_spec
from tests.worker_helpers import send_messages, start_worker, wait_for
from trainer.cli import run

pytestmark = pytest.mark.integration


def test_retrain_reads_the_stream_into_an_exact_table_and_publishes_a_challenger(
        kafka_settings: KafkaSettings, simulated: pd.DataFrame, raw_model_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    settings = dataclasses.replace(kafka_settings, features_topic=f"features-{uuid.uuid4().hex[:8]}",
                                   labels_topic=f"labels-{uuid.uuid4().hex[:8]}")
    root = tmp_path / "models"
    root.mkdir()
    current = Path(shutil.copytree(raw_model_dir, root / raw_model_dir.name))
    publish_current(root, current, CURRENT)
    ensure_topics(settings, [settings.input_topic, settings.labels_topic, settings.alerts_topic,
                             settings.dead_letter_topic, settings.features_topic or ""], 3)
    messages = list(raw_messages(simulated, resolve_spec(simulated, "handbook"), settings.input_topic,
                                 settings.labels_topic, 7.0))
    transactions = sum(m[0] == settings.input_topic for m in messages)
    worker, thread, _box = start_worker(settings, root, f"g-{uuid.uuid4().hex[:8]}", max_batch=4096)
    thread.start()
    try:
        send_messages(settings, messages)
        assert wait_for(lambda: worker.stats.scored + worker.stats.invalid >= transactions, 180)
    finally:
        worker.stop.set()
        thread.join(30)
    assert worker.stats.invalid == 0

    day0 = simulated["TX_DATETIME"].min().normalize()
    # the stream's newest transaction is late in day 69 (of 0..69): labels are due for the days before 62
    since, until = (day0 + pd.Timedelta(days=d) for d in (30, 62))
    flags = ["--model", str(root), "--bootstrap-servers", settings.bootstrap_servers, "--features-topic",
             settings.features_topic or "", "--labels-topic", settings.labels_topic, "--epochs", "2", "--device", "cpu",
             "--quiet"]
    assert run(["retrain", "--since", f"{since:%Y-%m-%d}", "--until", f"{until:%Y-%m-%d}", *flags]) == 0
    out = capsys.readouterr().out

    in_range = simulated[(simulated["TX_DATETIME"] >= since) & (simulated["TX_DATETIME"] < until)]
    frauds = int(in_range["TX_FRAUD"].sum())
    assert frauds > 0
    assert f"training table from the stream: {len(in_range)} transactions ({frauds} frauds)" in out, out
    challenger = load_artifact(root / CHALLENGER)
    served = load_artifact(root / CURRENT)
    assert served.version == current.name and challenger.version != served.version
    assert challenger.input_form == "raw" and challenger.feature_names == served.feature_names
    assert challenger.scoring.method == served.scoring.method
    # trained on the normal transactions before validation (the last fifth of the 25 days before the test week):
    # the days [30, 50)
    train = in_range[in_range["TX_DATETIME"] < since + pd.Timedelta(days=20)]
    manifest = json.loads((challenger.path / "manifest.json").read_text())
    assert manifest["training_data"]["rows"] == int((train["TX_FRAUD"] == 0).sum())
    test = in_range[in_range["TX_DATETIME"] >= until - pd.Timedelta(days=7)]
    assert f"{len(test)} transactions, {int(test['TX_FRAUD'].sum())} frauds" in out, out
    assert f"new      {challenger.version}: average precision" in out
    assert f"current  {served.version}: average precision" in out

    # labels not due yet for the whole range: one line, exit 2, nothing published
    late = until + pd.Timedelta(days=3)
    assert run(["retrain", "--since", f"{since:%Y-%m-%d}", "--until", f"{late:%Y-%m-%d}", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "past the labels that are due" in err and f"{until:%Y-%m-%d}" in err, err
    assert load_artifact(root / CHALLENGER).version == challenger.version
