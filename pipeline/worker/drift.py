"""Score drift: population stability index of recent scores against the validation scores.

PSI = sum over bins of (p - q) * ln(p / q), with p the share of recent scores in a bin and
q the share of the model's normal validation scores in it. Common reading: below 0.1 stable,
0.1-0.25 moderate shift, above 0.25 a real shift. Recent means exponentially decayed counts
with a half-life in transactions, so the gauge follows the stream without a window buffer.

>>> import numpy as np
>>> d = ScoreDrift(np.array([0.0, 1.0, 2.0, 4.0]), np.array([50, 30, 20]), half_life=1000)
>>> round(d.update(np.array([0.5] * 50 + [1.5] * 30 + [3.0] * 20)), 6)
0.0
>>> d.update(np.array([3.0] * 5000)) > 0.25
True
"""

from __future__ import annotations

from typing import Any

import numpy as np

_EPS = 1e-4


class ScoreDrift:
    """Decayed histogram of recent scores over the reference bins, and its PSI."""

    def __init__(self, edges: np.ndarray, reference_counts: np.ndarray, half_life: float = 20_000) -> None:
        if len(edges) != len(reference_counts) + 1 or len(reference_counts) == 0:
            raise ValueError("edges must have one more entry than reference_counts")
        self.edges = np.asarray(edges, dtype=np.float64)
        ref = np.asarray(reference_counts, dtype=np.float64)
        self.reference = np.clip(ref / max(ref.sum(), 1.0), _EPS, None)
        self.half_life = half_life
        self.recent = np.zeros_like(self.reference)

    @classmethod
    def from_artifact(cls, artifact: Any) -> ScoreDrift:
        hist = artifact.score_histogram
        return cls(hist.edges, hist.counts)

    def update(self, scores: np.ndarray) -> float:
        """Fold a batch of scores in and return the current PSI."""
        # Scores beyond the outer edges count in the outer bins.
        index = np.clip(np.searchsorted(self.edges, scores, side="right") - 1, 0, len(self.reference) - 1)
        self.recent *= 0.5 ** (len(scores) / self.half_life)
        self.recent += np.bincount(index, minlength=len(self.reference))
        return self.psi()

    def psi(self) -> float:
        total = self.recent.sum()
        if total == 0:
            return 0.0
        p = np.clip(self.recent / total, _EPS, None)
        return float(np.sum((p - self.reference) * np.log(p / self.reference)))
