"""What the container tests share: the images they run, Apache Kafka as a testcontainer, HTTP polling.

testcontainers' ``KafkaContainer`` drives Confluent's image (it sources ``/etc/confluent/docker/*`` and refuses
any tag below 7.0.0), so it cannot start ``apache/kafka``, the image docker-compose.yml runs. ``apache_kafka``
configures that image the way the compose file does, through its documented ``KAFKA_*`` variables.

``make containers`` builds the images once (``python -m deploy.containers images``) and sets
``FRAUD_CONTAINER_IMAGES=prebuilt``: the tests then run those, including the stand-in for apache/kafka where
Docker Hub cannot be reached. Without it, the tests build deploy/Dockerfile themselves and pull apache/kafka.

``Stack`` is one compose project of docker-compose.yml (and overlays) driven through Docker Compose, with the
host-side checks the compose tests share: committed against end offsets, health, Prometheus queries.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from deploy.containers import images
from deploy.ports import free_port

KAFKA_IMAGE = "apache/kafka:4.3.1"
PREBUILT = os.environ.get("FRAUD_CONTAINER_IMAGES") == "prebuilt"


def kafka_image() -> str:
    return images.KAFKA if PREBUILT else KAFKA_IMAGE


def apache_kafka(network: Any = None, alias: str = "kafka"):  # type: ignore[no-untyped-def]
    """A single KRaft node of the apache/kafka image: ``alias:9092`` inside ``network``, and a published port on
    the engine's host (``container.bootstrap_server``) advertised as 127.0.0.1. Not started."""
    from testcontainers.core.container import DockerContainer

    port = free_port()
    container = DockerContainer(kafka_image())
    settings = {
        "CLUSTER_ID": "5L6g3nShT-eMCtK--X86sw",
        "KAFKA_NODE_ID": "1",
        "KAFKA_PROCESS_ROLES": "broker,controller",
        "KAFKA_LISTENERS": "PLAINTEXT://:9092,CONTROLLER://:9093,EXTERNAL://:9094",
        "KAFKA_ADVERTISED_LISTENERS": f"PLAINTEXT://{alias}:9092,EXTERNAL://127.0.0.1:{port}",
        "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,EXTERNAL:PLAINTEXT",
        "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
        "KAFKA_INTER_BROKER_LISTENER_NAME": "PLAINTEXT",
        "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@localhost:9093",
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
        "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
        "KAFKA_HEAP_OPTS": "-Xmx512m -Xms512m",
    }
    for key, value in settings.items():
        container.with_env(key, value)
    container.with_bind_ports(9094, port)
    if network is not None:
        container.with_network(network).with_network_aliases(alias)
    container.bootstrap_server = f"127.0.0.1:{port}"
    return container


