"""The raw-input path's costs: feature stages, state memory, changelog restore, worker raw vs featured.

    python bench/state_bench.py --json runs/bench/state.json

Issue 9's benchmark, in one run, on one simulated bank (``--customers``, ``--terminals``, days):

1. ``features``: the per-event feature code without Kafka: ``feature_rows`` over the whole
   simulated table, and the worker's ``FeatureStages`` on its raw records and labels in batches
   (decode, customer stage, terminal stage, changelog records of the keys each batch changed);
2. ``memory``: memory per customer and per terminal in a ``Store``, with as many events per
   entity as the simulated bank's customers and terminals hold at its last day, measured with
   tracemalloc and as RSS growth in a fresh process, beside the changelog (serialized) size;
3. ``restore``: a compacted changelog of N customers (such states, in pages of 256 KiB as the
   stores write them) written to a broker, then read back by ``Restorer.restore`` in a fresh
   process: seconds, records/s, RSS;
4. ``worker``: ``python -m pipeline`` on the same streamed rows, once as featured records with a
   featured-input model, once as raw records plus delayed labels with a raw-input model, from
   process start and from partition assignment to the last commit. The raw worker's changelogs
   are filled first with the state of the days before the stream (what a worker that had read
   them would hold), so it restores that at assignment and computes the same features as the
   featured run's table; from empty state every customer would look new and most records alert.

Prints markdown tables and writes every number to ``--json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kafka import KafkaConsumer, KafkaProducer, TopicPartition  # noqa: E402

from bench.bank import fit_model, windows, with_challenger  # noqa: E402
from bench.brokerkit import broker, group_offsets  # noqa: E402
from bench.statekit import (  # noqa: E402
    TERMINAL_HORIZON_MS,
    customer_records,
    memory_child,
    restore_child,
    sample,
    stores_after,
)
from bench.worker.data import wire_records  # noqa: E402
from bench.worker.harness import log, machine  # noqa: E402
from bench.worker.process import WorkerProcess  # noqa: E402
from bench.worker.topic import end_offsets, fill_topic  # noqa: E402
from deploy.ports import free_port  # noqa: E402
from pipeline.config import KafkaSettings  # noqa: E402
from pipeline.streamfeatures import DELAY_DAYS, CustomerWindows, feature_rows  # noqa: E402
from pipeline.worker.state import Store  # noqa: E402

PARTS = ("features", "memory", "restore", "worker")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="write all results here (required unless --child)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"what to measure, of {', '.join(PARTS)}")
    p.add_argument("--customers", type=int, default=5000, help="simulated customers (features, worker, and the "
                   "distribution of events per customer that the memory and restore parts sample)")
    p.add_argument("--terminals", type=int, default=10000)
    p.add_argument("--warmup-days", type=int, default=30, help="days before the training window")
    p.add_argument("--train-days", type=int, default=7, help="training window of both models")
    p.add_argument("--stream-days", type=int, default=14, help="days after the training window, streamed")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-batch", type=int, default=4096, help="the worker's max_batch, and the stages' batch")
    p.add_argument("--memory-customers", type=int, default=100_000, help="customers built for the memory part")
    p.add_argument("--memory-terminals", type=int, default=200_000, help="terminals built for the memory part")
    p.add_argument("--grown-entities", type=int, default=10_000,
                   help="customers and terminals also built event by event with update() (slower)")
    p.add_argument("--restore-customers", default="100000,1000000", help="changelog sizes to restore")
    p.add_argument("--restore-partitions", type=int, default=1,
                   help="partitions of each changelog (restored one after another, as the worker does)")
    p.add_argument("--restore-repeats", type=int, default=3, help="restores of each changelog (the fastest shown)")
    p.add_argument("--challenger", action="store_true",
                   help="also run the raw worker with a challenger scored beside its model (issue 21: the shadow's "
                        "cost), interleaved with the other runs")
    p.add_argument("--worker-repeats", type=int, default=2,
                   help="worker runs of each input form, interleaved (each shown)")
    p.add_argument("--mode", default="at-least-once", choices=("at-least-once", "exactly-once"))
    p.add_argument("--hot-terminal-share", type=float, default=0.0,
                   help="move this share of the transactions to one terminal (a hot key), features recomputed")
    p.add_argument("--kafka-client", default="kafka-python", choices=("kafka-python", "confluent"),
                   help="the measured workers' Kafka client")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--bootstrap-servers", default=None, help="use this broker instead of starting one")
    p.add_argument("--kafka-home", type=Path, default=Path(tempfile.gettempdir()) / "state-bench-kafka")
    p.add_argument("--kafka-libs", type=Path, default=None,
                   help="broker jars to copy into --kafka-home (default: the checkout's .cache/kafka/libs)")
    p.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)  # a spec file: run one part alone
    return p


# -- simulated bank --------------------------------------------------------------------------
def simulate_bank(args: argparse.Namespace) -> tuple[pd.DataFrame, dict[str, Any]]:
    from producer.simulator import SimulatorConfig, simulate

    days = args.warmup_days + args.train_days + args.stream_days
    started = time.perf_counter()
    frame = simulate(SimulatorConfig(n_customers=args.customers, n_terminals=args.terminals, n_days=days,
                                     seed=args.seed))
    info = {"rows": len(frame), "days": days, "customers": args.customers, "terminals": args.terminals,
            "simulate_s": time.perf_counter() - started}
    if args.hot_terminal_share:
        frame = with_hot_terminal(frame, args.hot_terminal_share, args.seed)
        info["hot_terminal_share"] = args.hot_terminal_share
    return frame, info


def with_hot_terminal(frame: pd.DataFrame, share: float, seed: int) -> pd.DataFrame:
    """The same bank with ``share`` of its transactions moved to one terminal (a large online merchant),
    features recomputed by the one feature implementation."""
    from pipeline.streamfeatures import DERIVED_FEATURES, feature_table

    rng = np.random.default_rng(seed)
    hot = frame.copy()
    moved = rng.random(len(hot)) < share
    hot.loc[moved, "TERMINAL_ID"] = int(hot["TERMINAL_ID"].max()) + 1
    return feature_table(hot.drop(columns=[c for c in DERIVED_FEATURES if c in hot.columns]))


def epoch_ms(frame: pd.DataFrame) -> np.ndarray:
    return frame["TX_DATETIME"].to_numpy().astype("datetime64[ms]").astype(np.int64)


def held_events(frame: pd.DataFrame) -> dict[str, list[int]]:
    """Events each active customer and terminal holds at the table's last event (and frauds among them).

    A customer holds the events of the last ``CustomerWindows.HORIZON_MS`` (31 days), a terminal
    those of the last ``TerminalWindows.horizon_ms`` (38 days) with the fraud labels among them.
    """
    times = epoch_ms(frame)
    now = int(times.max())
    recent = frame[times > now - CustomerWindows.HORIZON_MS]
    customers = recent.groupby("CUSTOMER_ID").size()
    terminal = frame[times > now - TERMINAL_HORIZON_MS].groupby("TERMINAL_ID")["TX_FRAUD"].agg(["size", "sum"])
    return {"customer_events": customers.tolist(), "terminal_events": terminal["size"].tolist(),
            "terminal_frauds": terminal["sum"].astype(int).tolist(), "now_ms": [now]}


# -- 1. feature stages without Kafka ---------------------------------------------------------
def bench_feature_rows(frame: pd.DataFrame) -> dict[str, Any]:
    """``feature_rows`` over the whole table (customer update, terminal update and calendar per event)."""
    times = epoch_ms(frame)
    columns = (frame["CUSTOMER_ID"].tolist(), frame["TERMINAL_ID"].tolist(), times.tolist(),
               frame["TX_AMOUNT"].astype(np.float64).tolist(), frame["TX_FRAUD"].tolist())
    started = time.perf_counter()
    feature_rows(*columns)
    seconds = time.perf_counter() - started
    return {"events": len(frame), "seconds": seconds, "events_s": len(frame) / seconds}


class NoRestore:
    """A Restorer for stores that start empty (no broker)."""

    def restore(self, topic: str, partition: int, store: Store[Any], stop: threading.Event) -> int:
        return 0

    def close(self) -> None:
        pass


STAGE_STEPS = ("stage", "decode", "enrich", "changelog")


def bench_stages(frame: pd.DataFrame, max_batch: int) -> dict[str, Any]:
    """``FeatureStages`` on the table's raw records and labels, one partition, in batches of ``max_batch``.

    Timed over all batches, and over those after the first 38 days (state warm: windows full).
    """
    from prometheus_client import CollectorRegistry

    from pipeline.schema import DEFAULT_MAX_BYTES
    from pipeline.worker.metrics import WorkerMetrics
    from pipeline.worker.records import Record
    from pipeline.worker.state import FeatureStages, StateTopics
    from producer.rawfeed import raw_messages
    from producer.tables import resolve_spec

    topics = StateTopics("in", "labels", "repartition", "customer-changelog", "terminal-changelog", 1)
    stages = FeatureStages(topics, DELAY_DAYS, NoRestore(), WorkerMetrics(CollectorRegistry()),  # type: ignore[arg-type]
                           DEFAULT_MAX_BYTES, threading.Event())
    stages.sync({TopicPartition(t, 0) for t in topics.consumed})
    feed = raw_messages(frame, resolve_spec(frame, "handbook"), topics.input, topics.labels, DELAY_DAYS)
    records = [Record(topic, 0, 0, -1, key, value, []) for topic, key, value in feed]
    times = epoch_ms(frame)
    warm = int(np.searchsorted(times, times[0] + TERMINAL_HORIZON_MS))  # raw records of the first 38 days
    phases = {phase: {"events": 0, **dict.fromkeys(STAGE_STEPS, 0.0)} for phase in ("all", "steady")}
    counts = {"raw": 0, "labels": 0, "failed": 0, "changelog_records": 0, "changelog_bytes": 0}
    for first in range(0, len(records), max_batch):
        steady = counts["raw"] >= warm
        raw_before = counts["raw"]
        spent = _stage_batch(stages, records[first: first + max_batch], counts)
        for phase in ("all", "steady") if steady else ("all",):
            phases[phase]["events"] += counts["raw"] - raw_before
            for step, seconds in spent.items():
                phases[phase][step] += seconds
    return {"batch": max_batch, "warm_up_events": warm, **counts,
            "changelog_bytes_per_event": counts["changelog_bytes"] / counts["raw"],
            **{phase: _rates(spent) for phase, spent in phases.items() if spent["events"]}}


def _rates(spent: dict[str, Any]) -> dict[str, Any]:
    total = sum(spent[step] for step in STAGE_STEPS)
    return {**spent, "seconds": total, "events_s": spent["events"] / total,
            **{f"{step}_events_s": spent["events"] / spent[step] for step in STAGE_STEPS}}


def _stage_batch(stages: Any, batch: list[Any], counts: dict[str, int]) -> dict[str, float]:
    """One batch through the stages as the worker runs it, repartition records enriched at once; seconds per step."""
    from pipeline.schema import decode
    from pipeline.worker.records import Record
    from pipeline.worker.state.hop import unpack

    raw, labels, _, _ = stages.split(batch)
    t0 = time.perf_counter()
    staged = stages.stage(raw, labels)
    t1 = time.perf_counter()
    repartitioned = [r for o in staged.outputs for r in unpack(Record(o.topic, o.partition or 0, 0, -1, o.key,
                                                                      o.value, []))]
    decoded = [decode(r.value) for r in repartitioned]
    t2 = time.perf_counter()
    failed = [e for e in (stages.enrich(r, tx) for r, tx in zip(repartitioned, decoded, strict=True)) if e]
    t3 = time.perf_counter()
    changelog = stages.changelog()
    t4 = time.perf_counter()
    counts["raw"] += len(raw)
    counts["labels"] += len(labels)
    counts["failed"] += len(staged.failed) + len(failed)
    counts["changelog_records"] += len(changelog)
    counts["changelog_bytes"] += sum(len(o.key) + len(o.value) for o in changelog)
    return dict(zip(STAGE_STEPS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True))


# -- 3. restore (a child process reads what this one produced) -------------------------------
def fill_changelog(bootstrap: str, topic: str, partitions: int, records: Iterator[tuple[bytes, bytes]],
                   ) -> dict[str, Any]:
    """Produce the states (key, whole state) once into a new compacted topic, in pages as a worker's stores write
    them (``pipeline.worker.state.pages``), each key's on its partition; the records acknowledged and the bytes."""
    from pipeline.topics import ensure_topics
    from pipeline.worker.state import pages
    from pipeline.worker.state.hop import partition_for

    settings = KafkaSettings.build(environ={}, overrides={"bootstrap_servers": bootstrap})
    ensure_topics(settings, [topic], partitions, configs={topic: {"cleanup.policy": "compact"}})

    def paged() -> Iterator[tuple[str, bytes, bytes, int]]:
        open_pages: dict[int, list[tuple[str, bytes, bytes]]] = {}
        sizes: dict[int, int] = {}
        seq = 0
        for key, value in records:
            p = partition_for(key, partitions)
            open_pages.setdefault(p, []).append((key.decode(), key, value))
            sizes[p] = sizes.get(p, 0) + len(key) + len(value) + 8
            if sizes[p] >= pages.PAGE_BYTES:
                for page, data, _keys in pages.encode(b"statebench00", seq, open_pages.pop(p)):
                    yield topic, page, data, p
                sizes[p], seq = 0, seq + 1
        for p, entries in open_pages.items():
            for page, data, _keys in pages.encode(b"statebench00", seq, entries):
                yield topic, page, data, p
            seq += 1

    return produce(settings, paged())


