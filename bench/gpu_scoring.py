"""Scorer.score alone on CPU and, when there is one, CUDA (pinned-memory path), by batch size.

    python bench/gpu_scoring.py [--model-dir models/current] [--json runs/bench/gpu.json]

Without ``--model-dir`` a small model is trained first on a small simulated bank (speed
does not depend on the weights, only on the architecture). On a machine without CUDA it
says so and reports CPU only. Every timing includes preprocessing, the host-to-device copy
through the pinned staging buffer, the forward pass, the copy back and the per-feature
errors: everything ``Scorer.score`` does for the worker.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if TYPE_CHECKING:  # NumPy and PyTorch load once the flags are parsed: `--help` answers at once
    import numpy as np

    from pipeline.scoring import Scorer

SIZES = (256, 1024, 4096, 16384, 65536)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=None, help="model version (or root with `current`)")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated batch sizes")
    p.add_argument("--min-seconds", type=float, default=1.0, help="time each size at least this long")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p


def quick_model(root: Path) -> Path:
    """Train a small model on a small simulated bank (two epochs) and return its version folder."""
    from pipeline.features import HANDBOOK
    from producer.simulator import SimulatorConfig, simulate
    from trainer.fit import FitOptions, run_fit
    from trainer.split import SplitSpec
    from trainer.train import TrainConfig

    frame = simulate(SimulatorConfig(n_customers=500, n_terminals=1000, n_days=40, seed=3))
    history = frame[frame["TX_TIME_DAYS"] >= 30].reset_index(drop=True)
    options = FitOptions(output=root, train=TrainConfig(epochs=2, progress=False),
                         split=SplitSpec(val_fraction=0.2, test_fraction=0.0), device="cpu",
                         baselines=False, publish=False)
    return run_fit(history, HANDBOOK, options).version_dir


def time_scorer(scorer: Scorer, batch: np.ndarray, min_s: float) -> dict[str, Any]:
    """Mean wall time of ``scorer.score(batch)`` after two warm-up calls."""
    scorer.score(batch)
    scorer.score(batch)
    reps, started = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - started < min_s:
        scorer.score(batch)  # returns NumPy arrays: the device work is finished when it returns
        reps += 1
    seconds = time.perf_counter() - started
    return {"ms_per_batch": 1000 * seconds / reps, "tx_s": len(batch) * reps / seconds, "reps": reps}


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import numpy as np
    import torch

    from pipeline.artifact import load_artifact
    from pipeline.scoring import Scorer

    sizes = [int(s) for s in args.sizes.split(",")]
    model_dir = args.model_dir or quick_model(Path(tempfile.mkdtemp(prefix="gpu-scoring-")))
    artifact = load_artifact(model_dir)
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
        gpu = torch.cuda.get_device_name(0)
    else:
        gpu = None
        print("no CUDA GPU available here: reporting CPU only")
    rng = np.random.default_rng(0)
    results: list[dict[str, Any]] = []
    for device in devices:
        scorer = Scorer(artifact, device=device, max_batch=max(sizes))
        for size in sizes:
            # Standard-normal rows in the model's standardized space, mapped back to raw units.
            z = rng.standard_normal((size, len(artifact.feature_names))).astype(np.float32)
            batch = artifact.preprocessing.inverse_transform(z).astype(np.float32)
            results.append({"device": device, "batch": size, **time_scorer(scorer, batch, args.min_seconds)})
    print(f"\nmodel {artifact.version} ({artifact.model_class}); CPU threads {torch.get_num_threads()}; "
          f"GPU {gpu or 'none'}\n")
    print(table(results, sizes, devices))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"gpu": gpu, "torch": torch.__version__, "results": results}, indent=2))
    return 0


def table(results: list[dict[str, Any]], sizes: list[int], devices: list[str]) -> str:
    """Markdown: one row per batch size, tx/s per device, and the GPU speed-up when there is one."""
    by = {(r["device"], r["batch"]): r for r in results}
    head = "| batch | " + " | ".join(f"{d} ms/batch | {d} tx/s" for d in devices)
    head += " | cuda / cpu |" if "cuda" in devices else " |"
    lines = [head, "|" + "---:|" * (1 + 2 * len(devices) + ("cuda" in devices))]
    for size in sizes:
        cells = [f"{by[d, size]['ms_per_batch']:.2f} | {by[d, size]['tx_s']:,.0f}" for d in devices]
        row = f"| {size:,} | " + " | ".join(cells)
        if "cuda" in devices:
            row += f" | {by['cuda', size]['tx_s'] / by['cpu', size]['tx_s']:.1f}x"
        lines.append(row + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(run())
