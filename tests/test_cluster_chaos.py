"""Chaos on a real three-node Kafka cluster (``make chaos``): nodes killed under a streaming worker.

The cluster (``deploy.kafka.cluster``: three combined KRaft nodes, replication factor 3,
``min.insync.replicas=2``) is this module's own. Each test streams simulated transactions at a
steady pace, does its damage to the cluster, and checks what ``test_chaos`` checks: 0 lost, 0
duplicates under exactly-once for a ``read_committed`` reader, every offset committed, no crash.
Each prints one ``chaos:`` line with its figures, recovery time included.
"""

from __future__ import annotations

import shutil
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from kafka import KafkaAdminClient
from kafka.errors import KafkaError

from deploy.kafka.cluster import LocalCluster
from deploy.kafka.local import DEFAULT_HOME
from pipeline.config import KafkaSettings
from tests.chaos_helpers import Workers, assigned, check_outcome, committed_total, feed, stream_file
from tests.worker_helpers import committed_to_end, wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    home = tmp_path_factory.mktemp("cluster-kafka")
    if (DEFAULT_HOME / "libs").exists():
        shutil.copytree(DEFAULT_HOME / "libs", home / "libs", symlinks=True)
    nodes = LocalCluster(home)
    nodes.start()
    yield nodes
    nodes.stop()


@pytest.fixture
def settings(cluster: LocalCluster) -> KafkaSettings:
    state = cluster.state()
    assert state is not None
    tag = uuid.uuid4().hex[:10]
    return KafkaSettings.build(environ={}, overrides={
        "bootstrap_servers": state.bootstrap_servers, "input_topic": f"tx-{tag}", "alerts_topic": f"alerts-{tag}",
        "dead_letter_topic": f"dlq-{tag}", "client_id": f"cluster-{tag}"})


def transaction_coordinator(settings: KafkaSettings, group: str) -> int | None:
    """The node that coordinates the worker's open transactions (its transactional ids start with the group)."""
    admin = KafkaAdminClient(**settings.client_options())
    try:
        listed = admin.list_transactions(transactional_id_pattern=f"{group}-tx-.*")
    finally:
        admin.close()
    holders = [node for node, listings in listed.items() if listings]
    return holders[0] if holders else None


def test_every_node_writes_its_log(cluster: LocalCluster) -> None:
    """A broker problem must leave something to read: each node logs its start (SLF4J bound to log4j)."""
    state = cluster.state()
    assert state is not None
    for node in state.nodes:
        text = Path(node.log_file).read_text(errors="replace")
        assert "Kafka Server started" in text, f"node {node.node_id}'s log: {text[-2000:]!r}"
        assert "NOP" not in text and "StaticLoggerBinder" not in text


def committed_now(settings: KafkaSettings, group: str) -> int:
    """``committed_total``, or -1 while a node is down and the client cannot tell (kafka-python raises
    ``KafkaConnectionError`` when the group coordinator it found is the node just killed)."""
    try:
        return committed_total(settings, group)
    except KafkaError:
        return -1


@pytest.mark.parametrize("mode", ["at-least-once", "exactly-once"])
def test_transaction_coordinator_killed_mid_stream(cluster: LocalCluster, settings: KafkaSettings, model_dir: Path,
                                                   stream_frame: pd.DataFrame, tmp_path: Path, mode: str) -> None:
    """kill -9 of the node coordinating the worker's transactions while records flow (under at-least-once,
    which has none, node 2); the node returns 15 s later. Before the fix the exactly-once worker stalled for
    good in 2 of 4 runs here (``send_offsets_to_transaction`` or ``commit_transaction`` never returned)."""
    frame, path = stream_file(stream_frame, settings, tmp_path)
    group = f"coord-{settings.client_id}"
    workers = Workers(settings, model_dir, group, mode, tmp_path)
    workers.env["FRAUD_REPLICATION_FACTOR"] = "3"  # refused at start if any topic it writes had fewer
    proc, log = workers.start()
    try:
        assert wait_for(lambda: assigned(log), timeout_s=120), log.read_text()[-2000:]
        feeder = feed(settings, path, rate=len(frame) / 40)
        time.sleep(6)
        node = transaction_coordinator(settings, group) if mode == "exactly-once" else 2
        assert node is not None, "no open transaction of the worker found"
        before = committed_now(settings, group)
        cluster.kill(node)
        killed_at = time.monotonic()
        time.sleep(15)
        cluster.restart(node)
        assert wait_for(lambda: committed_now(settings, group) > before, timeout_s=150, every_s=0.5), \
            log.read_text()[-3000:]
        first_commit_s = time.monotonic() - killed_at
        feeder_out, _ = feeder.communicate(timeout=300)
        assert feeder.returncode == 0, feeder_out
        assert wait_for(lambda: committed_to_end(settings, group), timeout_s=240), log.read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log.read_text()
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out
    lost = sum("transaction lost:" in line for line in out.splitlines())
    print(f"chaos: cluster, kill -9 node {node} for 15 s ({mode}): first commit after the kill "
          f"{first_commit_s:.1f}s, {lost} lost transactional calls")
    check_outcome(settings, model_dir, frame, group, mode, f"cluster: kill -9 the transaction coordinator ({mode})")
