"""Model versions on disk: exact round trip, atomic publishing, and refusal of anything altered."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.artifact import (
    CHALLENGER,
    CLASSIFIER_PREFIX,
    CURRENT,
    MANIFEST,
    WEIGHTS,
    Explanation,
    ScoreHistogram,
    content_hash,
    load_artifact,
    promote_challenger,
    publish_current,
    save_artifact,
)
from pipeline.classifier import ClassifierSpec, build_classifier
from pipeline.errors import ModelArtifactError
from pipeline.models import ModelConfig, build_model
from pipeline.neighbours import ScoreSpec
from pipeline.preprocess import Preprocessing
from pipeline.scoring import Scorer

NAMES = ("amount", "count", "flag")


def export(root: Path, model_name: str = "autoencoder", seed: int = 0, hybrid: bool = False,
           classifier: str | None = None) -> Path:
    """A small untrained model version with real preprocessing and calibration fields (and, for a
    hybrid, a bank of 40 standardized rows; with ``classifier``, an untrained classifier of that kind)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x = np.column_stack([rng.lognormal(3, 1, 500), rng.poisson(4, 500), rng.integers(0, 2, 500)]).astype(np.float32)
    model = build_model(model_name, ModelConfig(n_features=3, hidden=(8,), bottleneck=2, memory_slots=10,
                                                shrink_threshold=0.2))
    fields = {
        "feature_names": NAMES, "preprocessing": Preprocessing.fit(x, NAMES, log_features=("amount",)),
        "threshold": 1.5, "alert_rate": 0.01,
        "explanation": Explanation(np.array([0.5, 1.0, 2.0], np.float32), np.array([1.0, 0.5, 0.25], np.float32)),
        "score_histogram": ScoreHistogram(np.array([0.0, 0.5, 1.0, 3.0]), np.array([10, 5, 1])),
        "training_data": {"rows": 500, "fingerprint_sha256": "ab" * 32}, "metrics": {"auc": float("nan")},
    }
    if hybrid:
        fields["scoring"] = ScoreSpec("hybrid", k=3, reconstruction_scale=2.0, distance_scale=0.5)
        fields["bank"] = fields["preprocessing"].transform(x[:40])
    if classifier:
        fields["classifier"] = build_classifier(ClassifierSpec(classifier, width=4), model.config)
        fields["threshold"] = 0.5  # a fraud probability
    return save_artifact(root, model, fields)


@pytest.fixture
def version(tmp_path: Path) -> Path:
    return export(tmp_path)


def rewrite_manifest(version: Path, change, rehash: bool = False) -> None:
    """Edit the manifest in place (optionally recomputing the hash, as a careless tool might)."""
    manifest = json.loads((version / MANIFEST).read_text())
    change(manifest)
    if rehash:
        manifest["content_hash"] = content_hash((version / WEIGHTS).read_bytes(), manifest)
    (version / MANIFEST).write_text(json.dumps(manifest))


def test_round_trip_is_exact(version: Path) -> None:
    artifact = load_artifact(version)
    assert artifact.path == version
    assert artifact.feature_names == NAMES
    assert artifact.threshold == 1.5 and artifact.alert_rate == 0.01
    assert artifact.preprocessing.log_features == ("amount",)
    np.testing.assert_array_equal(artifact.explanation.stds, [1.0, 0.5, 0.25])
    np.testing.assert_array_equal(artifact.score_histogram.counts, [10, 5, 1])
    assert artifact.manifest["metrics"] == {"auc": None}  # NaN is stored as null, JSON stays strict
    assert artifact.manifest["created_utc"].endswith("+00:00")
    model = artifact.build_model()
    assert not model.training
    raw = np.array([[20.0, 3, 1], [5000.0, 40, 0]], np.float32)
    first = Scorer(artifact, device="cpu").score(raw).scores
    np.testing.assert_array_equal(first, Scorer(load_artifact(version), device="cpu").score(raw).scores)


def test_reconstruction_versions_keep_format_1(version: Path) -> None:
    manifest = json.loads((version / MANIFEST).read_text())
    assert manifest["format_version"] == 1 and "scoring" not in manifest  # readable by every older worker
    artifact = load_artifact(version)
    assert artifact.scoring.method == "reconstruction" and artifact.bank is None


def test_hybrid_version_round_trips_and_scores_with_its_bank(tmp_path: Path) -> None:
    version = export(tmp_path, hybrid=True)
    artifact = load_artifact(version)
    assert artifact.manifest["format_version"] == 2
    assert artifact.scoring == ScoreSpec("hybrid", k=3, reconstruction_scale=2.0, distance_scale=0.5)
    assert artifact.bank is not None and tuple(artifact.bank.shape) == (40, 3)
    assert "scoring.bank" not in artifact.state_dict  # the model's weights load strictly without it
    raw = np.array([[20.0, 3, 1], [5000.0, 40, 0]], np.float32)
    batch = Scorer(artifact, device="cpu").score(raw)
    x = torch.from_numpy(artifact.preprocessing.transform(raw))
    knn = torch.cdist(x, artifact.bank).topk(3, largest=False).values.mean(dim=1).numpy()
    np.testing.assert_allclose(batch.scores, batch.feature_errors.mean(axis=1) / 2.0 + knn / 0.5, rtol=1e-5)
    assert batch.scores[1] > batch.scores[0]


