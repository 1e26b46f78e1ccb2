"""The model zoo: one contract every model type passes, and each type's own behaviour."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from pipeline.artifact import load_artifact
from pipeline.features import HANDBOOK
from pipeline.models import MODELS, MemAE, ModelConfig, build_model
from pipeline.scoring import Scorer, score_frame
from producer.simulator import SimulatorConfig, simulate
from trainer.fit import FitOptions, run_fit
from trainer.split import SplitSpec
from trainer.train import TrainConfig


@pytest.fixture(scope="module")
def transactions() -> pd.DataFrame:
    """Two months of simulated handbook transactions (~25k rows, ~0.7 % fraud)."""
    return simulate(SimulatorConfig(n_customers=250, n_terminals=500, n_days=61, seed=3))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_contract(name: str, transactions: pd.DataFrame, tmp_path: Path) -> None:
    """Every model type: learns, exports, reloads to identical scores, ranks frauds above normals."""
    options = FitOptions(
        output=tmp_path, model=name, baselines=False, device="cpu",
        train=TrainConfig(epochs=6, patience=6, progress=False, seed=1),
        split=SplitSpec(start="2018-04-15", val_start="2018-05-10", test_start="2018-05-17"),
    )
    result = run_fit(transactions, HANDBOOK, options)
    assert result.history.val_loss[-1] < result.history.val_loss[0]
    assert result.history.train_loss[-1] < result.history.train_loss[0]

    artifact = load_artifact(tmp_path)  # through the `current` link
    assert artifact.version == result.artifact.version
    assert artifact.model_class == name
    test = transactions[transactions["TX_DATETIME"] >= "2018-05-17"]
    scores = score_frame(Scorer(artifact, device="cpu"), test).scores
    again = score_frame(Scorer(load_artifact(result.version_dir), device="cpu"), test).scores
    np.testing.assert_array_equal(scores, again)
    assert scores.dtype == np.float32 and np.all(scores >= 0)
    assert roc_auc_score(test["TX_FRAUD"], scores) > 0.7
    assert scores[test["TX_FRAUD"].to_numpy() == 1].mean() > scores[test["TX_FRAUD"].to_numpy() == 0].mean()
    assert (result.version_dir / "report.md").is_file()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_shape_and_eval_determinism(name: str) -> None:
    """(batch, features) in, same shape out; eval mode is deterministic."""
    torch.manual_seed(0)
    model = build_model(name, ModelConfig(n_features=7, hidden=(16,), bottleneck=3, memory_slots=20,
                                          shrink_threshold=0.05)).eval()
    x = torch.randn(5, 7)
    assert model(x).shape == (5, 7)
    assert torch.equal(model(x), model(x))
    loss = model.train().training_loss(x)
    loss.backward()
    assert loss.ndim == 0 and all(p.grad is not None for p in model.parameters())


def test_denoising_adds_noise_only_in_training() -> None:
    model = build_model("denoising", ModelConfig(n_features=4, noise_std=0.5))
    x = torch.zeros(3, 4)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_memae_addressing_is_sparse_and_convex() -> None:
    torch.manual_seed(0)
    model = MemAE(ModelConfig(n_features=6, bottleneck=4, memory_slots=50, shrink_threshold=0.04))
    w = model.address(torch.randn(32, 4))  # (batch, slots)
    assert w.shape == (32, 50)
    assert torch.all(w >= 0)
    torch.testing.assert_close(w.sum(dim=1), torch.ones(32))
    assert (w == 0).float().mean() > 0.3  # hard shrinkage zeroes the weak slots


def test_memae_refuses_shrink_threshold_outside_range() -> None:
    with pytest.raises(ValueError, match=r"\[1/N, 3/N\]"):
        MemAE(ModelConfig(n_features=4, memory_slots=100, shrink_threshold=0.5))


def test_config_round_trip_and_registry() -> None:
    config = ModelConfig(n_features=9, hidden=(32, 16), bottleneck=5)
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert set(MODELS) == {"autoencoder", "denoising", "memae"}
    with pytest.raises(ValueError, match="unknown model type 'nope'"):
        build_model("nope", config)
