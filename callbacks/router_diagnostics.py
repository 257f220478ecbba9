"""Per-round measurements of the learned router (issue 12): why it lags the oracle.

``RouterDiagnostics`` records, at the end of every round:

* ``router/grad_norm``: the mean over the round's local steps of the L2 norm of the loss gradient with
  respect to the router logits (only the active client's row is non-zero). Zero means the loss does not
  depend on the mixture: the adaptors are identical.
* ``router/adaptor_spread``: for every adapted layer, the mean over adaptor pairs c < c' of the Frobenius
  distance between the adaptors' changes to the layer's weights and bias (``delta_weight`` of the one-hot
  mixtures e_c and e_c'); the mean over layers, and per layer ``router/adaptor_spread/<layer>``.
* ``router/ari``: the adjusted Rand index of the clients' argmax adaptor against the true clusters (when the
  data module knows them).

Values go to the trainer's loggers with the rounds completed as step (as ``RunReport``'s evaluations), and
to ``history`` (a list of dicts, one per round); with ``path`` set, the history is also written there as
JSON after every round.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from floral_lightning.metrics import adjusted_rand_index

from .run_report import completed_rounds

__all__ = ["RouterDiagnostics", "adaptor_spread"]


@torch.no_grad()
def adaptor_spread(layer) -> float:
    """Mean pairwise Frobenius distance between the C adaptors of one layer (their weight and bias changes)."""
    eye = torch.eye(layer.num_adaptors, dtype=next(layer.parameters()).dtype, device=next(layer.parameters()).device)
    deltas = []
    for c in range(layer.num_adaptors):
        dw, db = layer.delta_weight(eye[c])
        deltas.append(torch.cat([dw.flatten(), db.flatten() if db is not None else dw.new_zeros(0)]))
    pairs = list(itertools.combinations(range(len(deltas)), 2))
    if not pairs:
        return 0.0
    return sum(float((deltas[i] - deltas[j]).norm()) for i, j in pairs) / len(pairs)


class RouterDiagnostics(Callback):
    """Logs the router gradient norm, the adaptors' spread and the routing ARI every round (see the module).

    Args:
        path: a JSON file that receives the whole history after every round (``None``: keep it in memory only).
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.history: list[dict[str, float]] = []
        self._grad_sum = 0.0
        self._grad_steps = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._grad_sum, self._grad_steps = 0.0, 0

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        router = getattr(pl_module.model, "router", None)
        if router is None or router.logits.grad is None:
            return
        self._grad_sum += float(router.logits.grad.norm())
        self._grad_steps += 1

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        router = getattr(pl_module.model, "router", None)
        if router is None:
            return
        round_idx = completed_rounds(trainer)  # the step RunReport gives the evaluation after this round
        row: dict[str, float] = {
            "round": float(round_idx),
            "router/grad_norm": self._grad_sum / self._grad_steps if self._grad_steps else math.nan,
        }
        spreads = {name: adaptor_spread(layer) for name, layer in pl_module.model.floral_layers().items()}
        row["router/adaptor_spread"] = sum(spreads.values()) / len(spreads) if spreads else math.nan
        row.update({f"router/adaptor_spread/{name}": value for name, value in spreads.items()})
        clusters = getattr(trainer.datamodule, "clusters", None)
        if clusters is not None:
            row["router/ari"] = adjusted_rand_index(clusters, router.logits.detach().argmax(dim=1).cpu())
        self.history.append(row)
        for logger in trainer.loggers:
            logger.log_metrics({k: v for k, v in row.items() if k != "round"}, step=round_idx)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.history))