def produce(settings: KafkaSettings, records: Iterable[tuple[str, bytes, bytes] | tuple[str, bytes, bytes, int]]
            ) -> dict[str, Any]:
    """Send every (topic, key, value[, partition]), partitioned by key (as the worker's producer does) where no
    partition is given; wait for all acks."""
    producer = KafkaProducer(**settings.client_options(), acks="all", linger_ms=20, batch_size=512 * 1024,
                             max_request_size=1024 * 1024)
    n = size = 0
    started = time.perf_counter()
    for topic, key, value, *partition in records:
        producer.send(topic, key=key, value=value, partition=partition[0] if partition else None)
        n, size = n + 1, size + len(key) + len(value)
    producer.flush(timeout=600)
    seconds = time.perf_counter() - started
    producer.close()
    return {"records": n, "bytes": size, "produce_s": seconds, "produce_records_s": n / seconds}


def run_child(spec: dict[str, Any], work: Path, timeout_s: float = 900) -> dict[str, Any]:
    """This script in a fresh process on one part; its JSON result."""
    path = work / f"child-{uuid.uuid4().hex[:8]}.json"
    path.write_text(json.dumps(spec))
    done = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True, text=True,
                          timeout=timeout_s, check=False, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{spec['kind']} child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_restore(bootstrap: str, data_dir: Path | None, held: dict[str, list[int]], size: int, partitions: int,
                  seed: int, repeats: int, work: Path) -> dict[str, Any]:
    """Write a changelog of ``size`` customers, then time its restore, ``repeats`` times, each in a fresh process;
    the fastest reported (the others are the machine's noise), every time kept."""
    counts, _, _ = sample(held, size, 1, seed)
    expected = int((24 * counts + 5 + 7).sum())  # value (header + 3 arrays) and a key of ~6 digits
    free = shutil.disk_usage(data_dir or tempfile.gettempdir()).free
    if data_dir is not None and free < 3 * expected:
        return {"customers": size, "skipped": f"{free / 2**30:.1f} GiB free on the broker's disk, "
                                              f"{expected / 2**30:.1f} GiB needed (3x kept spare)"}
    topic = f"state-bench-{uuid.uuid4().hex[:6]}-{size}-customer-windows-changelog"
    fill = fill_changelog(bootstrap, topic, partitions, customer_records(counts, held["now_ms"][0], seed))
    ends = end_offsets(KafkaSettings.build(environ={}, overrides={"bootstrap_servers": bootstrap,
                                                                       "input_topic": topic}))
    if sum(ends.values()) != fill["records"]:
        raise SystemExit(f"changelog {topic} holds {sum(ends.values())} records, not {fill['records']}")
    runs = [run_child({"kind": "restore", "bootstrap": bootstrap, "topic": topic, "partitions": partitions}, work)
            for _ in range(repeats)]
    if any(r["entities"] != size for r in runs):
        raise SystemExit(f"restored {[r['entities'] for r in runs]} customers, not {size}")
    best = min(runs, key=lambda r: r["seconds"])
    return {"customers": size, "partitions": partitions, "mean_events": float(counts.mean()), **fill, **best,
            "records_s": best["records"] / best["seconds"], "mib_s": fill["bytes"] / 2**20 / best["seconds"],
            "all_seconds": [r["seconds"] for r in runs]}


