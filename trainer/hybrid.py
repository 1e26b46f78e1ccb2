"""How a new version scores: the reconstruction error alone or a hybrid, chosen on validation rows.

A hybrid adds ``DISTANCE_WEIGHT`` times the mean distance to the k nearest normal rows (a bank of
at most ``BANK_ROWS`` training and validation rows, standardized; ``fit --bank-rows``) to the reconstruction error,
each divided by its standard deviation on the normal validation rows. ``hybrid`` measures the
distance between rows clipped to ±``CLIP`` (one heavy-tailed column cannot swamp it);
``hybrid-unclipped`` between the rows as they are. ``auto`` keeps, of the reconstruction error
and both hybrids, the one with the highest average precision on labelled validation rows;
without labelled frauds there it takes ``hybrid``, which ranks best on ADBench's twelve
development tables (docs/model-quality.md).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import average_precision_score

from pipeline.models import Autoencoder
from pipeline.neighbours import ScoreSpec, knn_distance
from trainer.calibrate import feature_errors

log = logging.getLogger(__name__)

SCORE_CHOICES = ("auto", "hybrid", "reconstruction")
DEFAULT_K = 5
BANK_ROWS = 2048  # bounds the serving cost: one (batch x bank) distance block per micro-batch
DISTANCE_WEIGHT = 2.0
CLIP = 3.0
HYBRIDS = {"hybrid": CLIP, "hybrid-unclipped": None}  # candidate name -> clip


@dataclass(frozen=True)
class ScoreParts:
    """Per-row parts of the score of some rows: squared errors, and distances per hybrid candidate."""

    errors: np.ndarray  # (rows, features) squared reconstruction error, standardized space
    distances: dict[str, np.ndarray]  # candidate name -> (rows,) mean distance to the k nearest bank rows

    @property
    def mse(self) -> np.ndarray:
        """Mean squared reconstruction error per row (rows,)."""
        return self.errors.mean(axis=1)


@dataclass(frozen=True)
class Bank:
    """The normal rows the distance is measured to, and which normal validation rows are among them."""

    rows: np.ndarray  # (bank rows, features) float32, standardized (clipped when scoring, as the spec says)
    val_in_bank: np.ndarray  # (normal validation rows,) bool


def build_bank(train_x: np.ndarray, val_normal_x: np.ndarray, rows: int = BANK_ROWS, seed: int = 0) -> Bank:
    """The bank: the normal training and validation rows (standardized), all or a seeded sample in order.

    Validation rows in the bank are scored leave-one-out (``score_parts``), so the threshold and
    the scales still come from distances the bank did not make small by containing the row.
    """
    pool = np.concatenate([train_x, val_normal_x]).astype(np.float32)
    keep = np.arange(len(pool))
    if len(pool) > rows:
        keep = np.sort(np.random.default_rng(seed).choice(len(pool), rows, replace=False))
    member = np.zeros(len(pool), bool)
    member[keep] = True
    return Bank(np.ascontiguousarray(pool[keep]), member[len(train_x):])


def unscaled(name: str, k: int = DEFAULT_K) -> ScoreSpec:
    """A hybrid candidate before its scales are known."""
    return ScoreSpec("hybrid", k, distance_weight=DISTANCE_WEIGHT, clip=HYBRIDS[name])


def score_parts(model: Autoencoder, x: np.ndarray, bank: np.ndarray | None, device: torch.device,
                candidates: tuple[str, ...] = (), k: int = DEFAULT_K, in_bank: np.ndarray | None = None
                ) -> ScoreParts:
    """Reconstruction errors of standardized rows x (rows, features) and each candidate's distances
    to the bank (leave-one-out for the rows marked ``in_bank``)."""
    errors = feature_errors(model, x, device)
    distances = {}
    with torch.inference_mode():
        query = torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(device)
        own = None if in_bank is None else torch.from_numpy(in_bank).to(device)
        for name in candidates if bank is not None else ():
            space = unscaled(name, k).distance_space
            found = knn_distance(space(query), space(torch.from_numpy(bank).to(device)), k, own)
            distances[name] = found.cpu().numpy()
    return ScoreParts(errors, distances)


def candidates_for(option: str, labelled: bool) -> tuple[str, ...]:
    """The hybrid candidates whose distances the choice needs."""
    if option == "reconstruction":
        return ()
    return tuple(HYBRIDS) if option == "auto" and labelled else ("hybrid",)


def scaled(name: str, normal: ScoreParts, k: int = DEFAULT_K) -> ScoreSpec:
    """A hybrid candidate with its scales: each part's standard deviation on normal validation rows."""
    return dataclasses.replace(unscaled(name, k), reconstruction_scale=_positive(float(normal.mse.std())),
                               distance_scale=_positive(float(normal.distances[name].std())))


def _positive(scale: float) -> float:
    return scale if np.isfinite(scale) and scale > 1e-12 else 1.0


@dataclass(frozen=True)
class Choice:
    """The candidate a new version scores with, and what the choice rested on."""

    name: str  # "reconstruction" or a HYBRIDS key
    spec: ScoreSpec
    validation_ap: dict[str, float]  # auto on labelled validation rows: each candidate's average precision

    def scores(self, parts: ScoreParts) -> np.ndarray:
        """The chosen score of rows (rows,) from their parts."""
        return self.spec.combine(parts.mse, parts.distances.get(self.name))


def choose(option: str, normal: ScoreParts, rows: ScoreParts | None, labels: np.ndarray | None,
           k: int = DEFAULT_K) -> Choice:
    """The scoring of the new version: as asked, or for ``auto`` the candidate with the highest
    average precision on labelled validation rows (``hybrid`` when there are none)."""
    if option == "reconstruction":
        return Choice("reconstruction", ScoreSpec(), {})
    if option == "hybrid" or rows is None or labels is None or not 0 < int(labels.sum()) < len(labels):
        if option == "auto":
            log.info("scoring: hybrid (auto; no labelled frauds among the validation rows to choose by)")
        return Choice("hybrid", scaled("hybrid", normal, k), {})
    specs = {"reconstruction": ScoreSpec(), **{name: scaled(name, normal, k) for name in normal.distances}}
    ap = {name: float(average_precision_score(labels, spec.combine(rows.mse, rows.distances.get(name))))
          for name, spec in specs.items()}
    best = max(ap, key=lambda name: ap[name])
    log.info("scoring: %s (auto; validation average precision %s)", best,
             ", ".join(f"{name} {value:.3f}" for name, value in ap.items()))
    return Choice(best, specs[best], ap)
