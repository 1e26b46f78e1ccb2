"""The confluent-kafka driver (``pipeline.worker.kafkaclient.confluent``): options, errors, records, refusals
(against the session broker: ``tests/integration/test_confluent_client_kafka.py``)."""

from __future__ import annotations

import sys
import threading
from typing import Any

import pytest
from kafka import errors as kerr

from pipeline.config import WorkerSettings
from pipeline.errors import ConfigError
from pipeline.worker.delivery import REBALANCED, classify
from pipeline.worker.kafkaclient.calls import Call
from pipeline.worker.kafkaclient.kafka_python import KafkaPythonConsumer
from tests.kafka_helpers import run_cli

ck = pytest.importorskip("confluent_kafka", reason="confluent-kafka is not installed (make test installs it)")
confluent = pytest.importorskip("pipeline.worker.kafkaclient.confluent")


# -- options ---------------------------------------------------------------------------------
def test_options_are_translated_and_an_unknown_one_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LIBRDKAFKA_DEBUG", raising=False)
    conf = confluent.config({"bootstrap_servers": ["a:1", "b:2"], "security_protocol": "SASL_SSL",
                             "ssl_check_hostname": False, "sasl_plain_username": "u", "group_id": "g",
                             "metadata_max_age_ms": 15_000, "request_timeout_ms": 3000, "max_poll_records": 9},
                            role="consumer")
    assert conf["bootstrap.servers"] == "a:1,b:2" and conf["security.protocol"] == "sasl_ssl"
    assert conf["ssl.endpoint.identification.algorithm"] == "none" and conf["sasl.username"] == "u"
    assert conf["topic.metadata.refresh.interval.ms"] == 15_000  # not metadata.max.age.ms: a cache expiry only
    assert conf["socket.timeout.ms"] == 3000 and conf["group.id"] == "g" and "debug" not in conf
    assert "max_poll_records" not in conf and "partitioner" not in conf
    producer = confluent.config({"bootstrap_servers": "a:1", "acks": "all", "max_block_ms": 10}, role="producer")
    assert producer["partitioner"] == "murmur2_random" and producer["acks"] == "all"
    with pytest.raises(ValueError, match="group_id"):
        confluent.config({"group_id": "g"}, role="producer")
    with pytest.raises(ValueError, match="max_request_size"):
        confluent.config({"max_request_size": 1}, role="producer")
    monkeypatch.setenv("LIBRDKAFKA_DEBUG", "cgrp,broker")
    assert confluent.config({}, role="consumer")["debug"] == "cgrp,broker"


def test_a_transactional_producer_is_refused() -> None:
    with pytest.raises(ValueError, match="exactly-once needs kafka-python"):
        confluent.ConfluentProducer(bootstrap_servers="127.0.0.1:1", transactional_id="t")


# -- errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("code", "cls", "kind"), [
    (ck.KafkaError._TIMED_OUT, kerr.KafkaTimeoutError, "retry"),
    (ck.KafkaError._MSG_TIMED_OUT, kerr.KafkaTimeoutError, "retry"),
    (ck.KafkaError._TRANSPORT, kerr.KafkaConnectionError, "retry"),
    (ck.KafkaError._ALL_BROKERS_DOWN, kerr.KafkaConnectionError, "retry"),
    (ck.KafkaError.NOT_LEADER_FOR_PARTITION, kerr.NotLeaderForPartitionError, "retry"),
    (ck.KafkaError.MSG_SIZE_TOO_LARGE, kerr.MessageSizeTooLargeError, "shrink"),
    (ck.KafkaError.TOPIC_AUTHORIZATION_FAILED, kerr.TopicAuthorizationFailedError, "fatal"),
    (ck.KafkaError.REBALANCE_IN_PROGRESS, kerr.RebalanceInProgressError, None),
    (ck.KafkaError.ILLEGAL_GENERATION, kerr.IllegalGenerationError, None),
    (ck.KafkaError._ASSIGNMENT_LOST, kerr.CommitFailedError, None),
])
def test_errors_become_kafka_pythons_classes(code: int, cls: type, kind: str | None) -> None:
    err = confluent.translate(ck.KafkaException(ck.KafkaError(code)))
    assert type(err) is cls
    if kind is None:
        assert isinstance(err, REBALANCED)  # the commit is refused as after a rebalance: nothing lost
    else:
        assert classify(err) == kind  # delivery treats both clients alike


