"""Create the topics a component needs, once, before it starts producing or consuming."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from pipeline.config import KafkaSettings
from pipeline.errors import BrokerError

log = logging.getLogger(__name__)


def ensure_topics(settings: KafkaSettings, topics: Iterable[str], partitions: int = 3) -> None:
    """Create each missing topic with ``partitions`` partitions; existing ones are left alone."""
    try:
        admin = KafkaAdminClient(**settings.client_options(),
                                 client_id=f"{settings.client_id}-admin")
    except KafkaError as err:
        raise BrokerError(f"cannot reach Kafka at {settings.bootstrap_servers}: {err}") from err
    try:
        existing = set(admin.list_topics())
        missing = [t for t in dict.fromkeys(topics) if t not in existing]
        if not missing:
            return
        new = [NewTopic(t, num_partitions=partitions, replication_factor=-1) for t in missing]
        try:
            admin.create_topics(new)
            log.info("created topics %s with %d partitions", missing, partitions)
        except TopicAlreadyExistsError:
            pass  # created by someone else in the meantime
    except KafkaError as err:
        raise BrokerError(f"cannot create topics {list(topics)}: {err}") from err
    finally:
        admin.close()
