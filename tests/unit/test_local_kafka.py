"""The local broker's helpers that need no running Kafka."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.kafka.local import (
    DEFAULT_HOME,
    BrokerState,
    LocalKafka,
    LocalKafkaError,
    _cluster_id,
    _server_properties,
    default_home,
    quiet_logger,
    wait_until_ready,
)
from deploy.kafka.tls import LISTENERS
from deploy.ports import free_port


def test_cluster_ids_never_look_like_an_option() -> None:
    # One in 64 URL-safe base64 UUIDs starts with '-'; kafka-storage then reads the id as a flag
    # and formatting fails. 5,000 draws would hit one with near certainty if they were allowed.
    ids = {_cluster_id() for _ in range(5000)}
    assert len(ids) == 5000
    assert all(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]{21}", i) for i in ids)


def test_readiness_probe_is_quiet_but_keeps_the_reason(caplog: pytest.LogCaptureFixture) -> None:
    # `make demo` showed kafka-python's ECONNREFUSED ERROR lines while the broker was starting.
    kafka_logger = logging.getLogger("kafka")
    before = kafka_logger.level
    with caplog.at_level(logging.DEBUG), pytest.raises(LocalKafkaError, match="did not answer within") as err:
        wait_until_ready(f"127.0.0.1:{free_port()}", timeout_s=1.0)
    assert [r for r in caplog.records if r.name.startswith("kafka")] == []
    assert "Unable to bootstrap" in str(err.value) or "Connection" in str(err.value)  # the last error travels
    assert kafka_logger.level == before


def test_quiet_logger_restores_the_level_after_an_error() -> None:
    logger = logging.getLogger("kafka.test-quiet")
    logger.setLevel(logging.INFO)
    with pytest.raises(RuntimeError), quiet_logger("kafka.test-quiet"):
        assert not logger.isEnabledFor(logging.CRITICAL)
        raise RuntimeError
    assert logger.level == logging.INFO


def test_cli_works_from_any_directory(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "deploy.kafka", "status", "--home", "state"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (1, "not running\n", "")


def test_home_is_absolute_whatever_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert LocalKafka("state").home == tmp_path.resolve() / "state"
    assert DEFAULT_HOME.is_absolute() and default_home() == DEFAULT_HOME


def test_the_default_broker_has_only_its_plaintext_listener(tmp_path: Path) -> None:
    props = _server_properties(9092, 9093, tmp_path)
    assert "listeners=PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093\n" in props
    assert "advertised.listeners=PLAINTEXT://127.0.0.1:9092\n" in props
    assert "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n" in props
    assert "ssl." not in props and "sasl" not in props


def test_tls_adds_secure_listeners_beside_the_plaintext_one(tmp_path: Path) -> None:
    ports = {name: 10_000 + i for i, name in enumerate(LISTENERS)}
    props = _server_properties(9092, 9093, tmp_path, ports)
    assert ("listeners=PLAINTEXT://127.0.0.1:9092,SSL://127.0.0.1:10000,MTLS://127.0.0.1:10001,"
            "SASL_SSL://127.0.0.1:10002,WRONGHOST://127.0.0.1:10003,CONTROLLER://127.0.0.1:9093\n") in props
    assert "SSL:SSL,MTLS:SSL,SASL_SSL:SASL_SSL,WRONGHOST:SSL\n" in props
    assert "inter.broker.listener.name=PLAINTEXT\n" in props  # brokers and controller stay on plaintext


def test_an_old_state_file_still_reads(tmp_path: Path) -> None:
    state = BrokerState(**{"pid": 1, "bootstrap_servers": "127.0.0.1:1", "data_dir": "d", "log_file": "l"})
    assert state.ssl_servers is None and state.ca_file is None


def test_a_cluster_needs_three_nodes_and_says_so_in_one_line(tmp_path: Path) -> None:
    for args in (["--brokers", "2"], ["--brokers", "3", "--tls"]):
        done = subprocess.run([sys.executable, "-m", "deploy.kafka", "start", "--home", str(tmp_path), *args],
                              cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 2, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert done.stderr.startswith("python -m deploy.kafka: error:"), done.stderr
        assert not (tmp_path / "libs").exists()  # nothing resolved or started
