"""How a new version scores: the reconstruction error alone or the hybrid, chosen on validation rows.

The hybrid adds the mean distance to the k nearest normal training rows (a bank of at most
``BANK_ROWS`` of them, standardized) to the reconstruction error, each divided by its mean on
the normal validation rows. ``auto`` keeps the one with the higher average precision on
labelled validation rows; without labelled frauds there it takes the hybrid, which ranks
better on ADBench's twelve tables (docs/model-quality.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import average_precision_score

from pipeline.models import Autoencoder
from pipeline.neighbours import ScoreSpec, knn_distance
from trainer.calibrate import feature_errors

log = logging.getLogger(__name__)

SCORE_CHOICES = ("auto", "hybrid", "reconstruction")
DEFAULT_K = 5
BANK_ROWS = 16384  # bounds the serving cost: (batch x bank) distances per micro-batch


@dataclass(frozen=True)
class ScoreParts:
    """Per-row parts of the score of some rows: per-feature squared errors and bank distances."""

    errors: np.ndarray  # (rows, features) squared reconstruction error, standardized space
    distance: np.ndarray | None  # (rows,) mean distance to the k nearest bank rows; None without a bank

    @property
    def mse(self) -> np.ndarray:
        """Mean squared reconstruction error per row (rows,)."""
        return self.errors.mean(axis=1)


def sample_bank(train_x: np.ndarray, rows: int = BANK_ROWS, seed: int = 0) -> np.ndarray:
    """Standardized training rows kept for the distance: all, or a seeded sample in row order."""
    if len(train_x) <= rows:
        return np.ascontiguousarray(train_x, dtype=np.float32)
    keep = np.sort(np.random.default_rng(seed).choice(len(train_x), rows, replace=False))
    return np.ascontiguousarray(train_x[keep], dtype=np.float32)


def score_parts(model: Autoencoder, x: np.ndarray, bank: np.ndarray | None, device: torch.device,
                k: int = DEFAULT_K) -> ScoreParts:
    """Reconstruction errors of standardized rows x (rows, features) and, given a bank, distances."""
    errors = feature_errors(model, x, device)
    if bank is None:
        return ScoreParts(errors, None)
    with torch.inference_mode():
        distance = knn_distance(torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(device),
                                torch.from_numpy(bank).to(device), k)
    return ScoreParts(errors, distance.cpu().numpy())


def hybrid_spec(normal: ScoreParts, k: int = DEFAULT_K) -> ScoreSpec:
    """The hybrid's scales: each part's mean on normal validation rows."""
    assert normal.distance is not None
    return ScoreSpec("hybrid", k, _positive(float(normal.mse.mean())), _positive(float(normal.distance.mean())))


def _positive(scale: float) -> float:
    return scale if np.isfinite(scale) and scale > 1e-12 else 1.0


def choose(option: str, normal: ScoreParts, rows: ScoreParts | None, labels: np.ndarray | None,
           k: int = DEFAULT_K) -> tuple[ScoreSpec, dict[str, float]]:
    """The scoring of the new version and, for ``auto`` on labelled validation rows, each
    candidate's validation average precision (what the choice rested on)."""
    if option == "reconstruction":
        return ScoreSpec(), {}
    candidates = {"reconstruction": ScoreSpec(), "hybrid": hybrid_spec(normal, k)}
    if option == "hybrid":
        return candidates["hybrid"], {}
    if rows is None or labels is None or not 0 < int(labels.sum()) < len(labels):
        log.info("scoring: hybrid (auto; no labelled frauds among the validation rows to choose by)")
        return candidates["hybrid"], {}
    ap = {name: float(average_precision_score(labels, spec.combine(rows.mse, rows.distance)))
          for name, spec in candidates.items()}
    best = max(ap, key=lambda name: ap[name])
    log.info("scoring: %s (auto; validation average precision %s)", best,
             ", ".join(f"{name} {value:.3f}" for name, value in ap.items()))
    return candidates[best], ap
