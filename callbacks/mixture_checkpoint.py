"""``MixtureCheckpoint``: a ModelCheckpoint that also writes every client's mixture next to each checkpoint.

The mixtures are in every checkpoint already (the router is part of the model); this file is for reading
them without the model: ``epoch=9-step=200.ckpt`` gets ``epoch=9-step=200.mixtures.json`` beside it, written
atomically and removed together with its checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from .federated import FederatedCallback


def mixtures_path(checkpoint_path: str | os.PathLike) -> Path:
    """Where the mixtures of ``checkpoint_path`` are written."""
    path = Path(checkpoint_path)
    return path.with_name(path.stem + ".mixtures.json")


def mixtures_record(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
    """Every client's mixture ``softmax(theta / T)``, its logits and its true cluster (if known).

    The module must have client mixtures (``client_mixtures()`` is not ``None``)."""
    mixtures = pl_module.client_mixtures()
    logits = pl_module.model.router.logits.detach().cpu()
    clusters = getattr(trainer.datamodule, "clusters", None)
    return {
        # completed rounds, from the round loop when there is one
        "round": next((cb.round for cb in trainer.callbacks if isinstance(cb, FederatedCallback)), None),
        "global_step": trainer.global_step,
        "num_clients": mixtures.shape[0],
        "num_adaptors": mixtures.shape[1],
        "clients": [
            {
                "client_id": k,
                "mixture": mixtures[k].tolist(),
                "logits": logits[k].tolist(),
                "cluster": None if clusters is None else int(clusters[k]),
            }
            for k in range(mixtures.shape[0])
        ],
    }


def write_json_atomic(record: dict[str, Any], path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class MixtureCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` (all its options apply) that writes ``<checkpoint>.mixtures.json`` beside each file."""

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if not trainer.is_global_zero:
            return
        if trainer.lightning_module.client_mixtures() is None:  # e.g. FedAvg: a plain checkpoint
            rank_zero_info("MixtureCheckpoint: the model has no client mixtures; writing checkpoints only")
            return
        write_json_atomic(mixtures_record(trainer, trainer.lightning_module), mixtures_path(filepath))

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        if trainer.is_global_zero:
            mixtures_path(filepath).unlink(missing_ok=True)
