"""Fit, calibrate, export and evaluate one model version: the work behind ``fraud-train fit``."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline.artifact import CHALLENGER, CURRENT, ModelArtifact, load_artifact, publish_current, save_artifact
from pipeline.classifier import KINDS
from pipeline.errors import ConfigError, InputDataError
from pipeline.features import HANDBOOK_FEATURES, TableLayout
from pipeline.models import DEFAULT_MODEL, Autoencoder, ModelConfig, build_model, default_bottleneck
from pipeline.preprocess import Preprocessing
from pipeline.scoring import Scorer, resolve_device, score_frame
from pipeline.streamfeatures import DELAY_DAYS
from trainer import calibrate, evaluate, hybrid, supervised
from trainer.data import check_features, check_labels, event_times
from trainer.labels import DEFAULT_LABEL_DELAY_DAYS, LabelledRows, known_labels, labelled_rows
from trainer.options import DEFAULT_TEST_FRACTION
from trainer.report import write_report
from trainer.split import Split, SplitSpec, time_split
from trainer.train import History, TrainConfig, fit, seed_everything

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitOptions:
    """Everything ``fit`` needs besides the table."""

    output: Path
    model: str = DEFAULT_MODEL
    model_params: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields except n_features
    train: TrainConfig = field(default_factory=TrainConfig)
    split: SplitSpec = field(default_factory=SplitSpec)
    alert_rate: float = calibrate.DEFAULT_ALERT_RATE
    device: str = "auto"
    baselines: bool = True
    publish: bool = True
    challenger: bool = False  # publish as the root's challenger (scored beside the current one) instead
    score: str = "auto"  # auto, hybrid or reconstruction (trainer.hybrid); finetuned or stacked (with labels)
    bank_rows: int = hybrid.BANK_ROWS  # most rows kept for the hybrid's distance
    input_form: str = "features"  # what the worker's input carries: features, or raw (features made in stream)
    label_delay_days: int = DEFAULT_LABEL_DELAY_DAYS  # finetuned/stacked: labels known this long after a row


@dataclass
class FitResult:
    """The exported version and what was learned on the way."""

    version_dir: Path
    artifact: ModelArtifact
    history: History
    report: Path | None = None
    labelled: LabelledRows | None = None  # the classifier's rows, for versions fitted with labels


def fingerprint(x: np.ndarray) -> str:
    """sha256 of the training rows' raw feature values (rows, features), in order."""
    return hashlib.sha256(np.ascontiguousarray(x, dtype=np.float32).tobytes()).hexdigest()