def get_json(url: str, timeout_s: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return json.loads(response.read())


def wait_until(what: str, check, timeout_s: float, every_s: float = 2.0):  # type: ignore[no-untyped-def]
    """Poll ``check()`` until it returns something truthy; fail naming ``what`` and the last value or error."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
            last = value
        except Exception as err:  # the thing polled is not up yet
            last = f"{type(err).__name__}: {err}"
        time.sleep(every_s)
    raise AssertionError(f"{what}: not reached in {timeout_s:.0f} s (last: {last})")


# -- the compose stack -------------------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parent.parent
COMPOSE = os.environ.get("COMPOSE") or (str(images.COMPOSE) if images.COMPOSE.exists()
                                        else shutil.which("docker-compose"))
PARTITIONS = 6
# A small bank: 60 days of history (the model trains on days 30-60), then 12 live days at 150 tx/s (about
# 40 s), so that the scale-up happens while transactions flow.
SETTINGS = {
    "SIM_CUSTOMERS": "300", "SIM_TERMINALS": "600", "SIM_HISTORY_DAYS": "60", "SIM_LIVE_DAYS": "12",
    "TRAIN_EPOCHS": "3", "PRODUCER_RATE": "150", "TOPIC_PARTITIONS": str(PARTITIONS), "ALERT_RATE": "0.01",
}


class Stack:
    """One compose project: its files, its variables, and the engine's view of its containers."""

    def __init__(self, overlays: tuple[str, ...] = (), local_overlays: tuple[str, ...] = ()) -> None:
        self.project = f"fraudtest{uuid.uuid4().hex[:6]}"
        local = [REPO / "deploy" / "containers" / name for name in ("compose.local.yml", *local_overlays)]
        self.files = [REPO / "docker-compose.yml", *(REPO / name for name in overlays), *(local if PREBUILT else [])]
        self.kafka_port, self.prometheus_port = free_port(), free_port()
        self.env = {**os.environ, **SETTINGS, "KAFKA_EXTERNAL_PORT": str(self.kafka_port),
                    "KAFKA_EXTERNAL_HOST": "127.0.0.1", "PROMETHEUS_PORT": str(self.prometheus_port),
                    "GRAFANA_PORT": str(free_port()), "KAFKA_EXTERNAL_PORT_2": str(free_port()),
                    "KAFKA_EXTERNAL_PORT_3": str(free_port())}
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

    def logs(self, name: str, tail: str = "60") -> str:
        return self.compose("logs", "--no-color", "--tail", tail, name)

    def prometheus(self, path: str):  # type: ignore[no-untyped-def]
        return get_json(f"http://127.0.0.1:{self.prometheus_port}{path}")

    def query(self, expr: str) -> float:
        result = self.prometheus("/api/v1/query?query=" + urllib.parse.quote(expr))["data"]["result"]
        return sum(float(r["value"][1]) for r in result)


@contextmanager
def running(stack: Stack) -> Iterator[Stack]:
    """The stack, taken down with its volumes at the end (the services' log tails printed first)."""
    try:
        yield stack
    finally:
        try:
            for name in ("worker", "producer", "trainer"):
                text = stack.logs(name, "all")
                notable = [line[:500] for line in text.splitlines()
                           if " WARNING " in line or " ERROR " in line or "Traceback" in line]
                print(f"--- {name}: WARNING and ERROR lines ({len(notable)}, the last 40) ---\n" +
                      "\n".join(notable[-40:]), flush=True)
                print(f"--- {name} logs (tail) ---\n{text[-3000:]}", flush=True)
        except AssertionError:
            pass
        stack.compose("down", "-v", "--remove-orphans", timeout_s=300)


def offsets(stack: Stack) -> tuple[dict[int, int], dict[int, int]]:
    """The input topic's end offsets and the workers' committed offsets, per partition (0: none committed)."""
    from pipeline.config import KafkaSettings
    from tests.worker_helpers import input_progress

    settings = KafkaSettings.build(environ={}, overrides={"bootstrap_servers": f"127.0.0.1:{stack.kafka_port}",
                                                          "input_topic": "transactions"})
    progress = input_progress(settings, "fraud-worker")
    return ({p: end for p, (end, _) in progress.items()}, {p: committed or 0 for p, (_, committed) in progress.items()})


def caught_up(stack: Stack) -> dict[int, int] | None:
    """The end offsets once the group has committed all of them (None before)."""
    ends, committed = offsets(stack)
    return ends if ends == committed and any(ends.values()) else None


def healthy(stack: Stack, name: str, count: int) -> bool:
    states = [c.get("Health") or c.get("State") for c in stack.service(name)]
    return len(states) == count and all(s == "healthy" for s in states)


def container_marks(what: str, compose: bool = False) -> list:
    """A container test module's marks: docker and slow, skipped with the reason where no engine answers (or, with
    ``compose``, where no Docker Compose is found)."""
    import pytest

    from tests.conftest import docker_available

    reason = docker_available()
    marks = [pytest.mark.docker, pytest.mark.slow,
             pytest.mark.skipif(reason is not None, reason=f"{what} skipped: {reason}")]
    if compose:
        marks.append(pytest.mark.skipif(COMPOSE is None, reason="no Docker Compose: `python -m deploy.containers "
                                                                "images` builds one"))
    return marks
