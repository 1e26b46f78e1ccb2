"""3. A naive consumer, one message at a time as tutorials write it, on a prefix of the topic."""

from __future__ import annotations

import json
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, KafkaProducer

from pipeline.config import KafkaSettings


def bench_naive(settings: KafkaSettings, model_dir: Path, limit: int) -> dict[str, Any]:
    """One message at a time, as tutorials do: json deserializer, 1-row tensor, auto-commit."""
    import torch

    from pipeline.artifact import load_artifact
    from pipeline.scoring import Scorer

    scorer = Scorer(load_artifact(model_dir), device="cpu")
    features = scorer.artifact.feature_names
    opts = settings.client_options()
    with warnings.catch_warnings():  # kafka-python 3 prefers Serializer classes; tutorials pass lambdas
        warnings.simplefilter("ignore", DeprecationWarning)
        consumer = KafkaConsumer(settings.input_topic, **opts, group_id=f"bench-naive-{uuid.uuid4().hex[:8]}",
                                 auto_offset_reset="earliest", enable_auto_commit=True,
                                 value_deserializer=lambda v: json.loads(v))
        producer = KafkaProducer(**opts, value_serializer=lambda v: json.dumps(v).encode())
    n = alerts = 0
    started = first = time.perf_counter()
    for message in consumer:
        if n == 0:
            first = time.perf_counter()
        tx = message.value
        x = torch.tensor([[tx[f] for f in features]], dtype=torch.float32)  # (1, features)
        result = scorer.score(x.numpy())
        if result.flags[0]:
            producer.send(settings.alerts_topic, {"transaction_id": tx["transaction_id"],
                                                  "score": float(result.scores[0])})
            alerts += 1
        n += 1
        if n >= limit:
            break
    seconds = time.perf_counter() - first
    producer.flush()
    producer.close()
    consumer.close()
    return {"records": n, "alerts": alerts, "seconds": seconds, "tx_s": n / seconds,
            "join_s": first - started, "commit": "auto-commit (enable_auto_commit=True, every 5 s)"}
