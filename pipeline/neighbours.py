"""Distance to the nearest normal training rows, and how a model version combines it with the
reconstruction error into one anomaly score (higher = more anomalous).

Pure tensor code (CPU or CUDA), shared by the trainer (calibration) and ``Scorer`` (serving),
so the two can never combine the parts differently.

>>> bank = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
>>> knn_distance(torch.tensor([[0.0, 0.0], [6.0, 8.0]]), bank, k=1).tolist()
[0.0, 5.0]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

METHODS = ("reconstruction", "hybrid")
# Rows of a distance block (queries x bank) computed at once: about 64 MB of float32.
BLOCK_ENTRIES = 16 * 1024 * 1024


def knn_distance(x: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """Mean Euclidean distance of each row of x (rows, features) to its k nearest bank rows -> (rows,)."""
    k = min(k, bank.shape[0])
    rows = max(1, BLOCK_ENTRIES // max(1, bank.shape[0]))
    parts = []
    for start in range(0, x.shape[0], rows):
        block = torch.cdist(x[start : start + rows], bank, compute_mode="donot_use_mm_for_euclid_dist")
        parts.append(torch.topk(block, k, dim=1, largest=False).values.mean(dim=1))  # (block rows,)
    return torch.cat(parts) if parts else x.new_zeros(0)


@dataclass(frozen=True)
class ScoreSpec:
    """How a version scores: the mean squared reconstruction error alone, or (hybrid) that error
    plus the mean distance to the k nearest of the bank's normal training rows, each divided by
    its scale (its mean on normal validation rows) so that neither dominates by its units."""

    method: str = "reconstruction"
    k: int = 5
    reconstruction_scale: float = 1.0
    distance_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"scoring method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.k < 1 or not (self.reconstruction_scale > 0 and self.distance_scale > 0):
            raise ValueError("scoring needs k >= 1 and positive, finite scales")
        if not (np.isfinite(self.reconstruction_scale) and np.isfinite(self.distance_scale)):
            raise ValueError("scoring scales must be finite")

    @property
    def uses_bank(self) -> bool:
        """Whether scores need the bank of training rows."""
        return self.method == "hybrid"

    def combine(self, mse: torch.Tensor | np.ndarray, distance: torch.Tensor | np.ndarray | None) -> Any:
        """The anomaly score from its parts (rows,); distance is ignored without a bank."""
        if not self.uses_bank:
            return mse
        return mse / self.reconstruction_scale + distance / self.distance_scale

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the manifest."""
        return {"method": self.method, "k": self.k, "reconstruction_scale": float(self.reconstruction_scale),
                "distance_scale": float(self.distance_scale)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScoreSpec:
        """Inverse of ``to_dict``; ValueError on unknown methods or bad numbers."""
        return cls(str(data["method"]), int(data["k"]), float(data["reconstruction_scale"]),
                   float(data["distance_scale"]))
