"""One micro-batch in, the messages it must publish out: no Kafka here, and no record can stop it.

Every stage that touches a single record (decoding, scoring, explanation, encoding) is
isolated: a record that raises is dead-lettered as ``processing_error`` with the stage and
the exception in its headers, and the rest of the batch goes on. Scoring runs on the whole
matrix; if it raises, the batch is bisected until the rows that fail are alone (a CUDA
out-of-memory error on a large batch halves it the same way).

A score that is not finite (an input so far beyond the training data that the model's
float32 arithmetic overflows) is never a silent "no alert": the record is alerted with
``out_of_range: true``, and its explanation names the features outside the model's range.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.schema import RecordError, encode
from pipeline.scores import BatchScorer, ScoreBatch
from pipeline.worker.batch import Enrich, decode_batch
from pipeline.worker.outputs import (
    MAX_MESSAGE_CHARS,
    Output,
    alert_output,
    alert_value,
    dead_letter,
    processing_error,
)

log = logging.getLogger(__name__)
CHALLENGER_LOG_EVERY_S = 60.0


@dataclass
class BatchOutcome:
    """What one batch produced; counted in metrics only once it is committed."""

    outputs: list[Output] = field(default_factory=list)
    alerts: int = 0
    dead_letters: Counter[str] = field(default_factory=Counter)  # reason -> count
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # finite scores
    event_times_ms: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # of scored records
    out_of_range: int = 0
    decode_seconds: float = 0.0
    scoring_seconds: float = 0.0
    missing_features: Counter[str] = field(default_factory=Counter)  # feature -> records that lacked it
    # raw input only: what was decided for each record scored (record, transaction), its score / threshold (+inf
    # where the score is not finite) and whether it alerted; then the decisions whose labels came due
    decided: list[tuple[Any, Any]] = field(default_factory=list)
    decided_ratios: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    decided_alerted: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    resolved: list[Any] = field(default_factory=list)
    challenger: tuple[str, np.ndarray, np.ndarray] | None = None  # its version, ratios and alerts on ``decided``

    @property
    def scored(self) -> int:
        return len(self.event_times_ms)

    @property
    def invalid(self) -> int:
        return sum(self.dead_letters.values())


@dataclass(frozen=True)
class Topics:
    alerts: str
    dead_letters: str
    features: str | None = None  # every scored record with its features and score, when set


class BatchProcessor:
    """Turns records into alerts and dead letters with the model in service."""

    def __init__(self, scorer: BatchScorer, topics: Topics, worker_id: str, *, max_record_bytes: int,
                 top_features: int, clock: Callable[[], float] = time.time) -> None:
        self.scorer, self.topics, self.worker_id = scorer, topics, worker_id
        self.max_record_bytes, self.top_features, self.clock = max_record_bytes, top_features, clock
        self.features = tuple(scorer.artifact.feature_names)
        self.feature_set = frozenset(self.features)
        self.challenger: BatchScorer | None = None  # scored beside ``scorer`` on raw input; never alerts
        self._challenger_failed_at = -CHALLENGER_LOG_EVERY_S

    def process(self, records: Sequence[Any], enrich: Enrich | None = None,
                failed_before: Sequence[tuple[Any, RecordError]] = ()) -> BatchOutcome:
        """Score ``records``; every one ends as scored (alert or not) or as a dead letter.

        ``enrich`` adds computed features to each decoded record (``decode_batch``);
        ``failed_before`` are records an earlier stage refused, dead-lettered with these."""
        now_ms = int(self.clock() * 1000)
        out = BatchOutcome()
        decode_started = time.perf_counter()
        decoded = decode_batch(records, self.features, self.max_record_bytes, enrich)
        failed: list[tuple[Any, RecordError]] = [*failed_before, *decoded.bad]
        scoring_started = time.perf_counter()
        out.decode_seconds = scoring_started - decode_started
        result, broken = score_isolated(self.scorer, decoded.matrix)
        out.scoring_seconds = time.perf_counter() - scoring_started
        ok = np.ones(len(decoded.good), dtype=bool)
        for i, err in broken.items():
            ok[i] = False
            failed.append((decoded.good[i][0], processing_error("scoring", err)))
        if result is not None:
            threshold = self.scorer.artifact.threshold
            finite = np.isfinite(result.scores)
            for i in np.flatnonzero(ok & ~(result.scores <= threshold)):  # NaN is flagged, not skipped
                record, tx = decoded.good[i]
                try:
                    out.outputs.append(self._alert(result, int(i), decoded.matrix[i], tx, now_ms))
                except Exception as err:  # one record's explanation or encoding must not stop the batch
                    ok[i] = False
                    failed.append((record, processing_error("alert", err)))
            out.alerts = len(out.outputs)
            if enrich is not None:
                kept = np.flatnonzero(ok)
                out.decided = [decoded.good[i] for i in kept]
                out.decided_ratios, out.decided_alerted = decisions_of(result.scores[kept], threshold)
                if self.challenger is not None and len(kept):
                    out.challenger = self._shadow(decoded.matrix[kept])
            if self.topics.features:
                out.outputs += [self._featured(decoded.good[i][1], float(result.scores[i]))
                                for i in np.flatnonzero(ok)]
            out.out_of_range = int((ok & ~finite).sum())
            out.scores = result.scores[ok & finite]
        out.event_times_ms = decoded.event_times_ms[ok]
        for record, error in failed:
            out.outputs.append(self._dead_letter(record, error, now_ms))
            out.dead_letters[error.reason] += 1
            if error.reason == "missing_feature" and error.field:
                out.missing_features[error.field] += 1
        return out

    def _shadow(self, matrix: np.ndarray) -> tuple[str, np.ndarray, np.ndarray] | None:
        """The challenger's score ratios and alerts on the rows the current model scored. Rows it cannot score
        are left out of its decisions (NaN); a failure of the whole batch is logged (once a minute) and
        counted, never felt by the current model's outputs."""
        challenger = self.challenger
        assert challenger is not None
        artifact = challenger.artifact
        try:
            result, broken = score_isolated(challenger, matrix)
        except Exception as err:  # the challenger must never stop the batch
            result, broken = None, {0: err}
        if result is None:
            now = time.monotonic()
            if now - self._challenger_failed_at >= CHALLENGER_LOG_EVERY_S:
                self._challenger_failed_at = now
                log.error("challenger %s could not score a batch (%s); its decisions are skipped",
                          artifact.version, next(iter(broken.values()), None))
            return None
        ratios, alerted = decisions_of(result.scores, artifact.threshold)
        ratios[list(broken)] = np.nan
        return artifact.version, ratios, alerted

    def _alert(self, result: ScoreBatch, i: int, raw_row: np.ndarray, tx: Any, now_ms: int) -> Output:
        score = float(result.scores[i])
        if np.isfinite(score):
            top = result.top_features(i, raw_row, self.top_features)
        else:
            top = out_of_range_features(self.scorer, raw_row, self.top_features)
        artifact = self.scorer.artifact

        def encode(with_fields: bool) -> bytes:
            return alert_value(tx, score, artifact.threshold, artifact.version, now_ms, top, self.feature_set,
                               with_fields=with_fields)

        return alert_output(self.topics.alerts, tx, encode)

    def _featured(self, tx: Any, score: float) -> Output:
        """A scored record with every field it was scored with (computed features included) and its score."""
        value = encode({**tx.fields, "score": score if np.isfinite(score) else None,
                        "model_version": self.scorer.artifact.version})
        return Output(self.topics.features or "", tx.transaction_id.encode(), value)

    def dead_letter(self, record: Any, error: RecordError) -> Output:
        """A dead letter for one record, outside any batch."""
        return self._dead_letter(record, error, int(self.clock() * 1000))

    def _dead_letter(self, record: Any, error: RecordError, now_ms: int) -> Output:
        try:
            return dead_letter(self.topics.dead_letters, record, error, self.worker_id, now_ms)
        except Exception as err:  # a record too odd even to copy: send what is known about it
            fallback = RecordError(error.reason, error.field, f"{error.detail}; copy failed: {err!r}")
            return Output(self.topics.dead_letters, None, b"", [
                ("dlq.error.reason", error.reason.encode()),
                ("dlq.error.message", str(fallback)[:MAX_MESSAGE_CHARS].encode("utf-8", "replace")),
                ("dlq.worker", self.worker_id.encode())])


