"""Versions fitted with labels (``fit --score finetuned|stacked``): label delay, export, serving, explanations."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest
import torch

from pipeline.artifact import ModelArtifact, load_artifact
from pipeline.classifier import KINDS, attributions, fraud_logits
from pipeline.errors import InputDataError
from pipeline.features import HANDBOOK
from pipeline.schema import encode
from pipeline.scoring import Scorer, score_frame
from pipeline.worker.processing import BatchProcessor, Topics
from producer.simulator import SimulatorConfig, simulate
from tests.worker_helpers import Record
from trainer import options, supervised
from trainer.cli import run
from trainer.fit import FitOptions, FitResult, run_fit
from trainer.labels import DEFAULT_LABEL_DELAY_DAYS, known_labels, labelled_rows
from trainer.split import SplitSpec, time_split
from trainer.train import TrainConfig

# Train 04-10..05-05, validate 05-06..05-12, test from 05-13; a 10-day delay leaves 05-03..05-05 of the
# training rows (and every validation row) unlabelled at training time.
SPLIT = SplitSpec(start="2018-04-10", val_start="2018-05-06", test_start="2018-05-13", end="2018-05-21")
DELAY = 10
CUTOFF = np.datetime64("2018-05-03")


@pytest.fixture(scope="module")
def data() -> pd.DataFrame:
    return simulate(SimulatorConfig(n_customers=200, n_terminals=400, n_days=50, seed=5))


def fit_labels(data: pd.DataFrame, root: Path, kind: str, baselines: bool = False) -> FitResult:
    return run_fit(data, HANDBOOK, FitOptions(
        output=root, score=kind, device="cpu", baselines=baselines, label_delay_days=DELAY, split=SPLIT,
        train=TrainConfig(epochs=3, progress=False)))


@pytest.fixture(scope="module", params=KINDS)
def fitted(data: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
           ) -> FitResult:
    """A version of each kind; every test using it holds for both."""
    return fit_labels(data, tmp_path_factory.mktemp("models"), request.param, baselines=request.param == "stacked")


def raw_rows(data: pd.DataFrame, artifact: ModelArtifact) -> np.ndarray:
    return data[list(artifact.feature_names)].to_numpy(np.float32)


def test_the_version_describes_its_classifier_and_labels(fitted: FitResult) -> None:
    artifact = fitted.artifact
    kind = artifact.classifier.kind
    assert artifact.manifest["format_version"] == 3 and artifact.manifest["classifier"]["kind"] == kind
    labels = artifact.manifest["training_data"]["labels"]
    assert labels["label_delay_days"] == DELAY and labels["label_cutoff"] == "2018-05-03 00:00:00"
    assert labels["classifier_frauds"] > 0 and labels["classifier_validation_frauds"] > 0
    validation = artifact.manifest["metrics"]["validation"]
    assert validation["scoring"] == kind and 0 <= validation["classifier_validation"]["average_precision"] <= 1
    assert artifact.manifest["metrics"]["classifier_training"]["best_epoch"] >= 1
    reloaded = load_artifact(artifact.path).build_classifier()
    for key, value in artifact.build_classifier().state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key])


def test_scorer_serves_the_fraud_probability_with_contributions(data: pd.DataFrame, fitted: FitResult) -> None:
    artifact = fitted.artifact
    raw = raw_rows(data, artifact)
    batch = Scorer(artifact, device="cpu").score(raw)
    x = artifact.preprocessing.transform(raw)
    classifier, model = artifact.build_classifier(), artifact.build_model()
    np.testing.assert_allclose(batch.scores, supervised.probabilities(classifier, model, x, torch.device("cpu")),
                               rtol=1e-6, atol=1e-7)  # what calibration saw is what the worker serves
    assert batch.scores.min() >= 0 and batch.scores.max() <= 1
    np.testing.assert_array_equal(batch.flags, batch.scores > artifact.threshold)
    flagged = np.flatnonzero(batch.flags)
    assert 0 < len(flagged) < len(raw) // 10
    assert np.isfinite(batch.contributions[flagged]).all() and np.isnan(batch.contributions[~batch.flags]).all()
    # Integrated gradients: the contributions add up to the logit's rise from the mean normal row.
    with torch.no_grad():
        rows = torch.from_numpy(x[flagged])
        rise = (fraud_logits(classifier, model, rows) - fraud_logits(classifier, model, torch.zeros_like(rows)))
    np.testing.assert_allclose(batch.contributions[flagged].sum(axis=1), rise.numpy(), rtol=0.03, atol=0.05)
    i = int(flagged[0])
    top = batch.top_features(i, raw[i], k=4)
    assert [t["name"] for t in top] == [artifact.feature_names[j] for j in np.argsort(-batch.contributions[i])[:4]]
    assert all(set(t) == {"name", "value", "reconstruction", "z", "contribution"} for t in top)
    assert top[0]["contribution"] >= top[1]["contribution"] >= top[3]["contribution"]
    whole = score_frame(Scorer(artifact, device="cpu"), data, chunk_rows=5000)  # chunks join their contributions
    np.testing.assert_allclose(whole.contributions[flagged], batch.contributions[flagged], rtol=1e-5, atol=1e-6)


def test_attributions_work_under_inference_mode(fitted: FitResult) -> None:
    classifier, model = fitted.artifact.build_classifier(), fitted.artifact.build_model()
    with torch.inference_mode():
        x = torch.randn(5, len(fitted.artifact.feature_names))  # an inference tensor
        inside = attributions(classifier, model, x)
    torch.testing.assert_close(inside, attributions(classifier, model, x.clone()))


def test_worker_alerts_carry_the_probability_and_explanations(data: pd.DataFrame, fitted: FitResult) -> None:
    artifact = fitted.artifact
    scorer = Scorer(artifact, device="cpu")
    raw = raw_rows(data, artifact)
    flagged = np.flatnonzero(scorer.score(raw).flags)[:5]
    records = [Record(encode({"transaction_id": f"t{i}", "event_time": 1_525_000_000_000 + int(i),
                              **dict(zip(artifact.feature_names, map(float, raw[i]), strict=True))}), offset=n)
               for n, i in enumerate(flagged)]
    huge = {"transaction_id": "huge", "event_time": 1_525_000_000_000, **{n: 1e30 for n in artifact.feature_names}}
    records.append(Record(encode(huge), offset=len(records)))
    processor = BatchProcessor(scorer, Topics("alerts", "dlq"), "w1", max_record_bytes=65536, top_features=3)
    outcome = processor.process(records)
    alerts = [orjson.loads(o.value) for o in outcome.outputs if o.topic == "alerts"]
    assert outcome.invalid == 0 and len(alerts) >= len(flagged)
    for alert in alerts:
        assert len(alert["top_features"]) == 3
        if alert["transaction_id"] != "huge":
            assert 0 <= alert["threshold"] < alert["score"] <= 1 and alert["model_version"] == artifact.version
            assert alert["top_features"][0]["contribution"] >= alert["top_features"][1]["contribution"]


def test_rows_inside_the_label_delay_are_never_used_as_labelled(data: pd.DataFrame, tmp_path: Path) -> None:
    times = data["TX_DATETIME"].to_numpy()
    late = times >= CUTOFF  # labels not yet known when training ends (05-13) with a 10-day delay
    assert (late & (times < np.datetime64("2018-05-06"))).any()  # some of them are training rows
    base = fit_labels(data, tmp_path / "base", "stacked")
    assert not (base.labelled.fit | base.labelled.val)[late].any()
    flipped = data.assign(TX_FRAUD=np.where(late, 1 - data["TX_FRAUD"], data["TX_FRAUD"]))
    again = fit_labels(flipped, tmp_path / "flipped", "stacked")
    for make in ("build_model", "build_classifier"):  # labels after the cutoff change nothing
        for key, value in getattr(base.artifact, make)().state_dict().items():
            assert torch.equal(value, getattr(again.artifact, make)().state_dict()[key]), (make, key)
    assert base.artifact.threshold == again.artifact.threshold
    # The same flip before the cutoff does change the classifier: the check above can fail.
    early = (times >= np.datetime64("2018-04-20")) & ~late
    changed = fit_labels(data.assign(TX_FRAUD=np.where(early, 1 - data["TX_FRAUD"], data["TX_FRAUD"])),
                         tmp_path / "early", "stacked")
    assert not all(torch.equal(value, changed.artifact.build_classifier().state_dict()[key])
                   for key, value in base.artifact.build_classifier().state_dict().items())


def test_known_labels_and_the_classifiers_rows() -> None:
    times = pd.Series(pd.date_range("2018-05-01", periods=100, freq="6h"))  # to 05-25 18:00
    spec = SplitSpec(val_start="2018-05-20", test_start="2018-05-24")
    split = time_split(times, spec)
    known = known_labels(times, split, spec, 6)  # trained at 05-24: labels known before 05-18
    assert times[known].max() < pd.Timestamp("2018-05-18") <= times[~known].min()
    assert (split.train & ~known).sum() == 8  # 05-18 00:00 .. 05-19 18:00
    labels = np.zeros(100, np.int8)
    labels[[5, 62]] = 1  # one fraud in each part
    rows = labelled_rows(times, split, spec, labels, known, 6)
    assert not (rows.fit & rows.val).any() and ((rows.fit | rows.val) == (split.train & known)).all()
    assert times[rows.fit].max() < times[rows.val].min() and rows.cutoff == "2018-05-18 00:00:00"
    assert rows.val.sum() == 11 and rows.describe(labels)["classifier_validation_frauds"] == 1
    no_test = dataclasses.replace(spec, val_start=None, test_start=None, test_fraction=0.0)
    untimed = time_split(None, no_test, n_rows=100)
    assert known_labels(None, untimed, no_test, 0).all()  # row order: only a zero delay has a meaning
    with pytest.raises(InputDataError, match="--label-delay-days needs event times"):
        known_labels(None, untimed, no_test, 7)
    labels[62] = 0
    with pytest.raises(InputDataError, match=r"validation \(the last 15 %\) rows .* hold 0 frauds in 11 rows"):
        labelled_rows(times, split, spec, labels, known, 6)


def test_label_modes_are_refused_clearly(data: pd.DataFrame, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    unlabelled = tmp_path / "unlabelled.parquet"
    data.drop(columns=["TX_FRAUD", "TX_FRAUD_SCENARIO"]).to_parquet(unlabelled)
    cases = [
        (["--data", str(unlabelled), "--score", "finetuned"], "--score finetuned trains a classifier on labelled "
                                                               "rows, but the table has no label column (TX_FRAUD)"),
        (["--data", str(unlabelled), "--score", "hybrid", "--label-delay-days", "3"],
         "--label-delay-days applies to --score finetuned or stacked only"),
    ]
    for extra, expected in cases:
        assert run(["--quiet", "--device", "cpu", "fit", "--output", str(tmp_path / "m"), "--epochs", "1",
                    *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("fraud-train: error: ") and expected in err and len(err.splitlines()) == 1
    assert not (tmp_path / "m").exists()


def test_cli_names_agree_with_the_library() -> None:
    assert options.LABEL_SCORES == KINDS and options.DEFAULT_LABEL_DELAY_DAYS == DEFAULT_LABEL_DELAY_DAYS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(data: pd.DataFrame, fitted: FitResult) -> None:
    raw = raw_rows(data, fitted.artifact)
    cpu = Scorer(fitted.artifact, device="cpu").score(raw)
    gpu = Scorer(fitted.artifact, device="cuda", max_batch=1024).score(raw)
    np.testing.assert_allclose(gpu.scores, cpu.scores, rtol=1e-3, atol=1e-5)
    both = cpu.flags & gpu.flags
    np.testing.assert_allclose(gpu.contributions[both], cpu.contributions[both], rtol=1e-2, atol=1e-3)


@pytest.mark.slow
def test_labels_benchmark_runs_on_simulated_april_to_july(tmp_path: Path) -> None:
    data = tmp_path / "tx.parquet"
    simulate(SimulatorConfig(n_customers=200, n_terminals=400, n_days=122, seed=2)).to_parquet(data)
    doc = tmp_path / "quality.md"
    doc.write_text("# Model quality\n\nkept\n")
    done = subprocess.run([sys.executable, "quality/labels.py", "--data", str(data), "--out", str(doc), "--json",
                           str(tmp_path / "labels.json"), "--epochs", "2"], cwd=Path(__file__).resolve().parents[2],
                          capture_output=True, text=True, timeout=280, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    results = json.loads((tmp_path / "labels.json").read_text())
    assert list(results) == ["unsupervised (default)", "finetuned", "stacked", "hist_gradient_boosting"]
    for entry in results.values():
        assert 0.5 < entry["roc_auc"] <= 1 and 0 <= entry["card_precision_at_100_per_day"] <= 1
    assert results["finetuned"]["labels"] == results["stacked"]["labels"]  # the same labelled rows
    text = doc.read_text()
    assert "kept" in text and "<!-- labels:begin -->" in text and "| hist_gradient_boosting |" in text
