"""``MixtureCheckpoint``: a ModelCheckpoint that also writes every client's mixture next to each checkpoint.

The mixtures are in every checkpoint already (the router is part of the model); this file is for reading
them without the model: ``epoch=9-step=200.ckpt`` gets ``epoch=9-step=200.mixtures.json`` beside it, written
atomically and removed together with its checkpoint.

The two files of a pair cannot be replaced in one atomic step, so both carry the round and global step, and
the mixtures are written first: a crash between the two writes leaves a mixtures file one save ahead of its
checkpoint, never behind it. :func:`read_mixtures` checks the stamps and refuses a mismatched pair, and a run
resumed from a checkpoint rewrites that checkpoint's mixtures file from the checkpoint itself before training,
so a resume never pairs a checkpoint with another round's mixtures. Temporary files of a crashed write
(``*.tmp`` beside the checkpoints) are removed when a run starts.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from .federated import FederatedCallback

TMP_SUFFIX = ".tmp"


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
    """Write strict JSON to a temporary sibling, then rename: a crash never leaves half a file.

    The file gets the mode any new file gets (``0666`` less the umask, as the checkpoint); a non-finite number
    is refused with the path named (strict JSON has no NaN)."""
    try:
        text = json.dumps(record, allow_nan=False)
    except ValueError as err:
        clients = [c["client_id"] for c in record.get("clients", []) if not all(map(math.isfinite, c["mixture"]))]
        raise ValueError(f"refusing to write {path}: non-finite mixtures of clients {clients[:10]} ({err})") from err
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_mixtures(checkpoint_path: str | os.PathLike) -> dict[str, Any]:
    """The mixtures record written beside ``checkpoint_path``, after checking that both are of the same save
    (same round and global step); a mismatched pair raises ``ValueError`` naming both files."""
    path = mixtures_path(checkpoint_path)
    record = json.loads(path.read_text())
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=True)
    stamp = _checkpoint_stamp(checkpoint)
    if (record.get("round"), record.get("global_step")) != stamp:
        raise ValueError(
            f"{path} is of round {record.get('round')} (global step {record.get('global_step')}) but {checkpoint_path} "
            f"is of round {stamp[0]} (global step {stamp[1]}): the pair was split by a crash between the two writes; "
            "resuming from the checkpoint rewrites the mixtures file"
        )
    return record


def checkpoint_round(checkpoint: dict[str, Any]) -> int | None:
    """A loaded checkpoint's completed rounds, or ``None`` if it holds no round loop."""
    # the round loop's state: the callback state with a round and server state (its key is the class's name,
    # so a subclass of FederatedCallback is found too)
    states = checkpoint.get("callbacks", {}).values()
    loop = next((v for v in states if isinstance(v, dict) and {"round", "server_optimizer"} <= v.keys()), None)
    return None if loop is None else int(loop["round"])


def _checkpoint_stamp(checkpoint: dict[str, Any]) -> tuple[int | None, int]:
    return checkpoint_round(checkpoint), checkpoint["global_step"]


class MixtureCheckpointIO(CheckpointIO):
    """A ``CheckpointIO`` that writes ``<checkpoint>.mixtures.json`` beside every checkpoint it saves and removes
    it with its checkpoint; the checkpoint itself is written (and loaded) by the wrapped ``inner`` IO.

    The IO is where a checkpoint's path is known, so the mixtures file is named after its checkpoint here.
    ``record`` gives the mixtures record of the model being saved, or ``None`` for a model without mixtures.
    """

    def __init__(self, inner: CheckpointIO, record: Callable[[], dict[str, Any] | None]) -> None:
        self.inner = inner
        self.record = record

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        record = self.record()
        if record is not None:  # first: a crash before the checkpoint's write leaves the mixtures ahead, detectably
            write_json_atomic(record, mixtures_path(path))
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def load_checkpoint(self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None) -> Any:
        return self.inner.load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path: _PATH) -> None:
        self.inner.remove_checkpoint(path)
        mixtures_path(path).unlink(missing_ok=True)

    def teardown(self) -> None:
        self.inner.teardown()


class MixtureCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` (all its options apply) that writes ``<checkpoint>.mixtures.json`` beside each file.

    At setup it wraps the strategy's checkpoint IO in a :class:`MixtureCheckpointIO`, the public place that knows
    the path of each checkpoint written or removed (a callback's checkpoint hook gets the contents, not the
    path). Every checkpoint the trainer saves, this callback's or another's, gets its mixtures file.
    """

    _said_no_mixtures = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not isinstance(trainer.strategy.checkpoint_io, MixtureCheckpointIO):
            trainer.strategy.checkpoint_io = MixtureCheckpointIO(
                trainer.strategy.checkpoint_io, record=lambda: self._mixtures_record(trainer)
            )
        if trainer.is_global_zero and self.dirpath is not None and Path(self.dirpath).is_dir():
            # left by a run killed in the middle of a write (ours, or fsspec's for the checkpoint)
            for stale in Path(self.dirpath).glob(f"*{TMP_SUFFIX}"):
                stale.unlink(missing_ok=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """When resuming, rewrite the resumed checkpoint's mixtures file from the restored model and step (both
        restored by now), so the pair is consistent even if a crash split it."""
        if trainer.ckpt_path and trainer.is_global_zero and pl_module.client_mixtures() is not None:
            path = mixtures_path(trainer.ckpt_path)
            if path.exists():
                write_json_atomic(mixtures_record(trainer, pl_module), path)

    def _mixtures_record(self, trainer: L.Trainer) -> dict[str, Any] | None:
        if trainer.lightning_module.client_mixtures() is None:  # e.g. FedAvg: a plain checkpoint
            if not self._said_no_mixtures:
                rank_zero_info("MixtureCheckpoint: the model has no client mixtures; writing checkpoints only")
                self._said_no_mixtures = True
            return None
        return mixtures_record(trainer, trainer.lightning_module)
