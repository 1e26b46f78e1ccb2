"""Distance to the nearest normal training rows, and how a model version combines it with the
reconstruction error into one anomaly score (higher = more anomalous).

Pure tensor code (CPU or CUDA), shared by the trainer (calibration) and ``Scorer`` (serving),
so the two can never combine the parts differently.

>>> bank = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
>>> knn_distance(torch.tensor([[0.0, 0.0], [6.0, 8.0]]), bank, k=1).tolist()
[0.0, 5.0]
"""

from __future__ import annotations

import torch

from pipeline.layout import BLOCK_ENTRIES, FAR, METHODS, ScoreSpec

__all__ = ["BLOCK_ENTRIES", "FAR", "METHODS", "ScoreSpec", "knn_distance"]


def knn_distance(x: torch.Tensor, bank: torch.Tensor, k: int, in_bank: torch.Tensor | None = None) -> torch.Tensor:
    """Mean Euclidean distance of each row of x (rows, features) to its k nearest bank rows -> (rows,).

    ``in_bank`` (rows,) bool marks rows of x that are themselves bank rows: their own (zero)
    distance is left out (leave-one-out), so they score like rows the bank has never seen.
    The nearest rows are found with one matrix product per block (|x|² - 2 x·b + |b|², the fast
    way on CPU and GPU); their distances are then computed exactly.
    """
    k = min(k, bank.shape[0])
    wanted = k if in_bank is None else min(k + 1, bank.shape[0])
    rows = max(1, BLOCK_ENTRIES // max(1, bank.shape[0]))
    bank_sq = torch.square(bank).sum(dim=1)  # (bank rows,)
    parts = []
    for start in range(0, x.shape[0], rows):
        block = x[start : start + rows]
        sq = torch.square(block).sum(dim=1, keepdim=True) - 2 * block @ bank.T + bank_sq  # (block rows, bank rows)
        nearest = torch.topk(sq, wanted, dim=1, largest=False).indices  # (block rows, wanted)
        exact = torch.linalg.vector_norm(block[:, None, :] - bank[nearest], dim=2)  # (block rows, wanted)
        exact = torch.sort(exact, dim=1).values
        if in_bank is None:
            parts.append(exact.mean(dim=1))
            continue
        skip_self = exact[:, 1 : k + 1].mean(dim=1) if exact.shape[1] > 1 else exact[:, 0]
        parts.append(torch.where(in_bank[start : start + rows], skip_self, exact[:, :k].mean(dim=1)))
    return torch.cat(parts) if parts else x.new_zeros(0)
