"""``fraud-train``: time splits, calibration, the fit/evaluate/score commands and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.artifact import load_artifact
from pipeline.models import ModelConfig, build_model
from producer.simulator import SimulatorConfig, simulate
from trainer.calibrate import labelled_calibration, score_histogram, threshold_for
from trainer.cli import run
from trainer.split import SplitSpec, time_split
from trainer.train import TrainConfig, fit

FAST = ["--quiet", "--device", "cpu"]
FIT_FAST = ["--epochs", "3", "--start", "2018-04-10"]


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tx.parquet"
    simulate(SimulatorConfig(n_customers=200, n_terminals=400, n_days=40, seed=7)).to_parquet(path)
    return path


def fail(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI expecting exit 2 with one 'fraud-train: error:' line; returns that line."""
    assert run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fraud-train: error: ") and "Traceback" not in err and len(err.splitlines()) == 1
    return err


def test_time_split_is_ordered_and_disjoint() -> None:
    times = pd.Series(pd.date_range("2018-04-01", periods=120, freq="D")).sample(frac=1, random_state=0)
    split = time_split(times, SplitSpec(start="2018-05-01", val_start="2018-06-25", test_start="2018-07-01"))
    t = times.to_numpy()
    assert t[split.train].min() == np.datetime64("2018-05-01") and t[split.train].max() < t[split.val].min()
    assert t[split.val].max() < t[split.test].min() and t[split.test].min() == np.datetime64("2018-07-01")
    assert not (split.train & split.val).any() and not (split.val & split.test).any()
    by_fraction = time_split(times, SplitSpec(val_fraction=0.25, test_fraction=0.25))
    assert t[by_fraction.train].max() < t[by_fraction.val].min() < t[by_fraction.test].min()
    assert by_fraction.test.sum() == 30


def test_training_is_deterministic_for_a_seed() -> None:
    x = np.random.default_rng(0).normal(size=(2000, 6)).astype(np.float32)
    weights = []
    for _ in range(2):
        torch.manual_seed(4)
        model = build_model("denoising", ModelConfig(n_features=6, hidden=(8,), bottleneck=3))
        fit(model, x[:1500], x[1500:], TrainConfig(epochs=2, progress=False, seed=4), torch.device("cpu"))
        weights.append(model.state_dict())
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key])


def test_calibration() -> None:
    scores = np.linspace(0, 1, 10_001)
    threshold = threshold_for(scores, 0.01)
    assert (scores > threshold).mean() == pytest.approx(0.01, abs=2e-4)
    histogram = score_histogram(scores)
    assert histogram.counts.sum() == len(scores) and np.all(np.diff(histogram.edges) > 0)
    labels = (scores > 0.9).astype(int)
    calibration = labelled_calibration(scores, labels, threshold)
    assert calibration.precision == 1.0 and calibration.best_f1 == 1.0
    assert np.all((scores > calibration.best_f1_threshold) == labels.astype(bool))


