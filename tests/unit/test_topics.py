"""Start-up topic work (``pipeline.topics``) against fake admin clients: a node of the cluster dying under a request
is retried on a new client; anything else stops the worker with one line naming what failed."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from kafka.errors import KafkaConnectionError, MetadataEmptyBrokerList, TopicAuthorizationFailedError

from pipeline import topics
from pipeline.config import KafkaSettings
from pipeline.errors import BrokerError


class Admin:
    """Answers ``list_topics`` with ``names``, or raises the next of ``failures`` (shared by all clients made)."""

    made = 0

    def __init__(self, failures: list[BaseException], names: list[str]) -> None:
        self.failures, self.names, self.closed = failures, names, False
        Admin.made += 1

    def list_topics(self) -> list[str]:
        if self.failures:
            raise self.failures.pop(0)
        return list(self.names)

    def create_topics(self, new: list[Any]) -> None:
        self.names += [t.name for t in new]

    blind = 0  # describes, on any client, that show no partition yet (a node learning of a topic late)

    def describe_topics(self, names: list[str]) -> list[dict[str, Any]]:
        shown = 0 if Admin.blind > 0 else 3
        Admin.blind -= 1
        return [{"name": n, "partitions": [{"partition_index": i} for i in range(shown)]} for n in names]

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def settings() -> KafkaSettings:
    return KafkaSettings.build(environ={}, overrides={"connect_timeout_s": 5.0})


def fake_admin(monkeypatch: pytest.MonkeyPatch, failures: list[BaseException], names: list[str]) -> list[Admin]:
    made: list[Admin] = []

    def make(_settings: KafkaSettings) -> Admin:
        made.append(Admin(failures, names))
        return made[-1]

    monkeypatch.setattr(topics, "_admin", make)
    monkeypatch.setattr(Admin, "blind", 0)
    monkeypatch.setattr(topics.time, "sleep", lambda _s: None)
    return made


def test_a_node_dying_under_a_request_is_retried_on_a_new_client(monkeypatch: pytest.MonkeyPatch,
                                                                 settings: KafkaSettings, caplog) -> None:
    made = fake_admin(monkeypatch, [KafkaConnectionError("111 ECONNREFUSED"), MetadataEmptyBrokerList()], ["tx"])
    with caplog.at_level(logging.WARNING):
        assert topics.warn_if_absent(settings, "tx") is False
    assert len(made) == 3 and all(a.closed for a in made)
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("cannot list topics: KafkaConnectionError") and "trying again" in line


def test_creating_topics_is_retried_whole(monkeypatch: pytest.MonkeyPatch, settings: KafkaSettings) -> None:
    names: list[str] = ["tx"]
    fake_admin(monkeypatch, [KafkaConnectionError("reset")], names)
    topics.ensure_topics(settings, ["tx", "alerts"], 3)
    assert names == ["tx", "alerts"]


def test_an_error_no_retry_fixes_stops_at_once(monkeypatch: pytest.MonkeyPatch, settings: KafkaSettings) -> None:
    made = fake_admin(monkeypatch, [TopicAuthorizationFailedError("tx")], [])
    with pytest.raises(BrokerError, match=r"cannot list topics: .*TopicAuthorizationFailed"):
        topics.warn_if_absent(settings, "tx")
    assert len(made) == 1


def test_retries_end_at_the_connect_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = KafkaSettings.build(environ={}, overrides={"connect_timeout_s": 0.0})
    fake_admin(monkeypatch, [KafkaConnectionError("111 ECONNREFUSED")] * 3, [])
    with pytest.raises(BrokerError, match=r"cannot describe topics \[.tx.\]: .*ECONNREFUSED"):
        topics.partition_counts(settings, ["tx"])


def test_topics_created_are_waited_for_until_the_cluster_shows_their_partitions(
        monkeypatch: pytest.MonkeyPatch, settings: KafkaSettings) -> None:
    names: list[str] = ["tx"]
    made = fake_admin(monkeypatch, [], names)
    Admin.blind = 4
    topics.ensure_topics(settings, ["tx", "labels"], 3)
    assert Admin.blind < 0, "returned before the topics showed their partitions"
    assert topics.partition_counts(settings, ["labels"]) == {"labels": 3}
    assert len(made) >= 6


def test_topics_that_never_show_partitions_stop_the_start_naming_them(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = KafkaSettings.build(environ={}, overrides={"connect_timeout_s": 0.0})
    fake_admin(monkeypatch, [], ["tx", "labels"])
    Admin.blind = 10**6
    with pytest.raises(BrokerError, match=r"topics \['labels'\] exist but the cluster shows no partition"):
        topics.visible_partition_counts(settings, ["labels"])
