"""The product as containers: the image trains, streams and scores against Kafka on one network.

Builds deploy/Dockerfile's two images (the worker image, its default target, and the trainer
image), starts Apache Kafka (testcontainers' KafkaContainer, KRaft) and runs three containers on
a private network: the trainer image (simulate a history, fit a model into a mounted folder),
then the worker image as the worker (scores the input topic, serves /metrics) and as the producer
(streams the simulated days after the history). Passes when alerts come out on the alerts topic
and the worker's metrics count them.

Needs a Docker engine; skipped with the reason where none answers. ``make containers`` runs it with the
images it built (and Podman as the engine where Docker is absent); with Docker,
``.venv/bin/python -m pytest -m docker tests/containers/test_container.py`` builds them here (the first build downloads
PyTorch's CPU wheels: several minutes).
"""

from __future__ import annotations

import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from deploy.containers import images
from deploy.kafka.local import wait_until_ready
from pipeline.config import KafkaSettings
from tests.container_helpers import PREBUILT, apache_kafka, container_marks
from tests.worker_helpers import read_topic

REPO = Path(__file__).resolve().parents[2]
pytestmark = container_marks("container test")

IMAGE_TAG = "fraud-pipeline:container-test"
TRAINER_TAG = "fraud-pipeline-trainer:container-test"
# A small simulated bank: history days [0, 58) train the model, days [58, 70) are streamed.
SIM = ["--customers", "400", "--terminals", "800", "--days", "70", "--seed", "11"]
HISTORY_DAYS = 58


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    """The worker image: the Dockerfile's default target."""
    if PREBUILT:
        yield images.WORKER
        return
    from testcontainers.core.image import DockerImage

    with DockerImage(path=REPO, dockerfile_path="deploy/Dockerfile", tag=IMAGE_TAG, clean_up=False) as built:
        yield str(built)


@pytest.fixture(scope="module")
def trainer_image(image: str) -> Iterator[str]:
    """The trainer image (built after the worker image, whose builder stage it reuses from the cache)."""
    if PREBUILT:
        yield images.TRAINER
        return
    from testcontainers.core.image import DockerImage

    with DockerImage(path=REPO, dockerfile_path="deploy/Dockerfile", tag=TRAINER_TAG, clean_up=False,
                     target="trainer") as built:
        yield str(built)


def _run_to_completion(container, timeout_s: float) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    container.start()
    wrapped = container.get_wrapped_container()
    status = wrapped.wait(timeout=timeout_s)
    return int(status["StatusCode"]), wrapped.logs().decode(errors="replace")[-4000:]


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


@pytest.mark.timeout(1800)
def test_image_trains_scores_and_alerts(image: str, trainer_image: str, tmp_path: Path) -> None:
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.network import Network

    work = tmp_path / "work"
    work.mkdir()
    work.chmod(0o777)  # the image runs as an unprivileged user
    tag = uuid.uuid4().hex[:8]
    topics = {"FRAUD_INPUT_TOPIC": f"tx-{tag}", "FRAUD_ALERTS_TOPIC": f"alerts-{tag}",
              "FRAUD_DEAD_LETTER_TOPIC": f"dlq-{tag}"}
    common = {"FRAUD_BOOTSTRAP_SERVERS": "kafka:9092", **topics}

    client = DockerContainer(image).get_docker_client().client
    for built in (image, trainer_image):
        user = client.images.get(built).attrs["Config"]["User"]
        assert user and not user.startswith(("root", "0")), (built, user)
    # The worker image has no trainer-only package; the trainer image has them.
    probe = "import importlib.util as u; print(sorted(m for m in ('sklearn', 'scipy', 'matplotlib') if u.find_spec(m)))"
    assert client.containers.run(image, ["python", "-c", probe], remove=True).decode().strip() == "[]"
    assert "sklearn" in client.containers.run(trainer_image, ["python", "-c", probe], remove=True).decode()

    with Network() as network, apache_kafka(network) as kafka:
        wait_until_ready(kafka.bootstrap_server, 120)
        trainer = (DockerContainer(trainer_image).with_network(network)
                   .with_volume_mapping(str(work), "/work", "rw")
                   .with_command(["sh", "-c",
                                  f"fraud-produce simulate {' '.join(SIM)} --until-day {HISTORY_DAYS} "
                                  "--output /work/history.parquet && fraud-train --device cpu fit "
                                  "--data /work/history.parquet --output /work/models --start 2018-04-21 "
                                  "--epochs 4 --no-baselines"]))
        code, logs = _run_to_completion(trainer, 900)
        trainer.stop()
        assert code == 0, f"trainer failed:\n{logs}"
        assert (work / "models" / "current").exists()

        worker = (DockerContainer(image).with_network(network).with_env("FRAUD_MODEL_DIR", "/work/models")
                  .with_volume_mapping(str(work), "/work", "ro").with_exposed_ports(9108)
                  .with_command(["fraud-worker", "--device", "cpu", "--consumer-group", f"g-{tag}"]))
        for key, value in common.items():
            worker.with_env(key, value)
        with worker:
            producer = DockerContainer(image).with_network(network).with_command(
                ["fraud-produce", "simulate", *SIM, "--from-day", str(HISTORY_DAYS), "--drop-label", "--no-progress"])
            for key, value in common.items():
                producer.with_env(key, value)
            code, logs = _run_to_completion(producer, 600)
            producer.stop()
            assert code == 0, f"producer failed:\n{logs}"

            host = KafkaSettings.build(environ={}, overrides={
                "bootstrap_servers": kafka.bootstrap_server, "input_topic": topics["FRAUD_INPUT_TOPIC"],
                "alerts_topic": topics["FRAUD_ALERTS_TOPIC"], "dead_letter_topic": topics["FRAUD_DEAD_LETTER_TOPIC"]})
            alerts = read_topic(host, host.alerts_topic, expect=1, timeout_s=180)
            assert alerts, "no alert came out of the worker container"
            first = orjson.loads(alerts[0].value)
            assert first["score"] > first["threshold"] and first["model_version"]

            url = f"http://{worker.get_container_host_ip()}:{worker.get_exposed_port(9108)}/metrics"
            deadline = time.monotonic() + 30
            while True:
                with urllib.request.urlopen(url, timeout=5) as response:
                    text = response.read().decode()
                if _metric(text, "fraud_alerts_total") >= len(alerts) or time.monotonic() > deadline:
                    break
                time.sleep(1)
            assert _metric(text, "fraud_alerts_total") >= len(alerts)
            assert _metric(text, "fraud_transactions_total") > 0