def decisions_of(scores: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Score / threshold (+inf where a score is not finite) and whether each alerts (NaN alerts, as ever)."""
    ratios = scores.astype(np.float64) / threshold
    return np.where(np.isfinite(ratios), ratios, np.inf), ~(scores <= threshold)


def score_isolated(scorer: BatchScorer, matrix: np.ndarray) -> tuple[ScoreBatch | None, dict[int, BaseException]]:
    """Score the whole matrix; if that raises, bisect until the failing rows are alone.

    Returns one ScoreBatch over every row (failed rows hold NaN) and the failures by row.
    """
    if len(matrix) == 0:
        return None, {}
    try:
        return scorer.score(matrix), {}
    except Exception as err:
        if len(matrix) == 1:
            return None, {0: err}
    parts: list[tuple[int, ScoreBatch]] = []
    failures: dict[int, BaseException] = {}
    pending = [(0, len(matrix) // 2), (len(matrix) // 2, len(matrix))]
    while pending:
        start, stop = pending.pop()
        try:
            parts.append((start, scorer.score(matrix[start:stop])))
        except Exception as err:
            if stop - start == 1:
                failures[start] = err
            else:
                middle = (start + stop) // 2
                pending += [(start, middle), (middle, stop)]
    return _join(parts, len(matrix)), failures


def _join(parts: list[tuple[int, ScoreBatch]], n: int) -> ScoreBatch | None:
    if not parts:
        return None
    first = parts[0][1]
    f = first.feature_errors.shape[1]
    joined = ScoreBatch(
        scores=np.full(n, np.nan, np.float32), flags=np.zeros(n, bool),
        feature_errors=np.full((n, f), np.nan, np.float32),
        standardized_reconstruction=np.full((n, f), np.nan, np.float32), feature_names=first.feature_names,
        error_means=first.error_means, error_stds=first.error_stds, preprocessing=first.preprocessing,
        contributions=None if first.contributions is None else np.full((n, f), np.nan, np.float32))
    for start, part in parts:
        rows = slice(start, start + len(part.scores))
        joined.scores[rows], joined.flags[rows] = part.scores, part.flags
        joined.feature_errors[rows] = part.feature_errors
        joined.standardized_reconstruction[rows] = part.standardized_reconstruction
        if joined.contributions is not None and part.contributions is not None:
            joined.contributions[rows] = part.contributions
    return joined


def out_of_range_features(scorer: BatchScorer, raw_row: np.ndarray, k: int) -> list[dict[str, Any]]:
    """For a row whose score overflowed: the k features furthest from the training data,
    those whose standardized value is not finite first (``z`` is null: it has no finite value)."""
    with np.errstate(all="ignore"):
        x = scorer.artifact.preprocessing.transform(raw_row[None, :])[0].astype(np.float64)  # (f,)
    distance = np.where(np.isfinite(x), np.abs(x), np.inf)
    order = np.argsort(-distance, kind="stable")[: max(k, 0)]
    names = scorer.artifact.feature_names
    return [{"name": names[j], "value": float(str(np.float32(raw_row[j]))), "reconstruction": None,
             "z": None, "out_of_range": not np.isfinite(x[j])} for j in order]