# -- 4. worker, featured and raw input -------------------------------------------------------
def train_models(frame: pd.DataFrame, args: argparse.Namespace, root: Path) -> dict[str, Path]:
    """A featured-input and a raw-input model of the same network, trained on the same window."""
    history, _ = windows(frame, args.warmup_days, args.train_days)
    return {form: fit_model(history, root / form, args.epochs, input_form=form) for form in ("features", "raw")}


def settings_for(bootstrap: str, tag: str) -> KafkaSettings:
    return KafkaSettings.build(environ={}, overrides={
        "bootstrap_servers": bootstrap, "input_topic": f"state-tx-{tag}", "alerts_topic": f"state-alerts-{tag}",
        "dead_letter_topic": f"state-dlq-{tag}", "labels_topic": f"state-labels-{tag}", "client_id": f"state-{tag}"})


def fill_raw(settings: KafkaSettings, stream: pd.DataFrame) -> dict[str, Any]:
    """The stream as raw transactions (key customer) with its fraud labels 7 days late, 3 partitions each."""
    from pipeline.topics import ensure_topics
    from producer.rawfeed import raw_messages
    from producer.send import make_producer, send_records
    from producer.tables import resolve_spec

    ensure_topics(settings, [settings.input_topic, settings.labels_topic, settings.alerts_topic,
                             settings.dead_letter_topic], 3)
    messages = list(raw_messages(stream, resolve_spec(stream, "handbook"), settings.input_topic,
                                 settings.labels_topic, DELAY_DAYS))
    producer = make_producer(settings)
    try:
        report = send_records(messages, settings.input_topic, producer, progress=False)
    finally:
        producer.close()
    if report.acked != len(messages):
        raise SystemExit(f"only {report.acked} of {len(messages)} raw records acknowledged: {report.errors}")
    labels = sum(1 for m in messages if m[0] == settings.labels_topic)
    return {"records": len(messages) - labels, "labels": labels, "seconds": report.seconds,
            "bytes": sum(len(m[2]) for m in messages if m[0] == settings.input_topic)}


