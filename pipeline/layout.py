"""What a model version is made of, without PyTorch: its hyperparameters, its classifier's and
scoring's specs, and the name and shape of every weight.

The worker reads a version through this module alone when it scores on the CPU (``pipeline.npscorer``),
so that it starts without importing PyTorch; ``pipeline.models``, ``pipeline.classifier`` and
``pipeline.neighbours`` build their modules from the same specs and re-export them. A test checks
that ``weight_shapes`` names exactly the tensors of each ``nn.Module``'s state dict.

>>> config = ModelConfig(n_features=3, hidden=(4,), bottleneck=2)
>>> weight_shapes("autoencoder", config)["encoder.2.weight"]
(2, 4)
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MODEL_NAMES = ("autoencoder", "denoising", "memae")  # the registry of pipeline.models, by name
ACTIVATIONS = ("relu", "elu", "tanh", "gelu")
CLASSIFIER_KINDS = ("finetuned", "stacked")
METHODS = ("reconstruction", "hybrid")
FAR = 1e15  # |value| cap of unclipped distances: squared sums of 15 features stay finite in float32
# Rows of a distance block (queries x bank) computed at once: about 64 MB of float32.
BLOCK_ENTRIES = 16 * 1024 * 1024


def default_bottleneck(n_features: int) -> int:
    """Code size when none is given: 6 for the handbook's 15 features (chosen on its validation
    week), about 40 % of the features on narrow tables, at most 16.

    >>> [default_bottleneck(n) for n in (1, 3, 8, 15, 36, 100)]
    [1, 1, 3, 6, 14, 16]
    """
    return max(1, min(16, round(0.4 * n_features)))


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of every model type; each type reads the ones it needs."""

    n_features: int
    hidden: tuple[int, ...] = (64, 32)  # encoder widths; the decoder mirrors them
    bottleneck: int = 6  # chosen on the validation week of the reference data (4, 6, 8, 12 tried)
    activation: str = "elu"
    noise_std: float = 0.1  # denoising: Gaussian noise on standardized inputs while training
    memory_slots: int = 100  # memae: N
    shrink_threshold: float = 0.02  # memae: λ, in [1/N, 3/N]
    entropy_weight: float = 0.0002  # memae: weight of the addressing entropy loss
    extra: dict[str, Any] = field(default_factory=dict)  # reserved, kept in the manifest

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (tuples become lists)."""
        data = dataclasses.asdict(self)
        data["hidden"] = list(self.hidden)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of ``to_dict``; unknown keys raise TypeError."""
        values = dict(data)
        if "hidden" in values:
            values["hidden"] = tuple(int(h) for h in values["hidden"])
        return cls(**values)

    @property
    def widths(self) -> list[int]:
        """The encoder's layer widths, input to code; the decoder runs them backwards."""
        return [self.n_features, *self.hidden, self.bottleneck]

    def check(self, model_class: str) -> None:
        """ValueError naming what a model of this class cannot be built with."""
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r}: use one of {', '.join(ACTIVATIONS)}")
        n = self.memory_slots
        if model_class == "memae" and not 1 / n <= self.shrink_threshold <= 3 / n:
            raise ValueError(f"shrink_threshold={self.shrink_threshold} must lie in [1/N, 3/N] for N={n}")


