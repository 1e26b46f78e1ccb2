"""Create the topics a component needs, once, before it starts producing or consuming."""

from __future__ import annotations

import difflib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from pipeline.config import KafkaSettings
from pipeline.errors import BrokerError, ConfigError
from pipeline.security import check_access

log = logging.getLogger(__name__)
T = TypeVar("T")


def wait_for_kafka(settings: KafkaSettings, every_s: float = 2.0, stop: threading.Event | None = None) -> None:
    """Return once a bootstrap server accepts a TCP connection (or ``stop`` is set); say so at once when
    none does, keep trying for ``connect_timeout_s``, then raise BrokerError (no client: no library noise).
    With TLS or SASL, a refused certificate or login then raises ConfigError (``pipeline.security``)."""
    servers = [s.strip().rpartition(":") for s in settings.bootstrap_servers.split(",")]
    stop = stop or threading.Event()
    deadline = time.monotonic() + settings.connect_timeout_s
    said = False
    while True:
        reasons = []
        for host, _, port in servers:
            try:
                socket.create_connection((host.strip("[]"), int(port)), timeout=min(every_s, 3.0)).close()
                if said:
                    log.info("Kafka at %s answers", settings.bootstrap_servers)
                check_access(settings)
                return
            except OSError as err:
                reasons.append(f"{host}:{port}: {err.strerror or err}")
        reason = "; ".join(reasons)
        if time.monotonic() >= deadline:
            raise BrokerError(f"cannot reach Kafka at {settings.bootstrap_servers} ({reason}); is the broker "
                              f"running? set --bootstrap-servers or FRAUD_BOOTSTRAP_SERVERS")
        if not said:
            log.warning("cannot reach Kafka at %s (%s); trying again for %.0fs", settings.bootstrap_servers,
                        reason, settings.connect_timeout_s)
            said = True
        if stop.wait(every_s):
            return


def _admin(settings: KafkaSettings) -> KafkaAdminClient:
    return KafkaAdminClient(**settings.client_options(), client_id=f"{settings.client_id}-admin")


def _with_admin(settings: KafkaSettings, what: str, call: Callable[[KafkaAdminClient], T], retry_s: float | None = None
                ) -> T:
    """``call`` on a fresh admin client, again on a new one while Kafka answers with a retriable error (a node of
    the cluster dying under the request, a coordinator or controller being elected) for up to ``retry_s``
    (default ``connect_timeout_s``); then, or at once for any other error, BrokerError naming ``what``.

    One node of three killed while a worker started made it exit (``cannot list topics: KafkaConnectionError``,
    cluster chaos run of 2026-12-07): the admin client had been talking to that node."""
    deadline = time.monotonic() + (settings.connect_timeout_s if retry_s is None else retry_s)
    said = False
    while True:
        admin = None
        try:
            admin = _admin(settings)
            return call(admin)
        except KafkaError as err:
            if not getattr(err, "retriable", False) or time.monotonic() >= deadline:
                raise BrokerError(f"{what}: {err}") from err
            if not said:
                log.warning("%s: %s: %s; trying again with a new client for up to %.0fs", what, type(err).__name__,
                            err, deadline - time.monotonic())
                said = True
        finally:
            if admin is not None:
                admin.close()
        time.sleep(0.5)


def partition_counts(settings: KafkaSettings, topics: Iterable[str]) -> dict[str, int]:
    """The partition count of each topic (0 for a topic that does not exist)."""
    wanted = list(dict.fromkeys(topics))

    def count(admin: KafkaAdminClient) -> dict[str, int]:
        existing = set(admin.list_topics())
        described = admin.describe_topics([t for t in wanted if t in existing]) if existing & set(wanted) else []
        counts = {d["name"]: len(d["partitions"]) for d in described}
        return {t: counts.get(t, 0) for t in wanted}

    return _with_admin(settings, f"cannot describe topics {wanted}", count)