def wait_done(bootstrap: str, group: str, ends: dict[TopicPartition, int], repartition: str | None, total: int,
              alive: Callable[[], bool], timeout_s: float = 900) -> float:
    """perf_counter time at which the group has committed ``ends`` and, on raw input, scored every
    transaction: its repartition topic committed to its end (which holds watermark marks beside the
    ``total`` records, so it is read, not counted)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive():
        offsets = group_offsets(bootstrap, group, "state-bench-offsets")
        if all(offsets.get(tp, -1) >= end for tp, end in ends.items()) and (
                repartition is None or scored_to_end(bootstrap, repartition, offsets)):
            return time.perf_counter()
        time.sleep(0.1)
    raise SystemExit(f"group {group} did not commit every record " + ("(the worker exited)" if not alive() else
                                                                      f"in {timeout_s:.0f}s"))


def scored_to_end(bootstrap: str, topic: str, offsets: dict[TopicPartition, int]) -> bool:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        return bool(parts) and all(offsets.get(tp, -1) >= end for tp, end in consumer.end_offsets(parts).items())
    finally:
        consumer.close()


def warm_changelogs(settings: KafkaSettings, group: str, stores: tuple[dict[str, Any], dict[str, Any]],
                    ) -> dict[str, Any]:
    """Fill the raw group's changelogs with ``stores``: the state of a worker that has read the history.

    The measured worker then restores it at assignment and scores the stream with warm windows,
    as the featured run's table has them, rather than from empty state (which makes every
    customer look new: features far from the training data, most records alerts).
    """
    from pipeline.worker.state import prepare_topics

    customers, terminals = stores
    topics = prepare_topics(settings, group)
    records = itertools.chain(
        ((topics.customer_changelog, key.encode(), state.to_bytes()) for key, state in customers.items()),
        ((topics.terminal_changelog, key.encode(), state.to_bytes()) for key, state in terminals.items()))
    return {"customers": len(customers), "terminals": len(terminals), **produce(settings, records)}


def bench_worker(settings: KafkaSettings, model_dir: Path, total: int, args: argparse.Namespace, group: str,
                 raw: bool, data_dir: Path | None) -> dict[str, Any]:
    """``python -m pipeline`` from process start (and partition assignment) to its last commit.

    On raw input the labels topic is read too, and the internal topics' sizes are reported.
    """
    port = free_port()
    extra = ["--metrics-port", str(port), "--metrics-host", "127.0.0.1", "--exit-when-idle", "3",
             "--processing-guarantee", args.mode, "--max-batch", str(args.max_batch),
             "--kafka-client", args.kafka_client]
    ends = end_offsets(settings)
    if raw:
        extra += ["--labels-topic", settings.labels_topic]
        ends |= end_offsets(dataclasses.replace(settings, input_topic=settings.labels_topic))
    worker = WorkerProcess(settings, model_dir, group, *extra)
    try:
        done_at = wait_done(settings.bootstrap_servers, group, ends, f"{group}-by-terminal-repartition" if raw
                            else None, total, worker.alive)
    except SystemExit as err:
        worker.finish(terminate=worker.alive())
        raise SystemExit(f"{err}; the worker's last lines:\n" + "\n".join(worker.lines[-30:])) from err
    metrics = scrape(port)  # before the idle exit (3 s after the last record)
    result = worker.finish()
    from_start, from_assign = done_at - worker.started, done_at - (worker.assigned_at or worker.started)
    out = {"mode": args.mode, "kafka_client": args.kafka_client, "max_batch": args.max_batch, "records": total,
           "seconds_from_start": from_start,
           "seconds_from_assignment": from_assign, "tx_s": total / from_start,
           "tx_s_from_assignment": total / from_assign, "startup_s": from_start - from_assign,
           "command": " ".join(worker.command[1:]), "metrics": metrics, **result}
    if raw:
        out["internal_topics"] = {name: topic_size(settings.bootstrap_servers, f"{group}-{name}", data_dir) for name
                                  in ("customer-windows-changelog", "terminal-windows-changelog",
                                      "by-terminal-repartition")}
        out["restore_lines"] = [x for x in worker.lines if "restored" in x]
    return out


def scrape(port: int) -> dict[str, float]:
    """The worker's alert, late-event and state samples from its /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    except OSError as err:
        return {"error": str(err)}  # type: ignore[dict-item]
    return {sample.name + "".join(f"{{{k}={v}}}" for k, v in sample.labels.items()): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name.startswith(("fraud_alerts_total", "fraud_late_events_total", "fraud_late_labels_total",
                                        "fraud_state_", "fraud_records_held_for_labels_total",
                                        "fraud_records_handed_back_total"))
            and not sample.name.endswith("_created")}