def _masks(split: Split, labels: np.ndarray | None, known: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Training rows (normal only when labelled) and normal validation rows; refuses empty ones. Rows whose
    label is not ``known`` (label delay) count as normal, as on an unlabelled table."""
    normal = np.ones(len(split.train), bool) if labels is None else labels == 0
    if known is not None:
        normal |= ~known
    train, val_normal = split.train & normal, split.val & normal
    if not train.any():
        raise InputDataError("the training set is empty: no (normal) rows before the validation period; "
                             "check --start/--val-start or the fractions")
    if not val_normal.any():
        raise InputDataError("the validation set has no normal rows; check --val-start/--test-start or fractions")
    return train, val_normal


def resolve_split(spec: SplitSpec, labelled: bool) -> SplitSpec:
    """An unset test fraction: 0.2 on a labelled table, none on an unlabelled one (nothing to test)."""
    if spec.test_fraction is not None:
        return spec
    test_fraction = DEFAULT_TEST_FRACTION if labelled else 0.0
    if not labelled and not (spec.val_start or spec.test_start):
        log.info("unlabelled table: no test rows set aside; %.0f %% of the rows (the last) validate",
                 100 * spec.val_fraction)
    return dataclasses.replace(spec, test_fraction=test_fraction)


def model_config(name: str, n_features: int, params: dict[str, Any]) -> ModelConfig:
    """The model's config for this many features: the bottleneck, unless given, derived from the
    feature count (``default_bottleneck``); one that does not compress the input is refused."""
    bottleneck = params.get("bottleneck") or default_bottleneck(n_features)
    if bottleneck >= n_features and n_features > 1:
        raise ConfigError(f"--bottleneck {bottleneck} must be below the number of features ({n_features}), "
                          "or the model can learn to copy its input")
    return ModelConfig(**{**params, "n_features": n_features, "bottleneck": bottleneck})


def run_fit(frame: pd.DataFrame, layout: TableLayout, options: FitOptions) -> FitResult:
    """Train on the split's normal rows, calibrate on validation, export, evaluate on test, publish."""
    if options.input_form == "raw" and tuple(layout.features) != HANDBOOK_FEATURES:
        raise ConfigError(f"--input raw: the worker computes the handbook's 15 features from raw transactions, "
                          f"but this model's features are {', '.join(layout.features[:4])}...; use --input "
                          "features, or train on a handbook table")
    x = check_features(frame, layout.features)  # (rows, features) raw
    labels = check_labels(frame, layout)
    if options.score in KINDS and labels is None:
        raise InputDataError(f"--score {options.score} trains a classifier on labelled rows, but the table has no "
                             f"label column ({layout.label_column or 'none is named'}); pass --label-column, or "
                             "use an unsupervised --score (auto, hybrid, reconstruction)")
    model_config(options.model, len(layout.features), options.model_params)  # refuse a bad bottleneck first
    options = dataclasses.replace(options, split=resolve_split(options.split, labels is not None))
    times = event_times(frame, layout)
    split = time_split(times, options.split, n_rows=len(frame))
    labelled = None
    if options.score in KINDS and labels is not None:
        known = known_labels(times, split, options.split, options.label_delay_days)
        labelled = labelled_rows(times, split, options.split, labels, known, options.label_delay_days)
    result = fit_split(x, labels, split, layout, options, labelled)
    if labels is not None and split.test.any():
        train_x = result.artifact.preprocessing.transform(x[_masks(split, labels, _known(labelled))[0]])
        result.report = evaluate_split(result.artifact, frame, layout, split, labels, options, result.history,
                                       train_x, labelled)
    if options.publish:
        publish_current(options.output, result.version_dir, CHALLENGER if options.challenger else CURRENT)
    return result


def _known(labelled: LabelledRows | None) -> np.ndarray | None:
    return None if labelled is None else labelled.known


def fit_split(x: np.ndarray, labels: np.ndarray | None, split: Split, layout: TableLayout,
              options: FitOptions, labelled: LabelledRows | None = None) -> FitResult:
    """Train on the normal train rows of raw x (rows, features), calibrate and choose the scoring on
    the validation rows, export the version (unpublished); the test rows are not looked at. With
    ``labelled`` rows (``--score finetuned|stacked``) a classifier is trained on them and scores."""
    train, val_normal = _masks(split, labels, _known(labelled))
    config = model_config(options.model, len(layout.features), options.model_params)
    prep = Preprocessing.fit(x[train], layout.features, layout.log_features)
    device = resolve_device(options.device)
    seed_everything(options.train.seed)  # weight initialisation is part of what the seed fixes
    model = build_model(options.model, config)
    train_x = prep.transform(x[train])
    history = fit(model, train_x, prep.transform(x[val_normal]), options.train, device)
    if labelled is not None and labels is not None:
        fields = supervised.version_fields(options.score, model, prep, x, labels, split.val, labelled, val_normal,
                                           options.train, options.alert_rate, device)
    else:
        bank = None
        if options.score != "reconstruction":
            bank = hybrid.build_bank(train_x, prep.transform(x[val_normal]), options.bank_rows, options.train.seed)
        val_labels = labels[split.val] if labels is not None else None
        fields = _calibration(model, prep, bank, x[split.val], val_labels, x[val_normal], options, device)
    fields["training_data"] = {
        "rows": int(train.sum()), "fingerprint_sha256": fingerprint(x[train]), "layout": layout.name,
        "split": vars(options.split), "train_config": vars(history.config or options.train),
    }
    if labelled is not None and labels is not None:
        fields["training_data"]["labels"] = labelled.describe(labels)
    fields["metrics"]["training"] = {
        "train_loss": history.train_loss, "val_loss": history.val_loss, "best_epoch": history.best_epoch + 1,
        "seconds": history.seconds, "peak_rss_mb": evaluate.peak_rss_mb(), "device": str(device),
        "epoch_cap": history.epoch_cap, "stopped_early": history.stopped_early,
    }
    if options.input_form == "raw":
        fields["input"] = {"form": "raw", "feature_delay_days": DELAY_DAYS}
    version_dir = save_artifact(options.output, model.cpu(), fields)
    return FitResult(version_dir, load_artifact(version_dir), history, labelled=labelled)


def _calibration(model: Autoencoder, prep: Preprocessing, bank: hybrid.Bank | None, val_raw: np.ndarray,
                 val_labels: np.ndarray | None, val_normal_raw: np.ndarray, options: FitOptions,
                 device: torch.device) -> dict[str, Any]:
    """Manifest fields computed on validation rows: scoring, threshold, explanation, histogram, metrics."""
    normal, rows = _validation_parts(model, prep, bank, val_raw, val_labels, val_normal_raw, options, device)
    choice = hybrid.choose(options.score, normal, rows, val_labels)
    scores = choice.scores(normal)
    threshold = calibrate.threshold_for(scores, options.alert_rate)
    metrics: dict[str, Any] = {"validation": {
        "normal_rows": len(scores), "threshold": threshold, "score_option": options.score, "scoring": choice.name,
        "candidates_average_precision": choice.validation_ap}}
    if rows is not None:
        labelled = calibrate.labelled_calibration(choice.scores(rows), val_labels, threshold)
        if labelled is not None:
            metrics["validation"].update(labelled.to_dict())
    fields = {
        "feature_names": prep.feature_names, "preprocessing": prep, "threshold": threshold,
        "alert_rate": options.alert_rate, "explanation": calibrate.explanation_stats(normal.errors),
        "score_histogram": calibrate.score_histogram(scores), "metrics": metrics, "scoring": choice.spec,
    }
    if choice.spec.uses_bank and bank is not None:
        fields["bank"] = bank.rows
    return fields


def _validation_parts(model: Autoencoder, prep: Preprocessing, bank: hybrid.Bank | None, val_raw: np.ndarray,
                      val_labels: np.ndarray | None, val_normal_raw: np.ndarray, options: FitOptions,
                      device: torch.device) -> tuple[hybrid.ScoreParts, hybrid.ScoreParts | None]:
    """Score parts of the normal validation rows and (when labelled) of all validation rows; bank
    members among them are scored leave-one-out."""
    labelled = val_labels is not None and 0 < int(val_labels.sum()) < len(val_labels)
    candidates = hybrid.candidates_for(options.score, labelled)
    rows_of_bank = None if bank is None else bank.rows
    in_bank = None if bank is None else bank.val_in_bank  # (normal validation rows,)
    normal = hybrid.score_parts(model, prep.transform(val_normal_raw), rows_of_bank, device, candidates,
                                in_bank=in_bank)
    if val_labels is None:
        return normal, None
    all_in_bank = None
    if in_bank is not None:
        all_in_bank = np.zeros(len(val_labels), bool)
        all_in_bank[val_labels == 0] = in_bank
    return normal, hybrid.score_parts(model, prep.transform(val_raw), rows_of_bank, device, candidates,
                                      in_bank=all_in_bank)


def evaluate_split(artifact: ModelArtifact, frame: pd.DataFrame, layout: TableLayout, split: Split,
                   labels: np.ndarray, options: FitOptions, history: History | None,
                   train_x: np.ndarray, labelled: LabelledRows | None = None) -> Path:
    """Score the test rows with the exported model (via Scorer) and the baselines (with ``labelled``
    rows also a gradient-boosted classifier on them); write the report."""
    test = frame[split.test]
    test_labels = labels[split.test]
    model_result = score_detector(artifact, test, options.device)
    model_result.fit_seconds = history.seconds if history else float("nan")
    model_result.peak_rss_mb = evaluate.peak_rss_mb()
    results = [model_result]
    if options.baselines:
        prep = artifact.preprocessing
        val_normal = frame[split.val & (labels == 0)]
        results += evaluate.run_baselines(train_x, prep.transform(val_normal[list(layout.features)].to_numpy()),
                                          prep.transform(test[list(layout.features)].to_numpy()),
                                          artifact.alert_rate, options.train.seed)
    if options.baselines and labelled is not None:
        raw = frame[list(layout.features)].to_numpy(np.float32)
        results.append(supervised.boosted_baseline(raw, labels, labelled, raw[_masks(split, labels, labelled.known)[1]],
                                                   raw[split.test], artifact.alert_rate, options.train.seed))
    customers, days = customers_and_days(test, layout)
    for r in results:
        r.metrics = evaluate.detection_metrics(r.scores, test_labels, r.threshold, customers, days)
    context = {"model_version": artifact.version, "model_class": artifact.model_class, "layout": layout.name,
               "alert_rate": artifact.alert_rate, "test_rows": len(test), "test_frauds": int(test_labels.sum())}
    return write_report(artifact.path, results, test_labels, context, history)


def score_detector(artifact: ModelArtifact, rows: pd.DataFrame, device: str) -> evaluate.DetectorResult:
    """The exported model's scores on rows, through the same Scorer the worker uses."""
    batch = score_frame(Scorer(artifact, device=device), rows)
    name = artifact.model_class if artifact.classifier is None else f"{artifact.model_class}+{artifact.classifier.kind}"
    return evaluate.DetectorResult(name, batch.scores, artifact.threshold)


def customers_and_days(rows: pd.DataFrame, layout: TableLayout) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Customer ids and calendar days of rows, when the layout has both."""
    if not layout.key_column or layout.key_column not in rows.columns:
        return None, None
    times = event_times(rows, layout)
    if times is None:
        return None, None
    return rows[layout.key_column].to_numpy(), times.dt.floor("D").to_numpy()