def visible_partition_counts(settings: KafkaSettings, topics: Iterable[str]) -> dict[str, int]:
    """``partition_counts`` of topics that exist, once every one of them shows its partitions: a node of a
    cluster learns of a topic a moment after its creation, and answers with none meanwhile (a worker refused
    its labels topic for having 0 partitions, just created; cluster chaos run of 2026-12-07). BrokerError
    naming the topics when some still show none after ``connect_timeout_s``."""
    wanted = list(dict.fromkeys(topics))
    deadline = time.monotonic() + settings.connect_timeout_s
    while True:
        counts = partition_counts(settings, wanted)
        unseen = [t for t in wanted if counts[t] < 1]
        if not unseen:
            return counts
        if time.monotonic() >= deadline:
            raise BrokerError(f"topics {unseen} exist but the cluster shows no partition of them after "
                              f"{settings.connect_timeout_s:.0f}s")
        time.sleep(0.2)


def ensure_topics(settings: KafkaSettings, topics: Iterable[str], partitions: int = 3,
                  configs: dict[str, dict[str, str]] | None = None) -> None:
    """Create each missing topic with ``partitions`` partitions (and ``configs[topic]``, e.g. compaction);
    existing ones are left alone. Retried whole: what an earlier try created exists by then. Returns once
    the ones it created show their partitions (``visible_partition_counts``)."""
    wanted = list(dict.fromkeys(topics))
    configs = configs or {}

    def create(admin: KafkaAdminClient) -> list[str]:
        existing = set(admin.list_topics())
        missing = [t for t in wanted if t not in existing]
        if not missing:
            return []
        new = [NewTopic(t, num_partitions=partitions, replication_factor=settings.replication_factor or -1,
                        topic_configs=configs.get(t, {})) for t in missing]
        try:
            admin.create_topics(new)
            log.info("created topics %s with %d partitions", missing, partitions)
        except TopicAlreadyExistsError:
            pass  # created by someone else in the meantime
        return missing

    if _with_admin(settings, f"cannot create topics {wanted}", create):
        visible_partition_counts(settings, wanted)  # what is created next reads them at once


def warn_if_absent(settings: KafkaSettings, topic: str) -> bool:
    """Say (WARNING) that ``topic`` does not exist yet, naming the existing topics its name is close to (a typo
    in a topic setting otherwise creates an empty topic the worker idles on); whether it was absent."""
    existing = _with_admin(settings, "cannot list topics",
                           lambda admin: [t for t in admin.list_topics() if not t.startswith("__")])
    if topic in existing:
        return False
    close = difflib.get_close_matches(topic, existing, n=3, cutoff=0.75)
    log.warning("topic '%s' does not exist: it is created empty and the worker waits for records there; %s",
                topic, f"did you mean {' or '.join(repr(c) for c in close)}?" if close else
                "check the topic setting if records were expected already")
    return True


def check_replication(settings: KafkaSettings, topics: Iterable[str]) -> None:
    """Refuse (ConfigError: exit 2) topics among ``topics`` that exist with fewer replicas than
    ``settings.replication_factor`` (0: nothing to check against). A changelog or an alerts topic on one
    replica loses what a broker's disk loses, however many brokers the cluster has."""
    wanted = settings.replication_factor
    if wanted <= 0:
        return
    wanted_topics = list(dict.fromkeys(topics))

    def describe(admin: KafkaAdminClient) -> list:
        existing = set(admin.list_topics())
        names = [t for t in wanted_topics if t in existing]
        return admin.describe_topics(names) if names else []

    described = _with_admin(settings, f"cannot describe topics {wanted_topics}", describe)
    short = {d["name"]: min((len(p["replica_nodes"]) for p in d["partitions"]), default=0) for d in described}
    short = {name: n for name, n in short.items() if n < wanted}
    if short:
        listed = ", ".join(f"{name} ({n})" for name, n in sorted(short.items()))
        raise ConfigError(f"topic(s) with fewer replicas than replication_factor={wanted}: {listed}; raise their "
                          "replication (kafka-reassign-partitions) or set FRAUD_REPLICATION_FACTOR to what they have")


def committed_topics(settings: KafkaSettings, group: str, wait_s: float = 15.0) -> set[str]:
    """The topics on which consumer group ``group`` has committed offsets (empty for a new group)."""
    def read(admin: KafkaAdminClient) -> set[str]:
        if "__consumer_offsets" not in set(admin.list_topics()):
            return set()  # no group has committed anything on this cluster yet
        offsets = admin.list_group_offsets(group).get(group, {})
        return {tp.topic for tp, meta in offsets.items() if meta.offset >= 0}

    # retriable while the group coordinator is being elected
    return _with_admin(settings, f"cannot read the committed offsets of group '{group}'", read, retry_s=wait_s)
