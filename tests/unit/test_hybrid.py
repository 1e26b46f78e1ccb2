"""Hybrid scoring: the distance part, the bank, and the validation-only choice of ``--score auto``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline.neighbours import ScoreSpec, knn_distance
from trainer import hybrid
from trainer.hybrid import ScoreParts, build_bank, choose

# Standardized (and, for the hybrid, clipped) values. The nearest rows are picked from float32
# squared distances; among rows tied to within rounding either may be picked, hence the tolerance.
finite = st.floats(-10, 10, allow_nan=False, width=32)


@settings(max_examples=40, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 30), st.just(3)), elements=finite),
       arrays(np.float32, st.tuples(st.integers(1, 20), st.just(3)), elements=finite),
       st.integers(1, 7))
def test_knn_distance_is_the_brute_force_mean_of_the_k_smallest(x: np.ndarray, bank: np.ndarray, k: int) -> None:
    expected = np.sort(np.linalg.norm(x[:, None, :].astype(np.float64) - bank[None, :, :], axis=2), axis=1)
    expected = expected[:, : min(k, len(bank))].mean(axis=1)
    got = knn_distance(torch.from_numpy(x), torch.from_numpy(bank), k).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)


def test_identical_rows_are_at_distance_zero() -> None:
    x = torch.full((4, 3), 8.851978)
    assert knn_distance(x, x.clone(), 2).tolist() == [0.0] * 4


def test_knn_distance_in_blocks_equals_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    x, bank = torch.from_numpy(rng.normal(size=(50, 4))), torch.from_numpy(rng.normal(size=(30, 4)))
    whole = knn_distance(x, bank, 5)
    monkeypatch.setattr("pipeline.neighbours.BLOCK_ENTRIES", 60)  # two query rows per block
    torch.testing.assert_close(knn_distance(x, bank, 5), whole)


def test_bank_is_every_row_or_a_seeded_sample_in_order() -> None:
    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    np.testing.assert_array_equal(build_bank(x, x[:0], rows=50).rows, x)
    sample = build_bank(x, x[:0], rows=5, seed=3).rows
    assert sample.shape == (5, 2) and np.all(np.diff(sample[:, 0]) > 0)
    np.testing.assert_array_equal(sample, build_bank(x, x[:0], rows=5, seed=3).rows)


def _parts(mse: list[float], distance: list[float], unclipped: list[float] | None = None) -> ScoreParts:
    distances = {"hybrid": np.array(distance, np.float32)}
    if unclipped is not None:
        distances["hybrid-unclipped"] = np.array(unclipped, np.float32)
    return ScoreParts(np.repeat(np.array(mse, np.float32)[:, None], 2, axis=1), distances)


def test_auto_keeps_the_candidate_with_the_highest_validation_ap() -> None:
    normal = _parts([1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [2.0, 4.0, 6.0])  # stds sqrt(2/3) and 2 sqrt(2/3)
    labels = np.array([0, 0, 0, 1])
    # The reconstruction error misses the fraud, the clipped distance finds it.
    rows = _parts([1.0, 2.0, 3.0, 1.5], [1.0, 1.0, 1.0, 30.0], [1.0, 1.0, 40.0, 2.0])
    choice = choose("auto", normal, rows, labels)
    assert choice.name == "hybrid" and choice.validation_ap["hybrid"] == 1.0
    assert set(choice.validation_ap) == {"reconstruction", "hybrid", "hybrid-unclipped"}
    spec = choice.spec
    assert spec.reconstruction_scale == pytest.approx(np.sqrt(2 / 3), rel=1e-6)
    assert spec.distance_scale == pytest.approx(2 * np.sqrt(2 / 3), rel=1e-6)
    assert (spec.distance_weight, spec.clip) == (hybrid.DISTANCE_WEIGHT, hybrid.CLIP)
    np.testing.assert_allclose(choice.scores(rows), spec.combine(rows.mse, rows.distances["hybrid"]))
    # Only the unclipped distance finds it.
    rows = _parts([1.0, 2.0, 3.0, 1.5], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 40.0])
    choice = choose("auto", normal, rows, labels)
    assert choice.name == "hybrid-unclipped" and choice.spec.clip is None
    # The reconstruction error finds it alone, the distances only add noise.
    rows = _parts([1.0, 1.1, 1.2, 9.0], [1.0, 50.0, 1.0, 1.0], [1.0, 50.0, 1.0, 1.0])
    choice = choose("auto", normal, rows, labels)
    assert choice.spec == ScoreSpec() and choice.validation_ap["reconstruction"] == 1.0


def test_auto_without_labelled_frauds_takes_the_hybrid_and_explicit_choices_are_kept() -> None:
    normal = _parts([1.0, 3.0], [2.0, 2.0])
    assert choose("auto", normal, None, None).name == "hybrid"
    assert choose("auto", normal, normal, np.array([0, 0])).name == "hybrid"
    assert choose("reconstruction", normal, None, None).spec == ScoreSpec()
    spec = choose("hybrid", normal, None, None).spec
    # std 1.0 for the error; 0 for the constant distance, which falls back to 1.0
    assert (spec.method, spec.k, spec.reconstruction_scale, spec.distance_scale) == ("hybrid", hybrid.DEFAULT_K,
                                                                                      1.0, 1.0)


def test_score_spec_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="scoring method 'vote'"):
        ScoreSpec("vote")
    with pytest.raises(ValueError, match="positive"):
        ScoreSpec("hybrid", k=5, reconstruction_scale=0.0)
    with pytest.raises(ValueError, match="positive"):
        ScoreSpec("hybrid", k=5, clip=-1.0)
    spec = ScoreSpec("hybrid", 3, 2.0, 4.0, distance_weight=2.0, clip=3.0)
    assert ScoreSpec.from_dict(spec.to_dict()) == spec
    old = {"method": "hybrid", "k": 3, "reconstruction_scale": 2.0, "distance_scale": 4.0}  # no weight, no clip
    assert ScoreSpec.from_dict(old) == ScoreSpec("hybrid", 3, 2.0, 4.0)
    x = torch.tensor([[-7.0, 0.5, float("nan")]])
    assert spec.distance_space(x).tolist() == [[-3.0, 0.5, 0.0]]
    unclipped = ScoreSpec("hybrid", 1, clip=None)
    huge = unclipped.distance_space(torch.tensor([[float("inf"), 1e30, 0.0]]))
    far = knn_distance(huge, torch.zeros(4, 3), 1)
    assert torch.isfinite(far).all() and far.item() > 1e14  # an overflowing input is far, not NaN


def test_rows_in_the_bank_are_scored_leave_one_out() -> None:
    bank = torch.tensor([[0.0], [1.0], [3.0], [10.0]])
    x = torch.tensor([[1.0], [1.0]])
    plain = knn_distance(x, bank, 2)
    loo = knn_distance(x, bank, 2, in_bank=torch.tensor([False, True]))
    assert plain.tolist() == [0.5, 0.5]  # itself (0) and 0.0 (1)
    assert loo.tolist() == [0.5, 1.5]  # the second row is bank row 1: its own zero is left out -> 1 and 2


def test_bank_holds_training_and_validation_rows_and_knows_which() -> None:
    train, val = np.zeros((6, 2), np.float32), np.ones((4, 2), np.float32)
    bank = hybrid.build_bank(train, val, rows=100)
    assert bank.rows.shape == (10, 2) and bank.val_in_bank.tolist() == [True] * 4
    sampled = hybrid.build_bank(train, val, rows=5, seed=1)
    assert len(sampled.rows) == 5 and sampled.rows.sum() == sampled.val_in_bank.sum() * 2
