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

from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.artifact import ModelArtifact
from pipeline.classifier import ATTRIBUTION_STEPS, attributions
from pipeline.cpus import available_cpus
from pipeline.errors import ConfigError, InputDataError
from pipeline.neighbours import knn_distance
from pipeline.scores import BatchScorer, ScoreBatch

if TYPE_CHECKING:  # pandas costs ~0.8 s to import; only offline scoring needs it
    import pandas as pd


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


class Scorer(BatchScorer):
    """Scores raw feature rows with a loaded artifact on CPU or CUDA, through PyTorch."""

    engine = "torch"

    def __init__(self, artifact: ModelArtifact, device: str = "auto", max_batch: int = 65536,
                 threads: int | None = None) -> None:
        """`threads` sets PyTorch's (process-wide) intra-op threads for CPU scoring; by default
        it only lowers them to the CPUs this process may use."""
        if max_batch < 1:
            raise ConfigError(f"max_batch={max_batch} must be >= 1")
        self.artifact = artifact
        self.device = resolve_device(device)
        self.device_name = str(self.device)
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

    @property
    def where(self) -> str:
        """``cuda:0``, or ``cpu (N threads)`` with PyTorch's intra-op threads."""
        return str(self.device) if self.device.type != "cpu" else f"cpu ({torch.get_num_threads()} threads)"

    def _contributions(self, x: np.ndarray, flags: np.ndarray) -> np.ndarray | None:
        """Each feature's contribution to the fraud log-odds (n, f) for the flagged rows, NaN elsewhere."""
        if self._classifier is None:
            return None
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


def score_frame(scorer: BatchScorer, frame: pd.DataFrame, chunk_rows: int = 262_144) -> ScoreBatch:
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
