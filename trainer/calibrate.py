"""Threshold, explanation statistics and drift histogram from normal validation rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from pipeline.artifact import Explanation, ScoreHistogram
from pipeline.models import Autoencoder

DEFAULT_ALERT_RATE = 0.005
HISTOGRAM_BINS = 20


def feature_errors(model: Autoencoder, x: np.ndarray, device: torch.device, batch_size: int = 65536) -> np.ndarray:
    """Squared reconstruction error per feature (rows, features) of standardized rows x."""
    model.eval()
    out = np.empty_like(x, dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size], np.float32)).to(device)
            out[start : start + len(batch)] = torch.square(model(batch) - batch).cpu().numpy()
    return out


def threshold_for(scores: np.ndarray, alert_rate: float) -> float:
    """The (1 - alert_rate) quantile of normal scores: about alert_rate of them lie above it."""
    if not 0 < alert_rate < 1:
        raise ValueError(f"alert_rate={alert_rate} must lie strictly between 0 and 1")
    return float(np.quantile(scores.astype(np.float64), 1 - alert_rate))


def explanation_stats(errors: np.ndarray) -> Explanation:
    """Per-feature mean and std of the squared error on normal rows (std guarded away from 0)."""
    stds = errors.std(axis=0)
    return Explanation(errors.mean(axis=0).astype(np.float32), np.maximum(stds, 1e-6).astype(np.float32))


def score_histogram(scores: np.ndarray, bins: int = HISTOGRAM_BINS) -> ScoreHistogram:
    """Quantile-binned histogram of normal scores; edges run from 0 to the largest score.

    Equal-mass bins make a PSI against live traffic meaningful; the worker should count
    scores above the last edge in the last bin.
    """
    inner = np.quantile(scores.astype(np.float64), np.linspace(0, 1, bins + 1)[1:-1])
    top = max(float(scores.max()), float(inner.max(initial=0.0))) * (1 + 1e-9) + 1e-12
    edges = np.unique(np.concatenate([[0.0], inner[inner > 0], [top]]))
    counts, _ = np.histogram(np.clip(scores, 0, top), bins=edges)
    return ScoreHistogram(edges, counts.astype(np.int64))


@dataclass(frozen=True)
class LabelledCalibration:
    """Ranking quality, precision, recall and F1 at the chosen threshold, and the F1-optimal threshold."""

    roc_auc: float
    average_precision: float
    precision: float
    recall: float
    f1: float
    best_f1_threshold: float
    best_f1: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dict(vars(self))


def labelled_calibration(scores: np.ndarray, labels: np.ndarray, threshold: float) -> LabelledCalibration | None:
    """Metrics on labelled validation rows (all of them, frauds included); None without frauds."""
    labels = labels.astype(bool)
    if labels.sum() == 0 or labels.all():
        return None
    flagged = scores > threshold
    tp = float(np.sum(flagged & labels))
    precision = tp / max(1.0, float(flagged.sum()))
    recall = tp / float(labels.sum())
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    p, r, t = precision_recall_curve(labels, scores)
    f1s = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0.0)[:-1]  # (thresholds,)
    best = int(np.argmax(f1s))
    # precision_recall_curve flags scores >= t; nudge down so "scores > threshold" matches.
    ranking = float(roc_auc_score(labels, scores)), float(average_precision_score(labels, scores))
    return LabelledCalibration(*ranking, precision, recall, f1, float(np.nextafter(t[best], -np.inf)), float(f1s[best]))
