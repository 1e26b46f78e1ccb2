"""Autoencoders that score a transaction by how badly they reconstruct it.

Pure ``nn.Module``s and their config: no file, network or device work here. A model maps
standardized features ``(batch, features)`` to their reconstruction of the same shape; the
anomaly score is the mean squared reconstruction error, so higher = more anomalous. Models
are trained on normal transactions only, so frauds, unlike anything seen, reconstruct badly.

>>> model = build_model("memae", ModelConfig(n_features=15))
>>> model(torch.zeros(4, 15)).shape
torch.Size([4, 15])
"""

from __future__ import annotations

import itertools
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.layout import ModelConfig, default_bottleneck

__all__ = ["DEFAULT_MODEL", "MODELS", "Autoencoder", "DenoisingAutoencoder", "MemAE", "ModelConfig",
           "build_model", "default_bottleneck"]


_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "elu": nn.ELU, "tanh": nn.Tanh, "gelu": nn.GELU}


def _stack(widths: list[int], activation: str) -> nn.Sequential:
    """Linear layers through ``widths``, an activation after every layer but the last."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation {activation!r}: use one of {', '.join(_ACTIVATIONS)}")
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(widths) - 2:
            layers.append(_ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class Autoencoder(nn.Module):
    """Symmetric stacked dense autoencoder with a narrow bottleneck (the default model)."""

    name: ClassVar[str] = "autoencoder"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        widths = [config.n_features, *config.hidden, config.bottleneck]
        self.encoder = _stack(widths, config.activation)
        self.decoder = _stack(widths[::-1], config.activation)
        # The code goes through the activation before the decoder; the output is linear.
        self.code_activation = _ACTIVATIONS[config.activation]()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, features) -> (batch, bottleneck)."""
        return self.code_activation(self.encoder(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, features) -> reconstruction (batch, features)."""
        return self.decoder(self.encode(x))

    def training_loss(self, x: torch.Tensor) -> torch.Tensor:
        """Scalar loss for one mini-batch of clean standardized inputs (batch, features)."""
        return F.mse_loss(self(x), x)


class DenoisingAutoencoder(Autoencoder):
    """Autoencoder trained to rebuild clean inputs from noisy ones (noise in training mode only)."""

    name: ClassVar[str] = "denoising"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, features) -> reconstruction; adds N(0, noise_std²) to the input while training."""
        if self.training and self.config.noise_std > 0:
            x = x + torch.randn_like(x) * self.config.noise_std  # (batch, features)
        return self.decoder(self.encode(x))

    # training_loss (inherited) compares with the clean x: the target is never noisy.


class MemAE(Autoencoder):
    """Memory-augmented autoencoder (Gong et al., ICCV 2019).

    The code is replaced by a sparse convex combination of N learned memory slots, so even
    anomalies are rebuilt from normal prototypes and reconstruct badly.
    """

    name: ClassVar[str] = "memae"

    def __init__(self, config: ModelConfig) -> None:
        config.check(self.name)  # the shrink threshold in [1/N, 3/N], as the artifact loader checks it
        super().__init__(config)
        self.memory = nn.Parameter(torch.empty(config.memory_slots, config.bottleneck))  # (slots, bottleneck)
        nn.init.kaiming_uniform_(self.memory)

    def address(self, z: torch.Tensor) -> torch.Tensor:
        """Sparse addressing weights (batch, slots) for codes z (batch, bottleneck)."""
        similarity = F.normalize(z, dim=1) @ F.normalize(self.memory, dim=1).T  # (batch, slots)
        w = torch.softmax(similarity, dim=1)
        lam = self.config.shrink_threshold
        shrunk = F.relu(w - lam) * w / (torch.abs(w - lam) + 1e-12)  # hard shrinkage, differentiable
        total = shrunk.sum(dim=1, keepdim=True)  # (batch, 1)
        # L1 re-normalisation; a row whose weights all fell below λ keeps its dense softmax weights.
        return torch.where(total > 0, shrunk / total.clamp_min(1e-12), w)

    def forward_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction (batch, features) and addressing weights (batch, slots)."""
        w = self.address(self.encode(x))
        z_hat = w @ self.memory  # (batch, bottleneck)
        return self.decoder(z_hat), w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, features) -> reconstruction (batch, features)."""
        return self.forward_parts(x)[0]

    def training_loss(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction MSE plus entropy_weight × mean addressing entropy."""
        recon, w = self.forward_parts(x)
        entropy = (-w * torch.log(w + 1e-12)).sum(dim=1).mean()
        return F.mse_loss(recon, x) + self.config.entropy_weight * entropy


MODELS: dict[str, type[Autoencoder]] = {cls.name: cls for cls in (Autoencoder, DenoisingAutoencoder, MemAE)}
DEFAULT_MODEL = "autoencoder"


def build_model(name: str, config: ModelConfig) -> Autoencoder:
    """A fresh model of registry type ``name``; ValueError names the known types."""
    try:
        cls = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model type {name!r}; known: {', '.join(MODELS)}") from None
    return cls(config)
