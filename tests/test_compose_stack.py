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

Run it with ``make containers``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from deploy.containers import images
from deploy.ports import free_port
from tests.conftest import docker_available
from tests.container_helpers import PREBUILT, get_json, wait_until

REPO = Path(__file__).resolve().parent.parent
NO_DOCKER = docker_available()
COMPOSE = os.environ.get("COMPOSE") or (str(images.COMPOSE) if images.COMPOSE.exists()
                                        else shutil.which("docker-compose"))
pytestmark = [
    pytest.mark.docker,
    pytest.mark.slow,
    pytest.mark.skipif(NO_DOCKER is not None, reason=f"compose stack skipped: {NO_DOCKER}"),
    pytest.mark.skipif(COMPOSE is None, reason="no Docker Compose: `python -m deploy.containers images` builds one"),
]

PARTITIONS = 6
# A small bank: 60 days of history (the model trains on days 30-60), then 12 live days at 150 tx/s (about
# 40 s), so that the scale-up happens while transactions flow.
SETTINGS = {
    "SIM_CUSTOMERS": "300", "SIM_TERMINALS": "600", "SIM_HISTORY_DAYS": "60", "SIM_LIVE_DAYS": "12",
    "TRAIN_EPOCHS": "3", "PRODUCER_RATE": "150", "TOPIC_PARTITIONS": str(PARTITIONS), "ALERT_RATE": "0.01",
}


class Stack:
    """One compose project: its files, its variables, and the engine's view of its containers."""

    def __init__(self) -> None:
        self.project = f"fraudtest{uuid.uuid4().hex[:6]}"
        local = [REPO / "deploy" / "containers" / "compose.local.yml"] if PREBUILT else []
        self.files = [REPO / "docker-compose.yml", *local]
        self.kafka_port, self.prometheus_port = free_port(), free_port()
        self.env = {**os.environ, **SETTINGS, "KAFKA_EXTERNAL_PORT": str(self.kafka_port),
                    "KAFKA_EXTERNAL_HOST": "127.0.0.1", "PROMETHEUS_PORT": str(self.prometheus_port),
                    "GRAFANA_PORT": str(free_port())}
        limits = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
        self.memory_limits = {name: spec["deploy"]["resources"]["limits"]["memory"]
                              for name, spec in limits.items() if "deploy" in spec}

    def compose(self, *args: str, timeout_s: float = 600) -> str:
        cmd = [COMPOSE, "-p", self.project, *(f for path in self.files for f in ("-f", str(path))), *args]
        began = time.monotonic()
        done = subprocess.run(cmd, env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout_s,
                              check=False)
        print(f"compose {' '.join(args)}: {time.monotonic() - began:.1f} s", flush=True)
        assert done.returncode == 0, f"compose {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-4000:]}"
        return done.stdout

    def containers(self) -> list[dict]:
        """Every container of the project (running or not), as `compose ps -a --format json` lists them."""
        out = self.compose("ps", "-a", "--format", "json").strip()
        if out.startswith("["):
            return json.loads(out)
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def service(self, name: str) -> list[dict]:
        return [c for c in self.containers() if c.get("Service") == name]

    def logs(self, name: str) -> str:
        return self.compose("logs", "--no-color", "--tail", "60", name)

    def prometheus(self, path: str):  # type: ignore[no-untyped-def]
        return get_json(f"http://127.0.0.1:{self.prometheus_port}{path}")

    def query(self, expr: str) -> float:
        import urllib.parse

        result = self.prometheus("/api/v1/query?query=" + urllib.parse.quote(expr))["data"]["result"]
        return sum(float(r["value"][1]) for r in result)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    stack = Stack()
    try:
        yield stack
    finally:
        try:
            for name in ("worker", "producer", "trainer"):
                print(f"--- {name} logs (tail) ---\n{stack.logs(name)[-3000:]}", flush=True)
        except AssertionError:
            pass
        stack.compose("down", "-v", "--remove-orphans", timeout_s=300)


def _offsets(stack: Stack) -> tuple[dict[int, int], dict[int, int]]:
    """The input topic's end offsets and the workers' committed offsets, per partition (0: none committed)."""
    from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

    bootstrap = f"127.0.0.1:{stack.kafka_port}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        committed = admin.list_group_offsets("fraud-worker").get("fraud-worker", {})
        parts = [TopicPartition("transactions", p) for p in range(PARTITIONS)]
        ends = consumer.end_offsets(parts)
    finally:
        admin.close()
        consumer.close()
    return ({tp.partition: ends[tp] for tp in parts},
            {tp.partition: committed[tp].offset if tp in committed else 0 for tp in parts})


def _caught_up(stack: Stack) -> dict[int, int] | None:
    """The end offsets once the group has committed all of them (None before)."""
    ends, committed = _offsets(stack)
    return ends if ends == committed and any(ends.values()) else None


def _healthy(stack: Stack, name: str, count: int) -> bool:
    states = [c.get("Health") or c.get("State") for c in stack.service(name)]
    return len(states) == count and all(s == "healthy" for s in states)


@pytest.mark.timeout(1500)
def test_up_trains_alerts_and_is_scraped(stack: Stack) -> None:
    stack.compose("up", "-d", "--no-build", timeout_s=900)
    trainer = wait_until("the trainer one-shot exits", lambda: [
        c for c in stack.service("trainer") if c.get("State") == "exited"], 600)
    assert trainer[0].get("ExitCode") == 0, stack.logs("trainer")
    wait_until("the worker is healthy", lambda: _healthy(stack, "worker", 1), 240)
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
    wait_until("three healthy workers", lambda: _healthy(stack, "worker", 3), 300)
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
    ends = wait_until("every input record committed", lambda: _caught_up(stack), 300, every_s=3)
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
    before = _caught_up(stack)
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
    wait_until("the worker is healthy again", lambda: _healthy(stack, "worker", 1), 240)
    assert _offsets(stack) == (before, before)
    time.sleep(10)  # a scrape of the new worker
    assert stack.query("sum(fraud_dead_letters_total)") == 0