def topic_size(bootstrap: str, topic: str, data_dir: Path | None) -> dict[str, Any]:
    """Records in a topic (end offsets), the watermark marks among them (records with an empty key, which only
    the repartition topic has), the transactions its packed records carry, and, on a broker started here, its
    bytes on disk."""
    from pipeline.worker.state.hop import is_packed, packed_count

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    marks = carried = 0
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        ends = consumer.end_offsets(parts)
        records = sum(ends.values())
        if topic.endswith("-repartition"):
            consumer.assign(parts)
            consumer.seek_to_beginning(*parts)
            while any(consumer.position(tp) < ends[tp] for tp in parts):
                for batch in consumer.poll(timeout_ms=500).values():
                    marks += sum(1 for r in batch if not r.key)
                    carried += sum(packed_count(r.value) if is_packed(r) else 1 for r in batch if r.key)
    finally:
        consumer.close()
    size = None
    if data_dir is not None:
        size = sum(f.stat().st_size for d in data_dir.glob(f"{topic}-*") for f in d.glob("*.log"))
    out = {"records": records - marks, "watermark_marks": marks, "bytes_on_disk": size}
    return {**out, "transactions": carried} if topic.endswith("-repartition") else out


def bench_workers(bootstrap: str, data_dir: Path | None, frame: pd.DataFrame, args: argparse.Namespace,
                  work: Path, step: Callable[[str, Callable[[], Any]], Any]) -> dict[str, Any]:
    start = args.warmup_days + args.train_days
    stream = frame[frame["TX_TIME_DAYS"] >= start].reset_index(drop=True)
    models = step("train", lambda: {k: str(v) for k, v in train_models(frame, args, work / "models").items()})
    history = frame[frame["TX_TIME_DAYS"] < start]
    started = time.perf_counter()
    stores = stores_after(history)
    state = {"history_rows": len(history), "fold_s": time.perf_counter() - started}
    tag = uuid.uuid4().hex[:6]
    featured, raw = settings_for(bootstrap, f"f{tag}"), settings_for(bootstrap, f"r{tag}")
    fills = {"featured": fill_topic(featured, wire_records(stream)), "raw": fill_raw(raw, stream)}
    runs: dict[str, list[dict[str, Any]]] = {"featured": [], "raw": [], **({"shadow": []} if args.challenger else {})}
    shadowed = with_challenger(Path(models["raw"]), work / "models" / "shadowed") if args.challenger else None
    for i in range(args.worker_repeats):  # interleaved: a slower spell of the machine hits every form
        runs["featured"].append(step(f"worker-featured-{i + 1}", lambda i=i: bench_worker(
            featured, Path(models["features"]), len(stream), args, f"state-featured-{tag}-{i}", False, data_dir)))
        for kind, model in (("raw", Path(models["raw"])), ("shadow", shadowed)):
            if model is None:
                continue
            group = f"state-{kind}-{tag}-{i}"
            fills["raw_state"] = {**state, **warm_changelogs(raw, group, stores)}
            runs[kind].append(step(f"worker-{kind}-{i + 1}", lambda group=group, model=model: bench_worker(
                raw, model, len(stream), args, group, True, data_dir)))
    return {"stream_rows": len(stream), "fill": fills, "runs": runs}


