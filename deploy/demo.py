"""``make demo``: the main job end to end on simulated data, then stop everything it started.

1. Start a local Kafka (unless FRAUD_BOOTSTRAP_SERVERS names one).
2. Simulate a history of transactions (Fraud Detection Handbook design) and train a model.
3. Start the worker, stream the following days as live traffic, and let it score them.
4. Print what happened: scored, alerts, the share of alerts that are real frauds and the
   share of frauds caught (the simulator knows), throughput, the metrics URL.

By default the stream carries raw transactions (id, time, customer, terminal, amount), as a
card issuer's does, and the fraud labels the bank learns 7 days later go to the labels topic:
the worker computes the features itself. Its windows look 30 days back (terminal risk 37), so
the last 38 days of the history are streamed first, unpaced, to fill them (state a long-running
worker already holds), then the live days at ``--rate``. ``--featured`` streams records that
carry the features instead, with event times restamped to the send time (real latency).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import orjson

from deploy.ports import free_port
from pipeline.cliargs import print_error

REPO = Path(__file__).resolve().parent.parent
RUNS = REPO / "runs" / "demo"
WARM_UP_DAYS = 38  # the longest look-back: 30-day windows of terminal risk 7 days back, plus a day


def say(message: str) -> None:
    print(f"==> {message}", flush=True)


def cli(module: str, *args: str, env: dict[str, str]) -> None:
    """Run one of the project's CLIs, showing its output; stop the demo if it fails."""
    subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, check=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deploy.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=1000)
    parser.add_argument("--terminals", type=int, default=2000)
    parser.add_argument("--history-days", type=int, default=61, help="days simulated for training")
    parser.add_argument("--live-days", type=int, default=14, help="days streamed as live traffic")
    parser.add_argument("--rate", type=float, default=4000, help="live traffic, transactions per second")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--featured", action="store_true",
                        help="stream records that carry the features (default: raw transactions and labels)")
    return parser


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    RUNS.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "FRAUD_MODEL_DIR"}
    env["PYTHONUNBUFFERED"] = "1"
    started_kafka = None
    worker = None
    try:
        if not env.get("FRAUD_BOOTSTRAP_SERVERS"):
            from deploy.kafka import LocalKafka

            kafka = LocalKafka()
            running = kafka.state()
            if running is None:
                say("starting a local Apache Kafka (first run resolves its jars from Maven Central)")
                started_kafka = kafka
            env["FRAUD_BOOTSTRAP_SERVERS"] = (running or kafka.start()).bootstrap_servers
        run_id = uuid.uuid4().hex[:6]
        env.update(FRAUD_INPUT_TOPIC=f"demo-transactions-{run_id}", FRAUD_ALERTS_TOPIC=f"demo-alerts-{run_id}",
                   FRAUD_DEAD_LETTER_TOPIC=f"demo-dlq-{run_id}", FRAUD_LABELS_TOPIC=f"demo-labels-{run_id}")
        raw = not args.featured
        say(f"Kafka at {env['FRAUD_BOOTSTRAP_SERVERS']}, topics {env['FRAUD_INPUT_TOPIC']} -> "
            f"{env['FRAUD_ALERTS_TOPIC']} (dead letters: {env['FRAUD_DEAD_LETTER_TOPIC']})")

        sim = ["--customers", str(args.customers), "--terminals", str(args.terminals),
               "--days", str(args.history_days + args.live_days), "--seed", str(args.seed)]
        history = RUNS / "history.parquet"
        say(f"simulating {args.history_days} days of history for training")
        cli("producer", "simulate", *sim, "--until-day", str(args.history_days), "--output", str(history), env=env)
        live = RUNS / "live.parquet"
        cli("producer", "simulate", *sim, "--from-day", str(args.history_days), "--output", str(live), env=env)

        models = RUNS / "models"
        say("training the autoencoder on the normal transactions of the history (April is feature warm-up)"
            + ("; the worker will compute the features from raw transactions" if raw else ""))
        cli("trainer", "fit", "--data", str(history), "--output", str(models), "--start", "2018-05-01",
            "--seed", str(args.seed), "--input", "raw" if raw else "features", env=env)

        port = free_port()
        say(f"starting the worker; metrics at http://127.0.0.1:{port}/metrics")
        worker = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "--model-dir", str(models), "--metrics-port", str(port),
             "--metrics-host", "127.0.0.1", "--consumer-group", f"demo-{run_id}", "--exit-when-idle", "8",
             "--log-level", "WARNING"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)

        wait_until_assigned(port, worker)
        warmed = 0
        if raw:
            import pandas as pd

            warm = RUNS / "warm-up.parquet"
            frame = pd.read_parquet(history)
            frame[frame["TX_TIME_DAYS"] >= args.history_days - WARM_UP_DAYS].to_parquet(warm)
            warmed = int((frame["TX_TIME_DAYS"] >= args.history_days - WARM_UP_DAYS).sum())
            say(f"filling the worker's windows: the last {WARM_UP_DAYS} days of history as raw transactions "
                "and labels, unpaced")
            cli("producer", "replay", str(warm), "--raw", env=env)
            say(f"streaming {args.live_days} live days of raw transactions at {args.rate:.0f} tx/s, each fraud's "
                f"label 7 simulated days later to {env['FRAUD_LABELS_TOPIC']}")
        else:
            say(f"streaming {args.live_days} live days at {args.rate:.0f} tx/s (labels stay with the simulator)")
        started = time.monotonic()
        live_flags = ["--raw"] if raw else ["--drop-label", "--restamp"]
        cli("producer", "replay", str(live), "--rate", str(args.rate), *live_flags, env=env)
        streamed = count_rows(live)
        metrics = wait_until_scored(port, warmed + streamed)
        elapsed = time.monotonic() - started
        out, _ = worker.communicate(timeout=300)
        worker = None
        print(out.strip())
        summarize(live, env, metrics, elapsed, port, warmed)
        return 0
    except subprocess.CalledProcessError as err:
        print_error("make demo", f"step failed: {' '.join(map(str, err.cmd))}")
        return 1
    except RuntimeError as err:
        print_error("make demo", str(err))
        return 1
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)
        if started_kafka is not None:
            say("stopping the local Kafka")
            started_kafka.stop()


