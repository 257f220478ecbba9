"""Tasks beyond classification: each is a ``FloralModule`` that overrides the loss and the metrics."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .module import FloralModule


class RegressionModule(FloralModule):
    """Mean-squared-error regression (the synthetic tasks); reports per-client test MSE."""

    higher_is_better = frozenset()

    def compute_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(outputs, targets)

    def compute_metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mse": (outputs - targets).pow(2).flatten(1).mean(1)}