@dataclass(frozen=True)
class ClassifierSpec:
    """Which classifier a version carries and its width; the rest comes from the autoencoder's config."""

    kind: str
    width: int = 32

    def __post_init__(self) -> None:
        if self.kind not in CLASSIFIER_KINDS:
            raise ValueError(f"classifier kind {self.kind!r}: use one of {', '.join(CLASSIFIER_KINDS)}")
        if isinstance(self.width, bool) or not isinstance(self.width, int) or self.width < 2:
            raise ValueError(f"classifier width {self.width!r} must be an integer >= 2")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the manifest."""
        return {"kind": self.kind, "width": self.width}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClassifierSpec:
        """Inverse of ``to_dict``; ValueError on an unknown kind or a bad width."""
        if not isinstance(data, dict) or not {"kind", "width"} <= set(data):
            raise ValueError("the classifier section needs 'kind' and 'width'")
        return cls(str(data["kind"]), data["width"])

    def widths(self, config: ModelConfig) -> dict[str, list[int]]:
        """Each layer stack of this classifier and its widths."""
        if self.kind == "finetuned":
            return {"encoder": config.widths, "head": [config.bottleneck, self.width, 1]}
        return {"net": [2 * config.n_features, self.width, max(1, self.width // 2), 1]}


@dataclass(frozen=True)
class ScoreSpec:
    """How a version scores: the mean squared reconstruction error alone, or (hybrid) that error
    plus the mean distance to the k nearest of the bank's normal training rows, each divided by
    its scale (its spread on normal validation rows) so that neither dominates by its units, the
    distance weighted by ``distance_weight``. The distance is taken between standardized rows
    clipped to ±``clip``, so that one heavy-tailed column cannot swamp it; the reconstruction
    error keeps the unclipped values."""

    method: str = "reconstruction"
    k: int = 5
    reconstruction_scale: float = 1.0
    distance_scale: float = 1.0
    distance_weight: float = 1.0
    clip: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"scoring method {self.method!r}: use one of {', '.join(METHODS)}")
        numbers = (self.reconstruction_scale, self.distance_scale, self.distance_weight, self.clip or 1.0)
        if self.k < 1 or not all(np.isfinite(v) and v > 0 for v in numbers):
            raise ValueError("scoring needs k >= 1 and positive, finite scales, weight and clip")

    def distance_space(self, x: Any) -> Any:
        """Standardized rows (rows, features), a tensor or an array, as the distance sees them:
        clipped to ±clip, or (no clip) to ±FAR, so that an overflowing input still lies far away
        instead of at NaN."""
        bound = FAR if self.clip is None else self.clip
        if isinstance(x, np.ndarray):
            return np.clip(np.nan_to_num(x, nan=0.0), -bound, bound)
        return x.nan_to_num(nan=0.0).clamp(-bound, bound)

    @property
    def uses_bank(self) -> bool:
        """Whether scores need the bank of training rows."""
        return self.method == "hybrid"

    def combine(self, mse: Any, distance: Any) -> Any:
        """The anomaly score from its parts (rows,), tensors or arrays; distance is ignored without a bank."""
        if not self.uses_bank:
            return mse
        return mse / self.reconstruction_scale + self.distance_weight * distance / self.distance_scale

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the manifest."""
        return {"method": self.method, "k": self.k, "reconstruction_scale": float(self.reconstruction_scale),
                "distance_scale": float(self.distance_scale), "distance_weight": float(self.distance_weight),
                "clip": None if self.clip is None else float(self.clip)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScoreSpec:
        """Inverse of ``to_dict``; ValueError on unknown methods or bad numbers."""
        clip = data.get("clip")
        return cls(str(data["method"]), int(data["k"]), float(data["reconstruction_scale"]),
                   float(data["distance_scale"]), float(data.get("distance_weight", 1.0)),
                   None if clip is None else float(clip))


def stack_shapes(prefix: str, widths: list[int]) -> dict[str, tuple[int, ...]]:
    """The weights of linear layers through ``widths`` with an activation between them, named as
    ``nn.Sequential`` names them (the activations hold none, so the layers are 0, 2, 4, ...)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i, (n_in, n_out) in enumerate(itertools.pairwise(widths)):
        shapes[f"{prefix}.{2 * i}.weight"] = (n_out, n_in)
        shapes[f"{prefix}.{2 * i}.bias"] = (n_out,)
    return shapes


def weight_shapes(model_class: str, config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a model of this class, by state-dict name; ValueError where it cannot be built."""
    if model_class not in MODEL_NAMES:
        raise ValueError(f"unknown model type {model_class!r}; known: {', '.join(MODEL_NAMES)}")
    config.check(model_class)
    shapes = {**stack_shapes("encoder", config.widths), **stack_shapes("decoder", config.widths[::-1])}
    if model_class == "memae":
        shapes["memory"] = (config.memory_slots, config.bottleneck)
    return shapes


def classifier_shapes(spec: ClassifierSpec, config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of this classifier, by state-dict name (without the artifact's prefix)."""
    config.check("autoencoder")
    return {name: shape for prefix, widths in spec.widths(config).items()
            for name, shape in stack_shapes(prefix, widths).items()}


def check_weights(arrays: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]], what: str) -> None:
    """ValueError naming the first missing, unexpected or misshapen tensor of ``what``."""
    missing = sorted(set(expected) - set(arrays))
    unexpected = sorted(set(arrays) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{what}: missing tensors {missing}, unexpected tensors {unexpected}")
    for name, shape in expected.items():
        if tuple(arrays[name].shape) != shape:
            raise ValueError(f"{what}: {name} has shape {tuple(arrays[name].shape)}, expected {shape}")
