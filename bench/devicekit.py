"""What the device benchmarks (``gpu_scoring.py``, ``gpu_worker_path.py``) share.

One simulated bank (its history trains the models, its later days are the stream), a model
version per score method trained on it, the devices present, a timing loop that waits for
the device before it stops the clock, and the device's peak memory. Nothing here needs Kafka:
these scripts also run on a GPU machine that has no broker and no kafka-python.
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from bench.bank import fit_model, windows
from pipeline.scores import BatchScorer
from pipeline.scoring import Scorer, available_cpus

SCORES = ("reconstruction", "hybrid")  # the two ways a version scores (README, *Model quality*)
BANK = {"n_customers": 5000, "n_terminals": 10000, "seed": 7}
WARMUP_DAYS, TRAIN_DAYS = 30, 7  # feature warm-up (neither trained on nor streamed), then the training window
STREAM_ROWS_PER_DAY = 9000  # about 1.9 transactions per customer and day


def simulate_bank(stream_days: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The bank's training window and the ``stream_days`` after it (labels still in both)."""
    from producer.simulator import SimulatorConfig, simulate

    frame = simulate(SimulatorConfig(**BANK, n_days=WARMUP_DAYS + TRAIN_DAYS + stream_days))
    return windows(frame, WARMUP_DAYS, TRAIN_DAYS)


def stream_days_for(rows: int) -> int:
    """Days to simulate after the training window for about ``rows`` streamed transactions."""
    return max(1, math.ceil(rows / STREAM_ROWS_PER_DAY))


def prepare_models(root: Path | None, scores: tuple[str, ...] = SCORES) -> dict[str, Path]:
    """A model version per score method under ``root/<score>/``, trained on the bank where missing
    (two epochs, CPU: speed depends on the architecture, not on the weights). ``root`` None: a
    temporary folder. Training needs the trainer's dependencies; carry a prepared root where
    they are missing."""
    root = root or Path(tempfile.mkdtemp(prefix="device-models-"))
    found = {score: _version_in(root / score) for score in scores}
    if not all(found.values()):
        try:
            import trainer.fit  # noqa: F401
        except ImportError as err:
            raise SystemExit(f"no model of each score under {root} and the trainer cannot run here ({err}): "
                             "run `tools/device/device_check.sh --prepare` where it can, and carry the folder") from err
        history, _ = simulate_bank(stream_days=0)
        for score in (s for s, path in found.items() if path is None):
            found[score] = fit_model(history, root / score, epochs=2, score=score)
    return {score: path for score, path in found.items() if path is not None}


def _version_in(folder: Path) -> Path | None:
    versions = sorted(p.parent for p in folder.glob("*/manifest.json"))
    return versions[-1] if versions else None


def worker_scorer(model_dir: Path, device: str, max_batch: int) -> BatchScorer:
    """The scorer a worker builds with these settings, its engine (NumPy on the CPU) and thread rule
    (one thread per CPU but one) included."""
    from pipeline.config import WorkerSettings
    from pipeline.worker.cli import load_scorer

    settings = WorkerSettings.build(environ={}, overrides={"model_dir": str(model_dir), "device": device,
                                                           "max_batch": max_batch})
    return load_scorer(model_dir, settings)


def torch_scorer(model_dir: Path, device: str, max_batch: int) -> Scorer:
    """PyTorch's Scorer on ``device`` with the worker's thread rule: the kernels CPU and CUDA share."""
    from pipeline.artifact import load_artifact
    from pipeline.worker.cli import scoring_threads

    return Scorer(load_artifact(model_dir), device=device, max_batch=max_batch,
                  threads=scoring_threads(0, available_cpus()))


def devices() -> list[str]:
    """``cuda`` when PyTorch sees a GPU (first: a run cut short keeps its figures), then ``cpu``."""
    return ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]


def sync(device: str) -> None:
    """Wait for the device's queued work (nothing to wait for on CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def time_calls(call: Callable[[], Any], device: str, min_s: float, warmup: int = 2) -> tuple[int, float]:
    """(calls, seconds) of ``call`` repeated for at least ``min_s`` (and 3 calls), after ``warmup``
    calls, with the device's queued work finished inside the measured time."""
    for _ in range(warmup):
        call()
    sync(device)
    reps, started = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - started < min_s:
        call()
        reps += 1
    sync(device)
    return reps, time.perf_counter() - started


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mib(device: str) -> float | None:
    """Most device memory PyTorch held since the last reset (MiB); None on CPU."""
    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None


def environment() -> dict[str, Any]:
    """The machine and the library versions the figures belong to."""
    gpu = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
    return {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "numpy": np.__version__, "cpus": available_cpus(),
            "os_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": gpu.name if gpu else None,
            "gpu_memory_gib": round(gpu.total_memory / 2**30, 1) if gpu else None}


def write_json(path: Path | None, results: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2))
