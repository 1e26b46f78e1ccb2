"""The Scorer the worker and ``fraud-train score`` share: shapes, flags, chunking, explanations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.neighbors import NearestNeighbors

from pipeline.artifact import ModelArtifact
from pipeline.errors import ConfigError, InputDataError
from pipeline.features import HANDBOOK
from pipeline.scoring import ScoreBatch, Scorer, available_cpus, resolve_device, score_frame
from producer.simulator import SimulatorConfig, simulate
from trainer.fit import FitOptions, run_fit
from trainer.split import SplitSpec
from trainer.train import TrainConfig


@pytest.fixture(scope="module")
def data() -> pd.DataFrame:
    return simulate(SimulatorConfig(n_customers=200, n_terminals=400, n_days=50, seed=5))


@pytest.fixture(scope="module", params=["reconstruction", "hybrid"])
def artifact(data: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
             ) -> ModelArtifact:
    """A version of each scoring method: every test here holds for both."""
    options = FitOptions(output=tmp_path_factory.mktemp("models"), baselines=False, device="cpu",
                         train=TrainConfig(epochs=5, progress=False), split=SplitSpec(start="2018-04-15"),
                         score=request.param)
    return run_fit(data, HANDBOOK, options).artifact


def raw_rows(data: pd.DataFrame, artifact: ModelArtifact) -> np.ndarray:
    return data[list(artifact.feature_names)].to_numpy(np.float32)


def test_score_batch_shapes_and_meaning(data: pd.DataFrame, artifact: ModelArtifact) -> None:
    raw = raw_rows(data, artifact)[:1000]
    batch = Scorer(artifact, device="cpu").score(raw)
    n, f = raw.shape
    assert batch.scores.shape == (n,) and batch.scores.dtype == np.float32
    assert batch.flags.dtype == bool and batch.feature_errors.shape == (n, f)
    assert batch.reconstruction.shape == (n, f) and batch.reconstruction.dtype == np.float32
    np.testing.assert_array_equal(batch.flags, batch.scores > artifact.threshold)
    mse = batch.feature_errors.mean(axis=1)
    if artifact.scoring.method == "reconstruction":
        np.testing.assert_allclose(mse, batch.scores, rtol=1e-6)
    else:  # hybrid: plus the weighted mean distance to the 5 nearest (clipped) bank rows, each part over its scale
        spec = artifact.scoring
        x = np.clip(artifact.preprocessing.transform(raw), -spec.clip, spec.clip)
        bank = np.clip(artifact.bank.numpy(), -spec.clip, spec.clip)  # stored as is, clipped when scoring
        knn = NearestNeighbors(n_neighbors=5).fit(bank).kneighbors(x)[0].mean(axis=1)  # an independent kNN
        expected = mse / spec.reconstruction_scale + spec.distance_weight * knn / spec.distance_scale
        np.testing.assert_allclose(batch.scores, expected, rtol=1e-4, atol=1e-5)
        assert artifact.manifest["format_version"] == 2 and bank.shape[1] == f
    standardized = artifact.preprocessing.transform(batch.reconstruction)
    np.testing.assert_allclose(np.square(standardized - artifact.preprocessing.transform(raw)),
                               batch.feature_errors, rtol=1e-3, atol=1e-3)


def test_chunking_does_not_change_scores(data: pd.DataFrame, artifact: ModelArtifact) -> None:
    raw = raw_rows(data, artifact)[:120]
    whole = Scorer(artifact, device="cpu").score(raw).scores
    chunked = Scorer(artifact, device="cpu", max_batch=7).score(raw).scores
    np.testing.assert_allclose(whole, chunked, rtol=1e-5)


def test_alert_rate_holds_on_normal_rows(data: pd.DataFrame, artifact: ModelArtifact) -> None:
    normal = data[(data["TX_FRAUD"] == 0) & (data["TX_DATETIME"] >= "2018-04-15")]
    share = score_frame(Scorer(artifact, device="cpu"), normal).flags.mean()
    assert 0 < share < 10 * artifact.alert_rate


def test_top_features_point_at_the_odd_value(data: pd.DataFrame, artifact: ModelArtifact) -> None:
    raw = raw_rows(data, artifact)[-50:].copy()
    column = artifact.feature_names.index("CUSTOMER_ID_NB_TX_1DAY_WINDOW")
    raw[0, column] = 500.0  # a customer paying 500 times in a day
    batch = Scorer(artifact, device="cpu").score(raw)
    top = batch.top_features(0, raw[0], k=3)
    assert len(top) == 3 and set(top[0]) == {"name", "value", "reconstruction", "z"}
    assert top[0]["name"] == "CUSTOMER_ID_NB_TX_1DAY_WINDOW" and top[0]["value"] == 500.0
    assert [t["z"] for t in top] == sorted((t["z"] for t in top), reverse=True)
    assert batch.scores[0] > batch.scores[1:].max()
    assert len(batch.top_features(1, raw[1], k=100)) == len(artifact.feature_names)


def test_empty_and_malformed_input(artifact: ModelArtifact) -> None:
    scorer = Scorer(artifact, device="cpu")
    empty = scorer.score(np.zeros((0, len(artifact.feature_names)), np.float32))
    assert isinstance(empty, ScoreBatch) and empty.scores.shape == (0,) and empty.feature_errors.shape[0] == 0
    with pytest.raises(InputDataError, match=r"shape \(n, 15\)"):
        scorer.score(np.zeros((3, 4), np.float32))
    with pytest.raises(InputDataError, match="column 'TX_AMOUNT' is missing"):
        score_frame(scorer, pd.DataFrame({"x": [1.0]}))


def test_device_resolution() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


def test_cpu_threads_are_set_and_capped(artifact: ModelArtifact) -> None:
    before = torch.get_num_threads()
    try:
        Scorer(artifact, device="cpu", threads=1)
        assert torch.get_num_threads() == 1
        Scorer(artifact, device="cpu", threads=10_000)
        assert torch.get_num_threads() == available_cpus()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("cpu_max, expected", [("max 100000\n", None), ("150000 100000\n", 2),
                                               ("50000 100000\n", 1), ("garbage", None)])
def test_available_cpus_respects_a_cgroup_quota(tmp_path: Path, cpu_max: str, expected: int | None) -> None:
    (tmp_path / "cpu.max").write_text(cpu_max)
    unlimited = available_cpus(tmp_path / "missing")
    assert available_cpus(tmp_path / "cpu.max") == min(unlimited, expected or unlimited)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(data: pd.DataFrame, artifact: ModelArtifact, tmp_path: Path) -> None:
    raw = raw_rows(data, artifact)[:3000]
    cpu = Scorer(artifact, device="cpu").score(raw).scores
    gpu_scorer = Scorer(artifact, device="cuda", max_batch=1024)
    gpu = gpu_scorer.score(raw).scores
    np.testing.assert_allclose(cpu, gpu, rtol=1e-3, atol=1e-5)
    assert [b.is_pinned() for b in gpu_scorer._pinned.values()] == [True, True]  # inputs and results