def test_a_retriable_local_error_without_a_class_stays_retriable() -> None:
    err = confluent.translate(ck.KafkaError(ck.KafkaError._PARTIAL, "partial", retriable=True))
    assert isinstance(err, kerr.KafkaError) and classify(err) == "retry"


# -- records ---------------------------------------------------------------------------------
class FakeMessage:
    def __init__(self, headers: Any = None, error: Any = None) -> None:
        self._headers, self._error = headers, error

    def error(self) -> Any:
        return self._error

    def topic(self) -> str:
        return "tx"

    def partition(self) -> int:
        return 2

    def offset(self) -> int:
        return 41

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_700_000_000_000)

    def key(self) -> bytes:
        return b"k"

    def value(self) -> bytes:
        return b"{}"

    def headers(self) -> Any:
        if isinstance(self._headers, BaseException):
            raise self._headers
        return self._headers


def test_records_carry_what_the_worker_reads() -> None:
    record = confluent.to_record(FakeMessage([("origin", b"x"), ("n", None)]))
    assert (record.topic, record.partition, record.offset, record.key, record.value) == ("tx", 2, 41, b"k", b"{}")
    assert record.headers == [("origin", b"x"), ("n", None)] and record.unreadable is None
    assert confluent.to_record(FakeMessage(None)).headers == []


def test_unreadable_headers_and_error_messages_become_unreadable_records() -> None:
    bad = confluent.to_record(FakeMessage(SystemError("error return without exception set")))
    assert bad.unreadable and "headers cannot be read" in bad.unreadable and bad.value == b"{}"
    broken = confluent.to_record(FakeMessage(error=ck.KafkaError(ck.KafkaError._BAD_MSG)))
    assert broken.unreadable and "_BAD_MSG" in broken.unreadable and broken.offset == 41


# -- refusals at start -------------------------------------------------------------------------
def test_exactly_once_with_the_confluent_client_is_refused() -> None:
    with pytest.raises(ConfigError, match="at-least-once only"):
        WorkerSettings.build(environ={"FRAUD_KAFKA_CLIENT": "confluent",
                                      "FRAUD_PROCESSING_GUARANTEE": "exactly-once"})


def test_a_missing_confluent_package_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "confluent_kafka", None)  # import blocked: as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'fraud-pipeline\[confluent\]'"):
        WorkerSettings.build(environ={"FRAUD_KAFKA_CLIENT": "confluent"})


def test_the_cli_refuses_the_combination_in_one_line_before_any_io() -> None:
    done = run_cli("pipeline", "--kafka-client", "confluent", "--processing-guarantee", "exactly-once",
                   "--bootstrap-servers", "127.0.0.1:1", env={"PATH": "/usr/bin:/bin"}, check=False, timeout_s=60)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "at-least-once only" in lines[0], done.stderr


# -- helpers -----------------------------------------------------------------------------------
def test_call_returns_raises_or_gives_up_waiting() -> None:
    assert Call(lambda: 7, "t").within(5, lambda: AssertionError("late")) == 7
    with pytest.raises(ZeroDivisionError):
        Call(lambda: 1 / 0, "t").within(5, lambda: AssertionError("late"))
    gate = threading.Event()
    with pytest.raises(TimeoutError):
        Call(gate.wait, "t").within(0.1, lambda: TimeoutError("stuck"))
    gate.set()


# -- kafka-python's side of the interface ------------------------------------------------------------
def test_kafka_python_awaits_a_join_under_way() -> None:
    """kafka-python 3.0.12 re-awaits a join only while need_rejoin() holds; it must hold until the join's
    result is applied (``rejoining``), or the assignment is dropped (KafkaPythonConsumer)."""
    consumer = KafkaPythonConsumer(bootstrap_servers="127.0.0.1:1", group_id="g", api_version=(3, 0),
                                           enable_auto_commit=False)
    try:
        coordinator = consumer._coordinator
        coordinator.rejoining = False
        assert not coordinator.need_rejoin()  # not subscribed: kafka-python's own answer, no join to await
        coordinator.rejoining = True  # a join prepared, its SyncGroup answer not applied yet
        assert coordinator.need_rejoin() and consumer.rebalance_coming()
    finally:
        consumer.close(autocommit=False)
