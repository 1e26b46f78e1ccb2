"""The benchmark scripts that need a broker still run end to end on tiny inputs (the session broker)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.bench_helpers import STATE_BANK, run_script

pytestmark = pytest.mark.integration


def test_worker_bench_small_run(kafka_bootstrap: str, tmp_path: Path) -> None:
    out = tmp_path / "worker.json"
    run_script("bench/worker_bench.py", "--json", out, "--bootstrap-servers", kafka_bootstrap,
               "--customers", "300", "--terminals", "600", "--warmup-days", "10", "--train-days", "5",
               "--stream-days", "3", "--epochs", "1", "--naive-records", "300", "--rates", "200",
               "--latency-seconds", "2", "--second-batch", "0", "--profile-records", "0",
               "--in-flight", "1", "--max-load-wait", "0", timeout=420)
    results = json.loads(out.read_text())
    streamed = results["data"]["stream_rows"]
    assert streamed > 0 and results["fill"]["records"] == streamed
    assert results["ceiling"]["records"] == streamed
    assert results["ceiling_confluent"]["records"] == streamed and results["ceiling_confluent"]["undecodable"] == 0
    assert [(w["mode"], w["records"], w["in_flight"]) for w in results["worker"]] == [
        ("at-least-once", streamed, 4), ("exactly-once", streamed, 1), ("at-least-once", streamed, 1),
        ("at-least-once", streamed, 4)]
    assert [w["client"] for w in results["worker"]] == ["kafka-python"] * 3 + ["confluent"]
    assert [(lat["mode"], lat["in_flight"], lat["client"]) for lat in results["latency"]] == [
        ("at-least-once", None, "kafka-python"), ("exactly-once", None, "kafka-python"),
        ("at-least-once", 1, "kafka-python"), ("at-least-once", None, "confluent")]
    assert results["naive"]["records"] == 300
    assert results["latency"][0]["histogram"]["count"] == results["latency"][0]["sent"]
    assert {s["batch"] for s in results["scoring"]} >= {256, 65536}
    assert {(s["engine"], s["device"]) for s in results["scoring"]} == {("numpy", "cpu"), ("torch", "cpu")}
    assert [(f["client"], f["consumer_only"]["count"]) for f in results["floor"]] == [
        ("kafka-python", results["floor"][0]["sent"]), ("confluent", results["floor"][1]["sent"])]
    assert [w["device"] for w in results["worker"]] == ["cpu"] * 4
    assert [(p["processes"], p["records"], p["returncode"]) for p in results["processes"]] == [(1, streamed, 0),
                                                                                              (2, streamed, 0)]
    assert list(results["worker"][0]["ready"]) == ["settings_parsed_s", "model_served_s", "assigned_s"]


def test_state_bench_restore_and_worker_raw_vs_featured(kafka_bootstrap: str, tmp_path: Path) -> None:
    out = tmp_path / "state.json"
    run_script("bench/state_bench.py", "--json", out, "--parts", "restore,worker", *STATE_BANK, "--epochs", "1",
               "--restore-customers", "500,1500", "--restore-partitions", "2", "--restore-repeats", "2",
               "--worker-repeats", "1", "--bootstrap-servers", kafka_bootstrap, timeout=420)
    results = json.loads(out.read_text())
    assert [(r["customers"], r["entities"]) for r in results["restore"]] == [(500, 500), (1500, 1500)]
    assert all(2 <= r["records"] <= r["customers"] / 20 for r in results["restore"])  # pages of many states
    assert all(len(r["per_partition"]) == 2 and r["seconds"] == min(r["all_seconds"]) > 0 and r["peak_rss_mib"] > 0
               and len(r["all_seconds"]) == 2 for r in results["restore"])
    worker = results["worker"]
    streamed = worker["stream_rows"]
    assert worker["fill"]["featured"]["records"] == worker["fill"]["raw"]["records"] == streamed > 0
    runs = worker["runs"]
    assert [len(runs["featured"]), len(runs["raw"])] == [1, 1]
    featured, raw = runs["featured"][0], runs["raw"][0]
    assert featured["records"] == raw["records"] == streamed
    assert all(run["returncode"] == 0 and run["summary"][0].startswith(f"consumed {streamed}: {streamed} scored")
               for run in (featured, raw))
    # the raw worker restored the history's state and computed the table's features: (nearly) the same alerts
    # (from empty state, its features and alerts were far from the featured run's)
    state = worker["fill"]["raw_state"]
    assert 0 < state["customers"] <= 300 and 0 < state["terminals"] <= 600
    assert state["records"] == state["customers"] + state["terminals"]
    for kind in ("customer", "terminal"):
        assert raw["metrics"][f"fraud_state_restored_records_total{{store={kind}}}"] == state[f"{kind}s"]
    alerts = [int(re.search(r"(\d+) alerts", run["summary"][0])[1]) for run in (featured, raw)]
    assert alerts[0] > 0 and abs(alerts[0] - alerts[1]) <= max(2, alerts[0] // 20)
    internal = raw["internal_topics"]
    hop = internal["by-terminal-repartition"]  # each transaction through the terminal stage, packed
    assert hop["transactions"] == streamed and 0 < hop["records"] < streamed
    for kind in ("customer", "terminal"):  # the restored state, then what the worker changed
        assert internal[f"{kind}-windows-changelog"]["records"] > state[f"{kind}s"]
