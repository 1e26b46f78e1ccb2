"""What the container tests share: the images they run, Apache Kafka as a testcontainer, HTTP polling.

testcontainers' ``KafkaContainer`` drives Confluent's image (it sources ``/etc/confluent/docker/*`` and refuses
any tag below 7.0.0), so it cannot start ``apache/kafka``, the image docker-compose.yml runs. ``apache_kafka``
configures that image the way the compose file does, through its documented ``KAFKA_*`` variables.

``make containers`` builds the images once (``python -m deploy.containers images``) and sets
``FRAUD_CONTAINER_IMAGES=prebuilt``: the tests then run those, including the stand-in for apache/kafka where
Docker Hub cannot be reached. Without it, the tests build deploy/Dockerfile themselves and pull apache/kafka.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from typing import Any

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


def wait_for_broker(bootstrap: str, timeout_s: float = 120.0) -> None:
    """Until the broker answers a metadata request from this host."""
    from kafka import KafkaAdminClient

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
            admin.list_topics()
            admin.close()
            return
        except Exception as err:  # not up yet: any client error
            if time.monotonic() > deadline:
                raise AssertionError(f"Kafka at {bootstrap} did not answer in {timeout_s:.0f} s: {err}") from err
            time.sleep(1)


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
