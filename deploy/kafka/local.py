"""A real single-node Apache Kafka (KRaft) run as a local Java process, for the demo and tests.

The broker's jars come from Maven Central through ``pom.xml`` beside this file
(``mvn dependency:copy-dependencies`` into an ignored cache). ``LocalKafka.start``
formats KRaft storage, starts the broker on free loopback ports, waits until it
answers metadata requests, and records its state so ``stop`` can end it later,
from another process if need be.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from deploy.kafka import tls as tls_listeners
from deploy.ports import free_port

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
POM = HERE / "pom.xml"


def default_home() -> Path:
    """``.cache/kafka`` in the source checkout (whatever the working directory), else the user's cache."""
    if (REPO / "pyproject.toml").is_file():
        return REPO / ".cache" / "kafka"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fraud-pipeline" / "kafka"


DEFAULT_HOME = default_home()


class LocalKafkaError(RuntimeError):
    """The local broker could not be resolved, started or reached."""


@dataclass(frozen=True)
class BrokerState:
    """What a running local broker left on disk: enough to find and stop it."""

    pid: int
    bootstrap_servers: str
    data_dir: str
    log_file: str
    # started with tls=True: the secure listeners and what their clients need (None otherwise)
    ssl_servers: str | None = None  # TLS, the server's certificate only (CA: ca_file)
    mtls_servers: str | None = None  # TLS with ssl.client.auth=required (client_cert_file, client_key_file)
    sasl_ssl_servers: str | None = None  # SASL over TLS: SCRAM-SHA-512, SCRAM-SHA-256, PLAIN
    wrong_host_servers: str | None = None  # TLS with a certificate for another host name (no 127.0.0.1 SAN)
    ca_file: str | None = None
    client_cert_file: str | None = None
    client_key_file: str | None = None
    client_key_password: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None


def _cluster_id() -> str:
    """A KRaft cluster id as Kafka writes them (URL-safe base64 of a UUID).

    One in 64 such ids starts with '-', which kafka-storage's argument parser reads as an
    option ("--cluster-id: expected one argument"); Kafka's own Uuid.randomUuid skips those
    too, so do the same.
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise LocalKafkaError(
            f"'{tool}' is not on PATH; the local Kafka needs Java 17+ and Maven "
            "(run `make tools` or install openjdk-17-jre-headless and maven)"
        )
    return path


class LocalKafka:
    """Owns one local broker whose files live under ``home`` (default ``.cache/kafka``)."""

    def __init__(self, home: Path | str = DEFAULT_HOME, heap: str = "768m") -> None:
        self.home = Path(home).expanduser().resolve()  # the state file must not depend on the cwd
        self.heap = heap
        self.libs = self.home / "libs"
        self.state_file = self.home / "broker.json"

    # -- jars -------------------------------------------------------------------------
    def ensure_libs(self) -> Path:
        """Resolve the broker jars from Maven Central once; re-resolve when pom.xml changes."""
        digest = hashlib.sha256(POM.read_bytes()).hexdigest()[:16]
        stamp = self.libs / f".pom-{digest}"
        if stamp.exists():
            return self.libs
        mvn = _require("mvn")
        shutil.rmtree(self.libs, ignore_errors=True)
        log.info("resolving Kafka jars from Maven Central into %s", self.libs)
        cmd = [mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
               f"-DoutputDirectory={self.libs}"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise LocalKafkaError(f"mvn could not resolve Kafka: {done.stdout[-2000:]}"
                                  f"{done.stderr[-2000:]}")
        stamp.touch()
        return self.libs

    # -- lifecycle --------------------------------------------------------------------
    def state(self) -> BrokerState | None:
        """The recorded broker, if its process is still alive."""
        try:
            state = BrokerState(**json.loads(self.state_file.read_text()))
        except (FileNotFoundError, ValueError, TypeError):
            return None
        return state if _alive(state.pid) else None

    def start(self, port: int | None = None, timeout_s: float = 90.0, tls: bool = False) -> BrokerState:
        """Start a broker (or return the one already running) and wait until it answers.

        ``tls`` adds listeners for TLS, mTLS, SASL_SSL (SCRAM users made at format time) and a TLS
        one whose certificate names another host, with a throw-away CA (``deploy.kafka.tls``).
        """
        running = self.state()
        if running is not None:
            if tls and running.ssl_servers is None:
                raise LocalKafkaError(f"a broker without TLS listeners already runs at {running.bootstrap_servers} "
                                      f"(pid {running.pid}); stop it first")
            return running
        java = _require("java")
        libs = self.ensure_libs()
        port = port or free_port()
        controller_port = free_port()
        run_dir = self.home / f"run-{port}"
        shutil.rmtree(run_dir, ignore_errors=True)
        data_dir = run_dir / "data"
        data_dir.mkdir(parents=True)
        props = run_dir / "server.properties"
        secure_ports = {name: free_port() for name in tls_listeners.LISTENERS} if tls else {}
        material = _tls_material(run_dir / "tls") if tls else None
        text = _server_properties(port, controller_port, data_dir, secure_ports)
        props.write_text(text + (tls_listeners.listener_properties(secure_ports, material) if material else ""))
        log4j = run_dir / "log4j2.properties"
        log4j.write_text(_LOG4J)
        classpath = f"{libs}/*"
        jvm = [java, f"-Xmx{self.heap}", f"-Xms{min_heap(self.heap)}", "-XX:+UseG1GC",
               "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={log4j}",
               f"-Dkafka.logs.dir={run_dir}", "-cp", classpath]
        scram = tls_listeners.scram_arguments(material) if material else []
        fmt = subprocess.run(
            [*jvm, "kafka.tools.StorageTool", "format", "-t", _cluster_id(), "-c", str(props), *scram],
            capture_output=True, text=True, check=False,
        )
        if fmt.returncode != 0:
            raise LocalKafkaError(f"formatting KRaft storage failed: {fmt.stderr[-2000:]}")
        log_file = run_dir / "broker.log"
        with open(log_file, "ab") as out:
            proc = subprocess.Popen(
                [*jvm, "kafka.Kafka", str(props)], stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        state = BrokerState(proc.pid, f"127.0.0.1:{port}", str(data_dir), str(log_file),
                            **_secure_state(secure_ports, material))
        self.state_file.write_text(json.dumps(asdict(state)))
        try:
            wait_until_ready(state.bootstrap_servers, timeout_s, proc)
        except LocalKafkaError:
            self.stop()
            raise
        log.info("local Kafka ready at %s (pid %d)", state.bootstrap_servers, proc.pid)
        return state

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop the recorded broker: SIGTERM, then SIGKILL after ``timeout_s``. True if one ran."""
        try:
            state = BrokerState(**json.loads(self.state_file.read_text()))
        except (FileNotFoundError, ValueError, TypeError):
            return False
        stopped = _terminate(state.pid, timeout_s)
        self.state_file.unlink(missing_ok=True)
        shutil.rmtree(Path(state.data_dir).parent, ignore_errors=True)
        return stopped


