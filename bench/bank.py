"""The benchmarks' simulated bank, cut into windows, and the model they train on it: once for every benchmark."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def windows(frame: pd.DataFrame, warmup_days: int, train_days: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The training window (after ``warmup_days`` of feature warm-up, ``train_days`` long) and the stream after it."""
    days = frame["TX_TIME_DAYS"]
    start_stream = warmup_days + train_days
    history = frame[(days >= warmup_days) & (days < start_stream)].reset_index(drop=True)
    return history, frame[days >= start_stream].reset_index(drop=True)


def fit_model(history: pd.DataFrame, output: Path, epochs: int, score: str = "reconstruction",
              input_form: str = "features") -> Path:
    """A model version trained on ``history`` as a benchmark needs one: CPU, seeded, no test split, no baselines,
    not published (speed depends on the architecture, not on the weights)."""
    from pipeline.features import HANDBOOK
    from trainer.fit import FitOptions, run_fit
    from trainer.split import SplitSpec
    from trainer.train import TrainConfig

    options = FitOptions(output=output, train=TrainConfig(epochs=epochs, seed=0, progress=False),
                         split=SplitSpec(val_fraction=0.2, test_fraction=0.0), device="cpu",
                         baselines=False, publish=False, score=score, input_form=input_form)
    return run_fit(history, HANDBOOK, options).version_dir


def with_challenger(model_dir: Path, root: Path, threshold_factor: float = 0.5) -> Path:
    """A model root serving ``model_dir``'s version, with a challenger: the same weights under another version
    and ``threshold_factor`` times the threshold (so it decides otherwise on the same scores, at the cost of a
    real challenger of the same network). For the worker benchmark's shadow run and the broker tests."""
    import json
    import shutil

    from pipeline.artifact import CHALLENGER, HASH_KEY, MANIFEST, WEIGHTS, content_hash, publish_current

    source = Path(model_dir)
    source = (source / "current").resolve() if (source / "current").exists() else source
    root.mkdir(parents=True)
    current = Path(shutil.copytree(source, root / source.name))
    publish_current(root, current)
    shadow = Path(shutil.copytree(source, root / f"{source.name}-challenger"))
    manifest = json.loads((shadow / MANIFEST).read_text())
    manifest["model_version"] = shadow.name
    manifest["threshold"] = manifest["threshold"] * threshold_factor
    manifest[HASH_KEY] = content_hash((shadow / WEIGHTS).read_bytes(), manifest)
    (shadow / MANIFEST).write_text(json.dumps(manifest))
    publish_current(root, shadow, CHALLENGER)
    return root