def test_fit_evaluate_score_end_to_end(table: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "models"
    assert run([*FAST, "fit", "--data", str(table), "--output", str(root), *FIT_FAST]) == 0
    artifact = load_artifact(root)
    folder = artifact.path
    for name in ("report.md", "metrics.json", "loss.png", "scores.png", "curves.png"):
        assert (folder / name).is_file(), name
    metrics = json.loads((folder / "metrics.json").read_text())
    assert set(metrics["detectors"]) == {"autoencoder", "isolation_forest", "pca"}
    assert "card precision@100/day" in (folder / "report.md").read_text()
    assert artifact.manifest["training_data"]["fingerprint_sha256"]

    ev = tmp_path / "ev"
    assert run([*FAST, "evaluate", "--model", str(root), "--data", str(table), "--report", str(ev),
                "--start", "2018-05-01"]) == 0
    assert json.loads((ev / "metrics.json").read_text())["context"]["test_rows"] < len(pd.read_parquet(table))
    out = tmp_path / "scores.csv"
    assert run([*FAST, "score", "--model", str(root), "--data", str(table), "--output", str(out)]) == 0
    scored = pd.read_csv(out)
    assert list(scored.columns) == ["TRANSACTION_ID", "TX_FRAUD", "score", "flag", "top_features"]
    flagged = scored[scored["flag"]]
    assert len(flagged) > 0 and (flagged["score"] > artifact.threshold).all()
    assert json.loads(flagged["top_features"].iloc[0])[0]["name"] in artifact.feature_names


def test_generic_csv_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    n = 1500
    frame = pd.DataFrame({"t": np.arange(n), "a": rng.normal(size=n), "b": rng.exponential(size=n),
                          "y": (rng.random(n) < 0.02).astype(int), "note": "x"})
    frame.loc[frame["y"] == 1, "a"] += 6
    frame.to_csv(tmp_path / "g.csv", index=False)
    argv = [*FAST, "fit", "--data", str(tmp_path / "g.csv"), "--output", str(tmp_path / "m"), "--features", "a,b",
            "--label-column", "y", "--time-column", "t", "--time-unit", "s", "--epochs", "2", "--no-baselines",
            "--log-features", "b"]
    assert run(argv) == 0
    artifact = load_artifact(tmp_path / "m")
    assert artifact.feature_names == ("a", "b") and artifact.preprocessing.log_features == ("b",)


def test_a_stray_word_in_a_numeric_column_stops_fit_with_the_row(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(2)
    frame = pd.DataFrame({"t": np.arange(400), "a": rng.normal(size=400).astype(object), "b": rng.normal(size=400),
                          "label": (rng.random(400) < 0.05).astype(int), "note": "x"})
    frame.loc[123, "a"] = "abc"
    frame.to_csv(tmp_path / "g.csv", index=False)
    argv = [*FAST, "fit", "--data", str(tmp_path / "g.csv"), "--output", str(tmp_path / "m"), "--time-column", "t",
            "--time-unit", "s", "--epochs", "1", "--no-baselines"]
    assert "column 'a', data row 124 (1-based, header not counted): 'abc' is not a number" in fail(argv, capsys)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--features", "TX_AMOUNT,NOPE", "--label-column", "TX_FRAUD", "--time-column", "TX_DATETIME"],
         "--features 'NOPE': the table has no such column"),
        (["--val-start", "2018-03-01", "--test-start", "2018-05-01"], "training set is empty"),
        (["--layout", "martian"], "unknown layout 'martian'"),
        (["--label-column", "tx_fraud"], "--label-column 'tx_fraud': the table has no such column (did you mean "
                                         "'TX_FRAUD'?)"),
        (["--time-column", "TX_DATETIM"], "--time-column 'TX_DATETIM': the table has no such column (did you mean "
                                          "'TX_DATETIME'?)"),
        (["--log-features", "TX_AMOUNT,CUSTOMER_ID"], "--log-features column 'CUSTOMER_ID' is not one of the features"),
    ],
)
def test_bad_arguments_get_one_clear_line(table: Path, tmp_path: Path, extra: list[str], expected: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    argv = [*FAST, "fit", "--data", str(table), "--output", str(tmp_path / "m"), "--epochs", "1", *extra]
    assert expected in fail(argv, capsys)


def test_model_dir_and_device_come_from_the_shared_settings(table: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "shared-models"
    monkeypatch.setenv("FRAUD_MODEL_DIR", str(root))  # what the worker reads too
    monkeypatch.setenv("FRAUD_DEVICE", "cpu")
    assert run(["--quiet", "fit", "--data", str(table), "--no-baselines", *FIT_FAST]) == 0
    assert load_artifact(root).version == (root / "current").resolve().name
    out = tmp_path / "scores.parquet"
    assert run(["--quiet", "score", "--data", str(table), "--output", str(out)]) == 0
    assert len(pd.read_parquet(out)) == len(pd.read_parquet(table))
    monkeypatch.setenv("FRAUD_DEVICE", "gpu")
    assert "device='gpu': use auto, cpu, cuda or cuda:N" in fail(["--quiet", "score", "--data", str(table),
                                                                 "--output", str(out)], capsys)
    monkeypatch.setenv("FRAUD_DEVICE", "cpu")
    assert "device='tpu': use auto, cpu, cuda or cuda:N" in fail(["--quiet", "--device", "tpu", "score", "--data",
                                                                 str(table), "--output", str(out)], capsys)


def test_bad_values_name_the_column(table: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    frame = pd.read_parquet(table)
    broken = frame.assign(TX_AMOUNT=frame["TX_AMOUNT"].astype(object))
    broken.loc[3, "TX_AMOUNT"] = "twelve"
    broken.to_csv(tmp_path / "text.csv", index=False)
    err = fail([*FAST, "fit", "--data", str(tmp_path / "text.csv"), "--output", str(tmp_path / "m")], capsys)
    assert "column 'TX_AMOUNT', data row 4 (1-based, header not counted): 'twelve' is not a number" in err
    holes = frame.copy()
    holes.loc[[5, 9], "TERMINAL_ID_RISK_7DAY_WINDOW"] = np.nan
    holes.to_parquet(tmp_path / "nan.parquet")
    err = fail([*FAST, "fit", "--data", str(tmp_path / "nan.parquet"), "--output", str(tmp_path / "m")], capsys)
    assert "column 'TERMINAL_ID_RISK_7DAY_WINDOW' has 2 missing" in err
    err = fail([*FAST, "score", "--model", str(tmp_path / "none"), "--data", str(table), "--output", "x.csv"], capsys)
    assert "manifest.json not found" in err
