"""The evaluation report: ``metrics.json``, a readable ``report.md`` and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import precision_recall_curve, roc_curve

from trainer.evaluate import DetectorResult
from trainer.train import History

COLUMNS = (
    ("roc_auc", "ROC-AUC"), ("average_precision", "average precision"),
    ("card_precision_at_100_per_day", "card precision@100/day"), ("recall_at_alert_rate", "recall at alert rate"),
    ("precision_at_alert_rate", "precision at alert rate"), ("alert_share", "alert share"),
)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def metrics_table(results: list[DetectorResult]) -> str:
    """Markdown table, one row per detector."""
    head = "| detector | " + " | ".join(label for _, label in COLUMNS) + " | fit time (s) | peak RSS (MiB) |"
    rows = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    for r in results:
        cells = [_fmt(r.metrics.get(key)) for key, _ in COLUMNS]
        rows.append(f"| {r.name} | " + " | ".join(cells) + f" | {_fmt(r.fit_seconds, 1)} | {_fmt(r.peak_rss_mb, 0)} |")
    return "\n".join(rows)


def confusion_table(results: list[DetectorResult]) -> str:
    """Markdown confusion matrices at each detector's calibrated threshold."""
    rows = ["| detector | threshold | TN | FP | FN | TP |", "|---|---|---|---|---|---|"]
    for r in results:
        cm = r.metrics["confusion_matrix"]
        rows.append(f"| {r.name} | {r.threshold:.4g} | {cm['tn']} | {cm['fp']} | {cm['fn']} | {cm['tp']} |")
    return "\n".join(rows)


def plot_loss(history: History, path: Path) -> None:
    """Train and validation loss per epoch."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    epochs = np.arange(1, len(history.train_loss) + 1)
    ax.plot(epochs, history.train_loss, label="train")
    ax.plot(epochs, history.val_loss, label="validation")
    ax.set(xlabel="epoch", ylabel="reconstruction loss", yscale="log", title="Loss per epoch")
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")


def plot_histogram(result: DetectorResult, labels: np.ndarray, path: Path) -> None:
    """Score histograms of normal and fraud rows, log-scaled counts."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    bins = np.histogram_bin_edges(result.scores, bins=80)
    for mask, name in ((labels == 0, "normal"), (labels == 1, "fraud")):
        ax.hist(result.scores[mask], bins=bins, alpha=0.6, label=name, log=True)
    ax.axvline(result.threshold, color="black", linestyle="--", label="threshold")
    ax.set(xlabel="anomaly score", ylabel="transactions", title=f"Scores on the test rows ({result.name})")
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")


def plot_curves(results: list[DetectorResult], labels: np.ndarray, path: Path) -> None:
    """ROC and precision-recall curves of every detector."""
    fig = Figure(figsize=(11, 4.5))
    roc_ax, pr_ax = fig.subplots(1, 2)
    for r in results:
        fpr, tpr, _ = roc_curve(labels, r.scores)
        precision, recall, _ = precision_recall_curve(labels, r.scores)
        roc_ax.plot(fpr, tpr, label=f"{r.name} ({_fmt(r.metrics['roc_auc'])})")
        pr_ax.plot(recall, precision, label=f"{r.name} ({_fmt(r.metrics['average_precision'])})")
    roc_ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    pr_ax.set(xlabel="recall", ylabel="precision", title="Precision-recall")
    roc_ax.legend(loc="lower right")
    pr_ax.legend(loc="upper right")
    fig.savefig(path, dpi=100, bbox_inches="tight")


def write_report(folder: Path, results: list[DetectorResult], labels: np.ndarray, context: dict[str, Any],
                 history: History | None = None) -> Path:
    """Write metrics.json, report.md and the PNGs into folder; returns the report path."""
    folder.mkdir(parents=True, exist_ok=True)
    has_both = 0 < labels.sum() < len(labels)
    if history is not None and history.train_loss:
        plot_loss(history, folder / "loss.png")
    plot_histogram(results[0], labels, folder / "scores.png")
    if has_both:
        plot_curves(results, labels, folder / "curves.png")
    metrics = {"context": context, "detectors": {r.name: _entry(r) for r in results}}
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default) + "\n")
    lines = [
        f"# Evaluation of model {context.get('model_version', '?')}", "",
        *(f"- {key}: {value}" for key, value in context.items()), "",
        "## Detectors on the test rows", "", metrics_table(results), "",
        "Alert rate: each detector's threshold is the quantile of its scores on normal validation rows "
        f"at 1 - {context.get('alert_rate')}.", "",
        "## Confusion matrices", "", confusion_table(results), "",
        *(["![loss per epoch](loss.png)", ""] if history is not None and history.train_loss else []),
        "![score histograms](scores.png)", "", *(["![ROC and PR curves](curves.png)", ""] if has_both else []),
    ]
    (folder / "report.md").write_text("\n".join(lines))
    return folder / "report.md"


def _entry(result: DetectorResult) -> dict[str, Any]:
    costs = {"fit_seconds": result.fit_seconds, "peak_rss_mb": result.peak_rss_mb}
    return {**result.metrics, **{k: (v if np.isfinite(v) else None) for k, v in costs.items()}}


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
