"""Online quality without a broker: decisions kept until their labels are due, resolved once, restored whole.

The terminal stage keeps what the worker decided for every scored transaction (score / threshold,
alerted) until its label is due, then resolves it against the fraud labels its windows hold
(``pipeline.worker.state.decisions``). What it counts must equal the truth of the simulated bank
exactly, whatever the batch boundaries, and a restore from the changelog in between must count
nothing twice and lose nothing.
"""

from __future__ import annotations

import dataclasses
import math
import random
import threading
from collections import Counter
from typing import Any

import numpy as np
import pandas as pd
import pytest
from kafka import TopicPartition
from prometheus_client import CollectorRegistry

from pipeline.schema import decode
from pipeline.streamfeatures import DAY_MS, event_id
from pipeline.worker.metrics import WorkerMetrics
from pipeline.worker.state import FeatureStages, StateTopics
from pipeline.worker.state.decisions import GRACE_MS, Decisions, decision_key, split_key
from pipeline.worker.state.store import BIG_ENTRIES
from producer.rawfeed import raw_messages
from producer.simulator import SimulatorConfig, simulate
from producer.tables import resolve_spec
from tests.worker_helpers import Record, hop_records, restored

T0 = 1_525_132_800_000  # 2018-05-01
TOPICS = StateTopics("raw", "labels", "g-by-terminal-repartition", "g-customer-windows-changelog",
                     "g-terminal-windows-changelog", 1, "g-decisions-changelog")


def held(state: Decisions) -> list[tuple[int, int, float, int]]:
    return list(zip(state.times, state.ids, state.ratios, state.alerted, strict=True))


def test_a_decision_is_held_once_and_resolved_once() -> None:
    state = Decisions()
    assert state.decide(1, T0, 0.5, False)
    assert not state.decide(1, T0, 0.5, False)  # a replay scored alike changes nothing
    assert state.decide(1, T0, 2.0, True)  # scored again otherwise (a new model): the latest counts
    assert state.decide(2, T0 + 10, float("inf"), True)
    assert state.decide(3, T0 - 10, 0.1, False)  # out of time order: placed by time
    assert [t for t, *_ in held(state)] == [T0 - 10, T0, T0 + 10]
    ids, ratios, alerted = state.resolve(T0)
    assert (list(ids), list(ratios), list(alerted)) == ([3, 1], [0.1, 2.0], [0, 1])
    assert held(state) == [(T0 + 10, 2, float("inf"), 1)]
    assert held(Decisions.from_bytes(state.to_bytes())) == held(state)
    assert split_key(decision_key("v1", "T\x1f7")) == ("v1", "T\x1f7")


