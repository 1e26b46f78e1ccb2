"""What the benchmarks share about their broker: starting one (or using the one given), and reading a group's
committed offsets."""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kafka import KafkaAdminClient, TopicPartition
from kafka.errors import KafkaError


@contextmanager
def broker(args: argparse.Namespace) -> Iterator[tuple[str, Path | None]]:
    """Bootstrap servers and data folder (None when not started here) of ``--bootstrap-servers``, or of a local
    broker started (and stopped) in ``--kafka-home`` with the jars of ``--kafka-libs`` (default: the checkout's)."""
    if args.bootstrap_servers:
        yield args.bootstrap_servers, None
        return
    from deploy.kafka.local import DEFAULT_HOME, LocalKafka

    libs = getattr(args, "kafka_libs", None) or DEFAULT_HOME / "libs"
    if not (args.kafka_home / "libs").exists() and libs.exists():
        shutil.copytree(libs, args.kafka_home / "libs", symlinks=True)
    local = LocalKafka(args.kafka_home, heap="1g")
    state = local.start()
    try:
        yield state.bootstrap_servers, Path(state.data_dir)
    finally:
        local.stop()


def group_offsets(bootstrap: str, group: str, client_id: str = "bench-offsets") -> dict[TopicPartition, int]:
    """The group's committed offsets (empty while the broker cannot say)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id=client_id)
    try:
        return {tp: meta.offset for tp, meta in admin.list_group_offsets(group).get(group, {}).items()}
    except KafkaError:
        return {}
    finally:
        admin.close()
