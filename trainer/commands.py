"""The ``fraud-train`` subcommands: each takes parsed arguments and returns an exit status."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.artifact import load_artifact
from pipeline.errors import InputDataError
from pipeline.features import LAYOUTS, TableLayout, check_table, read_table
from pipeline.scoring import Scorer, score_frame
from trainer import evaluate as metrics
from trainer import options as opt
from trainer.data import (
    LayoutFlags,
    check_features,
    check_labels,
    event_times,
    find_label,
    flag_columns,
    resolve_layout,
)
from trainer.fit import FitOptions, customers_and_days, run_fit, score_detector
from trainer.report import write_report
from trainer.split import SplitSpec, time_split
from trainer.train import TrainConfig

log = logging.getLogger(__name__)


def _table(args: argparse.Namespace, flags: LayoutFlags) -> tuple[pd.DataFrame, TableLayout]:
    frame = read_table(args.data)
    return frame, resolve_layout(frame, flags)


def layout_flags(args: argparse.Namespace) -> LayoutFlags:
    """The layout-related flags of parsed arguments."""
    return LayoutFlags(args.layout, args.features, args.label_column, args.time_column, args.id_column,
                       args.customer_column, args.time_unit, args.log_features)


def fit(args: argparse.Namespace, flags: LayoutFlags) -> int:
    """Train, calibrate, export and publish a model version; print where it went."""
    frame, layout = _table(args, flags)
    params = {k: v for k, v in (("hidden", args.hidden), ("bottleneck", args.bottleneck)) if v is not None}
    options = FitOptions(
        output=args.output, model=args.model, model_params=params, device=args.device,
        train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
                          patience=args.patience, seed=args.seed, progress=not args.quiet),
        split=SplitSpec(args.start, args.val_start, args.test_start, args.end, args.val_fraction, args.test_fraction),
        alert_rate=args.alert_rate, baselines=not args.no_baselines, publish=not args.no_publish,
        challenger=args.challenger,
        score=args.score, bank_rows=args.bank_rows, input_form=args.input_form,
        label_delay_days=opt.DEFAULT_LABEL_DELAY_DAYS if args.label_delay_days is None else args.label_delay_days,
    )
    result = run_fit(frame, layout, options)
    print(f"model {result.artifact.version} written to {result.version_dir}")
    print(f"threshold {result.artifact.threshold:.6g} (alert rate {result.artifact.alert_rate})")
    if result.report:
        print(f"evaluation report: {result.report}")
    return 0


def promote(args: argparse.Namespace, flags: LayoutFlags | None) -> int:
    """Serve the model root's challenger: ``current`` moves to it (workers reload it), the challenger link goes."""
    from pipeline.artifact import promote_challenger

    artifact = promote_challenger(args.model)
    print(f"model {artifact.version} is current in {args.model}; workers serve it from their next reload")
    return 0


def retrain(args: argparse.Namespace, flags: LayoutFlags | None) -> int:
    """Fit a new version on the features and labels topics, compare it with the current one on the newest
    labelled days, publish it as the challenger (``trainer.stream``)."""
    from trainer import stream

    current = load_artifact(args.model)  # a bad model is refused before any Kafka I/O
    delay = args.label_delay_days
    if delay is None:
        delay = current.feature_delay_days if current.input_form == "raw" else opt.DEFAULT_LABEL_DELAY_DAYS
    since, until = (opt.when(d).isoformat() for d in (args.since, args.until))
    val_start, test_start = opt.split_days(since, until, args.test_days)
    kafka = args.kafka
    table = stream.training_table(stream.read_values(kafka, kafka.features_topic),
                                  stream.read_values(kafka, kafka.labels_topic), current.feature_names,
                                  stream.day_ms(since), stream.day_ms(until), delay)
    print(stream.describe(table, args.model))
    options = FitOptions(
        output=args.model, **stream.fit_options_like(current), device=args.device,
        train=TrainConfig(epochs=args.epochs, seed=args.seed, progress=not args.quiet),
        split=SplitSpec(since, val_start, test_start, until), baselines=False, publish=True, challenger=True,
        label_delay_days=delay)
    result = run_fit(table.frame, stream.with_log_features(table.layout, current), options)
    test = table.frame[event_times(table.frame, table.layout) >= pd.Timestamp(test_start)]
    labels = test[stream.LABEL].to_numpy()
    customers, days = customers_and_days(test, table.layout)
    print(f"on the newest {args.test_days} days ({test_start[:10]} to {until[:10]}: {len(test)} transactions, "
          f"{int(labels.sum())} frauds):")
    for role, artifact in (("new", result.artifact), ("current", current)):
        scored = score_detector(artifact, test, args.device)
        m = metrics.detection_metrics(scored.scores, labels, scored.threshold, customers, days)
        print(f"  {role:8s} {artifact.version}: average precision {_shown(m['average_precision'])}, ROC-AUC "
              f"{_shown(m['roc_auc'])}, alerts {m['confusion_matrix']['tp'] + m['confusion_matrix']['fp']} "
              f"(precision {_shown(m['precision_at_alert_rate'])}, recall {_shown(m['recall_at_alert_rate'])})")
    print(f"model {result.artifact.version} written to {result.version_dir} and published as the challenger of "
          f"{args.model}: workers score it beside {current.version} (online quality for both); "
          "`fraud-train promote` serves it")
    return 0


