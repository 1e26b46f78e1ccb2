"""5. Scoring alone (``NumpyScorer`` and PyTorch's ``Scorer``) on prebuilt float32 CPU matrices, by batch size."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

SCORING_SIZES = (256, 1024, 4096, 16384, 65536)


def bench_scoring(model_dir: Path, matrix: np.ndarray, sizes: tuple[int, ...] = SCORING_SIZES,
                  threads: int | None = None, min_s: float = 1.0, engine: str = "torch") -> list[dict[str, Any]]:
    """One engine's score on prebuilt float32 CPU matrices: tx/s per batch size (warm-up excluded).

    ``engine`` ``torch`` (``Scorer``) or ``numpy`` (``NumpyScorer``, what the worker serves on the CPU);
    ``threads`` None keeps what the engine chooses (one per available CPU).
    """
    from threadpoolctl import threadpool_limits

    from pipeline.artifact import load_artifact

    artifact = load_artifact(model_dir)
    with threadpool_limits(limits=None):  # whatever the engine sets is undone on return
        if engine == "numpy":
            from pipeline.npscorer import NumpyScorer

            scorer = NumpyScorer(artifact, max_batch=max(sizes), threads=threads)
            used = scorer.threads
        else:
            import torch

            from pipeline.scoring import Scorer

            before = torch.get_num_threads()
            scorer = Scorer(artifact, device="cpu", max_batch=max(sizes), threads=threads)
            used = torch.get_num_threads()
        rows = []
        for size in sizes:
            batch = np.ascontiguousarray(np.resize(matrix, (size, matrix.shape[1])), dtype=np.float32)
            scorer.score(batch)
            scorer.score(batch)
            reps, started = 0, time.perf_counter()
            while reps < 3 or time.perf_counter() - started < min_s:
                scorer.score(batch)
                reps += 1
            seconds = time.perf_counter() - started
            rows.append({"batch": size, "device": scorer.device_name, "engine": engine, "threads": used,
                         "reps": reps, "ms_per_batch": 1000 * seconds / reps,
                         "tx_s": size * reps / seconds})
        if engine == "torch":
            torch.set_num_threads(before)
    return rows
