"""Fit an autoencoder on standardized normal rows with Adam, mini-batches and early stopping."""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from pipeline.models import Autoencoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser and stopping settings."""

    epochs: int | None = None  # most epochs; None: auto_epochs(training rows, batch size)
    batch_size: int | None = None  # None: auto_batch_size(training rows)
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    patience: int | None = None  # epochs without a validation improvement before stopping; None: auto_patience
    min_delta: float = 1e-5  # smallest validation-loss drop that counts as an improvement
    seed: int = 0
    progress: bool = True  # tqdm bar per epoch
    threads: int = 1  # CPU intra-op threads while training; small dense nets run fastest on one


# The automatic schedule: large tables (the handbook's 500k rows) get the original 512-row batches,
# 30 epochs and patience 4; small ones smaller batches, and as many epochs as it takes to run at least
# MIN_STEPS mini-batch steps, with a patience of about PATIENCE_STEPS steps.
MAX_BATCH = 512
MIN_BATCH = 32
MIN_EPOCHS = 30
MIN_STEPS = 6000
MAX_AUTO_EPOCHS = 1000
MIN_PATIENCE = 4
PATIENCE_STEPS = 300


def _steps_per_epoch(n_rows: int, batch_size: int) -> int:
    return max(1, -(-n_rows // batch_size))


def auto_batch_size(n_rows: int) -> int:
    """512 rows, or a sixteenth of a small table (at least 32).

    >>> auto_batch_size(500_000), auto_batch_size(2_000), auto_batch_size(100)
    (512, 125, 32)
    """
    return max(MIN_BATCH, min(MAX_BATCH, n_rows // 16))


def auto_epochs(n_rows: int, batch_size: int) -> int:
    """The epoch cap when none is given: 30 on large tables, more on small ones, so that training
    may run at least MIN_STEPS mini-batch steps (early stopping usually ends it sooner).

    >>> auto_epochs(500_000, 512), auto_epochs(20_000, 512), auto_epochs(2_000, 125), auto_epochs(10, 32)
    (30, 150, 375, 1000)
    """
    return max(MIN_EPOCHS, min(MAX_AUTO_EPOCHS, -(-MIN_STEPS // _steps_per_epoch(n_rows, batch_size))))


def auto_patience(n_rows: int, batch_size: int) -> int:
    """Epochs without improvement before stopping: 4, or about PATIENCE_STEPS steps on small tables.

    >>> auto_patience(500_000, 512), auto_patience(2_000, 125)
    (4, 19)
    """
    return max(MIN_PATIENCE, -(-PATIENCE_STEPS // _steps_per_epoch(n_rows, batch_size)))


def resolve_schedule(config: TrainConfig, n_rows: int) -> TrainConfig:
    """config with its automatic (None) batch size, epoch cap and patience filled in for n_rows."""
    batch_size = config.batch_size or auto_batch_size(n_rows)
    return dataclasses.replace(config, batch_size=batch_size,
                               epochs=config.epochs or auto_epochs(n_rows, batch_size),
                               patience=config.patience or auto_patience(n_rows, batch_size))


@dataclass
class History:
    """Per-epoch mean losses and the epoch whose weights were kept."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int = -1
    seconds: float = 0.0
    epoch_cap: int = 0
    config: TrainConfig | None = None  # the schedule actually used (automatic values filled in)
    stopped_early: bool = False  # False: the epoch cap ended training while the validation loss still fell


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch's global RNG (for init and noise) and return a generator for shuffling."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def validation_loss(model: Autoencoder, x: torch.Tensor, batch_size: int = 8192) -> float:
    """Mean squared reconstruction error of clean rows x (rows, features) in eval mode."""
    model.eval()
    total = 0.0
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            batch = x[start : start + batch_size]
            total += torch.square(model(batch) - batch).sum().item()
    return total / max(1, x.numel())


def _epoch(model: Autoencoder, optimiser: torch.optim.Optimizer, x: torch.Tensor, config: TrainConfig,
           generator: torch.Generator, epoch: int) -> float:
    """One pass over x in shuffled mini-batches; returns the mean training loss."""
    model.train()
    order = torch.randperm(len(x), generator=generator).to(x.device)
    losses = []
    bar = tqdm(range(0, len(x), config.batch_size), desc=f"epoch {epoch + 1}",
               unit="batch", disable=None if config.progress else True, leave=False)  # None: off when not a TTY
    for start in bar:
        batch = x[order[start : start + config.batch_size]]
        loss = model.training_loss(batch)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        if len(losses) % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    return float(np.mean(losses))


def fit(model: Autoencoder, train_x: np.ndarray, val_x: np.ndarray, config: TrainConfig,
        device: torch.device) -> History:
    """Train in place on standardized rows; the weights of the best validation epoch are kept."""
    if len(train_x) == 0 or len(val_x) == 0:
        raise ValueError("training and validation sets must both be non-empty")
    previous_threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(max(1, config.threads))
    try:
        return _fit(model, train_x, val_x, config, device)
    finally:
        torch.set_num_threads(previous_threads)


def _fit(model: Autoencoder, train_x: np.ndarray, val_x: np.ndarray, config: TrainConfig,
         device: torch.device) -> History:
    generator = seed_everything(config.seed)
    model.to(device)
    train_t = torch.from_numpy(np.ascontiguousarray(train_x, dtype=np.float32)).to(device)
    val_t = torch.from_numpy(np.ascontiguousarray(val_x, dtype=np.float32)).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    config = resolve_schedule(config, len(train_x))
    cap = config.epochs
    history, best_state, best_val, waited = History(epoch_cap=cap, config=config), None, np.inf, 0
    started = time.perf_counter()
    for epoch in range(cap):
        history.train_loss.append(_epoch(model, optimiser, train_t, config, generator, epoch))
        history.val_loss.append(validation_loss(model, val_t))
        log.info("epoch %d: train %.5f val %.5f", epoch + 1, history.train_loss[-1], history.val_loss[-1])
        if history.val_loss[-1] < best_val - config.min_delta:
            best_state, best_val, waited = copy.deepcopy(model.state_dict()), history.val_loss[-1], 0
            history.best_epoch = epoch
        else:
            waited += 1
            if waited >= config.patience:
                history.stopped_early = True
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    history.seconds = time.perf_counter() - started
    if not history.stopped_early:
        log.warning("training stopped at the epoch cap (%d) with the validation loss still improving "
                    "(best epoch %d, %.5g); a larger --epochs may fit better", cap, history.best_epoch + 1, best_val)
    return history
