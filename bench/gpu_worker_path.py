"""The worker's own processing path, without Kafka, on CPU and (where PyTorch sees one) CUDA.

    python bench/gpu_worker_path.py [--records 200000] [--batches 4096,16384,65536] [--json out.json]

Builds ``--records`` consumed records as kafka-python hands them to the worker: the value bytes
the project's producer sends for simulated transactions (labels dropped), the key, topic,
partition, offset and timestamp. Then ``BatchProcessor.process`` (decode, score, explain and
encode alerts, dead letters) runs over them in micro-batches of each ``--batches`` size (4,096
is the worker's default ``max_batch``), for a model version of each score method, on each
device, with the Scorer built as the worker builds it. Reported per run: records/s for the
whole path, the seconds in each stage, alerts, and the most device memory PyTorch held.

This answers "worker throughput, CPU vs GPU" where no broker runs, and where one would hide the
answer: on the 2-core development machine kafka-python's own fetch + decode ceiling is about
55k records/s (bench/worker_bench.py), below what this path does. Not measured here: polling,
publishing and committing. Stages, as ``BatchOutcome`` times them: ``decode`` (JSON to the
float32 matrix), ``score`` (``Scorer.score``); ``explain_encode`` is the rest of the path
(explanations and alert JSON for flagged rows, dead letters).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.devicekit import (
    SCORES,
    devices,
    environment,
    peak_memory_mib,
    prepare_models,
    reset_peak_memory,
    simulate_bank,
    stream_days_for,
    worker_scorer,
    write_json,
)
from pipeline.config import WorkerSettings
from pipeline.worker.processing import BatchProcessor, Topics
from pipeline.worker.records import Record

BATCHES = (4096, 16384, 65536)
TOPIC, PARTITIONS = "transactions", 3
WORKER = WorkerSettings()  # the worker's defaults: max_record_bytes, top_features


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=200_000, help="records streamed through the path per run")
    p.add_argument("--batches", default=",".join(map(str, BATCHES)), help="micro-batch sizes (records)")
    p.add_argument("--models", type=Path, default=None,
                   help="root of one model version per score method (trained there when missing; "
                        "default: a temporary folder)")
    p.add_argument("--scores", default=",".join(SCORES), help="score methods to measure")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p


def consumed_records(n: int) -> list[Record]:
    """``n`` records of the simulated stream, encoded by the producer's code, spread over partitions
    (the stream repeats when it is shorter than ``n``)."""
    from producer.tables import iter_records, resolve_spec

    _, stream = simulate_bank(stream_days_for(n))
    wire = list(iter_records(stream, resolve_spec(stream, "handbook"), drop_label=True))
    now_ms = int(time.time() * 1000)
    return [Record(TOPIC, i % PARTITIONS, i // PARTITIONS, now_ms, *wire[i % len(wire)], []) for i in range(n)]


def batches_of(records: list[Record], size: int) -> list[list[Record]]:
    return [records[i : i + size] for i in range(0, len(records), size)]


def run_path(processor: BatchProcessor, records: list[Record], size: int, device: str) -> dict[str, Any]:
    """One pass of the whole path over ``records`` in micro-batches of ``size``, after one warm-up batch."""
    batches = batches_of(records, size)
    processor.process(batches[0])
    reset_peak_memory(device)
    outcomes = []
    started = time.perf_counter()
    for batch in batches:
        outcomes.append(processor.process(batch))  # NumPy results: the device's work is done on return
    seconds = time.perf_counter() - started
    decode_s = sum(o.decode_seconds for o in outcomes)
    score_s = sum(o.scoring_seconds for o in outcomes)
    return {"records": len(records), "seconds": seconds, "records_s": len(records) / seconds,
            "decode_s": decode_s, "score_s": score_s, "explain_encode_s": seconds - decode_s - score_s,
            "scored": sum(o.scored for o in outcomes), "alerts": sum(o.alerts for o in outcomes),
            "dead_letters": sum(o.invalid for o in outcomes), "peak_memory_mib": peak_memory_mib(device),
            "torch_threads": torch.get_num_threads()}


def bench_model(score: str, model_dir: Path, records: list[Record], sizes: list[int]
                ) -> list[dict[str, Any]]:
    """A run per device and batch size of one model version, as the worker would use it."""
    results = []
    for device in devices():
        for size in sizes:
            processor = BatchProcessor(worker_scorer(model_dir, device, size), Topics("alerts", "dead-letters"),
                                       "bench", max_record_bytes=WORKER.max_record_bytes,
                                       top_features=WORKER.top_features)
            run = run_path(processor, records, size, device)
            results.append({"score": score, "device": device, "batch": size, **run})
            print(f"{score} {device} batch {size:>6,}: {run['records_s']:>10,.0f} records/s "
                  f"(decode {run['decode_s']:.2f}s, score {run['score_s']:.2f}s, "
                  f"explain+encode {run['explain_encode_s']:.2f}s, {run['alerts']:,} alerts)", flush=True)
    return results


def table(results: list[dict[str, Any]]) -> str:
    """Markdown: a row per run, records/s and where the time went."""
    lines = ["| score | device | batch | records/s | decode | score | explain + encode | alerts | peak MiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        share = {k: f"{100 * r[f'{k}_s'] / r['seconds']:.0f} %" for k in ("decode", "score", "explain_encode")}
        memory = "" if r["peak_memory_mib"] is None else f"{r['peak_memory_mib']:,.0f}"
        lines.append(f"| {r['score']} | {r['device']} | {r['batch']:,} | {r['records_s']:,.0f} | {share['decode']} | "
                     f"{share['score']} | {share['explain_encode']} | {r['alerts']:,} | {memory} |")
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sizes = [int(s) for s in args.batches.split(",")]
    models = prepare_models(args.models, tuple(args.scores.split(",")))
    env = environment()
    print(env, flush=True)
    started = time.perf_counter()
    records = consumed_records(args.records)
    built_s = time.perf_counter() - started
    print(f"{len(records):,} records built in {built_s:.1f}s", flush=True)
    report = {"environment": env, "models": {s: p.name for s, p in models.items()}, "records": len(records),
              "mean_value_bytes": sum(len(r.value) for r in records) / len(records), "build_s": built_s,
              "results": []}
    for score, model_dir in models.items():
        report["results"] += bench_model(score, model_dir, records, sizes)
        write_json(args.json, report)  # after each model: a run cut short keeps what it measured
    print("\n" + table(report["results"]))
    return 0


if __name__ == "__main__":
    sys.exit(run())
