"""The one scoring code path, shared by the streaming worker and ``fraud-train score``.

A score is the mean squared reconstruction error of a transaction in standardized space, or,
for a hybrid version (``artifact.scoring``), that error plus the mean distance to the nearest
normal training rows, each divided by its scale on normal validation rows: higher = more
anomalous either way; scores above the artifact's threshold are flagged. The per-feature
reconstruction errors, compared with their spread on normal validation data, explain each alert.

A version fitted with labels (``artifact.classifier``) scores the fraud probability of its
classifier instead, and its alerts list the features by their contribution to the fraud log-odds
(``pipeline.classifier.attributions``), each still with its reconstruction error's z.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.artifact import ModelArtifact
from pipeline.classifier import ATTRIBUTION_STEPS, attributions
from pipeline.cpus import available_cpus
from pipeline.errors import ConfigError, InputDataError
from pipeline.neighbours import knn_distance
from pipeline.preprocess import Preprocessing

if TYPE_CHECKING:  # pandas costs ~0.8 s to import; only offline scoring needs it
    import pandas as pd


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


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available else CPU; otherwise the named device, checked."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"device={device!r}: use auto, cpu, cuda or cuda:N") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but CUDA is not available here; use --device cpu or auto")
    return resolved


def _shortest(value: np.floating) -> float:
    """A float32 as the shortest decimal that reads back to it, so 0.8979592 does not travel
    as 0.8979591727256775 (the same number widened to float64).

    >>> _shortest(np.float32(57.16)), float(np.float32(57.16))
    (57.16, 57.15999984741211)
    """
    return float(str(np.float32(value)))


class Scorer:
    """Scores raw feature rows with a loaded artifact on CPU or CUDA."""

    def __init__(self, artifact: ModelArtifact, device: str = "auto", max_batch: int = 65536,
                 threads: int | None = None) -> None:
        """`threads` sets PyTorch's (process-wide) intra-op threads for CPU scoring; by default
        it only lowers them to the CPUs this process may use."""
        if max_batch < 1:
            raise ConfigError(f"max_batch={max_batch} must be >= 1")
        self.artifact = artifact
        self.device = resolve_device(device)
        self.max_batch = max_batch
        self._model = artifact.build_model().to(self.device).float()
        self._pinned: dict[str, torch.Tensor] = {}  # CUDA only: host buffers for inputs and results, reused
        self._bank = None  # (bank rows, f) as the distance sees them (clipped when the spec says so)
        if artifact.bank is not None:
            self._bank = artifact.scoring.distance_space(artifact.bank.to(self.device).float())
        classifier = artifact.build_classifier()
        self._classifier = None if classifier is None else classifier.to(self.device).float()
        if self.device.type == "cpu":
            wanted = min(threads or torch.get_num_threads(), available_cpus())
            if torch.get_num_threads() != wanted:  # avoid oversubscribing a CPU-limited container
                torch.set_num_threads(wanted)

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
            contributions=None if self._classifier is None else self._contributions(x, flags),
        )

    def _contributions(self, x: np.ndarray, flags: np.ndarray) -> np.ndarray:
        """Each feature's contribution to the fraud log-odds (n, f) for the flagged rows, NaN elsewhere."""
        out = np.full(x.shape, np.nan, np.float32)
        rows = np.flatnonzero(flags)
        per_pass = max(1, self.max_batch // ATTRIBUTION_STEPS)  # every step of every row goes through at once
        for start in range(0, len(rows), per_pass):
            part = rows[start : start + per_pass]
            batch = torch.from_numpy(np.ascontiguousarray(x[part])).to(self.device)
            out[part] = attributions(self._classifier, self._model, batch).float().cpu().numpy()  # NaN: out of range
        return out

    def score_tensor(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The device's whole share of ``score``: squared errors (m, f), reconstruction (m, f) and
        scores (m,) of standardized rows x (m, f) already on this scorer's device, left there (no
        copy, no wait). Call it under ``torch.inference_mode()``. With a classifier, the score is its
        fraud probability."""
        recon = self._model(x)  # (m, f)
        errors = torch.square(recon - x)  # (m, f); a huge input errs to inf, alerts clip its score
        if self._classifier is not None:
            return errors, recon, torch.sigmoid(self._classifier(x, recon)).float()
        distance = None
        if self._bank is not None:
            spec = self.artifact.scoring
            distance = knn_distance(spec.distance_space(x), self._bank, spec.k)  # (m,)
        return errors, recon, self.artifact.scoring.combine(errors.mean(dim=1), distance)

    def _score_chunk(self, chunk: np.ndarray, out: np.ndarray) -> None:
        """Fill ``out`` (m, 2f + 1) with the squared errors, reconstruction and score of each row of
        one standardized chunk (m, f), m <= max_batch. On CUDA: one pinned copy each way, one wait."""
        with torch.inference_mode():
            if self.device.type == "cuda":
                staging = self._pinned_buffer("inputs", chunk.shape[1])[: len(chunk)]
                staging.copy_(torch.from_numpy(chunk))
                batch = staging.to(self.device, non_blocking=True)
            else:
                batch = torch.from_numpy(chunk)
            errors, recon, scores = self.score_tensor(batch)
            parts = [errors, recon, scores[:, None]]
            if self.device.type == "cpu":
                torch.cat(parts, dim=1, out=torch.from_numpy(out))
                return
            results = self._pinned_buffer("results", out.shape[1])[: len(out)]
            results.copy_(torch.cat(parts, dim=1), non_blocking=True)  # (m, 2f + 1)
            torch.cuda.current_stream(self.device).synchronize()  # both copies done: staging is free again
            out[:] = results.numpy()

    def _pinned_buffer(self, name: str, columns: int) -> torch.Tensor:
        """A pinned host buffer (max_batch, columns), made on first use and reused."""
        if name not in self._pinned:
            self._pinned[name] = torch.empty((self.max_batch, columns), dtype=torch.float32, pin_memory=True)
        return self._pinned[name]


def score_frame(scorer: Scorer, frame: pd.DataFrame, chunk_rows: int = 262_144) -> ScoreBatch:
    """Score a whole DataFrame holding the artifact's feature columns, in chunks, for offline use."""
    names = list(scorer.artifact.feature_names)
    missing = [n for n in names if n not in frame.columns]
    if missing:
        raise InputDataError(f"column {missing[0]!r} is missing; the model needs {', '.join(names)}")
    parts = [
        scorer.score(frame[names].iloc[start : start + chunk_rows].to_numpy(dtype=np.float32))
        for start in range(0, len(frame), chunk_rows)
    ] or [scorer.score(np.zeros((0, len(names)), np.float32))]
    first = parts[0]
    return ScoreBatch(
        scores=np.concatenate([p.scores for p in parts]),
        flags=np.concatenate([p.flags for p in parts]),
        feature_errors=np.concatenate([p.feature_errors for p in parts]),
        standardized_reconstruction=np.concatenate([p.standardized_reconstruction for p in parts]),
        feature_names=first.feature_names,
        error_means=first.error_means,
        error_stds=first.error_stds,
        preprocessing=first.preprocessing,
        contributions=None if first.contributions is None else np.concatenate([p.contributions for p in parts]),
    )
