"""The benchmark scripts still run end to end, on tiny inputs, so README's figures stay reproducible (those that
need a broker: ``tests/integration/test_bench_scripts_kafka.py``).

These check that each script works and writes well-formed results; they assert no timing.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from producer.simulator import SimulatorConfig, simulate
from tests.bench_helpers import STATE_BANK, run_script


def test_quality_baselines_on_simulated_april_to_july(tmp_path: Path) -> None:
    data = tmp_path / "tx.parquet"
    simulate(SimulatorConfig(n_customers=300, n_terminals=600, n_days=122, seed=2)).to_parquet(data)
    out = run_script("quality/quality.py", "--baselines-only", "--data", data)
    results = json.loads(out.strip().splitlines()[-1])
    assert set(results) == {"isolation_forest", "pca"}
    for metrics in results.values():
        assert 0.5 < metrics["roc_auc"] <= 1.0  # the simulator's frauds are findable
        assert 0.0 <= metrics["average_precision"] <= 1.0


def test_adbench_protocol_on_two_generated_sets(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i, name in enumerate(("blobs", "shifted")):
        normal = rng.normal(size=(300, 4 + i))
        anomalies = rng.normal(loc=4.0, size=(30, 4 + i))
        np.savez(tmp_path / f"{i + 1}_{name}.npz", X=np.concatenate([normal, anomalies]),
                 y=np.r_[np.zeros(300), np.ones(30)])
    doc = tmp_path / "quality.md"
    doc.write_text("# Model quality\n\nkept\n")
    out = run_script("quality/adbench.py", "--data-dir", tmp_path, "--out", doc, "--epochs", "3")
    results = json.loads((tmp_path / "adbench.json").read_text())
    assert list(results) == ["blobs", "shifted"]
    for entry in results.values():
        assert entry["train_rows"] == 180 and entry["test_rows"] == 150 and entry["test_anomalies"] == 30
        assert entry["knn5"]["roc_auc"] > 0.95 and 0 <= entry["ours"]["average_precision"] <= 1
        assert entry["scoring"] == "hybrid"  # auto without labelled validation rows
    text = doc.read_text()
    assert "kept" in text and "| **mean** |" in text and "quality/adbench.py" in text and "| blobs | 4 |" in out


@pytest.fixture(scope="module")
def device_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model version of each score method for the device benchmarks, trained once."""
    from bench.devicekit import prepare_models

    root = tmp_path_factory.mktemp("device-models")
    assert set(prepare_models(root)) == {"reconstruction", "hybrid"}
    return root


def test_gpu_scoring_reports_every_size_and_path(tmp_path: Path, device_models: Path) -> None:
    out = tmp_path / "gpu.json"
    run_script("bench/gpu_scoring.py", "--models", device_models, "--sizes", "256,1024", "--min-seconds", "0.05",
               "--json", out)
    results = json.loads(out.read_text())
    cpu = [r for r in results["results"] if r["device"] == "cpu"]
    assert sorted((r["score"], r["batch"], r["path"]) for r in cpu) == sorted(
        itertools.product(("reconstruction", "hybrid"), (256, 1024), ("end_to_end", "device_only")))
    assert all(r["tx_s"] > 0 and r["reps"] >= 3 and r["peak_memory_mib"] is None for r in cpu)
    cuda = [r for r in results["results"] if r["device"] == "cuda"]
    assert len(cuda) == (len(cpu) if torch.cuda.is_available() else 0)
    assert all(r["peak_memory_mib"] > 0 for r in cuda)


def test_gpu_worker_path_streams_every_record_through_each_run(tmp_path: Path, device_models: Path) -> None:
    out = tmp_path / "path.json"
    run_script("bench/gpu_worker_path.py", "--models", device_models, "--records", "3000", "--batches",
               "512,4096", "--json", out)
    results = json.loads(out.read_text())
    assert results["records"] == 3000 and 400 < results["mean_value_bytes"] < 1000  # the producer's JSON
    devices = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    runs = results["results"]
    assert [(r["score"], r["device"], r["batch"]) for r in runs] == list(
        itertools.product(("reconstruction", "hybrid"), devices, (512, 4096)))
    for r in runs:
        assert r["scored"] == 3000 and r["dead_letters"] == 0  # every simulated record is valid
        assert 0 < r["alerts"] < 300  # calibrated to alert on 0.5 % of normal validation rows
        assert r["records_s"] == pytest.approx(3000 / r["seconds"])
        assert r["decode_s"] > 0 and r["score_s"] > 0 and r["explain_encode_s"] >= 0
        assert (r["peak_memory_mib"] is None) == (r["device"] == "cpu")


def test_compare_simulator_prints_the_statistics_table() -> None:
    out = run_script("quality/compare_simulator.py", "--days", "10", "--seed", "1")
    assert "Simulated " in out and "| fraud rate overall (%) |" in out
    assert "| TERMINAL_ID_RISK_30DAY_WINDOW max |" in out  # every feature is summarised


def test_hot_key_bench_measures_both_banks() -> None:
    out = run_script("bench/hot_key.py", "--customers", "40", "--terminals", "80", "--days", "12", "--share", "0.3")
    lines = out.strip().splitlines()
    assert [line.split(": ")[1] for line in lines] == ["uniform terminals", "one terminal with 30%"]
    assert all(re.search(r"[\d,]+ events/s$", line) for line in lines)




def test_state_bench_feature_stages_and_memory(tmp_path: Path) -> None:
    out = tmp_path / "state.json"
    printed = run_script("bench/state_bench.py", "--json", out, "--parts", "features,memory", *STATE_BANK,
                         "--memory-customers", "2000", "--memory-terminals", "3000", "--grown-entities", "200")
    results = json.loads(out.read_text())
    rows = results["data"]["rows"]
    frauds = int(simulate(SimulatorConfig(n_customers=300, n_terminals=600, n_days=18, seed=7))["TX_FRAUD"].sum())
    assert results["features"]["feature_rows"]["events"] == rows
    stages = results["features"]["stages"]
    assert (stages["raw"], stages["labels"], stages["failed"]) == (rows, frauds, 0)  # every label sent, none lost
    assert stages["all"]["events"] == rows and stages["all"]["events_s"] > 0 and "steady" not in stages  # 18 days
    assert 0 < stages["changelog_records"] <= rows + frauds
    memory = results["memory"]
    assert (memory["customer"]["restored"]["entities"], memory["terminal"]["restored"]["entities"]) == (2000, 3000)
    for entity in ("customer", "terminal"):
        restored, grown = memory[entity]["restored"], memory[entity]["grown"]
        assert grown["entities"] == 200 and restored["mean_events"] > 5  # 18 days of a 0-4 tx/day bank
        # a state in memory holds at least its serialized events (8 bytes each per column), and objects
        assert restored["serialized_bytes"] < restored["tracemalloc_bytes"] < 4 * restored["serialized_bytes"]
        assert restored["serialized_bytes"] < grown["tracemalloc_bytes"] < 4 * restored["serialized_bytes"]
    assert "| customer, restored from its changelog record | 2,000 |" in printed
