"""5. ``Scorer.score`` alone on prebuilt float32 CPU matrices, by batch size."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

SCORING_SIZES = (256, 1024, 4096, 16384, 65536)


def bench_scoring(model_dir: Path, matrix: np.ndarray, sizes: tuple[int, ...] = SCORING_SIZES,
                  threads: int | None = None, min_s: float = 1.0) -> list[dict[str, Any]]:
    """Scorer.score on prebuilt float32 CPU matrices: tx/s per batch size (warm-up excluded).

    ``threads`` None keeps what Scorer chooses (one per available CPU).
    """
    import torch

    from pipeline.artifact import load_artifact
    from pipeline.scoring import Scorer

    before = torch.get_num_threads()
    scorer = Scorer(load_artifact(model_dir), device="cpu", max_batch=max(sizes))
    if threads:
        torch.set_num_threads(threads)
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
        rows.append({"batch": size, "device": str(scorer.device), "torch_threads": torch.get_num_threads(),
                     "reps": reps, "ms_per_batch": 1000 * seconds / reps, "tx_s": size * reps / seconds})
    torch.set_num_threads(before)
    return rows