# -- report ----------------------------------------------------------------------------------
def table(r: dict[str, Any]) -> str:
    lines: list[str] = []
    if "features" in r:
        lines += [*_features_table(r["features"]), ""]
    if "memory" in r:
        lines += [*_memory_table(r["memory"]), ""]
    if "restore" in r:
        lines += [*_restore_table(r["restore"]), ""]
    if "worker" in r:
        lines += _worker_table(r["worker"])
    return "\n".join(lines)


def _features_table(f: dict[str, Any]) -> list[str]:
    rows, s = f["feature_rows"], f["stages"]
    full, steady = s["all"], s.get("steady")
    out = ["| feature code, no Kafka | events | seconds | events/s | events/s after the first 38 days (state warm) |",
           "|---|---:|---:|---:|---:|",
           f"| feature_rows, whole table | {rows['events']:,} | {rows['seconds']:.2f} | {rows['events_s']:,.0f} | – |"]
    for step, what in (("stage", "customer stage: decode, customer windows, encode repartition record"),
                       ("decode", "decode the repartition record"), ("enrich", "terminal stage (enrich)"),
                       ("changelog", f"changelog records of changed keys, per batch of {s['batch']:,}"), ("", "all")):
        rate = f"{step}_events_s" if step else "events_s"
        seconds = full[step] if step else full["seconds"]
        out.append(f"| FeatureStages: {what} | {full['events']:,} | {seconds:.2f} | {full[rate]:,.0f} | "
                   f"{f'{steady[rate]:,.0f}' if steady else '–'} |")
    out.append(f"\nChangelog written by the stages: {s['changelog_records']:,} records, "
               f"{s['changelog_bytes'] / 2**20:,.0f} MiB, {s['changelog_bytes_per_event']:,.0f} bytes per raw event "
               f"({s['labels']:,} labels, {s['failed']} failed records).")
    return out