def test_hybrid_version_without_its_bank_is_refused(tmp_path: Path) -> None:
    version = export(tmp_path, hybrid=True)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(version / WEIGHTS))
    tensors.pop("scoring.bank")
    save_file(tensors, str(version / WEIGHTS))
    rewrite_manifest(version, lambda m: None, rehash=True)
    with pytest.raises(ModelArtifactError, match=r"hybrid scoring needs a finite \(rows, 3\) scoring.bank"):
        load_artifact(version)
    rewrite_manifest(version, lambda m: m.update(scoring={"method": "magic", "k": 5, "reconstruction_scale": 1,
                                                          "distance_scale": 1}), rehash=True)
    with pytest.raises(ModelArtifactError, match="scoring method 'magic'"):
        load_artifact(version)


def test_preprocessing_round_trips_through_json(version: Path) -> None:
    prep = load_artifact(version).preprocessing
    again = Preprocessing.from_dict(json.loads(json.dumps(prep.to_dict())))
    np.testing.assert_array_equal(again.mean, prep.mean)
    np.testing.assert_array_equal(again.std, prep.std)
    raw = np.array([[0.0, 0.0, 0.0], [123.4, 7.0, 1.0]], np.float32)
    np.testing.assert_allclose(prep.inverse_transform(prep.transform(raw)), raw, rtol=1e-5, atol=1e-4)


def test_constant_feature_is_not_divided_by_zero() -> None:
    prep = Preprocessing.fit(np.array([[1.0, 5.0], [2.0, 5.0]], np.float32), ("a", "b"))
    assert prep.std[1] == 1.0
    assert np.all(np.isfinite(prep.transform(np.array([[1.5, 9.0]], np.float32))))


def test_publish_current_switches_atomically(tmp_path: Path) -> None:
    first, second = export(tmp_path, seed=1), export(tmp_path, seed=2)
    publish_current(tmp_path, first)
    assert load_artifact(tmp_path).version == first.name
    publish_current(tmp_path, second)
    assert (tmp_path / CURRENT).is_symlink() and os.readlink(tmp_path / CURRENT) == second.name
    assert load_artifact(tmp_path).version == second.name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, second.name, CURRENT])  # no temp left


def test_a_challenger_is_promoted_once_and_a_broken_one_is_refused(tmp_path: Path, capsys) -> None:
    from trainer.cli import run as fraud_train

    first, second, third = export(tmp_path, seed=1), export(tmp_path, seed=2), export(tmp_path, seed=3)
    publish_current(tmp_path, first)
    publish_current(tmp_path, second, CHALLENGER)
    assert load_artifact(tmp_path).version == first.name  # the challenger does not serve
    assert fraud_train(["promote", "--model", str(tmp_path)]) == 0
    assert f"model {second.name} is current" in capsys.readouterr().out
    assert load_artifact(tmp_path).version == second.name and not (tmp_path / CHALLENGER).exists()
    assert fraud_train(["promote", "--model", str(tmp_path)]) == 2  # nothing left to promote
    assert "no `challenger` link" in capsys.readouterr().err
    publish_current(tmp_path, third, CHALLENGER)
    rewrite_manifest(third, lambda m: m.update(threshold=9.0))  # tampered after export
    with pytest.raises(ModelArtifactError, match="content hash mismatch"):
        promote_challenger(tmp_path)
    assert load_artifact(tmp_path).version == second.name and (tmp_path / CHALLENGER).is_symlink()


def test_tampered_weights_are_refused(version: Path) -> None:
    data = bytearray((version / WEIGHTS).read_bytes())
    data[-1] ^= 0x01
    (version / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ModelArtifactError, match="content hash mismatch"):
        load_artifact(version)


def test_tampered_manifest_is_refused(version: Path) -> None:
    rewrite_manifest(version, lambda m: m.update(threshold=99.0))
    with pytest.raises(ModelArtifactError, match="content hash mismatch: weights or manifest were modified"):
        load_artifact(version)


def test_missing_key_is_named(version: Path) -> None:
    rewrite_manifest(version, lambda m: m.pop("threshold"))
    with pytest.raises(ModelArtifactError, match=r"manifest.json: missing key 'threshold'"):
        load_artifact(version)


def test_wrong_type_and_format_version_are_refused(version: Path) -> None:
    rewrite_manifest(version, lambda m: m.update(threshold="high"), rehash=True)
    with pytest.raises(ModelArtifactError, match="key 'threshold' has type str"):
        load_artifact(version)
    rewrite_manifest(version, lambda m: m.update(format_version=99), rehash=True)
    with pytest.raises(ModelArtifactError, match="format_version 99 is not supported"):
        load_artifact(version)


