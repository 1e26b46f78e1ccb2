"""The compose stack users run, brought up for real: docker-compose.yml, unchanged, with Docker Compose.

On a machine without image registries (CI's), ``make containers`` builds the images first and this test adds
deploy/containers/compose.local.yml, which only swaps in the locally built images (stand-ins for apache/kafka
and prom/prometheus) and leaves Grafana out. A small simulated bank streams raw transactions and labels
(the stack's default), and in order:

1. ``up -d``: the trainer one-shot publishes a model, the worker is healthy, alerts come out, Prometheus scrapes
   the worker and has loaded every alerting rule;
2. ``up -d --scale worker=3`` while the producer streams: three workers share the six partitions, and once the
   producer is done every input record is committed (no lag), with no dead letter and no dropped output;
3. every container stays inside its compose limits (the limits are applied; none was OOM-killed or restarted);
4. ``down`` then ``up -d``: Kafka's volume kept the topics and the group's offsets, the model volume the model,
   and the producer does not send its raw stream again.

tests/containers/test_compose_cluster.py runs the same stack with the three-node overlay.

Run it with ``make containers``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.container_helpers import (
    PARTITIONS,
    Stack,
    caught_up,
    container_marks,
    healthy,
    offsets,
    running,
    wait_until,
)

REPO = Path(__file__).resolve().parents[2]
pytestmark = container_marks("compose stack", compose=True)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running(Stack()) as stack:
        yield stack


@pytest.mark.timeout(1500)
def test_up_trains_alerts_and_is_scraped(stack: Stack) -> None:
    stack.compose("up", "-d", "--no-build", timeout_s=900)
    trainer = wait_until("the trainer one-shot exits", lambda: [
        c for c in stack.service("trainer") if c.get("State") == "exited"], 600)
    assert trainer[0].get("ExitCode") == 0, stack.logs("trainer")
    wait_until("the worker is healthy", lambda: healthy(stack, "worker", 1), 240)
    alerts = wait_until("alerts counted by Prometheus", lambda: stack.query("sum(fraud_alerts_total)"), 300)
    print(f"alerts so far: {alerts:.0f}", flush=True)

    targets = stack.prometheus("/api/v1/targets")["data"]["activeTargets"]
    workers = [t for t in targets if t["labels"]["job"] == "fraud-worker"]
    assert len(workers) == 1 and workers[0]["health"] == "up", workers
    rules = [r for g in stack.prometheus("/api/v1/rules")["data"]["groups"] for r in g["rules"]]
    expected = [r for g in yaml.safe_load((REPO / "deploy/prometheus/rules.yml").read_text())["groups"]
                for r in g["rules"]]
    assert len(rules) == len(expected) and all(r["health"] == "ok" for r in rules), rules


@pytest.mark.timeout(900)
def test_three_workers_share_the_partitions_and_lose_nothing(stack: Stack) -> None:
    from kafka import KafkaAdminClient

    stack.compose("up", "-d", "--no-build", "--no-recreate", "--scale", "worker=3", timeout_s=600)
    wait_until("three healthy workers", lambda: healthy(stack, "worker", 3), 300)
    wait_until("Prometheus scrapes three workers", lambda: len([
        t for t in stack.prometheus("/api/v1/targets")["data"]["activeTargets"]
        if t["labels"]["job"] == "fraud-worker" and t["health"] == "up"]) == 3, 120)

    def shared() -> bool:
        admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{stack.kafka_port}")
        try:
            members = (admin.describe_groups(["fraud-worker"]).get("fraud-worker") or {}).get("members") or []
        finally:
            admin.close()
        owned = [sum(len(a.get("partitions") or []) for a in
                     (m.get("member_assignment") or {}).get("assigned_partitions") or []
                     if a.get("topic") == "transactions") for m in members]
        return len(owned) == 3 and sum(owned) == PARTITIONS and min(owned) >= 1

    wait_until("three members sharing the input partitions", shared, 180)
    wait_until("the producer has sent the raw stream",
               lambda: "raw stream sent" in stack.logs("producer"), 600, every_s=5)
    ends = wait_until("every input record committed", lambda: caught_up(stack), 300, every_s=3)
    print(f"input records: {sum(ends.values()):,}", flush=True)
    assert stack.query('sum(fraud_transactions_total{outcome="scored"})') > 0
    assert stack.query("sum(fraud_dead_letters_total)") == 0
    assert stack.query('sum(fraud_errors_total{kind=~"output_dropped|publish_failed|commit_failed"})') == 0
    late = stack.query("sum(fraud_late_events_total)")
    print(f"late events: {late:.0f}", flush=True)


def test_every_service_stays_inside_its_limits(stack: Stack) -> None:
    for container in stack.containers():
        name = container["Service"]
        if name not in stack.memory_limits:
            continue
        inspect = json.loads(subprocess.run(["podman", "inspect", container["ID"]] if shutil.which("podman") else
                                            ["docker", "inspect", container["ID"]], capture_output=True, text=True,
                                            check=True, env=stack.env).stdout)[0]
        host, state = inspect["HostConfig"], inspect["State"]
        assert host.get("Memory", 0) > 0, f"{name}: no memory limit applied"
        assert host.get("NanoCpus", 0) > 0 or host.get("CpuQuota", 0) > 0, f"{name}: no CPU limit applied"
        assert not state.get("OOMKilled"), f"{name} was OOM-killed (limit {stack.memory_limits[name]})"
        assert inspect.get("RestartCount", 0) == 0, f"{name} restarted {inspect['RestartCount']} times"


@pytest.mark.timeout(900)
def test_down_then_up_keeps_kafka_data_and_the_model(stack: Stack) -> None:
    before = caught_up(stack)
    assert before is not None, "the previous test leaves the group caught up"
    stack.compose("down", timeout_s=300)
    stack.compose("up", "-d", "--no-build", timeout_s=900)
    trainer = wait_until("the trainer one-shot exits", lambda: [
        c for c in stack.service("trainer") if c.get("State") == "exited"], 300)
    assert trainer[0].get("ExitCode") == 0
    assert "already published" in stack.logs("trainer"), stack.logs("trainer")
    # Kafka's volume kept the topics and the group's offsets: the same end offsets, all committed, and the
    # producer does not send its raw stream again (old event times would be dead letters). A lost volume would
    # show empty topics here.
    wait_until("the producer sees its stream was sent",
               lambda: "raw stream already sent" in stack.logs("producer"), 300, every_s=3)
    wait_until("the worker is healthy again", lambda: healthy(stack, "worker", 1), 240)
    assert offsets(stack) == (before, before)
    time.sleep(10)  # a scrape of the new worker
    assert stack.query("sum(fraud_dead_letters_total)") == 0
