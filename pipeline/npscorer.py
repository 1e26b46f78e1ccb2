"""Scoring on the CPU without PyTorch: the same forward pass as ``pipeline.models`` in NumPy.

PyTorch takes 2.5-5 s to import on a small machine, most of a worker's start-up, and a third of
its memory; the models are small dense networks (15-64-32-6-32-64-15 by default), which NumPy's
matrix products score as fast. So the worker serves a version on the CPU with ``NumpyScorer``
wherever it can (``serve``): reconstruction and hybrid versions of every model type, with the
ReLU, ELU or tanh activations. PyTorch, imported only then, serves CUDA, versions with a fraud
classifier (their explanations are integrated gradients) and GELU (NumPy has no erf).
``tests/unit/test_npscorer.py`` holds both engines to the same scores on hostile inputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from pipeline.artifact import ModelArtifact
from pipeline.cpus import available_cpus
from pipeline.errors import ConfigError
from pipeline.layout import BLOCK_ENTRIES, ModelConfig
from pipeline.scores import BatchScorer

# Where the kernel driver of a GPU that PyTorch could use shows itself: without one, CUDA (or ROCm)
# is never available, so ``auto`` means the CPU without asking PyTorch.
GPU_DRIVER_FILES = ("/proc/driver/nvidia/version", "/dev/kfd")
NUMPY_ACTIVATIONS = ("relu", "elu", "tanh")


def numpy_refusal(artifact: ModelArtifact) -> str | None:
    """Why ``NumpyScorer`` cannot score this version, or None when it can."""
    activation = ModelConfig.from_dict(artifact.manifest["hyperparameters"]).activation
    if artifact.classifier is not None:
        return "its fraud classifier's explanations need PyTorch's gradients"
    if activation not in NUMPY_ACTIVATIONS:
        return f"its {activation} activation is not built in NumPy"
    return None


def gpu_driver_present(files: tuple[str, ...] = GPU_DRIVER_FILES) -> bool:
    """Whether this machine has a GPU driver that PyTorch might use."""
    return any(Path(f).exists() for f in files)


def serve(artifact: ModelArtifact, device: str = "auto", max_batch: int = 65536,
          threads: int | None = None) -> BatchScorer:
    """The scorer for ``device``: NumPy on the CPU where it can score this version (``cpu``, or
    ``auto`` on a machine without a GPU driver), else PyTorch's ``Scorer``, imported here."""
    on_cpu = device == "cpu" or (device == "auto" and not gpu_driver_present())
    if on_cpu and numpy_refusal(artifact) is None:
        return NumpyScorer(artifact, max_batch=max_batch, threads=threads)
    from pipeline.scoring import Scorer

    return Scorer(artifact, device=device, max_batch=max_batch, threads=threads)


def _activation(name: str, x: np.ndarray) -> np.ndarray:
    """PyTorch's ReLU, ELU (alpha 1) or tanh, in place where it can be; NaN stays NaN."""
    if name == "relu":
        return np.maximum(x, 0, out=x)
    if name == "elu":  # max(x, 0) + exp(min(x, 0)) - 1: PyTorch's exp - 1 (NumPy's float32 expm1 is 8x slower)
        negative = np.minimum(x, 0)
        np.exp(negative, out=negative)
        negative -= 1
        np.maximum(x, 0, out=x)
        x += negative
        return x
    return np.tanh(x, out=x)


class _Dense:
    """Linear layers with an activation between them (not after the last), as ``models._stack`` builds them."""

    def __init__(self, weights: dict[str, np.ndarray], prefix: str, activation: str) -> None:
        self.layers: list[tuple[np.ndarray, np.ndarray]] = []
        i = 0
        while f"{prefix}.{i}.weight" in weights:
            w = weights[f"{prefix}.{i}.weight"].astype(np.float32)
            self.layers.append((np.ascontiguousarray(w.T), weights[f"{prefix}.{i}.bias"].astype(np.float32)))
            i += 2
        self.activation = activation

    def __call__(self, x: np.ndarray) -> np.ndarray:
        for i, (w_t, b) in enumerate(self.layers):
            x = x @ w_t  # (rows, out): a fresh array, so the in-place steps below touch no caller's data
            x += b
            if i < len(self.layers) - 1:
                x = _activation(self.activation, x)
        return x


