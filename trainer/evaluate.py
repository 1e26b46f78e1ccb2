"""Detection metrics for any scorer, and the scikit-learn baselines scored on the same split.

>>> card_precision_at_k(np.array([0.9, 0.1, 0.8]), np.array([1, 0, 0]), np.array([7, 8, 9]), np.array([0, 0, 0]), k=2)
0.5
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.ensemble import IsolationForest
from sklearn.metrics import average_precision_score, roc_auc_score

from trainer.calibrate import threshold_for


def card_precision_at_k(scores: np.ndarray, labels: np.ndarray, customers: np.ndarray, days: np.ndarray,
                        k: int = 100) -> float:
    """Handbook's card precision@k: per day, the share of the k customers with the highest max
    score that had a fraud that day, averaged over days."""
    frame = pd.DataFrame({"day": days, "customer": customers, "score": scores, "fraud": labels})
    per_card = frame.groupby(["day", "customer"], sort=False).agg(score=("score", "max"), fraud=("fraud", "max"))
    top = per_card.sort_values("score", ascending=False).groupby(level="day", sort=False).head(k)
    per_day = top.groupby(level="day")["fraud"].sum() / k
    return float(per_day.mean())


@dataclass
class DetectorResult:
    """One detector's test scores and metrics, plus what it cost."""

    name: str
    scores: np.ndarray
    threshold: float
    metrics: dict[str, Any] = field(default_factory=dict)
    fit_seconds: float = float("nan")
    peak_rss_mb: float = float("nan")


def detection_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float,
                      customers: np.ndarray | None = None, days: np.ndarray | None = None) -> dict[str, Any]:
    """ROC-AUC, AP, recall/precision at the threshold, confusion matrix, card precision@100/day."""
    labels = labels.astype(bool)
    flagged = scores > threshold
    tp, fp = int(np.sum(flagged & labels)), int(np.sum(flagged & ~labels))
    fn, tn = int(np.sum(~flagged & labels)), int(np.sum(~flagged & ~labels))
    both = 0 < labels.sum() < len(labels)
    metrics: dict[str, Any] = {
        "rows": len(labels), "frauds": int(labels.sum()),
        "roc_auc": float(roc_auc_score(labels, scores)) if both else None,
        "average_precision": float(average_precision_score(labels, scores)) if both else None,
        "threshold": float(threshold), "alert_share": float(flagged.mean()) if len(flagged) else 0.0,
        "recall_at_alert_rate": tp / (tp + fn) if tp + fn else None,
        "precision_at_alert_rate": tp / (tp + fp) if tp + fp else None,
        "confusion_matrix": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
        "card_precision_at_100_per_day": None,
    }
    if customers is not None and days is not None and len(labels):
        metrics["card_precision_at_100_per_day"] = card_precision_at_k(scores, labels, customers, days)
    return metrics


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pca_components(n_features: int) -> int:
    """Principal components kept by the PCA baseline: 8 (the reference data's baseline), fewer for narrow tables."""
    return max(1, min(8, n_features - 1))


def run_baselines(train_x: np.ndarray, val_normal_x: np.ndarray, test_x: np.ndarray, alert_rate: float,
                  seed: int = 0) -> list[DetectorResult]:
    """Isolation Forest and PCA reconstruction error, fitted on the model's (preprocessed) train rows."""
    results = []
    for name, fit_score in (("isolation_forest", _iforest), ("pca", _pca)):
        started = time.perf_counter()
        val_scores, test_scores = fit_score(train_x, (val_normal_x, test_x), seed)
        result = DetectorResult(name, test_scores, threshold_for(val_scores, alert_rate))
        result.fit_seconds = time.perf_counter() - started
        results.append(result)
    return results


def _iforest(train_x: np.ndarray, parts: tuple[np.ndarray, ...], seed: int) -> list[np.ndarray]:
    forest = IsolationForest(n_estimators=200, random_state=seed, n_jobs=1).fit(train_x)
    return [-forest.score_samples(p) for p in parts]  # higher = more anomalous


def _pca(train_x: np.ndarray, parts: tuple[np.ndarray, ...], seed: int) -> list[np.ndarray]:
    pca = PCA(n_components=pca_components(train_x.shape[1]), random_state=seed).fit(train_x)
    return [np.mean(np.square(pca.inverse_transform(pca.transform(p)) - p), axis=1) for p in parts]
