"""What every scorer returns for a batch: scores, flags, per-feature errors and the means to explain
an alert. PyTorch-free, shared by ``pipeline.scoring.Scorer`` and ``pipeline.npscorer.NumpyScorer``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import InputDataError
from pipeline.preprocess import Preprocessing

if TYPE_CHECKING:
    from pipeline.artifact import ModelArtifact


@dataclass
class ScoreBatch:
    """Scores, flags and explanations of one batch of transactions."""

    scores: np.ndarray  # (n,) float32, higher = more anomalous (see the module docstring)
    flags: np.ndarray  # (n,) bool, scores > artifact.threshold
    feature_errors: np.ndarray  # (n, f) float32 squared error per feature, standardized space
    standardized_reconstruction: np.ndarray  # (n, f) float32, the model's output
    feature_names: tuple[str, ...] = ()
    error_means: np.ndarray | None = None  # (f,) explanation statistics of the artifact
    error_stds: np.ndarray | None = None  # (f,)
    preprocessing: Preprocessing | None = None  # maps the reconstruction back to raw units; None: identity
    # (n, f) float32 contribution of each feature to the fraud log-odds, for the flagged rows of a
    # version with a classifier (NaN elsewhere); None for versions without one
    contributions: np.ndarray | None = None

    @property
    def reconstruction(self) -> np.ndarray:
        """(n, f) float32 reconstruction in raw units. Computed on demand: explanations map only the
        rows they explain (see ``top_features``), not every row of a batch."""
        return self._raw_reconstruction(slice(None))

    def _raw_reconstruction(self, rows: slice) -> np.ndarray:
        z = self.standardized_reconstruction[rows]
        return z if self.preprocessing is None else self.preprocessing.inverse_transform(z)

    def top_features(self, i: int, raw_row: np.ndarray, k: int = 3) -> list[dict[str, Any]]:
        """The k features of row i that explain its score best, as dicts.

        Each dict: name, value (raw), reconstruction (raw), z = (error - mean) / std, with
        mean and std of that feature's error on normal validation data. Sorted by z descending;
        for a version with a classifier, by ``contribution`` (to the fraud log-odds) descending,
        added to each dict (null, and the z order, for a row without contributions).
        """
        errors = self.feature_errors[i].astype(np.float64)
        means = np.zeros_like(errors) if self.error_means is None else self.error_means
        stds = np.ones_like(errors) if self.error_stds is None else self.error_stds
        z = (errors - means) / stds  # (f,)
        contributions = None if self.contributions is None else self.contributions[i].astype(np.float64)
        explained = contributions is not None and bool(np.isfinite(contributions).all())
        order = np.argsort(-(contributions if explained else z), kind="stable")[: max(k, 0)]
        names = self.feature_names or tuple(f"f{j}" for j in range(errors.size))
        reconstruction = self._raw_reconstruction(slice(i, i + 1))[0]  # (f,) raw units
        tops = [
            {
                "name": names[j],
                "value": _shortest(raw_row[j]),
                "reconstruction": _shortest(reconstruction[j]),
                "z": round(float(z[j]), 3),
            }
            for j in order
        ]
        if contributions is not None:
            for top, j in zip(tops, order, strict=True):
                top["contribution"] = round(float(contributions[j]), 3) if explained else None
        return tops


def _shortest(value: np.floating) -> float:
    """A float32 as the shortest decimal that reads back to it, so 0.8979592 does not travel
    as 0.8979591727256775 (the same number widened to float64).

    >>> _shortest(np.float32(57.16)), float(np.float32(57.16))
    (57.16, 57.15999984741211)
    """
    return float(str(np.float32(value)))


class BatchScorer:
    """What the worker calls: ``score`` raw rows in chunks of at most ``max_batch`` rows. Subclasses
    fill each chunk's errors, reconstruction and scores (``_score_chunk``) and, for versions with a
    classifier, the contributions of the flagged rows."""

    engine = ""  # which library scores: "torch" or "numpy"
    device_name = "cpu"  # where: "cpu", "cuda:0"
    artifact: ModelArtifact
    max_batch: int

    @property
    def where(self) -> str:
        """Where and how scores are computed, for the log (``cuda:0``, ``cpu (NumPy, 1 threads)``); the
        model-info metric carries ``device_name`` and ``engine``."""
        raise NotImplementedError

    def score(self, raw: np.ndarray) -> ScoreBatch:
        """Score raw (n, f) rows in the artifact's feature order, un-preprocessed."""
        names = self.artifact.feature_names
        raw = np.asarray(raw, dtype=np.float32)
        if raw.ndim != 2 or raw.shape[1] != len(names):
            raise InputDataError(f"expected raw features of shape (n, {len(names)}), got {raw.shape}")
        with np.errstate(over="ignore", invalid="ignore"):  # beyond float32: inf, scored as out of range
            x = self.artifact.preprocessing.transform(raw)  # (n, f) standardized
        f = x.shape[1]
        out = np.empty((len(x), 2 * f + 1), np.float32)  # per row: squared errors, reconstruction, score
        for start in range(0, len(x), self.max_batch):
            chunk = x[start : start + self.max_batch]
            self._score_chunk(chunk, out[start : start + len(chunk)])
        scores = out[:, 2 * f].copy()
        flags = scores > self.artifact.threshold
        return ScoreBatch(
            scores=scores,
            flags=flags,
            feature_errors=out[:, :f],
            standardized_reconstruction=out[:, f : 2 * f],
            feature_names=names,
            error_means=self.artifact.explanation.means,
            error_stds=self.artifact.explanation.stds,
            preprocessing=self.artifact.preprocessing,
            contributions=self._contributions(x, flags),
        )

    def _score_chunk(self, chunk: np.ndarray, out: np.ndarray) -> None:
        """Fill ``out`` (m, 2f + 1) with the squared errors, reconstruction and score of each row of
        one standardized chunk (m, f), m <= max_batch."""
        raise NotImplementedError

    def _contributions(self, x: np.ndarray, flags: np.ndarray) -> np.ndarray | None:
        """Contributions (n, f) of each feature to the flagged rows' fraud log-odds; None without a classifier."""
        return None
