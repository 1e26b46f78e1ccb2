"""The raw-input topology's topics: names, creation, co-partitioning, and the start-up checks.

Every internal topic has the input topic's partition count, so partition N of the repartition
topic and of the labels topic (both keyed by terminal with Kafka's default partitioner) meet in
the same worker (range assignment) and in the same store.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from pipeline.config import KafkaSettings
from pipeline.errors import ConfigError
from pipeline.schema import Transaction, decode
from pipeline.worker.state.fields import RAW_FIELDS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StateTopics:
    """The topics of the raw-input topology; internal ones are named after the consumer group."""

    input: str
    labels: str
    repartition: str
    customer_changelog: str
    terminal_changelog: str
    partitions: int = 0  # of every one of them (0: not known, as in tests without a broker)
    decisions_changelog: str = ""  # the terminal stage's decisions awaiting their labels (``decisions``)

    @classmethod
    def for_group(cls, kafka: KafkaSettings, group: str, partitions: int = 0) -> StateTopics:
        return cls(kafka.input_topic, kafka.labels_topic, f"{group}-by-terminal-repartition",
                   f"{group}-customer-windows-changelog", f"{group}-terminal-windows-changelog", partitions,
                   f"{group}-decisions-changelog")

    @property
    def consumed(self) -> list[str]:
        return [self.input, self.repartition, self.labels]

    @property
    def windows_changelogs(self) -> list[str]:
        return [self.customer_changelog, self.terminal_changelog]

    @property
    def changelogs(self) -> list[str]:
        return [*self.windows_changelogs, *([self.decisions_changelog] if self.decisions_changelog else [])]


def check_partitioning(counts: dict[str, int], topics: StateTopics) -> None:
    """Every topic of the topology needs the input topic's partition count (co-partitioning)."""
    expected = counts[topics.input]
    for topic in (topics.labels, topics.repartition, *topics.changelogs):
        if counts[topic] != expected:
            raise ConfigError(
                f"topic '{topic}' has {counts[topic]} partitions but the input topic '{topics.input}' has "
                f"{expected}; raw input needs the same count on both (partition N of each must meet in one "
                f"worker); recreate '{topic}' with {expected} partitions or use another consumer group")


def prepare_topics(kafka: KafkaSettings, group: str) -> StateTopics:
    """Create the topology's topics that are missing (changelogs compacted), then check co-partitioning.

    A changelog that is missing while the group has committed offsets was deleted: creating it
    empty would serve every customer and terminal from empty windows, silently. That is refused.
    """
    from pipeline.topics import (
        check_replication,
        committed_topics,
        ensure_topics,
        partition_counts,
        visible_partition_counts,
    )

    topics = StateTopics.for_group(kafka, group)
    counts = partition_counts(kafka, [topics.input, *topics.changelogs])
    partitions = counts[topics.input]
    if partitions < 1:
        raise ConfigError(f"input topic '{topics.input}' does not exist; create it before starting the worker")
    missing = [t for t in topics.windows_changelogs if not counts[t]]  # decisions lost: quality counts only
    if missing and topics.input in committed_topics(kafka, group):
        raise ConfigError(
            f"changelog topic(s) {', '.join(missing)} missing, but group '{group}' has committed offsets on "
            f"'{topics.input}': the window state is lost. To rebuild it, reset the group to the start of the "
            f"input (kafka-consumer-groups --group {group} --reset-offsets --to-earliest --all-topics --execute) "
            "or start with a new FRAUD_CONSUMER_GROUP")
    compacted = {"cleanup.policy": "compact"}
    ensure_topics(kafka, [topics.labels, topics.repartition, *topics.changelogs], partitions,
                  configs=dict.fromkeys(topics.changelogs, compacted))
    check_partitioning(visible_partition_counts(kafka, [topics.input, *topics.consumed, *topics.changelogs]),
                       topics)
    check_replication(kafka, [topics.labels, topics.repartition, *topics.changelogs])
    return StateTopics.for_group(kafka, group, partitions)


def check_input_form(kafka: KafkaSettings, artifact: Any, sample: int = 5, wait_s: float = 3.0) -> None:
    """Refuse to start when the latest input records do not fit the model's input form.

    Reads up to ``sample`` of the newest records of each input partition (nothing is
    committed). Records that are not transactions at all are ignored here: they become dead
    letters. If every transaction seen lacks what the model needs, the worker would only
    dead-letter; it stops at once instead, saying which form the topic carries.
    """
    from kafka.errors import KafkaError

    consumer = KafkaConsumer(**kafka.client_options(), client_id=f"{kafka.client_id}-peek", group_id=None,
                             enable_auto_commit=False, isolation_level="read_committed")
    try:
        partitions = [TopicPartition(kafka.input_topic, p)
                      for p in sorted(consumer.partitions_for_topic(kafka.input_topic) or ())]
        if not partitions:
            return
        consumer.assign(partitions)
        ends = consumer.end_offsets(partitions)
        starts = consumer.beginning_offsets(partitions)
        wanted = 0
        for tp in partitions:
            consumer.seek(tp, max(starts[tp], ends[tp] - sample))
            wanted += ends[tp] - max(starts[tp], ends[tp] - sample)
        values: list[bytes] = []
        deadline = time.monotonic() + wait_s
        while len(values) < wanted and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                values += [r.value for r in records if r.value]
    except KafkaError as err:
        log.warning("could not read the newest input records to check their form: %s", err)
        return
    finally:
        consumer.close(autocommit=False)
    judge(values, artifact, kafka.input_topic)


def judge(values: list[bytes], artifact: Any, topic: str) -> None:
    """Raise ConfigError when no transaction among ``values`` has what the model's input form needs."""
    transactions = [tx for tx in (decode(v) for v in values) if isinstance(tx, Transaction)]
    if not transactions:
        return
    if artifact.input_form == "raw":
        needed = ("transaction_id", "event_time", *RAW_FIELDS)
        if any(all(name in tx.fields for name in RAW_FIELDS) for tx in transactions):
            return
        missing = next(name for name in RAW_FIELDS if not all(name in tx.fields for tx in transactions))
        raise ConfigError(f"model {artifact.version} expects raw transactions ({', '.join(needed)}) but the newest "
                          f"records of '{topic}' have no {missing}; send raw transactions (fraud-produce "
                          "simulate --raw) or serve a model trained with fraud-train fit --input features")
    features = artifact.feature_names
    if any(all(name in tx.fields for name in features) for tx in transactions):
        return
    missing = next(name for name in features if not all(name in tx.fields for tx in transactions))
    raw = any(all(name in tx.fields for name in RAW_FIELDS) for tx in transactions)
    hint = ("they look like raw transactions: serve a model trained with fraud-train fit --input raw, which "
            "computes the features in the stream" if raw else "send records that carry the model's features")
    raise ConfigError(f"model {artifact.version} expects records with its {len(features)} features but the newest "
                      f"records of '{topic}' have no {missing}; {hint}")
