"""Shared fixtures: one real Kafka broker per session, fresh topics and groups per test.

The broker is, in order: ``KAFKA_BOOTSTRAP_SERVERS`` if set; testcontainers' KafkaContainer
if a Docker engine answers; else the project's local broker (``deploy.kafka``). When none can
be had the integration tests fail with the reason; they are never skipped silently.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from deploy.kafka.local import LocalKafka, LocalKafkaError, wait_until_ready
from pipeline.config import KafkaSettings
from tests.kafka_helpers import with_shared_jars

REPO = Path(__file__).resolve().parent.parent

logging.getLogger("kafka").setLevel(logging.ERROR)
LOCAL_BROKER_PID: int | None = None  # set when the session broker is the project's local process


# The folder says what a test needs, and marks it so (``make unit`` / ``test`` / ``chaos`` / ``containers`` select by
# marker): tests/unit needs nothing running, tests/integration a broker, tests/chaos brokers it kills, tests/containers
# a container engine.
FOLDER_MARKS = {"integration": ("integration",), "chaos": ("chaos", "integration"), "containers": ("docker",)}
BROKER_FIXTURES = {"kafka_bootstrap", "kafka_settings", "kafka_env", "broker_pid"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    tests = Path(__file__).resolve().parent
    for item in items:
        try:
            parts = Path(str(item.fspath)).resolve().relative_to(tests).parts
        except ValueError:  # the doctests of the packages
            continue
        folder = parts[0] if len(parts) > 1 else ""
        for mark in FOLDER_MARKS.get(folder, ()):
            item.add_marker(mark)
        if folder == "unit" and BROKER_FIXTURES & set(getattr(item, "fixturenames", ())):
            raise pytest.UsageError(f"{item.nodeid} uses the session broker: it belongs in tests/integration")


def docker_available() -> str | None:
    """None when a Docker engine answers, else the reason it does not."""
    try:
        import docker

        client = docker.from_env(timeout=3)
        client.ping()
        client.close()
        return None
    except Exception as err:  # any failure means: no engine to use
        return f"no Docker engine answers ({type(err).__name__}: {str(err)[:120]})"


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap servers of a real broker for the whole session."""
    configured = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if configured:
        wait_until_ready(configured, 60)
        yield configured
        return
    if docker_available() is None:
        from tests.container_helpers import apache_kafka

        with apache_kafka() as container:
            wait_until_ready(container.bootstrap_server, 120)
            yield container.bootstrap_server
        return
    home = tmp_path_factory.mktemp("kafka")
    with_shared_jars(home)
    broker = LocalKafka(home)
    global LOCAL_BROKER_PID
    try:
        state = broker.start()
        LOCAL_BROKER_PID = state.pid
    except LocalKafkaError as err:
        pytest.fail(f"no Kafka broker for integration tests: set KAFKA_BOOTSTRAP_SERVERS, "
                    f"start Docker, or fix the local broker: {err}")
    try:
        yield state.bootstrap_servers
    finally:
        broker.stop()


@pytest.fixture
def broker_pid(kafka_bootstrap: str) -> int:
    """Process id of the session broker, for tests that pause it; skipped for external brokers."""
    if LOCAL_BROKER_PID is None:
        pytest.skip("the session broker is not a local process this test can pause "
                    "(KAFKA_BOOTSTRAP_SERVERS or testcontainers)")
    return LOCAL_BROKER_PID


@pytest.fixture
def kafka_settings(kafka_bootstrap: str) -> KafkaSettings:
    """Settings pointing at the session broker, with topics no other test uses."""
    tag = uuid.uuid4().hex[:10]
    return KafkaSettings.build(environ={}, overrides={
        "bootstrap_servers": kafka_bootstrap,
        "input_topic": f"tx-{tag}",
        "alerts_topic": f"alerts-{tag}",
        "dead_letter_topic": f"dlq-{tag}",
        "labels_topic": f"labels-{tag}",
        "client_id": f"test-{tag}",
    })


@pytest.fixture(params=["kafka-python", "confluent"])
def kafka_client(request: pytest.FixtureRequest) -> str:
    """The worker's Kafka client (``--kafka-client``): tests that take this fixture run on both."""
    if request.param == "confluent" and importlib.util.find_spec("confluent_kafka") is None:
        pytest.skip("confluent-kafka is not installed (pip install 'fraud-pipeline[confluent]'; make test does)")
    return str(request.param)


@pytest.fixture
def kafka_env(kafka_settings: KafkaSettings) -> dict[str, str]:
    """Environment for a subprocess CLI that should use ``kafka_settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUD_")}
    env.update({
        "FRAUD_BOOTSTRAP_SERVERS": kafka_settings.bootstrap_servers,
        "FRAUD_INPUT_TOPIC": kafka_settings.input_topic,
        "FRAUD_ALERTS_TOPIC": kafka_settings.alerts_topic,
        "FRAUD_DEAD_LETTER_TOPIC": kafka_settings.dead_letter_topic,
        "FRAUD_LABELS_TOPIC": kafka_settings.labels_topic,
        "PYTHONUNBUFFERED": "1",
    })
    return env


@pytest.fixture(scope="session")
def kcat() -> str:
    """Path to kcat, the independent Kafka client used to check the wire format."""
    path = shutil.which("kcat")
    if path is None:
        pytest.fail("kcat is not installed; `make test` installs it (deploy/install-tools.sh)")
    return path


# -- simulated data and trained models shared by the worker tests ---------------------------
SIM_DAYS, HISTORY_DAYS = 70, 58


@pytest.fixture(scope="session")
def simulated() -> pd.DataFrame:
    """A small simulated bank: 400 customers, 800 terminals, 70 days, known frauds."""
    from producer.simulator import SimulatorConfig, simulate

    return simulate(SimulatorConfig(n_customers=400, n_terminals=800, n_days=SIM_DAYS, seed=11))


@pytest.fixture(scope="session")
def stream_frame(simulated: pd.DataFrame) -> pd.DataFrame:
    """The days after the history: what the worker scores live."""
    return simulated[simulated["TX_TIME_DAYS"] >= HISTORY_DAYS].reset_index(drop=True)


def _train(simulated: pd.DataFrame, root: Path, seed: int, input_form: str = "features") -> Path:
    from pipeline.features import HANDBOOK
    from trainer.fit import FitOptions, run_fit
    from trainer.split import SplitSpec
    from trainer.train import TrainConfig

    history = simulated[(simulated["TX_TIME_DAYS"] >= 20) & (simulated["TX_TIME_DAYS"] < HISTORY_DAYS)]
    options = FitOptions(output=root, train=TrainConfig(epochs=6, seed=seed, progress=False),
                         split=SplitSpec(val_fraction=0.2, test_fraction=0.0), device="cpu",
                         baselines=False, publish=False, input_form=input_form)
    return run_fit(history.reset_index(drop=True), HANDBOOK, options).version_dir


@pytest.fixture(scope="session")
def model_dir(simulated: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model version trained on the simulated history (one version folder)."""
    return _train(simulated, tmp_path_factory.mktemp("models"), seed=0)


@pytest.fixture(scope="session")
def raw_model_dir(simulated: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model, exported for raw input: the worker computes the handbook features itself."""
    return _train(simulated, tmp_path_factory.mktemp("raw-models"), seed=0, input_form="raw")


@pytest.fixture(scope="session")
def second_model_dir(simulated: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another version of the same model (other seed), for hot-reload tests."""
    return _train(simulated, tmp_path_factory.mktemp("models2"), seed=1)