@pytest.mark.parametrize("big", [False, True])
def test_the_changelog_restores_exactly_the_decisions_not_yet_resolved(big: bool) -> None:
    """Random decisions and resolutions through a store; at any point, a store restored from the (compacted)
    changelog holds what the live one does: resolved decisions never come back, open ones are never lost."""
    from pipeline.worker.state import Store
    from pipeline.worker.state.decisions import ALERTED, DECIDED, RESOLVED

    rng = random.Random(7)
    store: Store[Decisions] = Store(Decisions, Decisions.from_bytes, Decisions.merge, lag=4)
    outputs: list[Any] = []
    n = 3 * BIG_ENTRIES if big else 400
    t = T0
    for batch in range(40):
        for _ in range(n // 40):
            key = decision_key("v1", rng.choice(["a", "b"]) if not big else "hot")
            state = store.entities.get(key) or Decisions()
            t += rng.randrange(1, 2_000 if big else 60_000)  # big: a decision a second, 21,600 in 6 hours
            eid, ratio, alert = rng.getrandbits(62), rng.random() * 2, rng.random() < 0.1
            at = t - rng.randrange(0, 3_600_000)  # up to an hour out of time order
            if state.decide(eid, at, ratio, alert):
                store.change(key, state, ALERTED if alert else DECIDED, eid, at, ratio)
        if batch % 5 == 4:
            cutoff = t - 6 * 3_600_000
            for key, state in list(store.entities.items()):
                state.resolve(cutoff)
                if state.times:
                    store.change(key, state, RESOLVED, 0, cutoff, 0.0)
                else:
                    del store.entities[key]
                    store.dirty.add(key)
        outputs += store.flush("decisions", 0)
        back = restored(outputs, Decisions, Decisions)
        assert {k: held(v) for k, v in back.entities.items()} == {k: held(v) for k, v in store.entities.items()}
    assert not big or any(o.key and b"\x00" in o.key and not o.key.startswith(b"\x00") for o in outputs)


@pytest.fixture(scope="module")
def bank() -> pd.DataFrame:
    """A small bank over 30 days with many compromised terminals (frauds to count)."""
    return simulate(SimulatorConfig(n_customers=80, n_terminals=100, n_days=30, seed=5,
                                    terminals_compromised_per_day=0.4))


def ratio_of(tx_id: str, fraud: bool) -> float:
    """A made-up score ratio per transaction, the same at every reading: about 15 % of genuine transactions and
    half the frauds alerted."""
    return (event_id(tx_id) % 1000) / (870 if not fraud else 500)


class Changelogs:
    """A restorer over the changelog records written so far (a compacted topic keeps the last per key)."""

    def __init__(self) -> None:
        self.outputs: list[Any] = []

    def restore(self, topic: str, partition: int, store: Any, stop: threading.Event) -> int:
        mine = [o for o in self.outputs if o.topic == topic]
        back = restored(mine, store.factory, type(store.factory()))
        store.entities = back.entities
        return len(mine)

    def close(self) -> None:
        pass


def stream(bank: pd.DataFrame, batch: int, restart_every: int | None, grace_ms: int = GRACE_MS
           ) -> tuple[Counter[tuple[str, bool, bool]], int, list[float]]:
    """The bank's raw records and labels through the stages in batches, each scored transaction decided with
    ``ratio_of``; restarted from the changelogs every ``restart_every`` batches. What was resolved, counted, the
    event time resolved up to, and the fraud ratios resolved."""
    changelogs = Changelogs()
    registry = WorkerMetrics(CollectorRegistry())

    def fresh() -> FeatureStages:
        stages = FeatureStages(TOPICS, 7, changelogs, registry, 65536, threading.Event(),  # type: ignore[arg-type]
                               grace_ms=grace_ms)
        stages.sync({TopicPartition(t, 0) for t in TOPICS.consumed})
        return stages

    stages = fresh()
    frauds = dict(zip(bank["TRANSACTION_ID"].astype(str), bank["TX_FRAUD"].astype(bool), strict=True))
    feed = raw_messages(bank, resolve_spec(bank, "handbook"), TOPICS.input, TOPICS.labels, 7)
    records = [Record(value, i, topic, 0, key) for i, (topic, key, value) in enumerate(feed)]
    counts: Counter[tuple[str, bool, bool]] = Counter()
    fraud_ratios: list[float] = []
    for n, first in enumerate(range(0, len(records), batch)):
        raw, labels, _, _ = stages.split(records[first: first + batch])
        staged = stages.stage(raw, labels)
        scored = []
        for record in hop_records(staged.outputs):
            tx = decode(record.value)
            assert stages.enrich(record, tx) is None
            scored.append((record, tx))
        ratios = [ratio_of(tx.transaction_id, frauds[tx.transaction_id]) for _r, tx in scored]
        stages.decide(scored, ratios, [r > 1 for r in ratios], "v1")
        changelogs.outputs += stages.changelog()
        stages.staged({})  # committed at once: nothing is held back for a replay
        stages.committed({TopicPartition(t, 0): 1 << 62 for t in TOPICS.consumed})
        for part in stages.take_resolved():
            assert part.version == "v1"
            for ratio, alert, fraud in zip(part.ratios, part.alerted, part.fraud, strict=True):
                counts[(part.version, fraud, bool(alert))] += 1
                if fraud:
                    fraud_ratios.append(ratio)
        if restart_every and n % restart_every == restart_every - 1:
            stages = fresh()
    return counts, stages.resolved_until[0], fraud_ratios


@pytest.mark.parametrize(("batch", "restart_every", "grace_days"), [(64, None, 1), (97, None, 1), (50, 7, 1),
                                                                    (64, None, 4)])
def test_resolved_decisions_equal_the_truth_exactly(bank: pd.DataFrame, batch: int, restart_every: int | None,
                                                    grace_days: int) -> None:
    counts, until, fraud_ratios = stream(bank, batch, restart_every, grace_days * DAY_MS)
    t_ms = bank["TX_DATETIME"].to_numpy().astype("datetime64[ms]").astype(np.int64)
    due = t_ms <= until
    # due: the label delay plus grace behind the stream (within the batch span: a day of this small bank), held back
    # to the last batch's oldest (it may be read again)
    assert 7 * DAY_MS + grace_days * DAY_MS <= t_ms.max() - until <= 7 * DAY_MS + (grace_days + 1) * DAY_MS
    assert until >= t_ms.min() + 15 * DAY_MS
    truth: Counter[tuple[str, bool, bool]] = Counter()
    truth_fraud_ratios = []
    for tx_id, fraud in zip(bank["TRANSACTION_ID"].astype(str)[due], bank["TX_FRAUD"][due], strict=True):
        ratio = ratio_of(tx_id, bool(fraud))
        truth[("v1", bool(fraud), ratio > 1)] += 1
        if fraud:
            truth_fraud_ratios.append(ratio)
    assert sum(truth.values()) > 1000 and truth[("v1", True, True)] > 10
    assert counts == truth
    assert sorted(fraud_ratios) == sorted(truth_fraud_ratios)


def test_average_precision_from_buckets_is_exact_when_each_score_has_its_own_bucket() -> None:
    """Every score alone in its bucket: nothing to interleave, so the estimate is the exact AP; coarser buckets
    only approximate it."""
    from sklearn.metrics import average_precision_score

    from pipeline.worker.metrics import QUALITY_BUCKETS
    from pipeline.worker.state.decisions import bucket_average_precision

    rng = np.random.default_rng(3)
    fraud = rng.random(3000) < 0.05
    scores = np.round(rng.lognormal(np.where(fraud, 1.0, 0.0), 1.0), 9)
    bounds = np.unique(scores)

    def cumulative(rows: np.ndarray, edges: np.ndarray) -> list[float]:
        return [float(c) for c in np.cumsum(np.bincount(np.searchsorted(edges, scores[rows]),
                                                        minlength=len(edges) + 1))]

    exact = average_precision_score(fraud, scores)
    alone = bucket_average_precision(cumulative(fraud, bounds), cumulative(~fraud, bounds))
    assert alone == pytest.approx(exact, abs=1e-12)
    coarse = np.array(QUALITY_BUCKETS)
    assert abs(bucket_average_precision(cumulative(fraud, coarse), cumulative(~fraud, coarse)) - exact) < 0.01
    assert math.isnan(bucket_average_precision([0.0, 0.0], [3.0, 5.0]))


# -- the challenger (shadow) model ------------------------------------------------------------
class Variant:
    """The served model's scores under another version and ``threshold_factor`` times its threshold, as a
    ``raw``-input version if asked (what a challenger must match); ``fail``: every batch raises."""

    def __init__(self, scorer: Any, version: str = "challenger-v2", threshold_factor: float = 0.5,
                 raw: bool = False, fail: bool = False) -> None:
        self.inner, self.fail, self.device = scorer, fail, scorer.device
        self.device_name, self.engine, self.where = scorer.device_name, scorer.engine, scorer.where
        manifest = {**scorer.artifact.manifest, "model_version": version,
                    "threshold": scorer.artifact.threshold * threshold_factor}
        if raw:
            manifest["input"] = {**scorer.artifact.manifest.get("input", {}), "form": "raw"}
        self.artifact = dataclasses.replace(scorer.artifact, manifest=manifest)

    def score(self, raw: np.ndarray) -> Any:
        if self.fail:
            raise RuntimeError("challenger broke")
        return self.inner.score(raw)


@pytest.fixture(scope="module")
def scorer(model_dir: Any) -> Any:
    from pipeline.artifact import load_artifact
    from pipeline.scoring import Scorer

    return Scorer(load_artifact(model_dir), device="cpu")


def scored_batch(scorer: Any, n: int = 64) -> list[Any]:
    import orjson

    rng = np.random.default_rng(1)
    pre = scorer.artifact.preprocessing
    rows = [{name: float(pre.mean[j] + pre.std[j] * rng.normal(0, 3)) for j, name in
             enumerate(scorer.artifact.feature_names)} for _ in range(n)]
    return [Record(orjson.dumps({"transaction_id": f"t{i}", "event_time": T0 + i, **row}), i)
            for i, row in enumerate(rows)]


def test_a_challenger_decides_on_the_same_transactions_and_never_alerts(scorer: Any, caplog: Any) -> None:
    import logging

    from pipeline.worker.processing import BatchProcessor, Topics

    def processor(challenger: Any) -> BatchProcessor:
        made = BatchProcessor(scorer, Topics("alerts", "dlq"), "w", max_record_bytes=65536, top_features=3)
        made.challenger = challenger
        return made

    records = scored_batch(scorer)
    alone = processor(None).process(records, enrich=lambda record, tx: None)
    shadowed = processor(Variant(scorer)).process(records, enrich=lambda record, tx: None)
    def alerted_ids(outcome: Any) -> list[bytes | None]:
        return [o.key for o in outcome.outputs if o.topic == "alerts"]

    assert alerted_ids(shadowed) == alerted_ids(alone) and alone.alerts > 0  # alerts from the served model only
    assert alone.challenger is None and shadowed.challenger is not None
    version, ratios, alerted = shadowed.challenger
    assert version == "challenger-v2" and len(ratios) == len(shadowed.decided) == 64
    np.testing.assert_allclose(ratios, 2 * shadowed.decided_ratios)  # half the threshold: twice the ratio
    assert list(alerted) == list(ratios > 1) and alerted.sum() > shadowed.decided_alerted.sum() > 0
    with caplog.at_level(logging.ERROR):
        broken = processor(Variant(scorer, fail=True)).process(records, enrich=lambda record, tx: None)
    assert broken.challenger is None and alerted_ids(broken) == alerted_ids(alone) and not broken.dead_letters
    assert any("challenger challenger-v2 could not score a batch" in r.getMessage() for r in caplog.records)


def test_a_featured_or_same_version_challenger_is_not_scored(scorer: Any) -> None:
    from pipeline.config import KafkaSettings, WorkerSettings
    from pipeline.worker.app import Worker

    metrics = WorkerMetrics(CollectorRegistry())
    worker = Worker(KafkaSettings.build(environ={}), WorkerSettings.build(environ={}, overrides={"device": "cpu"}),
                    scorer, metrics, challenger=Variant(scorer))  # type: ignore[arg-type]
    assert worker.challenger is None and worker.processor.challenger is None  # featured input: no labels to judge
    assert metrics.registry.get_sample_value("fraud_model_reloads_total", {"result": "refused"}) == 1


def test_a_challenger_comes_with_its_link_and_goes_with_it(scorer: Any) -> None:
    from pipeline.config import KafkaSettings, WorkerSettings
    from pipeline.worker.app import Worker
    from pipeline.worker.reload import REMOVED

    handed = iter([Variant(scorer, "v2", 0.5, raw=True), None, REMOVED])
    metrics = WorkerMetrics(CollectorRegistry())
    worker = Worker(KafkaSettings.build(environ={}), WorkerSettings.build(environ={}, overrides={"device": "cpu"}),
                    Variant(scorer, "v1", 1.0, raw=True), metrics, take_new_challenger=lambda: next(handed))  # type: ignore[arg-type]
    assert worker.processor.challenger is None
    worker._swap_model_if_new()
    assert worker.processor.challenger is not None and worker.processor.challenger.artifact.version == "v2"
    assert metrics.registry.get_sample_value("fraud_model_challenger", {"version": "v2"}) == 1
    assert metrics.registry.get_sample_value("fraud_quality_resolved_total",  # from 0, for increase()
                                             {"version": "v2", "label": "fraud", "alerted": "true"}) == 0
    worker._swap_model_if_new()  # nothing new
    assert worker.processor.challenger is not None
    worker._swap_model_if_new()  # its link is gone
    assert worker.processor.challenger is None and worker.challenger is None
    assert metrics.registry.get_sample_value("fraud_model_challenger", {"version": "v2"}) is None
