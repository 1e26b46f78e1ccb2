"""Runs the measurements in order against one filled topic, each on a machine as quiet as it gets.

Every result is written to ``--json`` as soon as it is measured, so an interrupted run keeps
what it measured; the markdown tables are printed at the end.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.brokerkit import broker
from bench.worker.ceiling import bench_ceiling, bench_ceiling_confluent
from bench.worker.data import feature_matrix, simulate_and_train, wire_records
from bench.worker.latency import bench_latency
from bench.worker.naive import bench_naive
from bench.worker.profiling import profile_worker
from bench.worker.report import table
from bench.worker.scoring import bench_scoring
from bench.worker.throughput import bench_processes, bench_worker
from bench.worker.topic import fill_topic, topics_for
from bench.worker.transport import bench_transport

KP = "kafka-python"


def machine() -> dict[str, Any]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines()
    return {"nproc": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "lscpu": lscpu[:12],
            "python": platform.python_version(), "platform": platform.platform(),
            "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def wait_for_quiet(max_load: float, max_wait_s: float) -> dict[str, float]:
    """Wait (bounded) until the 1-minute load average drops below ``max_load``; report it."""
    started = time.monotonic()
    while os.getloadavg()[0] > max_load and time.monotonic() - started < max_wait_s:
        time.sleep(10)
    load1, load5, load15 = os.getloadavg()
    return {"load1": load1, "load5": load5, "load15": load15, "waited_s": round(time.monotonic() - started)}


def in_fresh_process(measure: Callable[..., Any], *args: Any) -> Any:
    """Run a measurement in a new interpreter, as the worker runs: not in this one, whose heap holds the
    whole stream and the model (its garbage collections would be charged to the measurement)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure, args)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Harness:
    """Holds the results; runs one measurement at a time after waiting (bounded) for a quiet machine."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.loads: dict[str, dict[str, float]] = {}
        self.results: dict[str, Any] = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                                        "load": self.loads}

    def timed(self, name: str, run: Callable[[], Any]) -> Any:
        """Wait (bounded) for a quiet machine, note the load, run one measurement, save what is known."""
        self.loads[name] = wait_for_quiet(self.args.max_load, self.args.max_load_wait)
        result = run()
        log(f"{name} (load {self.loads[name]}): {str(result)[:400]}")
        self.results.setdefault("steps", {})[name] = result  # so an interrupted run keeps what it measured
        self.save()
        return result

    def save(self) -> None:
        self.args.json.write_text(json.dumps(self.results, indent=2, default=str))


def run(args: argparse.Namespace) -> int:
    """The whole benchmark: data and model, a filled topic, every measurement, the tables."""
    args.json.parent.mkdir(parents=True, exist_ok=True)
    harness = Harness(args)
    results, timed = harness.results, harness.timed
    work = Path(tempfile.mkdtemp(prefix="worker-bench-"))
    log(f"simulating and training under {work}")
    stream, model_dir, results["data"] = simulate_and_train(args, work / "models")
    log(f"{results['data']}")
    records = wire_records(stream)
    matrix = feature_matrix(stream, model_dir)
    with broker(args) as (bootstrap, _data_dir):
        settings = topics_for(bootstrap, uuid.uuid4().hex[:8])
        results["fill"] = fill_topic(settings, records)
        log(f"filled: {results['fill']}")
        total = results["fill"]["records"]
        results["ceiling"] = timed("ceiling", lambda: in_fresh_process(bench_ceiling, settings, total))
        results["ceiling_confluent"] = timed("ceiling-confluent",
                                             lambda: in_fresh_process(bench_ceiling_confluent, settings, total))
        modes = args.modes.split(",")
        runs = [(modes[0], None)] + ([(modes[0], args.second_batch)] if args.second_batch else []) + \
            [(m, None) for m in modes[1:]]
        in_flight = [int(n) for n in args.in_flight.split(",") if n.strip()]
        runs = [(m, b, None, KP) for m, b in runs] + [(modes[0], None, n, KP) for n in in_flight]
        others = [c for c in args.clients.split(",") if c.strip() and c != KP]  # at-least-once only (README)
        runs += [("at-least-once", None, None, c) for c in others]
        devices = [d for d in args.devices.split(",") if d.strip()]  # each worker row once per device
        results["worker"] = [timed(f"worker-{m}-{b or 4096}" + (f"-in-flight-{n}" if n else "")
                                   + (f"-{c}" if c != KP else "") + (f"-{d}" if d != "cpu" else ""),
                                   lambda m=m, b=b, n=n, c=c, d=d: bench_worker(settings, model_dir, total, b, m, n,
                                                                                c, d))
                             for m, b, n, c in runs for d in devices]
        results["naive"] = timed("naive", lambda: bench_naive(settings, model_dir, args.naive_records))
        results["scoring"] = timed("scoring", lambda: [row for engine in ("numpy", "torch") for threads in (None, 1)
                                                       for row in bench_scoring(model_dir, matrix, threads=threads,
                                                                                engine=engine)])
        rates = args.rates.split(",")
        latency_runs = [(m, None, KP) for m in modes] + [(modes[0], n, KP) for n in in_flight] + \
            [("at-least-once", None, c) for c in others]
        results["latency"] = [
            timed(f"latency-{m}-{rate}" + (f"-in-flight-{n}" if n else "") + (f"-{c}" if c != KP else ""),
                  lambda r=float(rate), m=m, n=n, c=c: bench_latency(bootstrap, model_dir, records, r,
                                                                     args.latency_seconds, m, n, c, args.max_wait_ms))
            for m, n, c in latency_runs for rate in rates]
        results["floor"] = [  # what a consumer that only reads sees: the worker's latency rows less its own share
            timed(f"floor-{rate}" + (f"-{c}" if c != KP else ""),
                  lambda r=float(rate), c=c: bench_transport(bootstrap, records, r, args.latency_seconds, c))
            for c in [KP, *others] for rate in rates]
        results["processes"] = [
            timed(f"processes-{n}", lambda n=n: bench_processes(settings, model_dir, total, n))
            for n in (int(p) for p in args.processes.split(",") if p.strip())]
        if args.profile_records:
            results["profile"] = [timed(f"profile-{c}", lambda c=c: profile_worker(settings, model_dir,
                                                                                  args.profile_records, c))
                                  for c in [KP, *others]]
    harness.save()
    print(table(results))
    print("\n1-minute load average before each measurement: "
          + ", ".join(f"{k} {v['load1']:.2f}" for k, v in harness.loads.items()))
    for p in results.get("profile", []):
        print(f"\nprofile ({p['client']}): {p['records']:,} records, wall {p['wall_s']:.1f}s, process CPU "
              f"{p['process_cpu_s']:.1f}s, main thread CPU {p['main_thread_cpu_s']:.1f}s\n{p['top_tottime']}")
    return 0
