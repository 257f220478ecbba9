"""``FederatedProgressBar``: Lightning's progress bar with the client id shown as an int."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class FederatedProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` that shows ``client`` (the client training now) as ``client=7``, not ``client=7.000``:
    ``LightningModule.log`` stores every value as a float, so the bar is where it becomes an id again."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        if "client" in metrics:
            metrics["client"] = int(metrics["client"])
        return metrics
