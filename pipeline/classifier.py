"""Fraud classifiers beside the autoencoder, for versions fitted with labels (``fit --score finetuned|stacked``).

Pure modules and tensor code, as in ``pipeline.models``: no file, network or device work. A
classifier maps standardized rows x (batch, features) and the autoencoder's reconstruction of
them to fraud logits (batch,); the version's score is the fraud probability sigmoid(logit),
so higher = more likely fraud, as for every other score.

- ``finetuned``: a copy of the trained encoder with a classification head on its code, both
  trained on labelled rows (the encoder starts from the autoencoder's weights).
- ``stacked``: a small network over the standardized features and their signed reconstruction
  residuals x - AE(x), the autoencoder frozen.

Explanations: integrated gradients of the logit along the straight path from the all-zero row
(the mean normal training row) to x: one contribution per feature, in log-odds, that sum to
logit(x) - logit(0) up to the quadrature error.

>>> from pipeline.models import ModelConfig, build_model
>>> config = ModelConfig(n_features=4, hidden=(8,), bottleneck=2)
>>> spec = ClassifierSpec("stacked", width=6)
>>> head = build_classifier(spec, config)
>>> x = torch.zeros(3, 4)
>>> fraud_logits(head, build_model("autoencoder", config), x).shape
torch.Size([3])
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from pipeline.layout import CLASSIFIER_KINDS, ClassifierSpec, ModelConfig
from pipeline.models import _ACTIVATIONS, Autoencoder, _stack

__all__ = ["ATTRIBUTION_STEPS", "CLASSIFIERS", "KINDS", "ClassifierSpec", "FineTuned", "Stacked", "attributions",
           "build_classifier", "fraud_logits"]

KINDS = CLASSIFIER_KINDS
ATTRIBUTION_STEPS = 32  # integrated-gradient steps, for flagged rows only (16 left errors of 0.1-0.4 in the sum)


class FineTuned(nn.Module):
    """The encoder's layers (fine-tuned) and a head on the code: (batch, features) -> logits (batch,)."""

    name: ClassVar[str] = "finetuned"

    def __init__(self, spec: ClassifierSpec, config: ModelConfig) -> None:
        super().__init__()
        self.spec = spec
        self.encoder = _stack([config.n_features, *config.hidden, config.bottleneck], config.activation)
        self.code_activation = _ACTIVATIONS[config.activation]()
        self.head = _stack([config.bottleneck, spec.width, 1], config.activation)

    def forward(self, x: torch.Tensor, reconstruction: torch.Tensor | None = None) -> torch.Tensor:
        """Fraud logits of standardized rows; the reconstruction is not used."""
        return self.head(self.code_activation(self.encoder(x))).squeeze(1)

    def start_from(self, autoencoder: Autoencoder) -> None:
        """Copy the trained autoencoder's encoder weights (the starting point of fine-tuning)."""
        self.encoder.load_state_dict(autoencoder.encoder.state_dict())


class Stacked(nn.Module):
    """A network over [x, x - reconstruction]: (batch, features) twice -> logits (batch,)."""

    name: ClassVar[str] = "stacked"

    def __init__(self, spec: ClassifierSpec, config: ModelConfig) -> None:
        super().__init__()
        self.spec = spec
        self.net = _stack([2 * config.n_features, spec.width, max(1, spec.width // 2), 1], config.activation)

    def forward(self, x: torch.Tensor, reconstruction: torch.Tensor | None = None) -> torch.Tensor:
        """Fraud logits of standardized rows x and their reconstruction (both (batch, features))."""
        if reconstruction is None:
            raise ValueError("the stacked classifier needs the autoencoder's reconstruction")
        return self.net(torch.cat([x, x - reconstruction], dim=1)).squeeze(1)  # (batch, 2 f) -> (batch,)

    def start_from(self, autoencoder: Autoencoder) -> None:
        """Nothing to copy: the autoencoder stays as it is and only feeds the residuals."""


CLASSIFIERS: dict[str, type[FineTuned | Stacked]] = {cls.name: cls for cls in (FineTuned, Stacked)}


def build_classifier(spec: ClassifierSpec, config: ModelConfig) -> FineTuned | Stacked:
    """A fresh classifier of ``spec.kind`` for an autoencoder with this config."""
    return CLASSIFIERS[spec.kind](spec, config)


def fraud_logits(classifier: nn.Module, autoencoder: Autoencoder, x: torch.Tensor) -> torch.Tensor:
    """Fraud logits (rows,) of standardized rows x (rows, features)."""
    return classifier(x, autoencoder(x))


def attributions(classifier: nn.Module, autoencoder: Autoencoder, x: torch.Tensor,
                 steps: int = ATTRIBUTION_STEPS) -> torch.Tensor:
    """Integrated gradients (rows, features) of the fraud logit from the all-zero row to x (midpoint rule).

    Gradients flow through the autoencoder too (the stacked classifier sees its residuals), so each
    contribution belongs to one input feature. All steps go through the networks as one batch of
    steps x rows. Works inside an inference-mode caller.
    """
    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone()  # a normal tensor even when the caller made x in inference mode
        alphas = (torch.arange(steps, dtype=x.dtype, device=x.device) + 0.5) / steps  # (steps,)
        points = (alphas[:, None, None] * x[None]).reshape(-1, x.shape[1]).requires_grad_(True)  # (steps * rows, f)
        (grad,) = torch.autograd.grad(fraud_logits(classifier, autoencoder, points).sum(), points)
        return (x * grad.reshape(steps, *x.shape).mean(dim=0)).detach()  # (rows, f)
