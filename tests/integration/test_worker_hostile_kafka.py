"""Hostile input and delivery guarantees on a real broker.

Records that once stopped a partition for good (a value that overflows standardisation, a
deeply nested field on an alert, a null header value, a header key that is not UTF-8, a
record just under the broker's size limit) are sent by kcat and kafka-python among good
ones: the worker keeps going, and every record ends scored or dead-lettered.
"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import orjson
import pandas as pd
import pytest
from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewPartitions

from pipeline.config import KafkaSettings
from pipeline.features import HANDBOOK
from tests.worker_helpers import (
    BAD_RECORDS,
    alert_ids,
    committed_to_end,
    offline_flags,
    produce_bad,
    produce_frame,
    read_topic,
    start_worker,
    wait_for,
)

pytestmark = pytest.mark.integration
EVENT = "2018-06-01T00:00:00Z"


def _tx(tx_id: str, features: dict, **extra: object) -> bytes:
    return orjson.dumps({"transaction_id": tx_id, "event_time": EVENT, **features, **extra})


def _kcat_send(kcat: str, bootstrap: str, topic: str, value: bytes, *headers: bytes) -> None:
    args = [kcat, "-b", bootstrap, "-P", "-t", topic, "-X", "message.max.bytes=2000000"]
    for h in headers:
        args += ["-H", h]  # type: ignore[list-item]
    subprocess.run(args, input=value, check=True, timeout=30)


def test_poison_records_do_not_stop_the_partition(kafka_settings: KafkaSettings, model_dir: Path,
                                                  stream_frame: pd.DataFrame, kcat: str, kafka_client: str) -> None:
    frame = stream_frame.iloc[:1500]
    produce_frame(kafka_settings, frame, partitions=1)  # one partition: poison sits in front of good records
    row = frame.iloc[0]
    features = {name: float(row[name]) for name in HANDBOOK.features}
    flagged = {**features, "TX_AMOUNT": 1e6}
    deep = _tx("deep", flagged)[:-1] + b',"meta":' + b"[" * 300 + b"1" + b"]" * 300 + b"}"  # unwritable as JSON
    topic, bootstrap = kafka_settings.input_topic, kafka_settings.bootstrap_servers
    _kcat_send(kcat, bootstrap, topic, _tx("overflow", {**features, "TX_DURING_WEEKEND": 3e38}))
    _kcat_send(kcat, bootstrap, topic, deep)
    _kcat_send(kcat, bootstrap, topic, b"{not json", b"nullheader")  # kcat -H name: a header with a null value
    _kcat_send(kcat, bootstrap, topic, _tx("badkey", features), b"bad\xffkey=v")  # key not UTF-8
    producer = KafkaProducer(**kafka_settings.client_options(), max_request_size=1_048_576)
    producer.send(topic, value=_tx("huge", features, pad="x" * 1_047_600))  # just under the broker's limit
    producer.flush()
    producer.close()
    produce_frame(kafka_settings, frame.iloc[:300].assign(TRANSACTION_ID=lambda f: "after-" + f["TRANSACTION_ID"]
                                                          .astype(str)), partitions=1)
    group = f"gp-{kafka_settings.client_id}"
    worker, thread, box = start_worker(kafka_settings, model_dir, group, kafka_client=kafka_client)
    box["idle_exit_s"] = 4.0
    thread.start()
    thread.join(timeout=180)
    assert not thread.is_alive() and "stats" in box, "the worker must end by itself, not die or hang"
    stats = box["stats"]
    # scored: the overflow (alerted out of range) and the deep one (alerted without its fields) among them
    assert stats.consumed == 1500 + 5 + 300 and stats.scored == 1500 + 2 + 300 and stats.invalid == 3

    letters = {dict(r.headers)["dlq.error.reason"].decode(): r
               for r in read_topic(kafka_settings, kafka_settings.dead_letter_topic, expect=3)}
    assert set(letters) == {"not_json", "corrupt_record", "oversized"}
    assert dict(letters["not_json"].headers)["dlq.headers.null"] == b"nullheader"
    assert letters["corrupt_record"].value == _tx("badkey", features)  # the original bytes, headers unreadable
    assert b"cut from" in dict(letters["oversized"].headers)["dlq.truncated"]
    alerts = {orjson.loads(r.value)["transaction_id"]: orjson.loads(r.value)
              for r in read_topic(kafka_settings, kafka_settings.alerts_topic)}
    assert alerts["overflow"]["out_of_range"] is True
    assert alerts["deep"]["fields_dropped"] is True and "fields" not in alerts["deep"]  # the fraud is raised
    assert offline_flags(model_dir, frame) <= set(alerts)
    assert {f"after-{i}" for i in offline_flags(model_dir, frame.iloc[:300])} <= set(alerts)  # records behind
    assert worker.metrics.registry.get_sample_value("fraud_dead_letters_total", {"reason": "corrupt_record"}) == 1
    assert committed_to_end(kafka_settings, group)


def test_exactly_once_alerts_for_read_committed_readers(kafka_settings: KafkaSettings, model_dir: Path,
                                                        stream_frame: pd.DataFrame) -> None:
    frame = stream_frame.iloc[:3000]
    produce_frame(kafka_settings, frame)
    produce_bad(kafka_settings)
    group = f"ge-{kafka_settings.client_id}"
    worker, thread, box = start_worker(kafka_settings, model_dir, group, processing_guarantee="exactly-once")
    box["idle_exit_s"] = 4.0
    thread.start()
    thread.join(timeout=180)
    assert "stats" in box and type(worker.delivery).__name__ == "ExactlyOnce"
    assert (box["stats"].scored, box["stats"].invalid) == (len(frame), len(BAD_RECORDS))
    alerts = read_topic(kafka_settings, kafka_settings.alerts_topic, isolation_level="read_committed")
    assert sorted(alert_ids(alerts)) == sorted(offline_flags(model_dir, frame))  # each once
    letters = read_topic(kafka_settings, kafka_settings.dead_letter_topic, isolation_level="read_committed")
    assert len(letters) == len(BAD_RECORDS)
    assert committed_to_end(kafka_settings, group)


def test_partitions_added_while_running_are_picked_up(kafka_settings: KafkaSettings, model_dir: Path,
                                                      stream_frame: pd.DataFrame, kafka_client: str) -> None:
    produce_frame(kafka_settings, stream_frame.iloc[:10], partitions=1)
    group = f"gn-{kafka_settings.client_id}"
    worker, thread, _box = start_worker(kafka_settings, model_dir, group, kafka_client=kafka_client)
    thread.start()
    assert wait_for(lambda: worker.metrics.registry.get_sample_value("fraud_assigned_partitions") == 1, timeout_s=60)
    admin = KafkaAdminClient(**kafka_settings.client_options())
    admin.create_partitions({kafka_settings.input_topic: NewPartitions(total_count=3)})
    admin.close()
    produce_frame(kafka_settings, stream_frame.iloc[10:2010], partitions=3)
    try:
        assert wait_for(lambda: worker.metrics.registry.get_sample_value("fraud_assigned_partitions") == 3,
                        timeout_s=60), \
            "new partitions must be noticed within the consumer's metadata refresh, not minutes later"
        assert wait_for(lambda: committed_to_end(kafka_settings, group), timeout_s=60)
    finally:
        worker.stop.set()
        thread.join(timeout=60)


def test_lag_is_reported_from_assignment_even_when_nothing_is_committed(
        kafka_settings: KafkaSettings, model_dir: Path, stream_frame: pd.DataFrame) -> None:
    produce_frame(kafka_settings, stream_frame.iloc[:900])
    group = f"gl-{kafka_settings.client_id}"
    gate = threading.Event()
    worker, thread, _box = start_worker(kafka_settings, model_dir, group)
    process = worker.process

    def stuck(records):  # type: ignore[no-untyped-def]
        gate.wait()
        process(records)

    worker.process = stuck  # type: ignore[method-assign]
    thread.start()
    try:
        def lag() -> float:
            samples = worker.metrics.registry.collect()
            return sum(s.value for m in samples if m.name == "fraud_consumer_lag" for s in m.samples)
        assert wait_for(lambda: lag() == 900, timeout_s=60), lag()  # a worker stuck from the start shows its lag
        assert worker.metrics.registry.get_sample_value("fraud_batches_total") == 0
    finally:
        gate.set()
        assert wait_for(lambda: committed_to_end(kafka_settings, group), timeout_s=60)
        worker.stop.set()
        thread.join(timeout=60)

