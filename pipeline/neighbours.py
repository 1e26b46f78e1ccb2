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
FAR = 1e15  # |value| cap of unclipped distances: squared sums of 15 features stay finite in float32


def knn_distance(x: torch.Tensor, bank: torch.Tensor, k: int, in_bank: torch.Tensor | None = None) -> torch.Tensor:
    """Mean Euclidean distance of each row of x (rows, features) to its k nearest bank rows -> (rows,).

    ``in_bank`` (rows,) bool marks rows of x that are themselves bank rows: their own (zero)
    distance is left out (leave-one-out), so they score like rows the bank has never seen.
    The nearest rows are found with one matrix product per block (|x|² - 2 x·b + |b|², the fast
    way on CPU and GPU); their distances are then computed exactly.
    """
    k = min(k, bank.shape[0])
    wanted = k if in_bank is None else min(k + 1, bank.shape[0])
    rows = max(1, BLOCK_ENTRIES // max(1, bank.shape[0]))
    bank_sq = torch.square(bank).sum(dim=1)  # (bank rows,)
    parts = []
    for start in range(0, x.shape[0], rows):
        block = x[start : start + rows]
        sq = torch.square(block).sum(dim=1, keepdim=True) - 2 * block @ bank.T + bank_sq  # (block rows, bank rows)
        nearest = torch.topk(sq, wanted, dim=1, largest=False).indices  # (block rows, wanted)
        exact = torch.linalg.vector_norm(block[:, None, :] - bank[nearest], dim=2)  # (block rows, wanted)
        exact = torch.sort(exact, dim=1).values
        if in_bank is None:
            parts.append(exact.mean(dim=1))
            continue
        skip_self = exact[:, 1 : k + 1].mean(dim=1) if exact.shape[1] > 1 else exact[:, 0]
        parts.append(torch.where(in_bank[start : start + rows], skip_self, exact[:, :k].mean(dim=1)))
    return torch.cat(parts) if parts else x.new_zeros(0)


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

    def distance_space(self, x: torch.Tensor) -> torch.Tensor:
        """Standardized rows (rows, features) as the distance sees them: clipped to ±clip, or (no
        clip) to ±FAR, so that an overflowing input still lies far away instead of at NaN."""
        bound = FAR if self.clip is None else self.clip
        return torch.clamp(torch.nan_to_num(x, nan=0.0), -bound, bound)

    @property
    def uses_bank(self) -> bool:
        """Whether scores need the bank of training rows."""
        return self.method == "hybrid"

    def combine(self, mse: torch.Tensor | np.ndarray, distance: torch.Tensor | np.ndarray | None) -> Any:
        """The anomaly score from its parts (rows,); distance is ignored without a bank."""
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
