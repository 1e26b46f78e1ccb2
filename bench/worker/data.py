"""The benchmark's data: a simulated bank, a model trained on a history window, the records on the wire."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.bank import fit_model, windows


def simulate_and_train(args: argparse.Namespace, root: Path) -> tuple[pd.DataFrame, Path, dict[str, Any]]:
    """The stream (rows after the training window) and a model version trained on the window."""
    from producer.simulator import SimulatorConfig, simulate

    t0 = time.perf_counter()
    frame = simulate(SimulatorConfig(n_customers=args.customers, n_terminals=args.terminals,
                                     n_days=args.warmup_days + args.train_days + args.stream_days, seed=7))
    sim_s = time.perf_counter() - t0
    history, stream = windows(frame, args.warmup_days, args.train_days)
    t0 = time.perf_counter()
    version = fit_model(history, root, args.epochs, score=args.score)
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
