"""The one scoring code path, shared by the streaming worker and ``fraud-train score``.

A score is the mean squared reconstruction error of a transaction in standardized space, or,
for a hybrid version (``artifact.scoring``), that error plus the mean distance to the nearest
normal training rows, each divided by its scale on normal validation rows: higher = more
anomalous either way; scores above the artifact's threshold are flagged. The per-feature
reconstruction errors, compared with their spread on normal validation data, explain each alert.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.artifact import ModelArtifact
from pipeline.cpus import available_cpus
from pipeline.errors import ConfigError, InputDataError
from pipeline.neighbours import knn_distance

if TYPE_CHECKING:  # pandas costs ~0.8 s to import; only offline scoring needs it
    import pandas as pd


@dataclass
class ScoreBatch:
    """Scores, flags and explanations of one batch of transactions."""

    scores: np.ndarray  # (n,) float32, higher = more anomalous (see the module docstring)
    flags: np.ndarray  # (n,) bool, scores > artifact.threshold
    feature_errors: np.ndarray  # (n, f) float32 squared error per feature, standardized space
    reconstruction: np.ndarray  # (n, f) float32 in raw units (inverse preprocessing)
    feature_names: tuple[str, ...] = ()
    error_means: np.ndarray | None = None  # (f,) explanation statistics of the artifact
    error_stds: np.ndarray | None = None  # (f,)

    def top_features(self, i: int, raw_row: np.ndarray, k: int = 3) -> list[dict[str, Any]]:
        """The k features of row i whose error is most unusual, as dicts sorted by z descending.

        Each dict: name, value (raw), reconstruction (raw), z = (error - mean) / std, with
        mean and std of that feature's error on normal validation data.
        """
        errors = self.feature_errors[i].astype(np.float64)
        means = np.zeros_like(errors) if self.error_means is None else self.error_means
        stds = np.ones_like(errors) if self.error_stds is None else self.error_stds
        z = (errors - means) / stds  # (f,)
        order = np.argsort(-z, kind="stable")[: max(k, 0)]
        names = self.feature_names or tuple(f"f{j}" for j in range(errors.size))
        return [
            {
                "name": names[j],
                "value": _shortest(raw_row[j]),
                "reconstruction": _shortest(self.reconstruction[i, j]),
                "z": round(float(z[j]), 3),
            }
            for j in order
        ]


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
        self._staging: torch.Tensor | None = None  # pinned host buffer (CUDA only), reused
        self._bank = None  # (bank rows, f) as the distance sees them (clipped when the spec says so)
        if artifact.bank is not None:
            self._bank = artifact.scoring.distance_space(artifact.bank.to(self.device).float())
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
        recon = np.empty_like(x)
        distance = np.zeros(len(x), np.float32) if self._bank is not None else None  # (n,)
        for start in range(0, x.shape[0], self.max_batch):
            chunk = x[start : start + self.max_batch]
            recon[start : start + len(chunk)], chunk_distance = self._reconstruct(chunk)
            if distance is not None:
                distance[start : start + len(chunk)] = chunk_distance
        with np.errstate(over="ignore", invalid="ignore"):  # a huge input errs to inf; alerts clip the score
            errors = np.square(recon - x, dtype=np.float32)  # (n, f)
            mse = errors.mean(axis=1, dtype=np.float32) if len(x) else np.zeros(0, np.float32)
            scores = np.asarray(self.artifact.scoring.combine(mse, distance), dtype=np.float32)
        return ScoreBatch(
            scores=scores,
            flags=scores > self.artifact.threshold,
            feature_errors=errors,
            reconstruction=self.artifact.preprocessing.inverse_transform(recon),
            feature_names=names,
            error_means=self.artifact.explanation.means,
            error_stds=self.artifact.explanation.stds,
        )

    def _reconstruct(self, chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Model reconstruction (m, f) of one standardized chunk (m, f), m <= max_batch, and for a
        hybrid version the chunk's mean distance to its k nearest bank rows (m,)."""
        with torch.inference_mode():
            if self.device.type == "cuda":
                staging = self._staging_buffer(chunk.shape[1])[: len(chunk)]
                staging.copy_(torch.from_numpy(chunk))
                batch = staging.to(self.device, non_blocking=True)
            else:
                batch = torch.from_numpy(chunk)
            distance = None
            if self._bank is not None:
                spec = self.artifact.scoring
                distance = knn_distance(spec.distance_space(batch), self._bank, spec.k).float().cpu().numpy()
            # .cpu() waits, so staging is free again
            return self._model(batch).float().cpu().numpy(), distance

    def _staging_buffer(self, n_features: int) -> torch.Tensor:
        if self._staging is None:
            self._staging = torch.empty((self.max_batch, n_features), dtype=torch.float32, pin_memory=True)
        return self._staging


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
        reconstruction=np.concatenate([p.reconstruction for p in parts]),
        feature_names=first.feature_names,
        error_means=first.error_means,
        error_stds=first.error_stds,
    )
