"""The NumPy engine (``pipeline.npscorer``) against PyTorch's ``Scorer``: the same weights' layout, the
same scores and alerts on hostile rows, the engine ``serve`` picks, and a worker start-up without
PyTorch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline.artifact import Explanation, ModelArtifact, ScoreHistogram, load_artifact
from pipeline.classifier import CLASSIFIERS, build_classifier
from pipeline.errors import ConfigError
from pipeline.layout import (
    ACTIVATIONS,
    MODEL_NAMES,
    ClassifierSpec,
    ModelConfig,
    ScoreSpec,
    classifier_shapes,
    weight_shapes,
)
from pipeline.models import MODELS, build_model
from pipeline.npscorer import NumpyScorer, gpu_driver_present, numpy_refusal, serve
from pipeline.preprocess import Preprocessing
from pipeline.scoring import Scorer

REPO = Path(__file__).resolve().parents[2]


def test_layout_names_every_tensor_of_the_torch_modules() -> None:
    assert set(MODELS) == set(MODEL_NAMES) and set(CLASSIFIERS) == {"finetuned", "stacked"}
    config = ModelConfig(n_features=5, hidden=(7, 4), bottleneck=3, memory_slots=10, shrink_threshold=0.2)
    for name in MODEL_NAMES:
        expected = {k: tuple(v.shape) for k, v in build_model(name, config).state_dict().items()}
        assert weight_shapes(name, config) == expected, name
    for kind in CLASSIFIERS:
        spec = ClassifierSpec(kind, 6)
        expected = {k: tuple(v.shape) for k, v in build_classifier(spec, config).state_dict().items()}
        assert classifier_shapes(spec, config) == expected, kind


def make_artifact(model_class: str, config: ModelConfig, seed: int, scoring: ScoreSpec | None = None,
                  bank_rows: int = 0, classifier: ClassifierSpec | None = None) -> ModelArtifact:
    """An in-memory version with random weights and preprocessing: what both engines read."""
    scoring = scoring or ScoreSpec()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n = config.n_features
    names = tuple(f"f{j}" for j in range(n))
    model = build_model(model_class, config)
    weights = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    classifier_weights = None
    if classifier is not None:
        head = build_classifier(classifier, config)
        classifier_weights = {k: v.detach().numpy().copy() for k, v in head.state_dict().items()}
    preprocessing = Preprocessing(names, rng.random(n) < 0.3, rng.normal(0, 3, n), rng.uniform(0.1, 10, n))
    manifest = {"model_version": f"test-{seed}", "model_class": model_class, "hyperparameters": config.to_dict(),
                "feature_names": list(names), "threshold": float(rng.uniform(0.1, 5)), "alert_rate": 0.01}
    bank = rng.normal(0, 2, (bank_rows, n)).astype(np.float32) if scoring.uses_bank else None
    return ModelArtifact(Path("."), manifest, weights, preprocessing,
                         Explanation(np.ones(n, np.float32), np.ones(n, np.float32)),
                         ScoreHistogram(np.array([0.0, 1.0]), np.array([1])), scoring, bank, classifier,
                         classifier_weights)


HOSTILE = st.one_of(st.floats(-1e4, 1e4, width=32), st.sampled_from([np.nan, np.inf, -np.inf, 3e38, -3e38, 1e-45]))


@st.composite
def versions(draw: st.DrawFn) -> ModelArtifact:
    model_class = draw(st.sampled_from(MODEL_NAMES))
    slots = draw(st.integers(2, 20))
    hidden = tuple(draw(st.lists(st.integers(1, 16), max_size=2)))
    config = ModelConfig(n_features=draw(st.integers(1, 8)), hidden=hidden,
                         bottleneck=draw(st.integers(1, 4)), activation=draw(st.sampled_from(("relu", "elu", "tanh"))),
                         memory_slots=slots, shrink_threshold=draw(st.floats(1 / slots, 3 / slots)))
    scoring = ScoreSpec()
    if draw(st.booleans()):
        scoring = ScoreSpec("hybrid", k=draw(st.integers(1, 6)), reconstruction_scale=draw(st.floats(0.1, 10)),
                            distance_scale=draw(st.floats(0.1, 10)), distance_weight=draw(st.floats(0.1, 3)),
                            clip=draw(st.one_of(st.none(), st.floats(0.5, 5))))
    return make_artifact(model_class, config, draw(st.integers(0, 2**16)), scoring, bank_rows=draw(st.integers(1, 30)))


@settings(max_examples=80, deadline=None)
@given(data=st.data(), artifact=versions())
def test_numpy_scores_and_alerts_like_pytorch(data: st.DataObject, artifact: ModelArtifact) -> None:
    """Hostile rows (NaN, ±inf, float32's edges) included: the same rows alert (a non-finite score
    alerts, as ``processing`` reads it), and rows within the data's range score the same."""
    n = len(artifact.feature_names)
    raw = data.draw(arrays(np.float32, st.tuples(st.integers(1, 40), st.just(n)), elements=HOSTILE))
    ours = NumpyScorer(artifact, max_batch=data.draw(st.integers(1, 64))).score(raw)
    theirs = Scorer(artifact, device="cpu", max_batch=64, threads=1).score(raw)
    alerts_ours, alerts_theirs = ~(ours.scores <= artifact.threshold), ~(theirs.scores <= artifact.threshold)
    near_threshold = np.isclose(theirs.scores, artifact.threshold, rtol=1e-3)
    np.testing.assert_array_equal(alerts_ours[~near_threshold], alerts_theirs[~near_threshold])
    np.testing.assert_array_equal(ours.flags, ours.scores > artifact.threshold)
    with np.errstate(all="ignore"):
        tame = np.all(np.abs(artifact.preprocessing.transform(raw)) < 1e6, axis=1)
    np.testing.assert_allclose(ours.scores[tame], theirs.scores[tame], rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(ours.standardized_reconstruction[tame], theirs.standardized_reconstruction[tame],
                               rtol=1e-3, atol=1e-4)
    assert ours.contributions is None and ours.scores.dtype == np.float32


def test_engine_choice() -> None:
    config = ModelConfig(n_features=3, hidden=(4,), bottleneck=2)
    plain = make_artifact("autoencoder", config, 1)
    assert isinstance(serve(plain, "cpu"), NumpyScorer)
    assert serve(plain, "cpu", threads=1).where == "cpu (NumPy, 1 threads)"
    labelled = make_artifact("autoencoder", config, 1, classifier=ClassifierSpec("stacked", 4))
    gelu = make_artifact("autoencoder", ModelConfig(n_features=3, hidden=(4,), bottleneck=2, activation="gelu"), 1)
    for artifact, reason in ((labelled, "gradients"), (gelu, "gelu activation")):
        assert reason in (numpy_refusal(artifact) or "")
        assert type(serve(artifact, "cpu")) is Scorer  # PyTorch serves what NumPy cannot
        with pytest.raises(ConfigError, match="cannot be scored without PyTorch"):
            NumpyScorer(artifact)
    if not torch.cuda.is_available():  # CUDA is asked of PyTorch, which says it is missing
        with pytest.raises(ConfigError, match="CUDA is not available"):
            serve(plain, "cuda")
    assert not gpu_driver_present(("/nonexistent/nvidia",)) and gpu_driver_present((str(REPO),))
    assert "gelu" in ACTIVATIONS


def test_saved_version_loads_and_scores_without_torch(model_dir: Path) -> None:
    """The worker's start-up path, in a fresh interpreter: load the version, build the scorer the
    worker would on a machine without a GPU, score a row; PyTorch is never imported."""
    probe = (
        "import sys, json, types, numpy as np\n"
        "from pathlib import Path\n"
        "from pipeline.worker.cli import load_scorer\n"
        "import pipeline.worker.app, pipeline.worker.reload, pipeline.worker.state\n"
        "s = load_scorer(Path(sys.argv[1]), types.SimpleNamespace(torch_threads=1, device='cpu', max_batch=64))\n"
        "b = s.score(np.zeros((2, len(s.artifact.feature_names)), np.float32))\n"
        "print(json.dumps({'engine': s.engine, 'torch': 'torch' in sys.modules, 'n': len(b.scores)}))\n")
    out = subprocess.run([sys.executable, "-c", probe, str(model_dir)], cwd=REPO, capture_output=True, text=True,
                         check=True, timeout=120)
    assert json.loads(out.stdout.splitlines()[-1]) == {"engine": "numpy", "torch": False, "n": 2}
    # and on disk the same version scores alike through both engines
    artifact = load_artifact(model_dir)
    raw = np.random.default_rng(3).normal(0, 50, (500, len(artifact.feature_names))).astype(np.float32)
    np.testing.assert_allclose(NumpyScorer(artifact).score(raw).scores,
                               Scorer(artifact, device="cpu").score(raw).scores, rtol=1e-4, atol=1e-6)