def test_feature_count_must_match_weights(version: Path) -> None:
    def drop_feature(m: dict) -> None:
        m["feature_names"] = m["feature_names"][:2]
        m["hyperparameters"]["n_features"] = 2

    rewrite_manifest(version, drop_feature, rehash=True)
    with pytest.raises(ModelArtifactError, match=r"inconsistent with weights\.safetensors"):
        load_artifact(version)


def test_missing_folder_or_weights_is_explained(tmp_path: Path, version: Path) -> None:
    with pytest.raises(ModelArtifactError, match="model root with a `current` link"):
        load_artifact(tmp_path / "nowhere")
    (version / WEIGHTS).unlink()
    with pytest.raises(ModelArtifactError, match=r"weights\.safetensors is missing"):
        load_artifact(version)


def test_memae_exports_too(tmp_path: Path) -> None:
    artifact = load_artifact(export(tmp_path, model_name="memae"))
    assert artifact.model_class == "memae"
    assert "memory" in artifact.state_dict


@pytest.mark.parametrize("kind", ["finetuned", "stacked"])
def test_classifier_version_round_trips_and_scores_its_fraud_probability(tmp_path: Path, kind: str) -> None:
    version = export(tmp_path, classifier=kind)
    artifact = load_artifact(version)
    assert artifact.manifest["format_version"] == 3 and artifact.manifest["classifier"] == {"kind": kind, "width": 4}
    assert artifact.classifier == ClassifierSpec(kind, 4) and artifact.bank is None
    assert not any(k.startswith(CLASSIFIER_PREFIX) for k in artifact.state_dict)  # the model loads strictly
    classifier = artifact.build_classifier()
    assert classifier is not None and not classifier.training
    raw = np.array([[20.0, 3, 1], [5000.0, 40, 0]], np.float32)
    batch = Scorer(artifact, device="cpu").score(raw)
    x = torch.from_numpy(artifact.preprocessing.transform(raw))
    with torch.no_grad():
        expected = torch.sigmoid(classifier(x, artifact.build_model()(x))).numpy()
    np.testing.assert_allclose(batch.scores, expected, rtol=1e-6)
    np.testing.assert_array_equal(batch.flags, batch.scores > 0.5)
    np.testing.assert_allclose(batch.feature_errors.mean(axis=1), np.square(
        artifact.build_model()(x).detach().numpy() - x.numpy()).mean(axis=1), rtol=1e-5)  # explanations still there


def test_readers_of_formats_1_and_2_refuse_a_classifier_version(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    version = export(tmp_path, classifier="stacked")
    monkeypatch.setattr("pipeline.artifact.READABLE_FORMATS", (1, 2))  # what the previous release reads
    with pytest.raises(ModelArtifactError, match="format_version 3 is not supported"):
        load_artifact(version)


def test_classifier_version_altered_is_refused(tmp_path: Path) -> None:
    version = export(tmp_path, classifier="finetuned")
    rewrite_manifest(version, lambda m: m.update(classifier={"kind": "forest", "width": 4}), rehash=True)
    with pytest.raises(ModelArtifactError, match="classifier kind 'forest': use one of finetuned, stacked"):
        load_artifact(version)
    rewrite_manifest(version, lambda m: m.update(classifier={"kind": "stacked", "width": 4}), rehash=True)
    with pytest.raises(ModelArtifactError, match=r"inconsistent with weights\.safetensors"):  # other tensors
        load_artifact(version)
    rewrite_manifest(version, lambda m: m.pop("classifier"), rehash=True)
    with pytest.raises(ModelArtifactError, match="a 'classifier' object goes with format_version 3"):
        load_artifact(version)
    rewrite_manifest(version, lambda m: m.update(format_version=1), rehash=True)  # an old reader's view
    with pytest.raises(ModelArtifactError, match=r"classifier\.\* tensors but no 'classifier' section"):
        load_artifact(version)


def test_the_challenger_watcher_hands_over_a_new_challenger_then_its_removal(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry

    from pipeline.worker.metrics import WorkerMetrics
    from pipeline.worker.reload import REMOVED, ModelWatcher

    first, second = export(tmp_path, seed=1), export(tmp_path, seed=2)
    publish_current(tmp_path, first)
    watcher = ModelWatcher(tmp_path, load_artifact, WorkerMetrics(CollectorRegistry()), interval_s=0,
                           link=CHALLENGER)
    assert not watcher.check() and watcher.take() is None  # no challenger: nothing, and no error
    publish_current(tmp_path, second, CHALLENGER)
    assert watcher.check() and watcher.take().version == second.name
    assert not watcher.check()  # seen already
    (tmp_path / CHALLENGER).unlink()  # promoted, or withdrawn
    assert watcher.check() and watcher.take() is REMOVED
    assert not watcher.check() and watcher.take() is None  # said once
