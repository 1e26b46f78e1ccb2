"""Scoring speed alone, by batch size, on CPU and (where PyTorch sees one) CUDA.

    python bench/gpu_scoring.py [--models runs/device-check/models] [--json runs/bench/gpu.json]

For a model version of each score method (reconstruction; hybrid, which adds the mean distance
to the 5 nearest of 2,048 bank rows), two figures per device and batch size:

- ``end_to_end``: ``Scorer.score``, what the worker calls: NumPy preprocessing on the
  CPU, the copy to the device through a pinned buffer, forward pass, per-feature errors and
  scores on the device, one copy back into NumPy arrays;
- ``device_only``: ``Scorer.score_tensor`` alone, on standardized rows already on the device, the
  results left there: the device's own ceiling, which no host work limits (on CPU: the same
  arithmetic without the NumPy work before and after).

Each figure comes with the most device memory PyTorch held while it ran (model and bank
included). On CUDA the scores are also compared with the CPU's on the same rows. Rows are
standard-normal in the model's standardized space, mapped back to raw units: speed depends on
shapes, not values. Models come from ``--models`` (``<root>/<score>/<version>``), trained
there first when missing (bench/devicekit.py).
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if TYPE_CHECKING:  # NumPy, PyTorch and the models load once the flags are parsed (see the end)
    import numpy as np

    from pipeline.artifact import ModelArtifact
    from pipeline.scoring import Scorer

SIZES = (256, 1024, 4096, 16384, 65536, 262144)
PATHS = ("end_to_end", "device_only")
CPU_MAX_BATCH = 65536  # larger CPU batches only take longer to measure: CPU speed is flat by then


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, default=None,
                   help="root of one model version per score method (trained there when missing; "
                        "default: a temporary folder)")
    p.add_argument("--scores", default=None, help="score methods to measure (default: reconstruction,hybrid)")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated batch sizes")
    p.add_argument("--cpu-max-batch", type=int, default=CPU_MAX_BATCH, help="larger sizes run on CUDA only")
    p.add_argument("--min-seconds", type=float, default=1.0, help="time each figure at least this long")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p


def standard_rows(artifact: ModelArtifact, size: int, seed: int = 0) -> np.ndarray:
    """(size, f) float32 raw rows whose standardized values are standard normal."""
    z = np.random.default_rng(seed).standard_normal((size, len(artifact.feature_names))).astype(np.float32)
    return artifact.preprocessing.inverse_transform(z)


def measure(scorer: Scorer, raw: np.ndarray, path: str, min_s: float) -> dict[str, Any]:
    """One figure: ``end_to_end`` (Scorer.score on raw rows) or ``device_only`` (score_tensor on the
    same rows, standardized and already on the device)."""
    device = scorer.device.type
    call = partial(scorer.score, raw)
    if path == "device_only":
        call = partial(scorer.score_tensor, torch.from_numpy(scorer.artifact.preprocessing.transform(raw)).to(device))
    reset_peak_memory(device)
    with torch.inference_mode():
        reps, seconds = time_calls(call, device, min_s)
    return {"path": path, "reps": reps, "ms_per_batch": 1000 * seconds / reps, "tx_s": len(raw) * reps / seconds,
            "peak_memory_mib": peak_memory_mib(device)}


def agreement(model_dir: Path, raw: np.ndarray) -> dict[str, Any]:
    """How far CUDA scores stray from CPU scores on the same rows."""
    cpu = torch_scorer(model_dir, "cpu", len(raw)).score(raw)
    gpu = torch_scorer(model_dir, "cuda", len(raw)).score(raw)
    diff = np.abs(cpu.scores - gpu.scores)
    return {"rows": len(raw), "max_abs_diff": float(diff.max()),
            "max_rel_diff": float((diff / np.maximum(np.abs(cpu.scores), 1e-6)).max()),
            "flags_differ": int((cpu.flags != gpu.flags).sum()),
            "allclose": bool(np.allclose(gpu.scores, cpu.scores, rtol=1e-3, atol=1e-5))}


def bench_model(score: str, model_dir: Path, sizes: list[int], cpu_max: int, min_s: float
                ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Every figure of one version, and its CPU/CUDA agreement (None without CUDA)."""
    results = []
    for device in devices():
        wanted = [s for s in sizes if device != "cpu" or s <= cpu_max]
        scorer = torch_scorer(model_dir, device, max(wanted))
        for size in wanted:
            raw = standard_rows(scorer.artifact, size)
            for path in PATHS:
                figure = measure(scorer, raw, path, min_s)
                results.append({"score": score, "device": device, "batch": size, **figure,
                                "torch_threads": torch.get_num_threads()})
                print(f"{score} {device} {size:>7,} {path:11}: {figure['tx_s']:>14,.0f} tx/s", flush=True)
    if "cuda" not in devices():
        return results, None
    return results, agreement(model_dir, standard_rows(scorer.artifact, 4096, seed=1))


def table(results: list[dict[str, Any]], score: str) -> str:
    """Markdown for one score method: a row per batch size, tx/s per device and path, CUDA memory."""
    by = {(r["device"], r["batch"], r["path"]): r for r in results if r["score"] == score}
    columns = [(d, p) for d in devices() for p in PATHS]
    head = "| batch | " + " | ".join(f"{d} {p.replace('_', '-')} tx/s" for d, p in columns)
    lines = [head + (" | CUDA peak MiB (end-to-end / device-only) |" if "cuda" in devices() else " |"),
             "|" + "---:|" * (1 + len(columns) + ("cuda" in devices()))]
    for size in sorted({b for _, b, _ in by}):
        cells = [f"{by[d, size, p]['tx_s']:,.0f}" if (d, size, p) in by else "" for d, p in columns]
        if "cuda" in devices():
            cells.append(" / ".join(f"{by['cuda', size, p]['peak_memory_mib']:,.0f}" for p in PATHS))
        lines.append(f"| {size:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    models = prepare_models(args.models, tuple(args.scores.split(",")) if args.scores else SCORES)
    env = environment()
    print(f"{env}\n" + ("" if env["gpu"] else "no CUDA GPU here: CPU only\n"), flush=True)
    report: dict[str, Any] = {"environment": env, "models": {s: p.name for s, p in models.items()},
                              "agreement": {}, "results": []}
    for score, path in models.items():
        rows, report["agreement"][score] = bench_model(score, path, sizes, args.cpu_max_batch, args.min_seconds)
        report["results"] += rows
        write_json(args.json, report)  # after each model: a run cut short keeps what it measured
    for score in models:
        print(f"\n{score} ({models[score].name}); CUDA vs CPU scores: {report['agreement'][score]}\n"
              f"{table(report['results'], score)}")
    return 0


if __name__ == "__main__":
    build_parser().parse_args()  # --help and a bad flag answer before NumPy and PyTorch load
    import numpy as np
    import torch

    from bench.devicekit import (
        SCORES,
        devices,
        environment,
        peak_memory_mib,
        prepare_models,
        reset_peak_memory,
        time_calls,
        torch_scorer,
        write_json,
    )
    from pipeline.artifact import ModelArtifact
    from pipeline.scoring import Scorer
    sys.exit(run())
