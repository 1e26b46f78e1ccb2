"""Fit a fraud classifier beside the trained autoencoder on labelled rows (``fit --score finetuned|stacked``),
calibrate it by the alert budget, and fit the gradient-boosted baseline the evaluation compares it with
on the same rows.

The classifier trains with binary cross-entropy and Adam on the labelled training rows and keeps the
epoch with the highest average precision on its validation part (``trainer.labels``). Its width,
schedule and the baseline's settings were chosen on two validation windows of the handbook data's
labelled period (docs/model-quality.md), the baseline's by the same search as ours.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import average_precision_score, roc_auc_score
from torch import nn

from pipeline.classifier import ClassifierSpec, build_classifier
from pipeline.models import Autoencoder
from pipeline.preprocess import Preprocessing
from trainer import calibrate
from trainer.evaluate import DetectorResult
from trainer.labels import LabelledRows
from trainer.train import TrainConfig, seed_everything

log = logging.getLogger(__name__)

WIDTHS = {"finetuned": 64, "stacked": 64}  # finetuned: code -> 64 -> 1; stacked: 2f -> 64 -> 32 -> 1
SCHEDULE = TrainConfig(epochs=40, batch_size=512, learning_rate=1e-3, patience=5)
BOOSTING = {"learning_rate": 0.05, "max_leaf_nodes": 31, "min_samples_leaf": 100, "l2_regularization": 1.0,
            "max_iter": 1000, "early_stopping": True, "n_iter_no_change": 30}
CHUNK = 65536


@dataclass
class ClassifierHistory:
    """Loss and validation average precision per epoch, and what training cost."""

    train_loss: list[float] = field(default_factory=list)
    val_ap: list[float] = field(default_factory=list)
    best_epoch: int = 0  # 0-based
    seconds: float = 0.0
    epoch_cap: int = 0
    stopped_early: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the manifest (best epoch 1-based)."""
        return {**vars(self), "best_epoch": self.best_epoch + 1}


def _reconstruct(autoencoder: Autoencoder, x: torch.Tensor) -> torch.Tensor:
    """The frozen autoencoder's reconstruction (rows, f) of x (rows, f), in chunks, without gradients."""
    with torch.no_grad():
        return torch.cat([autoencoder(x[i : i + CHUNK]) for i in range(0, len(x), CHUNK)]) if len(x) else x.clone()


def probabilities(classifier: nn.Module, autoencoder: Autoencoder, x: np.ndarray, device: torch.device) -> np.ndarray:
    """Fraud probability (rows,) of standardized rows x (rows, f), as the Scorer computes it."""
    classifier.eval()
    autoencoder.eval()
    out = np.empty(len(x), np.float32)
    with torch.inference_mode():
        for start in range(0, len(x), CHUNK):
            batch = torch.from_numpy(np.ascontiguousarray(x[start : start + CHUNK], np.float32)).to(device)
            out[start : start + len(batch)] = torch.sigmoid(classifier(batch, autoencoder(batch))).float().cpu().numpy()
    return out


def fit_classifier(kind: str, autoencoder: Autoencoder, fit: tuple[np.ndarray, np.ndarray],
                   val: tuple[np.ndarray, np.ndarray], train: TrainConfig, device: torch.device
                   ) -> tuple[nn.Module, ClassifierHistory]:
    """Train a ``kind`` classifier on standardized fit rows (x, y); keep the epoch with the best validation AP."""
    config = dataclasses.replace(SCHEDULE, seed=train.seed, progress=train.progress, threads=train.threads)
    previous_threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(max(1, config.threads))
    try:
        return _fit(kind, autoencoder, fit, val, config, device)
    finally:
        torch.set_num_threads(previous_threads)


def _fit(kind: str, autoencoder: Autoencoder, fit: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
         config: TrainConfig, device: torch.device) -> tuple[nn.Module, ClassifierHistory]:
    generator = seed_everything(config.seed)
    classifier = build_classifier(ClassifierSpec(kind, WIDTHS[kind]), autoencoder.config)
    classifier.start_from(autoencoder)
    classifier.to(device)
    autoencoder.to(device).eval()
    x = torch.from_numpy(np.ascontiguousarray(fit[0], np.float32)).to(device)  # (rows, f)
    y = torch.from_numpy(fit[1].astype(np.float32)).to(device)  # (rows,)
    recon = _reconstruct(autoencoder, x)
    optimiser = torch.optim.Adam(classifier.parameters(), lr=config.learning_rate)
    history = ClassifierHistory(epoch_cap=config.epochs or 0)
    best_state, best, waited, started = None, -np.inf, 0, time.perf_counter()
    batch, patience = config.batch_size or 512, config.patience or 5
    for epoch in range(history.epoch_cap):
        classifier.train()
        order = torch.randperm(len(x), generator=generator).to(device)
        losses = []
        for start in range(0, len(x), batch):
            rows = order[start : start + batch]
            loss = F.binary_cross_entropy_with_logits(classifier(x[rows], recon[rows]), y[rows])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
        history.train_loss.append(float(np.mean(losses)))
        history.val_ap.append(float(average_precision_score(val[1], probabilities(classifier, autoencoder, val[0],
                                                                                    device))))
        log.info("classifier epoch %d: train loss %.5f, validation AP %.4f", epoch + 1, history.train_loss[-1],
                 history.val_ap[-1])
        if history.val_ap[-1] > best:
            best_state, best, waited = copy.deepcopy(classifier.state_dict()), history.val_ap[-1], 0
            history.best_epoch = epoch
        else:
            waited += 1
            if waited >= patience:
                history.stopped_early = True
                break
    if best_state is not None:
        classifier.load_state_dict(best_state)
    history.seconds = time.perf_counter() - started
    return classifier.eval(), history


