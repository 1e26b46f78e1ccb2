"""The fitted preprocessing between raw feature values and the model's standardized inputs.

Optionally a signed log1p on heavy-tailed columns, then standardisation with the mean and
standard deviation of the training rows. Serialised as plain JSON in the model manifest, so
the trainer and the worker can never transform features differently.

>>> p = Preprocessing.fit(np.array([[1.0, 0.0], [3.0, 0.0]], np.float32), ("a", "b"), log_features=())
>>> p.transform(np.array([[2.0, 5.0]], np.float32)).tolist()
[[0.0, 5.0]]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# A feature whose training std is below this is constant: it is centred but not scaled.
MIN_STD = 1e-6


def signed_log1p(x: np.ndarray) -> np.ndarray:
    """sign(x)·log(1+|x|): log1p that is defined, odd and invertible on all reals."""
    return np.sign(x) * np.log1p(np.abs(x))


def signed_expm1(y: np.ndarray) -> np.ndarray:
    """Inverse of ``signed_log1p``."""
    return np.sign(y) * np.expm1(np.abs(y))


@dataclass(frozen=True)
class Preprocessing:
    """Per-feature log flag, mean and std, in the artifact's feature order."""

    feature_names: tuple[str, ...]
    log_mask: np.ndarray  # (features,) bool
    mean: np.ndarray  # (features,) float64, after the log
    std: np.ndarray  # (features,) float64, >= MIN_STD

    @classmethod
    def fit(cls, x: np.ndarray, feature_names: Sequence[str], log_features: Sequence[str] = ()) -> Preprocessing:
        """Fit on training rows x (rows, features), raw units."""
        names = tuple(feature_names)
        if x.ndim != 2 or x.shape[1] != len(names) or x.shape[0] == 0:
            raise ValueError(f"need a non-empty (rows, {len(names)}) array, got shape {x.shape}")
        unknown = sorted(set(log_features) - set(names))
        if unknown:
            raise ValueError(f"log features {unknown} are not among the features")
        log_mask = np.array([n in set(log_features) for n in names], dtype=bool)
        logged = x.astype(np.float64)
        logged[:, log_mask] = signed_log1p(logged[:, log_mask])
        std = logged.std(axis=0)
        return cls(names, log_mask, logged.mean(axis=0), np.where(std < MIN_STD, 1.0, std))

    @property
    def log_features(self) -> tuple[str, ...]:
        """Names of the log-transformed features."""
        return tuple(n for n, flag in zip(self.feature_names, self.log_mask, strict=True) if flag)

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Raw (rows, features) -> standardized float32 (rows, features)."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != len(self.feature_names):
            raise ValueError(f"expected (rows, {len(self.feature_names)}) features, got shape {x.shape}")
        if self.log_mask.any():
            x = x.copy()
            x[:, self.log_mask] = signed_log1p(x[:, self.log_mask])
        return ((x - self.mean.astype(np.float32)) / self.std.astype(np.float32)).astype(np.float32, copy=False)

    def inverse_transform(self, z: np.ndarray) -> np.ndarray:
        """Standardized (rows, features) -> raw units float32 (rows, features)."""
        raw = np.asarray(z, dtype=np.float64) * self.std + self.mean
        with np.errstate(over="ignore"):  # a wild reconstruction of a logged column may exceed float range
            raw[:, self.log_mask] = signed_expm1(raw[:, self.log_mask])
        return raw.astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form (lists of Python floats, exact through JSON)."""
        return {
            "feature_names": list(self.feature_names),
            "log_features": list(self.log_features),
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        """Inverse of ``to_dict``; ValueError when lengths or names disagree."""
        names = tuple(str(n) for n in data["feature_names"])
        mean = np.asarray(data["mean"], dtype=np.float64)
        std = np.asarray(data["std"], dtype=np.float64)
        if mean.shape != (len(names),) or std.shape != (len(names),):
            raise ValueError(f"mean/std must have {len(names)} values, got {mean.shape[0]} and {std.shape[0]}")
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std > 0)):
            raise ValueError("mean must be finite and std finite and positive")
        unknown = sorted(set(data["log_features"]) - set(names))
        if unknown:
            raise ValueError(f"log features {unknown} are not among the features")
        log_mask = np.array([n in set(data["log_features"]) for n in names], dtype=bool)
        return cls(names, log_mask, mean, std)