def _tls_material(folder: Path) -> tls_listeners.TlsMaterial:
    try:
        return tls_listeners.make_material(folder)
    except tls_listeners.TlsSetupError as err:
        raise LocalKafkaError(f"cannot make the TLS listeners' certificates: {err}") from err


def _secure_state(ports: dict[str, int], tls: tls_listeners.TlsMaterial | None) -> dict[str, str | None]:
    """BrokerState fields for the secure listeners (none without ``tls``)."""
    if tls is None:
        return {}
    return {
        "ssl_servers": f"127.0.0.1:{ports['SSL']}", "mtls_servers": f"127.0.0.1:{ports['MTLS']}",
        "sasl_ssl_servers": f"127.0.0.1:{ports['SASL_SSL']}", "wrong_host_servers": f"127.0.0.1:{ports['WRONGHOST']}",
        "ca_file": str(tls.ca_file), "client_cert_file": str(tls.client_cert_file),
        "client_key_file": str(tls.client_key_file), "client_key_password": tls.client_key_password,
        "sasl_username": tls_listeners.SASL_USER, "sasl_password": tls.sasl_password,
    }


def min_heap(heap: str) -> str:
    """The initial heap: a quarter of the maximum, so an idle broker stays small."""
    digits, unit = heap[:-1], heap[-1]
    return f"{max(64, int(digits) // 4)}{unit}" if unit in "mM" else heap


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def _terminate(pid: int, timeout_s: float) -> bool:
    if not _alive(pid):
        return False
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.2)
    log.warning("Kafka pid %d ignored SIGTERM for %.0fs; killing it", pid, timeout_s)
    os.killpg(pid, signal.SIGKILL)
    return True


def wait_until_ready(
    bootstrap: str, timeout_s: float, proc: subprocess.Popen | None = None
) -> None:
    """Block until the broker answers a metadata request, or raise LocalKafkaError."""
    from kafka import KafkaAdminClient  # the broker itself needs no Python client
    from kafka.errors import KafkaError

    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise LocalKafkaError(f"broker exited with code {proc.returncode}; see its log")
        wait_ms = int(1000 * min(5.0, max(0.5, deadline - time.monotonic())))
        try:
            with quiet_logger("kafka"):  # refused connections are expected until the broker listens
                admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000,
                                         bootstrap_timeout_ms=wait_ms, reconnect_backoff_max_ms=500)
                try:
                    admin.describe_cluster()
                    return
                finally:
                    admin.close()
        except (KafkaError, OSError) as err:
            last = err
            time.sleep(0.5)
    raise LocalKafkaError(f"broker at {bootstrap} did not answer within {timeout_s:.0f}s: {last}")


@contextmanager
def quiet_logger(name: str) -> Iterator[None]:
    """Silence one logger (and its children that inherit its level) for the duration of a block."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _server_properties(port: int, controller_port: int, data_dir: Path,
                       secure_ports: dict[str, int] | None = None) -> str:
    secure = secure_ports or {}
    listeners = "".join(f",{name}://127.0.0.1:{p}" for name, p in secure.items())
    protocols = "".join(f",{name}:{tls_listeners.LISTENERS[name]}" for name in secure)
    return f"""\
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller_port}
listeners=PLAINTEXT://127.0.0.1:{port}{listeners},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}{listeners}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT{protocols}
log.dirs={data_dir}
num.partitions=3
auto.create.topics.enable=true
offsets.topic.replication.factor=1
offsets.topic.num.partitions=5
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
log.retention.hours=24
log.segment.bytes=104857600
"""


_LOG4J = """\
status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = warn
rootLogger.appenderRef.out.ref = out
logger.kafka.name = kafka.server.KafkaRaftServer
logger.kafka.level = info
"""
