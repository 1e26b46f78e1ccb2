"""The benchmark's data: a simulated bank, a model trained on a history window, the records on the wire."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def simulate_and_train(args: argparse.Namespace, root: Path) -> tuple[pd.DataFrame, Path, dict[str, Any]]:
    """The stream (rows after the training window) and a model version trained on the window."""
    from pipeline.features import HANDBOOK
    from producer.simulator import SimulatorConfig, simulate
    from trainer.fit import FitOptions, run_fit
    from trainer.split import SplitSpec
    from trainer.train import TrainConfig

    start_train, start_stream = args.warmup_days, args.warmup_days + args.train_days
    t0 = time.perf_counter()
    frame = simulate(SimulatorConfig(n_customers=args.customers, n_terminals=args.terminals,
                                     n_days=start_stream + args.stream_days, seed=7))
    sim_s = time.perf_counter() - t0
    days = frame["TX_TIME_DAYS"]
    history = frame[(days >= start_train) & (days < start_stream)].reset_index(drop=True)
    stream = frame[days >= start_stream].reset_index(drop=True)
    options = FitOptions(output=root, train=TrainConfig(epochs=args.epochs, seed=0, progress=False),
                         split=SplitSpec(val_fraction=0.2, test_fraction=0.0), device="cpu",
                         baselines=False, publish=False, score=args.score)
    t0 = time.perf_counter()
    version = run_fit(history, HANDBOOK, options).version_dir
    info = {"simulated_rows": len(frame), "simulate_s": sim_s, "train_rows": len(history),
            "train_s": time.perf_counter() - t0, "stream_rows": len(stream), "epochs": args.epochs,
            "score": args.score}
    return stream, version, info


def wire_records(frame: pd.DataFrame) -> list[tuple[bytes | None, bytes]]:
    """The exact (key, value) bytes the project's producer sends for these rows, labels dropped."""
    from producer.tables import iter_records, resolve_spec

    return list(iter_records(frame, resolve_spec(frame, "handbook"), drop_label=True))


def feature_matrix(frame: pd.DataFrame, model_dir: Path) -> np.ndarray:
    """The rows' model features as float32, in the model's order: ``(rows, features)``."""
    from pipeline.artifact import load_artifact

    return frame[list(load_artifact(model_dir).feature_names)].to_numpy(np.float32)