class NumpyScorer(BatchScorer):
    """Scores raw feature rows with a loaded artifact on the CPU, in NumPy (see the module docstring)."""

    engine = "numpy"

    def __init__(self, artifact: ModelArtifact, max_batch: int = 65536, threads: int | None = None) -> None:
        """``threads`` sets the (process-wide) threads of NumPy's BLAS; by default it only lowers them to
        the CPUs this process may use. Two BLAS threads beside a busy Kafka client on two cores made the
        forward pass 9x slower here, so the worker passes one fewer than its CPUs."""
        if max_batch < 1:
            raise ConfigError(f"max_batch={max_batch} must be >= 1")
        refusal = numpy_refusal(artifact)
        if refusal is not None:
            raise ConfigError(f"model {artifact.version} cannot be scored without PyTorch: {refusal}")
        self.artifact = artifact
        self.max_batch = max_batch
        self.threads = min(threads or available_cpus(), available_cpus())
        threadpool_limits(limits=self.threads, user_api="blas")
        config = ModelConfig.from_dict(artifact.manifest["hyperparameters"])
        self._activation = config.activation
        self._encoder = _Dense(artifact.weights, "encoder", config.activation)
        self._decoder = _Dense(artifact.weights, "decoder", config.activation)
        self._memory = None  # memae: (slots, bottleneck) and its rows normalised
        self._shrink = config.shrink_threshold
        if artifact.model_class == "memae":
            memory = artifact.weights["memory"].astype(np.float32)
            self._memory = (memory, memory / np.maximum(np.linalg.norm(memory, axis=1, keepdims=True), 1e-12))
        self._bank = None  # hybrid: (bank rows, f) as the distance sees them, and their squared norms
        if artifact.bank_rows is not None:
            bank = artifact.scoring.distance_space(artifact.bank_rows.astype(np.float32))
            self._bank = (bank, np.square(bank).sum(axis=1))

    @property
    def where(self) -> str:
        """Always the CPU."""
        return f"cpu (NumPy, {self.threads} threads)"

    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        """The model's reconstruction (m, f) of standardized rows x (m, f)."""
        code = _activation(self._activation, self._encoder(x))  # (m, bottleneck)
        if self._memory is not None:
            code = self._address(code) @ self._memory[0]
        return self._decoder(code)

    def _address(self, z: np.ndarray) -> np.ndarray:
        """MemAE's sparse addressing weights (m, slots), as ``models.MemAE.address``."""
        z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
        similarity = z @ self._memory[1].T  # (m, slots)
        w = np.exp(similarity - similarity.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        lam = np.float32(self._shrink)
        shrunk = np.maximum(w - lam, 0) * w / (np.abs(w - lam) + np.float32(1e-12))
        total = shrunk.sum(axis=1, keepdims=True)
        return np.where(total > 0, shrunk / np.maximum(total, np.float32(1e-12)), w)

    def _distance(self, x: np.ndarray) -> np.ndarray:
        """Mean Euclidean distance (m,) of each row to its k nearest bank rows, as ``neighbours.knn_distance``."""
        bank, bank_sq = self._bank
        x = self.artifact.scoring.distance_space(x)
        k = min(self.artifact.scoring.k, len(bank))
        rows = max(1, BLOCK_ENTRIES // len(bank))
        out = np.empty(len(x), np.float32)
        for start in range(0, len(x), rows):
            block = x[start : start + rows]
            sq = block @ bank.T  # (rows, bank rows): |b|² - 2 x·b, which orders the bank as |x - b|² does
            sq *= -2
            sq += bank_sq
            nearest = np.argpartition(sq, k - 1, axis=1)[:, :k]  # (rows, k), in no order
            out[start : start + rows] = np.linalg.norm(block[:, None, :] - bank[nearest], axis=2).mean(axis=1)
        return out

    def _score_chunk(self, chunk: np.ndarray, out: np.ndarray) -> None:
        f = chunk.shape[1]
        with np.errstate(over="ignore", invalid="ignore"):  # out-of-range rows score inf or NaN, as on PyTorch
            recon = self.reconstruct(chunk)
            errors = np.square(recon - chunk, out=out[:, :f])
            out[:, f : 2 * f] = recon
            distance = None if self._bank is None else self._distance(chunk)
            out[:, 2 * f] = self.artifact.scoring.combine(errors.mean(axis=1), distance)