def calibration_fields(classifier: nn.Module, autoencoder: Autoencoder, prep: Preprocessing, normal_raw: np.ndarray,
                       labelled_val: tuple[np.ndarray, np.ndarray] | None, alert_rate: float,
                       device: torch.device) -> dict[str, Any]:
    """Manifest fields from the validation rows counted as normal (normal_raw, raw units): threshold by
    the alert budget, score histogram, explanation statistics; metrics on the labelled validation rows
    (labelled_val, raw units) where there are any."""
    x = prep.transform(normal_raw)
    scores = probabilities(classifier, autoencoder, x, device)
    threshold = calibrate.threshold_for(scores, alert_rate)
    metrics: dict[str, Any] = {"validation": {"normal_rows": len(scores), "threshold": threshold}}
    if labelled_val is not None:
        labelled = calibrate.labelled_calibration(
            probabilities(classifier, autoencoder, prep.transform(labelled_val[0]), device), labelled_val[1], threshold)
        if labelled is not None:
            metrics["validation"].update(labelled.to_dict())
    return {
        "feature_names": prep.feature_names, "preprocessing": prep, "threshold": threshold, "alert_rate": alert_rate,
        "explanation": calibrate.explanation_stats(calibrate.feature_errors(autoencoder, x, device)),
        "score_histogram": calibrate.score_histogram(scores), "metrics": metrics, "classifier": classifier,
    }


def version_fields(kind: str, model: Autoencoder, prep: Preprocessing, x: np.ndarray, labels: np.ndarray,
                   val_split: np.ndarray, labelled: LabelledRows, val_normal: np.ndarray, train: TrainConfig,
                   alert_rate: float, device: torch.device) -> dict[str, Any]:
    """Manifest fields of a version fitted with labels: train a ``kind`` classifier on the labelled rows of raw
    x (rows, f), calibrate it on the validation rows counted as normal (val_normal, a subset of val_split)."""
    fit_rows = (prep.transform(x[labelled.fit]), labels[labelled.fit])
    val_rows = (prep.transform(x[labelled.val]), labels[labelled.val])
    classifier, history = fit_classifier(kind, model, fit_rows, val_rows, train, device)
    known_val = val_split & labelled.known
    fields = calibration_fields(classifier, model, prep, x[val_normal],
                                (x[known_val], labels[known_val]) if known_val.any() else None, alert_rate, device)
    fields["metrics"]["validation"].update(
        score_option=kind, scoring=kind, classifier_validation=classifier_metrics(classifier, model, val_rows, device))
    fields["metrics"]["classifier_training"] = history.to_dict()
    return fields


def classifier_metrics(classifier: nn.Module, autoencoder: Autoencoder, val: tuple[np.ndarray, np.ndarray],
                       device: torch.device) -> dict[str, float]:
    """ROC-AUC and average precision on the classifier's own (standardized) validation rows."""
    scores = probabilities(classifier, autoencoder, val[0], device)
    return {"roc_auc": float(roc_auc_score(val[1], scores)), "average_precision": float(average_precision_score(
        val[1], scores))}


def boosted_baseline(raw: np.ndarray, labels: np.ndarray, rows: LabelledRows, normal_val_raw: np.ndarray,
                     test_raw: np.ndarray, alert_rate: float, seed: int = 0) -> DetectorResult:
    """scikit-learn's HistGradientBoostingClassifier on the raw features of the classifier's labelled rows,
    early-stopped on the same validation part; threshold by the same alert budget."""
    started = time.perf_counter()
    model = HistGradientBoostingClassifier(**BOOSTING, random_state=seed)
    model.fit(raw[rows.fit], labels[rows.fit], X_val=raw[rows.val], y_val=labels[rows.val])
    threshold = calibrate.threshold_for(model.predict_proba(normal_val_raw)[:, 1], alert_rate)
    result = DetectorResult("hist_gradient_boosting", model.predict_proba(test_raw)[:, 1], threshold)
    result.fit_seconds = time.perf_counter() - started
    log.info("hist_gradient_boosting: %d iterations, %.1f s", model.n_iter_, result.fit_seconds)
    return result
