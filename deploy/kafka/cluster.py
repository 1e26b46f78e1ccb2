"""A real three-node Apache Kafka (KRaft) cluster run as local Java processes: replication and failover.

Three *combined* nodes (each a controller and a broker, ``process.roles=broker,controller``),
not three controllers beside three brokers: half the JVMs (three of 512 MiB fit beside the
test suite on a two-core, 24 GiB machine), and still a controller quorum that survives one
node down and brokers whose leaders move when a node dies, which is what a client meets. Kafka
does not recommend combined nodes for production clusters (a broker's load can starve its
controller); nothing here is about controller load.

The cluster runs as production clusters are set up: replication factor 3 for every topic
(internal ones too), ``min.insync.replicas=2``, no unclean leader election. So an acknowledged
(``acks=all``) record is on two nodes at least, one node down changes leaders but loses
nothing, and two nodes down stop every write (``NotEnoughReplicas``) until one returns.

Each node can be killed (any signal: SIGKILL for a crash, SIGSTOP for a zombie) and started
again on its own data (``restart``): the fault injection the cluster chaos tests use.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from deploy.kafka.local import (
    _LOG4J,
    DEFAULT_HOME,
    LocalKafka,
    LocalKafkaError,
    _alive,
    _cluster_id,
    _require,
    _terminate,
    min_heap,
    wait_until_ready,
)
from deploy.ports import free_port

log = logging.getLogger(__name__)

NODE_HEAP = "512m"


@dataclass
class NodeState:
    """One node of the cluster: enough to find it, kill it and start it again."""

    node_id: int
    pid: int
    bootstrap_servers: str
    data_dir: str
    log_file: str
    command: list[str] = field(default_factory=list)


@dataclass
class ClusterState:
    bootstrap_servers: str  # every node's listener, comma-separated
    nodes: list[NodeState]

    def node(self, node_id: int) -> NodeState:
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise LocalKafkaError(f"the cluster has no node {node_id}")


class LocalCluster:
    """Owns one local cluster whose files live under ``home`` (default ``.cache/kafka``), beside a single broker's."""

    def __init__(self, home: Path | str = DEFAULT_HOME, nodes: int = 3, heap: str = NODE_HEAP) -> None:
        if nodes < 3:
            raise LocalKafkaError(f"a cluster needs 3 nodes or more (replication factor 3), not {nodes}")
        self.single = LocalKafka(home, heap=heap)  # its jars and folders
        self.home, self.size, self.heap = self.single.home, nodes, heap
        self.state_file = self.home / "cluster.json"

    def state(self) -> ClusterState | None:
        """The recorded cluster, if any of its nodes is alive."""
        try:
            raw = json.loads(self.state_file.read_text())
            state = ClusterState(raw["bootstrap_servers"], [NodeState(**n) for n in raw["nodes"]])
        except (FileNotFoundError, ValueError, TypeError, KeyError):
            return None
        return state if any(_alive(n.pid) for n in state.nodes) else None

    def start(self, timeout_s: float = 120.0) -> ClusterState:
        """Start the cluster (or return the one running) and wait until every node answers and the
        internal topics can be written with their three replicas."""
        running = self.state()
        if running is not None:
            return running
        java = _require("java")
        libs = self.single.ensure_libs()
        ports = [(free_port(), free_port()) for _ in range(self.size)]
        run_dir = self.home / f"cluster-{ports[0][0]}"
        shutil.rmtree(run_dir, ignore_errors=True)
        voters = ",".join(f"{i + 1}@127.0.0.1:{cport}" for i, (_port, cport) in enumerate(ports))
        cluster_id = _cluster_id()
        nodes = []
        for i, (port, cport) in enumerate(ports):
            node_id, node_dir = i + 1, run_dir / f"node-{i + 1}"
            data_dir = node_dir / "data"
            data_dir.mkdir(parents=True)
            props = node_dir / "server.properties"
            props.write_text(_node_properties(node_id, port, cport, voters, data_dir, self.size))
            log4j = node_dir / "log4j2.properties"
            log4j.write_text(_NODE_LOG4J)
            jvm = [java, f"-Xmx{self.heap}", f"-Xms{min_heap(self.heap)}", "-XX:+UseG1GC",
                   "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={log4j}",
                   f"-Dkafka.logs.dir={node_dir}", "-cp", f"{libs}/*"]
            fmt = subprocess.run([*jvm, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props)],
                                 capture_output=True, text=True, check=False)
            if fmt.returncode != 0:
                raise LocalKafkaError(f"formatting node {node_id}'s KRaft storage failed: {fmt.stderr[-2000:]}")
            nodes.append(NodeState(node_id, 0, f"127.0.0.1:{port}", str(data_dir), str(node_dir / "node.log"),
                                   [*jvm, "kafka.Kafka", str(props)]))
        state = ClusterState(",".join(n.bootstrap_servers for n in nodes), nodes)
        for node in nodes:
            node.pid = _launch(node)
        self._save(state)
        try:
            for node in nodes:
                wait_until_ready(node.bootstrap_servers, timeout_s)
            wait_for_replicas(state.bootstrap_servers, self.size, timeout_s)
        except LocalKafkaError:
            self.stop()
            raise
        log.info("local Kafka cluster of %d nodes ready at %s", self.size, state.bootstrap_servers)
        return state

    def kill(self, node_id: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to one node (SIGKILL: a crash; SIGSTOP: a zombie, SIGCONT wakes it)."""
        state = self._require_state()
        os.killpg(state.node(node_id).pid, sig)
        if sig == signal.SIGKILL:
            deadline = time.monotonic() + 10
            while _alive(state.node(node_id).pid) and time.monotonic() < deadline:
                time.sleep(0.05)

    def stop_node(self, node_id: int, timeout_s: float = 30.0) -> None:
        """Stop one node as an operator's rolling restart does (SIGTERM: a controlled shutdown that hands its
        leaderships over first), SIGKILL past ``timeout_s``."""
        _terminate(self._require_state().node(node_id).pid, timeout_s)

    def restart(self, node_id: int, timeout_s: float = 90.0) -> NodeState:
        """Start a node that was killed again on its own data; wait until it answers."""
        state = self._require_state()
        node = state.node(node_id)
        deadline = time.monotonic() + 10  # a SIGKILL just sent takes a moment
        while _alive(node.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(node.pid):
            raise LocalKafkaError(f"node {node_id} (pid {node.pid}) is still running")
        node.pid = _launch(node)
        self._save(state)
        wait_until_ready(node.bootstrap_servers, timeout_s)
        return node

    def alive(self, node_id: int) -> bool:
        return _alive(self._require_state().node(node_id).pid)

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Stop every node (SIGCONT first, for a node left paused; SIGKILL after ``timeout_s``: the last nodes of
        a cluster wait for a controller quorum that is gone) and remove the cluster's files."""
        try:
            raw = json.loads(self.state_file.read_text())
            state = ClusterState(raw["bootstrap_servers"], [NodeState(**n) for n in raw["nodes"]])
        except (FileNotFoundError, ValueError, TypeError, KeyError):
            return False
        stopped = False
        for node in state.nodes:
            if _alive(node.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.pid, signal.SIGCONT)
            stopped = _terminate(node.pid, timeout_s) or stopped
        self.state_file.unlink(missing_ok=True)
        if state.nodes:
            shutil.rmtree(Path(state.nodes[0].data_dir).parent.parent, ignore_errors=True)
        return stopped

    def _require_state(self) -> ClusterState:
        try:
            raw = json.loads(self.state_file.read_text())
        except (FileNotFoundError, ValueError) as err:
            raise LocalKafkaError("no local cluster is recorded; start one first") from err
        return ClusterState(raw["bootstrap_servers"], [NodeState(**n) for n in raw["nodes"]])

    def _save(self, state: ClusterState) -> None:
        self.state_file.write_text(json.dumps(asdict(state)))


