"""One model version on disk: ``weights.safetensors`` + ``manifest.json``, checked on load.

A model root holds one folder per version and a ``current`` symlink to the served one.
Versions are written to a temporary folder and renamed into place; ``current`` is switched
with a temporary link and ``os.replace``, so a reader never sees a half-written model. The
manifest carries everything the worker needs besides the weights (feature order,
preprocessing, threshold, explanation statistics, score histogram) and a sha256 over the
weights bytes and the canonical manifest, so any later edit is refused.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_arrays

from pipeline.errors import ModelArtifactError
from pipeline.features import HANDBOOK_FEATURES
from pipeline.layout import (
    MODEL_NAMES,
    ClassifierSpec,
    ModelConfig,
    ScoreSpec,
    check_weights,
    classifier_shapes,
    weight_shapes,
)
from pipeline.preprocess import Preprocessing

if TYPE_CHECKING:  # PyTorch only where a caller builds modules: the CPU worker serves without it
    import torch

    from pipeline.classifier import FineTuned, Stacked
    from pipeline.models import Autoencoder

FORMAT_VERSION = 1  # reconstruction-only versions: what every reader of this format understands
HYBRID_FORMAT_VERSION = 2  # versions with a "scoring" section and a bank of training rows
CLASSIFIER_FORMAT_VERSION = 3  # versions with a "classifier" section: a fraud classifier fitted on labelled rows
READABLE_FORMATS = (FORMAT_VERSION, HYBRID_FORMAT_VERSION, CLASSIFIER_FORMAT_VERSION)
BANK_KEY = "scoring.bank"  # the bank's tensor in weights.safetensors, beside the model's state dict
CLASSIFIER_PREFIX = "classifier."  # the classifier's tensors in weights.safetensors, under this prefix
WEIGHTS = "weights.safetensors"
MANIFEST = "manifest.json"
CURRENT = "current"
CHALLENGER = "challenger"  # a version the worker scores beside the current one, alerting from neither
HASH_KEY = "content_hash"
INPUT_FORMS = ("features", "raw")

# Required manifest keys and their JSON types.
REQUIRED: dict[str, type | tuple[type, ...]] = {
    "format_version": int,
    "model_version": str,
    "created_utc": str,
    "model_class": str,
    "hyperparameters": dict,
    "feature_names": list,
    "preprocessing": dict,
    "threshold": (int, float),
    "alert_rate": (int, float),
    "explanation": dict,
    "score_histogram": dict,
    "training_data": dict,
    "metrics": dict,
    HASH_KEY: str,
}


@dataclass(frozen=True)
class Explanation:
    """Per-feature mean and std of the squared reconstruction error on normal validation rows."""

    means: np.ndarray  # (features,) float32
    stds: np.ndarray  # (features,) float32, > 0


@dataclass(frozen=True)
class ScoreHistogram:
    """Anomaly-score histogram on normal validation rows: the drift reference (PSI)."""

    edges: np.ndarray  # (bins + 1,) float64, increasing
    counts: np.ndarray  # (bins,) int64


@dataclass(frozen=True)
class ModelArtifact:
    """A loaded, validated model version."""

    path: Path
    manifest: dict[str, Any]
    weights: dict[str, np.ndarray]  # the model's tensors by state-dict name, float32
    preprocessing: Preprocessing
    explanation: Explanation
    score_histogram: ScoreHistogram
    scoring: ScoreSpec = field(default_factory=ScoreSpec)  # format 1: the reconstruction error alone
    bank_rows: np.ndarray | None = None  # (rows, features) standardized normal training rows, hybrid scoring only
    classifier: ClassifierSpec | None = None  # format 3: the score is this classifier's fraud probability
    classifier_weights: dict[str, np.ndarray] | None = None

    @property
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The model's weights as tensors (sharing memory with ``weights``)."""
        return _tensors(self.weights)

    @property
    def bank(self) -> torch.Tensor | None:
        """The hybrid's bank of training rows as a tensor, None for other versions."""
        return None if self.bank_rows is None else _tensors({"bank": self.bank_rows})["bank"]

    @property
    def classifier_state(self) -> dict[str, torch.Tensor] | None:
        """The classifier's weights as tensors, None for versions without one."""
        return None if self.classifier_weights is None else _tensors(self.classifier_weights)

    @property
    def version(self) -> str:
        """The model version string, unique per export."""
        return str(self.manifest["model_version"])

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Feature names in the order the model expects them."""
        return tuple(self.manifest["feature_names"])

    @property
    def threshold(self) -> float:
        """Scores above this are flagged."""
        return float(self.manifest["threshold"])

    @property
    def alert_rate(self) -> float:
        """Share of normal validation transactions above the threshold, by construction."""
        return float(self.manifest["alert_rate"])

    @property
    def input_form(self) -> str:
        """What the input topic carries: ``features`` (each record the model's features) or ``raw``
        (id, time, customer, terminal, amount: the worker computes the handbook features itself)."""
        return str(self.manifest.get("input", {}).get("form", "features"))

    @property
    def feature_delay_days(self) -> int:
        """Raw input: the label delay, in days, of the terminal-risk features the model was trained on."""
        return int(self.manifest.get("input", {}).get("feature_delay_days", 7))

    @property
    def model_class(self) -> str:
        """Registry name of the model type."""
        return str(self.manifest["model_class"])

    def build_model(self) -> Autoencoder:
        """A fresh model on CPU in eval mode with the weights loaded."""
        from pipeline.models import build_model

        model = build_model(self.model_class, ModelConfig.from_dict(self.manifest["hyperparameters"]))
        model.load_state_dict(self.state_dict, strict=True)
        return model.eval()

    def build_classifier(self) -> FineTuned | Stacked | None:
        """A fresh fraud classifier on CPU in eval mode with its weights loaded (None for unsupervised versions)."""
        if self.classifier is None or self.classifier_weights is None:
            return None
        from pipeline.classifier import build_classifier

        classifier = build_classifier(self.classifier, ModelConfig.from_dict(self.manifest["hyperparameters"]))
        classifier.load_state_dict(self.classifier_state, strict=True)
        return classifier.eval()


def _tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    import torch

    return {name: torch.from_numpy(array) for name, array in arrays.items()}


def content_hash(weights: bytes, manifest: dict[str, Any]) -> str:
    """sha256 over the weights bytes and the canonical manifest without its hash field."""
    body = {k: v for k, v in manifest.items() if k != HASH_KEY}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    return hashlib.sha256(weights + b"\n" + canonical).hexdigest()


def new_version(model_class: str, created: dt.datetime) -> str:
    """A sortable, unique version string such as ``20180801T120000Z-autoencoder-1a2b3c``."""
    return f"{created.astimezone(dt.UTC):%Y%m%dT%H%M%SZ}-{model_class}-{secrets.token_hex(3)}"


def save_artifact(root: str | Path, model: Autoencoder, fields: dict[str, Any], version: str | None = None) -> Path:
    """Write a new version folder under ``root`` atomically and return its path.

    ``fields`` holds the manifest entries the trainer computes: feature_names, preprocessing
    (a Preprocessing), threshold, alert_rate, explanation (an Explanation), score_histogram
    (a ScoreHistogram), training_data and metrics (JSON-ready dicts); for hybrid scoring also
    scoring (a ScoreSpec) and bank ((rows, features) float32 standardized training rows); for a
    version scored by a fraud classifier, classifier (the fitted ``pipeline.classifier`` module).
    """
    import torch
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    created = dt.datetime.now(dt.UTC)
    version = version or new_version(model.name, created)
    manifest = _manifest(model, fields, version, created)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=root))
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if manifest.get("scoring", {}).get("method", "reconstruction") != "reconstruction":
        tensors[BANK_KEY] = torch.as_tensor(np.ascontiguousarray(fields["bank"], dtype=np.float32))
    if fields.get("classifier") is not None:
        tensors.update({CLASSIFIER_PREFIX + k: v.detach().cpu().contiguous()
                        for k, v in fields["classifier"].state_dict().items()})
    save_file(tensors, str(tmp / WEIGHTS))
    manifest[HASH_KEY] = content_hash((tmp / WEIGHTS).read_bytes(), manifest)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n")
    for name in (WEIGHTS, MANIFEST):
        _fsync(tmp / name)
        os.chmod(tmp / name, 0o644)  # the worker may run as another user; nothing here is secret
    os.chmod(tmp, 0o755)  # noqa: S103 - readable by the worker's user, writable by nobody else
    target = root / version
    if target.exists():
        raise ModelArtifactError(f"{target} already exists; pick another version string")
    os.rename(tmp, target)
    return target


def _manifest(model: Autoencoder, fields: dict[str, Any], version: str, created: dt.datetime) -> dict[str, Any]:
    explanation: Explanation = fields["explanation"]
    histogram: ScoreHistogram = fields["score_histogram"]
    scoring: ScoreSpec = fields.get("scoring", ScoreSpec())
    extra = {"scoring": scoring.to_dict()} if scoring.uses_bank else {}
    if "input" in fields:  # absent: records carry the features (the only form before raw input existed)
        extra["input"] = dict(fields["input"])
    format_version = HYBRID_FORMAT_VERSION if scoring.uses_bank else FORMAT_VERSION
    if fields.get("classifier") is not None:
        extra["classifier"] = fields["classifier"].spec.to_dict()
        format_version = CLASSIFIER_FORMAT_VERSION
    return {
        "format_version": format_version,
        **extra,
        "model_version": version,
        "created_utc": created.isoformat(),
        "model_class": model.name,
        "hyperparameters": model.config.to_dict(),
        "feature_names": list(fields["feature_names"]),
        "preprocessing": fields["preprocessing"].to_dict(),
        "threshold": float(fields["threshold"]),
        "alert_rate": float(fields["alert_rate"]),
        "explanation": {"means": _floats(explanation.means), "stds": _floats(explanation.stds)},
        "score_histogram": {"edges": _floats(histogram.edges), "counts": [int(c) for c in histogram.counts]},
        "training_data": _json_ready(fields.get("training_data", {})),
        "metrics": _json_ready(fields.get("metrics", {})),
    }


def _floats(values: np.ndarray) -> list[float]:
    return [float(v) for v in np.asarray(values).ravel()]


def _json_ready(value: Any) -> Any:
    """Nested dicts/lists with numpy scalars made Python ones and NaN/inf made None."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def publish_current(root: str | Path, version_dir: str | Path, link: str = CURRENT) -> Path:
    """Point ``root/current`` (or ``root/<link>``) at ``version_dir`` atomically; returns the link path."""
    root, version_dir = Path(root), Path(version_dir)
    if not (version_dir / MANIFEST).is_file():
        raise ModelArtifactError(f"{version_dir} holds no {MANIFEST}; it is not a model version")
    same_root = version_dir.resolve().parent == root.resolve()
    target = version_dir.name if same_root else str(version_dir.resolve())
    tmp = root / f".{link}-{secrets.token_hex(4)}"
    os.symlink(target, tmp)
    os.replace(tmp, root / link)
    return root / link


def promote_challenger(root: str | Path) -> ModelArtifact:
    """Serve the challenger: ``current`` moves to the version ``challenger`` points at (validated first), then
    the ``challenger`` link goes. Workers' hot reload follows ``current``; their shadow scoring stops."""
    root = Path(root)
    link = root / CHALLENGER
    if not link.is_symlink():
        raise ModelArtifactError(f"{root} has no `{CHALLENGER}` link: no challenger to promote "
                                 "(fraud-train fit --challenger publishes one)")
    target = link.resolve()
    artifact = load_artifact(target)  # a broken challenger is refused before anything moves
    current = root / CURRENT
    if current.exists() and load_artifact(current.resolve()).input_form != artifact.input_form:
        raise ModelArtifactError(f"challenger {artifact.version} expects {artifact.input_form} input but the current "
                                 "version does not: workers would refuse it; retrain it for the same input")
    publish_current(root, target)
    link.unlink()
    return artifact


def load_artifact(path: str | Path) -> ModelArtifact:
    """Load and validate a version folder, or the ``current`` version of a model root."""
    folder = Path(path)
    if (folder / CURRENT).exists():
        folder = (folder / CURRENT).resolve()
    manifest = _read_manifest(folder)
    weights_path = folder / WEIGHTS
    if not weights_path.is_file():
        raise ModelArtifactError(f"{folder}: {WEIGHTS} is missing")
    data = weights_path.read_bytes()
    if content_hash(data, manifest) != manifest[HASH_KEY]:
        raise ModelArtifactError(f"{folder}: content hash mismatch: weights or manifest were modified after export")
    try:  # NumPy arrays: a dtype NumPy lacks (bfloat16) is refused here, said as unreadable
        state = {name: np.asarray(array, np.float32) for name, array in load_arrays(data).items()}
    except (SafetensorError, OSError, TypeError, ValueError) as err:
        raise ModelArtifactError(f"{weights_path}: not a readable safetensors file ({err})") from err
    try:
        return _assemble(folder, manifest, state)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ModelArtifactError(f"{folder / MANIFEST}: inconsistent with {WEIGHTS}: {err}") from err


def _read_manifest(folder: Path) -> dict[str, Any]:
    """The parsed manifest, with its format version, required keys and their types checked."""
    path = folder / MANIFEST
    if not path.is_file():
        raise ModelArtifactError(
            f"{path} not found; pass a model version folder or a model root with a `{CURRENT}` link"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelArtifactError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(manifest, dict):
        raise ModelArtifactError(f"{path}: top level must be a JSON object")
    if manifest.get("format_version") not in READABLE_FORMATS:
        raise ModelArtifactError(
            f"{MANIFEST}: format_version {manifest.get('format_version')!r} is not supported "
            f"(this code reads {', '.join(map(str, READABLE_FORMATS))}); re-export the model with this version "
            "of fraud-train"
        )
    if manifest["format_version"] == HYBRID_FORMAT_VERSION and not isinstance(manifest.get("scoring"), dict):
        raise ModelArtifactError(f"{MANIFEST}: format_version 2 needs a 'scoring' object")
    if (manifest["format_version"] == CLASSIFIER_FORMAT_VERSION) != isinstance(manifest.get("classifier"), dict):
        raise ModelArtifactError(f"{MANIFEST}: a 'classifier' object goes with format_version "
                                 f"{CLASSIFIER_FORMAT_VERSION}, and only with it")
    for key, kind in REQUIRED.items():
        if key not in manifest:
            raise ModelArtifactError(f"{MANIFEST}: missing key {key!r}")
        value = manifest[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ModelArtifactError(f"{MANIFEST}: key {key!r} has type {type(value).__name__}, expected {kind}")
    _check_input(manifest)
    if manifest["model_class"] not in MODEL_NAMES:
        raise ModelArtifactError(f"{MANIFEST}: unknown model_class {manifest['model_class']!r}; "
                                 f"known: {list(MODEL_NAMES)}")
    return manifest


def _check_input(manifest: dict[str, Any]) -> None:
    """The optional ``input`` section: which form the worker's input records take."""
    if "input" not in manifest:
        return
    section = manifest["input"]
    if not isinstance(section, dict) or section.get("form") not in INPUT_FORMS:
        raise ModelArtifactError(f"{MANIFEST}: 'input' must be an object with 'form' one of {list(INPUT_FORMS)}")
    if section["form"] == "raw":
        if tuple(manifest.get("feature_names", ())) != HANDBOOK_FEATURES:
            raise ModelArtifactError(f"{MANIFEST}: raw input needs the handbook's 15 features, in their order")
        delay = section.get("feature_delay_days", 7)
        if not isinstance(delay, int) or isinstance(delay, bool) or not 1 <= delay <= 365:
            raise ModelArtifactError(f"{MANIFEST}: input.feature_delay_days must be a whole number of days, "
                                     f"1 to 365, got {delay!r}")


def _assemble(folder: Path, manifest: dict[str, Any], state: dict[str, np.ndarray]) -> ModelArtifact:
    """The artifact, after checking every per-feature array against the feature count and weights."""
    n = len(manifest["feature_names"])
    config = ModelConfig.from_dict(manifest["hyperparameters"])
    if config.n_features != n:
        raise ValueError(f"hyperparameters.n_features={config.n_features} but {n} feature names")
    scoring = ScoreSpec.from_dict(manifest["scoring"]) if "scoring" in manifest else ScoreSpec()
    state = dict(state)
    bank = state.pop(BANK_KEY, None)
    classifier = ClassifierSpec.from_dict(manifest["classifier"]) if "classifier" in manifest else None
    classifier_state = {k.removeprefix(CLASSIFIER_PREFIX): state.pop(k) for k in list(state)
                        if k.startswith(CLASSIFIER_PREFIX)}
    if classifier is not None:
        check_weights(classifier_state, classifier_shapes(classifier, config), "the classifier")
    elif classifier_state:
        raise ValueError(f"{CLASSIFIER_PREFIX}* tensors but no 'classifier' section")
    if scoring.uses_bank and (bank is None or bank.ndim != 2 or bank.shape[1] != n or bank.shape[0] < 1
                              or not bool(np.isfinite(bank).all())):
        raise ValueError(f"hybrid scoring needs a finite (rows, {n}) {BANK_KEY} tensor")
    check_weights(state, weight_shapes(manifest["model_class"], config), f"the {manifest['model_class']} model")
    preprocessing = Preprocessing.from_dict(manifest["preprocessing"])
    if preprocessing.feature_names != tuple(manifest["feature_names"]):
        raise ValueError("preprocessing.feature_names differ from feature_names")
    means = np.asarray(manifest["explanation"]["means"], dtype=np.float32)
    stds = np.asarray(manifest["explanation"]["stds"], dtype=np.float32)
    if means.shape != (n,) or stds.shape != (n,) or not np.all(stds > 0):
        raise ValueError(f"explanation means/stds need {n} values each, stds > 0")
    edges = np.asarray(manifest["score_histogram"]["edges"], dtype=np.float64)
    counts = np.asarray(manifest["score_histogram"]["counts"], dtype=np.int64)
    if edges.ndim != 1 or counts.shape != (edges.size - 1,) or np.any(np.diff(edges) <= 0):
        raise ValueError("score_histogram needs increasing edges and one count fewer than edges")
    return ModelArtifact(
        folder, manifest, state, preprocessing, Explanation(means, stds), ScoreHistogram(edges, counts),
        scoring, bank if scoring.uses_bank else None, classifier, classifier_state if classifier else None,
    )
