"""The local broker's helpers that need no running Kafka."""

from __future__ import annotations

import re

from deploy.kafka.local import _cluster_id


def test_cluster_ids_never_look_like_an_option() -> None:
    # One in 64 URL-safe base64 UUIDs starts with '-'; kafka-storage then reads the id as a flag
    # and formatting fails. 5,000 draws would hit one with near certainty if they were allowed.
    ids = {_cluster_id() for _ in range(5000)}
    assert len(ids) == 5000
    assert all(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]{21}", i) for i in ids)