def count_rows(path: Path) -> int:
    """Rows of a Parquet file, from its footer."""
    import pyarrow.parquet as pq  # pandas and pyarrow only once the demo runs: `--help` answers at once

    return int(pq.ParquetFile(path).metadata.num_rows)


def scrape(port: int) -> dict[str, float]:
    """The worker's metrics as name -> value; empty when it does not answer."""
    from pipeline.worker.metrics import parse_samples

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return {}
    return parse_samples(text)


def wait_until_assigned(port: int, worker: subprocess.Popen, timeout_s: float = 120) -> None:
    """Wait until the worker owns input partitions, so live traffic is scored as it arrives."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and worker.poll() is None:
        if scrape(port).get("fraud_assigned_partitions", 0) > 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"the worker did not join its consumer group within {timeout_s:.0f}s "
                       f"(exit code {worker.poll()})")


def wait_until_scored(port: int, expected: int, timeout_s: float = 300) -> dict[str, float]:
    """Poll /metrics until every streamed transaction was scored or dead-lettered."""
    deadline = time.monotonic() + timeout_s
    samples: dict[str, float] = {}
    while time.monotonic() < deadline:
        samples = scrape(port) or samples
        done = sum(samples.get(f'fraud_transactions_total{{outcome="{o}"}}', 0) for o in ("scored", "invalid"))
        if done >= expected:
            break
        time.sleep(0.2)
    return samples


def bucket_quantile(samples: dict[str, float], name: str, q: float) -> str:
    """Upper bound of the histogram bucket holding quantile ``q`` ("?" without data)."""
    buckets = sorted(
        (float(key.split('le="')[1].rstrip('"}')), count)
        for key, count in samples.items() if key.startswith(f"{name}_bucket{{")
    )
    total = buckets[-1][1] if buckets else 0
    for bound, count in buckets:
        if total and count >= q * total:
            return f"{bound:g}"
    return "?"


def print_quality(metrics: dict[str, float], streamed: list[Path], alerted: set[str]) -> None:
    """Online quality as the worker counted it from the labels topic (``fraud_quality_*``), beside the simulator's
    truth for the same transactions: those whose label came due (event time up to what each repartition
    partition resolved)."""
    import re

    import pandas as pd

    from pipeline.worker.state.decisions import bucket_average_precision
    from pipeline.worker.state.hop import partition_for

    counts = {(label, alerted_): 0.0 for label in ("fraud", "genuine") for alerted_ in ("true", "false")}
    buckets: dict[str, dict[float, float]] = {"fraud": {}, "genuine": {}}
    until: dict[int, float] = {}
    for key, value in metrics.items():
        labels = dict(re.findall(r'(\w+)="([^"]*)"', key))
        if key.startswith("fraud_quality_resolved_total{"):
            counts[(labels["label"], labels["alerted"])] += value
        elif key.startswith("fraud_quality_score_ratio_bucket{"):
            le = float(labels["le"])
            buckets[labels["label"]][le] = buckets[labels["label"]].get(le, 0.0) + value
        elif key.startswith("fraud_quality_resolved_until_timestamp_seconds{"):
            until[int(labels["partition"])] = value
    resolved = sum(counts.values())
    if not resolved or not until:
        print("  realised quality          none yet: no transaction's label came due (the label delay plus a "
              "day of stream time)")
        return
    tp, fp, fn = counts[("fraud", "true")], counts[("genuine", "true")], counts[("fraud", "false")]
    ap = bucket_average_precision(*([v for _le, v in sorted(buckets[label].items())] for label in ("fraud", "genuine")))
    print(f"  realised quality          precision {tp / max(1, tp + fp):.1%}, recall {tp / max(1, tp + fn):.1%}, "
          f"AP {ap:.3f}  (the stream's own counters: {resolved:,.0f} transactions whose label came due)")
    frame = pd.concat([pd.read_parquet(path, columns=["TRANSACTION_ID", "TERMINAL_ID", "TX_DATETIME", "TX_FRAUD"])
                       for path in streamed])
    seconds = frame["TX_DATETIME"].to_numpy().astype("datetime64[ms]").astype("int64") / 1000
    limit = [until.get(partition_for(str(t).encode(), len(until)), -1.0) for t in frame["TERMINAL_ID"]]
    due = frame[seconds <= limit]
    fraud = due["TX_FRAUD"].to_numpy() == 1
    flagged = due["TRANSACTION_ID"].astype(str).isin(alerted).to_numpy()
    t_tp = int((fraud & flagged).sum())
    print(f"  simulator's truth         precision {t_tp / max(1, flagged.sum()):.1%}, recall "
          f"{t_tp / max(1, fraud.sum()):.1%}  (the same {len(due):,} transactions, labels as simulated)")


def summarize(live: Path, env: dict[str, str], metrics: dict[str, float], elapsed: float, port: int,
              warmed: int) -> None:
    """What happened to the live days (the warm-up of raw input, ``warmed`` transactions, aside)."""
    import pandas as pd

    raw = warmed > 0
    from kafka import KafkaConsumer

    truth = pd.read_parquet(live, columns=["TRANSACTION_ID", "TX_FRAUD"])
    frauds = set(truth.loc[truth["TX_FRAUD"] == 1, "TRANSACTION_ID"].astype(str))
    consumer = KafkaConsumer(env["FRAUD_ALERTS_TOPIC"], bootstrap_servers=env["FRAUD_BOOTSTRAP_SERVERS"],
                             auto_offset_reset="earliest", enable_auto_commit=False, consumer_timeout_ms=3000)
    live_ids = set(truth["TRANSACTION_ID"].astype(str))
    every_alert = [orjson.loads(m.value) for m in consumer]
    consumer.close()
    alerts = [a for a in every_alert if a["transaction_id"] in live_ids]
    warm_up_alerts = len({a["transaction_id"] for a in every_alert} - live_ids)
    alerted = {a["transaction_id"] for a in alerts}
    caught = alerted & frauds
    scored = metrics.get('fraud_transactions_total{outcome="scored"}', float("nan"))
    print()
    say("summary")
    print(f"  transactions streamed     {len(truth):>10,}")
    print(f"  transactions scored       {scored:>10,.0f}" + (f"  (with {warmed:,} of warm-up)" if raw else ""))
    print(f"  alerts                    {len(alerted):>10,}"
          + (f"  (and {warm_up_alerts:,} on the warm-up)" if raw else ""))
    digest = hashlib.sha256("\n".join(sorted(alerted)).encode()).hexdigest()[:12]
    print(f"  alert set digest          {digest:>10}  (the same seed gives the same alerts: compare runs)")
    print(f"  alerts that are frauds    {len(caught) / max(1, len(alerted)):>10.1%}  (precision)")
    print(f"  frauds caught             {len(caught) / max(1, len(frauds)):>10.1%}  "
          f"({len(caught)} of {len(frauds)}; recall)")
    invalid = metrics.get('fraud_transactions_total{outcome="invalid"}', 0)
    print(f"  dead letters              {invalid:>10,.0f}")
    if raw:
        late = metrics.get("fraud_late_events_total", float("nan"))
        late_labels = metrics.get("fraud_late_labels_total", float("nan"))
        back = metrics.get("fraud_records_handed_back_total", float("nan"))
        print(f"  late events               {late:>10,.0f}  (transactions a window scored earlier should have counted; "
              "0: every feature exact)")
        print(f"  late labels               {late_labels:>10,.0f}  (fraud labels a terminal window needed before "
              "they arrived: each is due exactly at the label delay)")
        print(f"  records handed back       {back:>10,.0f}  (read again later: their partition ran ahead in event "
              "time during the unpaced warm-up)")
    if raw:
        print_quality(metrics, [RUNS / "warm-up.parquet", live], {a["transaction_id"] for a in every_alert})
    print(f"  stream start to last commit {elapsed:>8.1f}s  (input paced; the worker kept up at "
          f"{len(truth) / elapsed:,.0f} tx/s" + (", after the warm-up backlog)" if raw else ")"))
    if raw:
        print("  end-to-end latency        not measured: raw transactions keep their 2018 event times (the "
              "windows need them); `python -m deploy.demo --featured` streams with real latency")
    else:
        p50, p99 = (bucket_quantile(metrics, "fraud_end_to_end_latency_seconds", q) for q in (0.5, 0.99))
        print(f"  end-to-end latency        p50 <= {p50}s, p99 <= {p99}s  (histogram bucket bounds)")
    print(f"  metrics were at           http://127.0.0.1:{port}/metrics (the worker has stopped)")
    print(f"  model and report          {RUNS / 'models' / 'current'}")
    if alerts:
        top = max(alerts, key=lambda a: a["score"])
        print(f"\nthe highest-scoring alert, as published to {env['FRAUD_ALERTS_TOPIC']}:")
        print(orjson.dumps(top, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    sys.exit(run())
