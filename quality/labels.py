"""Label modes on the reference data: the unsupervised default, ``fit --score finetuned`` and ``--score stacked``,
and scikit-learn's HistGradientBoostingClassifier on the same labelled rows, on one time split, in one run.

Trains through June: April is the 30-day feature warm-up and is dropped; the autoencoder learns the
normal rows of 05-01..06-23 and early-stops on 06-24..06-30, where each detector's threshold is set by
the alert budget; with the 7-day label delay those last days are unlabelled at training time, so the
classifiers (and the gradient-boosted baseline) learn from the rows labelled before 06-24, the last
15 % of them by time early-stopping them. Test: July. Each ``fraud-train fit`` runs in its own process;
the baseline runs inside the ``finetuned`` one, on the rows its classifier saw. Writes a markdown block
into --out and the raw metrics as JSON.

    .venv/bin/python quality/labels.py          # needs ../shared/data; about 8 minutes on 2 busy cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from quality.docblock import replace_block  # noqa: E402

SPLIT = ["--start", "2018-05-01", "--val-start", "2018-06-24", "--test-start", "2018-07-01", "--end", "2018-08-01"]
RUNS = {  # name -> fit flags; the baseline comes from the finetuned run's report
    "unsupervised (default)": ["--score", "auto", "--no-baselines"],
    "finetuned": ["--score", "finetuned"],
    "stacked": ["--score", "stacked", "--no-baselines"],
}
BASELINE = "hist_gradient_boosting"
COLUMNS = ("roc_auc", "average_precision", "card_precision_at_100_per_day", "recall_at_alert_rate",
           "precision_at_alert_rate")


def fit(name: str, data: Path, root: Path, extra: list[str]) -> dict[str, dict]:
    """Run ``fraud-train fit`` once; the model's entry (and the baseline's, where there is one) from its report."""
    cmd = [sys.executable, "-m", "trainer", "--quiet", "--device", "cpu", "fit", "--data", str(data),
           "--output", str(root / name), *SPLIT, *RUNS[name], *extra]
    started = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # the baseline's threads too
    subprocess.run(cmd, check=True, cwd=REPO, env=env)
    wall = time.perf_counter() - started
    folder = (root / name / "current").resolve()
    detectors = json.loads((folder / "metrics.json").read_text())["detectors"]
    manifest = json.loads((folder / "manifest.json").read_text())
    model = next(iter(detectors.values()))
    classifier = manifest["metrics"].get("classifier_training", {})
    validation = manifest["metrics"]["validation"]
    model.update(
        wall_seconds=wall, scoring=validation.get("scoring", "reconstruction"),
        fit_seconds=manifest["metrics"]["training"]["seconds"] + classifier.get("seconds", 0.0),
        classifier_epochs=classifier.get("best_epoch"), classifier_validation=validation.get("classifier_validation"),
        labels=manifest["training_data"].get("labels"), threshold=manifest["threshold"])
    entries = {name: model}
    if BASELINE in detectors:
        entries[BASELINE] = {**detectors[BASELINE], "scoring": "raw features"}
    return entries


def table(entries: dict[str, dict]) -> str:
    """Markdown table of every detector."""
    rows = ["| detector | score | ROC-AUC | average precision | card precision@100/day | recall at alert rate "
            "| precision at alert rate | fit time (s) |", "|---|---|---|---|---|---|---|---|"]
    for name, e in entries.items():
        cells = " | ".join(f"{e[c]:.3f}" if e.get(c) is not None else "–" for c in COLUMNS)
        rows.append(f"| {name} | {e.get('scoring', '–')} | {cells} | {e['fit_seconds']:.1f} |")
    return "\n".join(rows)


def markdown(entries: dict[str, dict], command: str) -> str:
    """The generated block of docs/model-quality.md: setup, table, command."""
    first = next(iter(entries.values()))
    labels = entries["finetuned"]["labels"]
    lines = [
        "Reference data `fdh-transactions-2018-04-to-07.parquet`, trained through June, tested on July "
        f"({first['rows']:,} transactions, {first['frauds']:,} frauds). Label delay "
        f"{labels['label_delay_days']} days: rows from {labels['label_cutoff'][:10]} on were unlabelled at "
        f"training time. Classifiers (ours and the baseline): {labels['classifier_rows']:,} labelled rows "
        f"({labels['classifier_frauds']:,} frauds), early-stopped on the next "
        f"{labels['classifier_validation_rows']:,} ({labels['classifier_validation_frauds']:,} frauds). "
        "Thresholds: each detector's (1 − 0.005) quantile on the validation week's rows counted as normal (with "
        "the delay, all of them for the label modes). `hist_gradient_boosting`: scikit-learn's "
        "HistGradientBoostingClassifier on the 15 raw features of the same labelled rows, early-stopped on the "
        "same rows, in the same run.",
        "", table(entries), "",
        "Fit time: the autoencoder's training plus the classifier's (ours), or the baseline's fit; every run on "
        f"the CPU with one intra-op thread, {os.cpu_count()} shared cores, torch {_version('torch')}, scikit-learn "
        f"{_version('scikit-learn')}, seed 0.", "",
        "Reproduce:", "", "```", command, "```",
    ]
    return "\n".join(lines)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared/data/fdh-transactions-2018-04-to-07.parquet")
    parser.add_argument("--out", type=Path, default=REPO / "docs/model-quality.md")
    parser.add_argument("--json", type=Path, default=REPO / "docs/labels.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, help="autoencoder epoch cap (default: fraud-train's)")
    args = parser.parse_args()
    extra = ["--seed", str(args.seed), *(["--epochs", str(args.epochs)] if args.epochs else [])]
    entries: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in RUNS:
            entries.update(fit(name, args.data, Path(tmp), extra))
            print(name, {c: round(entries[name][c], 4) for c in COLUMNS if entries[name].get(c) is not None},
                  flush=True)
    entries[BASELINE] = entries.pop(BASELINE)  # last, beside the models it is compared with
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(entries, indent=2) + "\n")
    command = ".venv/bin/python quality/labels.py" + (f" --seed {args.seed}" if args.seed else "")
    replace_block(args.out, "labels", markdown(entries, command), heading="Labels when they exist")
    print(table(entries))


if __name__ == "__main__":
    main()