def _launch(node: NodeState) -> int:
    with open(node.log_file, "ab") as out:
        proc = subprocess.Popen(node.command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    return proc.pid


def wait_for_replicas(bootstrap: str, replicas: int, timeout_s: float) -> None:
    """Block until every node is registered with the cluster (a topic of ``replicas`` replicas can be made)."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    deadline = time.monotonic() + timeout_s
    seen = 0
    while time.monotonic() < deadline:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
            try:
                seen = len(admin.describe_cluster()["brokers"])
            finally:
                admin.close()
            if seen >= replicas:
                return
        except (KafkaError, OSError):
            pass
        time.sleep(0.5)
    raise LocalKafkaError(f"only {seen} of {replicas} nodes joined the cluster within {timeout_s:.0f}s")


def _node_properties(node_id: int, port: int, controller_port: int, voters: str, data_dir: Path, size: int) -> str:
    return f"""\
process.roles=broker,controller
node.id={node_id}
controller.quorum.voters={voters}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs={data_dir}
num.partitions=3
auto.create.topics.enable=true
default.replication.factor={min(3, size)}
min.insync.replicas=2
unclean.leader.election.enable=false
offsets.topic.replication.factor={min(3, size)}
offsets.topic.num.partitions=5
transaction.state.log.replication.factor={min(3, size)}
transaction.state.log.min.isr=2
transaction.state.log.num.partitions=5
share.coordinator.state.topic.replication.factor={min(3, size)}
share.coordinator.state.topic.min.isr=2
group.initial.rebalance.delay.ms=0
replica.lag.time.max.ms=10000
log.retention.hours=24
log.segment.bytes=104857600
"""


# what a node says of its life (start, leadership, fencing, shutdown) and every warning, to its own log
_NODE_LOG4J = _LOG4J + """\
logger.controller.name = org.apache.kafka.controller.QuorumController
logger.controller.level = info
logger.coordinator.name = kafka.coordinator.transaction
logger.coordinator.level = info
"""