def _shown(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def evaluate(args: argparse.Namespace, flags: LayoutFlags) -> int:
    """Score a labelled table with a model and write the report (model only, no baselines)."""
    artifact = load_artifact(args.model)
    frame, layout = _table(args, flags)
    check_table(frame, {}, artifact.feature_names)  # the model's features, before the window renumbers rows
    frame = _window(frame, layout, args.start, args.end)
    check_features(frame, artifact.feature_names)
    labels = check_labels(frame, layout)
    if labels is None:
        raise InputDataError(f"evaluation needs a label column; {layout.label_column or 'none'} is not in the table "
                             "(pass --label-column)")
    result = score_detector(artifact, frame, args.device)
    customers, days = customers_and_days(frame, layout)
    result.metrics = metrics.detection_metrics(result.scores, labels, result.threshold, customers, days)
    folder = args.report or Path(f"evaluation-{artifact.version}")
    context = {"model_version": artifact.version, "model_class": artifact.model_class, "data": str(args.data),
               "alert_rate": artifact.alert_rate, "test_rows": len(frame), "test_frauds": int(labels.sum())}
    print(f"evaluation report: {write_report(folder, [result], labels, context)}")
    return 0


def _window(frame: pd.DataFrame, layout: TableLayout, start: str | None, end: str | None) -> pd.DataFrame:
    """The rows with start <= event time < end (either bound optional)."""
    if not (start or end):
        return frame
    times = event_times(frame, layout)
    if times is None:
        raise InputDataError("--start/--end need a time column; pass --time-column")
    keep = time_split(times, SplitSpec(start=start, end=end, val_fraction=0.0, test_fraction=0.0))
    window = frame[keep.train | keep.val | keep.test]
    if window.empty:
        raise InputDataError(f"no rows between {start or 'the start'} and {end or 'the end'}")
    return window


def score(args: argparse.Namespace, flags: LayoutFlags) -> int:
    """Write score, flag and (for flagged rows) top features of every row, after the table's id and label."""
    artifact = load_artifact(args.model)
    frame = read_table(args.data)
    check_table(frame, {**flag_columns(flags), "--features": flags.features}, artifact.feature_names)
    raw = check_features(frame, artifact.feature_names)
    batch = score_frame(Scorer(artifact, device=args.device), frame)
    kept = [c for c in dict.fromkeys((flags.id_column or _known_id(frame), flags.label_column or _label(frame))) if c]
    out = frame[kept].reset_index(drop=True).assign(score=batch.scores, flag=batch.flags)
    tops = [""] * len(out)
    for i in np.flatnonzero(batch.flags):
        tops[i] = json.dumps(batch.top_features(int(i), raw[i], k=args.top_features))
    out["top_features"] = tops
    _write(out, args.output)
    print(f"{len(out)} rows scored, {int(batch.flags.sum())} flagged, written to {args.output}")
    return 0


def _known_id(frame: pd.DataFrame) -> str | None:
    """A known layout's id column, else one named transaction_id or id (any case)."""
    for layout in LAYOUTS.values():
        if layout.id_column and layout.id_column in frame.columns:
            return layout.id_column
    by_name = {str(c).lower(): str(c) for c in frame.columns}
    return by_name.get("transaction_id") or by_name.get("id")


def _label(frame: pd.DataFrame) -> str | None:
    """A known layout's label column, else a 0/1 column named like a label."""
    known = next((lay.label_column for lay in LAYOUTS.values() if lay.label_column in frame.columns), None)
    return known or find_label(frame)


def _write(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in {".parquet", ".pq"}:
        frame.to_parquet(path, index=False)
    elif ".csv" in "".join(path.suffixes).lower():
        frame.to_csv(path, index=False)
    else:
        raise InputDataError(f"{path}: unknown output type; use .csv or .parquet")