def _memory_table(m: dict[str, Any]) -> list[str]:
    out = ["| state in a Store | entities | mean events | changelog bytes (key + value) | tracemalloc bytes | "
           "RSS growth bytes | GiB per million (tracemalloc) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for entity in ("customer", "terminal"):
        restored = m[entity]["restored"]
        for how, what in (("restored", "restored from its changelog record"),
                          ("grown", "grown by update()" + (" and label()" if entity == "terminal" else ""))):
            e = m[entity][how]
            rss = f"{e['rss_bytes']:,.0f}" if "rss_bytes" in e else "–"
            out.append(f"| {entity}, {what} | {e['entities']:,} | {restored['mean_events']:.1f} | "
                       f"{restored['serialized_bytes']:,.0f} | {e['tracemalloc_bytes']:,.0f} | {rss} | "
                       f"{e['tracemalloc_bytes'] * 1e6 / 2**30:.2f} |")
    return out


def _restore_table(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| customers | partitions | mean events | changelog MiB | produce s | restore s, fastest (each) | "
           "records/s | MiB/s | restore process peak RSS MiB | RSS growth MiB |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "skipped" in r:
            out.append(f"| {r['customers']:,} | skipped: {r['skipped']} |||||||||")
            continue
        every = ", ".join(f"{x:.1f}" for x in r["all_seconds"])
        out.append(f"| {r['customers']:,} | {r['partitions']} | {r['mean_events']:.1f} | {r['bytes'] / 2**20:,.0f} | "
                   f"{r['produce_s']:.1f} | {r['seconds']:.1f} ({every}) | {r['records_s']:,.0f} | {r['mib_s']:.1f} | "
                   f"{r['peak_rss_mib']:,.0f} | {r['rss_growth_mib']:,.0f} |")
    return out


def _worker_table(w: dict[str, Any]) -> list[str]:
    out = ["| worker input | records | start → last commit s | tx/s | assignment → last commit s | tx/s | "
           "peak RSS MiB | the worker's summary |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, what in (("featured", "featured records, featured-input model"),
                       ("raw", "raw records + labels, raw-input model"),
                       ("shadow", "raw records + labels, raw-input model and a challenger beside it")):
        for i, x in enumerate(w["runs"].get(name, [])):
            out.append(f"| {what} (run {i + 1}) | {x['records']:,} | {x['seconds_from_start']:.1f} | "
                       f"{x['tx_s']:,.0f} | {x['seconds_from_assignment']:.1f} | {x['tx_s_from_assignment']:,.0f} | "
                       f"{x['peak_rss_mib']:,.0f} | {' '.join(x['summary'])} |")
    restored = [re.search(r"restored (\w+) store \d+: (\d+) keys .* in ([\d.]+)s", line)
                for line in w["runs"]["raw"][0]["restore_lines"]]
    late = [run["metrics"].get("fraud_late_events_total") for run in w["runs"]["raw"]]
    out += ["", f"Raw runs' late events (fraud_late_events_total): {', '.join(str(x) for x in late)}.  "]
    for entity in ("customer", "terminal"):
        found = [m for m in restored if m and m[1] == entity]
        out.append(f"First raw run's {entity} stores restored at assignment: {sum(int(m[2]) for m in found):,} keys in "
                   f"{sum(float(m[3]) for m in found):.2f}s ({len(found)} partitions).  ")
    internal = w["runs"]["raw"][0]["internal_topics"]
    out.append("First raw run's internal topics: " + ", ".join(
        f"{k} {v['records']:,} records" + (f" ({v['transactions']:,} transactions)" if "transactions" in v else "")
        + (f" + {v['watermark_marks']:,} watermark marks" if v.get("watermark_marks")
                                             else "")
        + (f" ({v['bytes_on_disk'] / 2**20:,.0f} MiB)" if v["bytes_on_disk"] else "")
        for k, v in internal.items()) + ".")
    return out


# -- main ------------------------------------------------------------------------------------
def measure(args: argparse.Namespace, results: dict[str, Any], step: Callable[[str, Callable[[], Any]], Any],
            work: Path) -> None:
    """Every part asked for, into ``results``."""
    parts = set(args.parts.split(","))
    frame, results["data"] = simulate_bank(args)
    held = held_events(frame)
    results["data"]["held"] = {k: float(np.mean(v)) for k, v in held.items() if k != "now_ms"}
    log(f"simulated: {results['data']}")
    if "features" in parts:
        results["features"] = {"feature_rows": step("feature_rows", lambda: bench_feature_rows(frame)),
                               "stages": step("stages", lambda: bench_stages(frame, args.max_batch))}
    if "memory" in parts:
        results["memory"] = {entity: step(f"memory-{entity}", lambda entity=entity: run_child(
            {"kind": "memory", "entity": entity, "held": held, "seed": args.seed, "customers": args.memory_customers,
             "terminals": args.memory_terminals, "grown": args.grown_entities}, work))
            for entity in ("customer", "terminal")}
    if parts & {"restore", "worker"}:
        with broker(args) as (bootstrap, data_dir):
            if "restore" in parts:
                results["restore"] = [step(f"restore-{n}", lambda n=int(n): bench_restore(
                    bootstrap, data_dir, held, n, args.restore_partitions, args.seed, args.restore_repeats, work))
                    for n in args.restore_customers.split(",")]
            if "worker" in parts:
                results["worker"] = bench_workers(bootstrap, data_dir, frame, args, work, step)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child is not None:
        spec = json.loads(args.child.read_text())
        print(json.dumps((memory_child if spec["kind"] == "memory" else restore_child)(spec)))
        return 0
    if args.json is None or not set(args.parts.split(",")) <= set(PARTS):
        raise SystemExit(f"--json is required and --parts must be among {', '.join(PARTS)}")
    results: dict[str, Any] = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                               "load": {}}

    def step(name: str, run: Callable[[], Any]) -> Any:
        """One measurement: the load before it noted, its result saved at once (an interrupted run keeps it)."""
        results["load"][name] = os.getloadavg()[0]
        started = time.perf_counter()
        result = run()
        log(f"{name} ({time.perf_counter() - started:.0f}s, load {results['load'][name]:.2f}): "
               f"{str(result)[:300]}")
        args.json.write_text(json.dumps(results, indent=2, default=str))
        return result

    args.json.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="state-bench-"))
    try:
        measure(args, results, step, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.json.write_text(json.dumps(results, indent=2, default=str))
    print(table(results))
    print("\n1-minute load average before each measurement: "
          + ", ".join(f"{k} {v:.2f}" for k, v in results["load"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
