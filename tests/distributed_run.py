"""A small federated run on 1 or more CPU processes, for tests/test_distributed.py (run as a script: Lightning's
launcher starts the other ranks by running this file again with the same arguments).

Every rank writes ``<out>.rank<r>.pt``: the clients sampled in each round, the validation values logged after each
round, and at the end the global weights, every private per-client table and the mixtures.

    python tests/distributed_run.py --devices 2 --out /tmp/run [--method local_adaptor] [--rounds 3]
        [--clients-per-round 5] [--ckpt-dir DIR] [--resume DIR/last.ckpt] [--nan-round R]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import lightning as L
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks import FederatedCallback  # noqa: E402
from floral_lightning.data import FederatedDataModule, NpzArrays  # noqa: E402
from floral_lightning.methods import LocalAdaptorModule  # noqa: E402
from floral_lightning.module import FloralModule  # noqa: E402


def write_data(path: Path) -> None:
    """Four-class data whose label depends on a random projection of 8 features (learnable, not trivial)."""
    g = np.random.default_rng(0)
    w = g.normal(size=(8, 4))
    x_train, x_test = g.normal(size=(480, 8)).astype(np.float32), g.normal(size=(240, 8)).astype(np.float32)
    np.savez(path, x_train=x_train, y_train=(x_train @ w).argmax(1), x_test=x_test, y_test=(x_test @ w).argmax(1))


class Record(L.Callback):
    """What a rank saw: the sampled clients per round, the validation values, the final state."""

    def __init__(self, loop: FederatedCallback, out: str) -> None:
        self.loop, self.out = loop, out
        self.rounds: list[list[int]] = []
        self.val: list[dict[str, float]] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.rounds.append(list(self.loop.clients))

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            metrics = trainer.callback_metrics
            self.val.append({k: float(v) for k, v in metrics.items() if k.startswith("val/")})

    def on_fit_end(self, trainer, pl_module) -> None:
        mixtures = pl_module.client_mixtures()
        record = {
            "rounds": self.rounds,
            "val": self.val,
            "global": {n: t.detach().clone() for n, t in pl_module.federated_state().items()},
            "tables": [t.detach().clone() for t in pl_module.client_tables()],
            "mixtures": None if mixtures is None else mixtures.clone(),
            "world_size": trainer.world_size,
            "sync_bytes": None if self.loop.last_sync is None else self.loop.last_sync.payload_bytes,
        }
        torch.save(record, f"{self.out}.rank{trainer.global_rank}.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--out", required=True)
    parser.add_argument("--method", choices=("floral", "local_adaptor"), default="floral")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients-per-round", type=int, default=5)
    parser.add_argument("--ckpt-dir", default=None)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--nan-round", type=int, default=None, help="make client 0's data non-finite from this round")
    args = parser.parse_args()

    L.seed_everything(0, verbose=False)  # the same initial model in every run (rank 0 broadcasts it to the others)
    data_path = Path(f"{args.out}.data.npz")
    if int(os.environ.get("LOCAL_RANK", 0)) == 0 and not data_path.exists():
        write_data(data_path)
    # uneven clients (Dirichlet label skew), so ranks get unequal batch counts and pad
    data = FederatedDataModule(
        NpzArrays(str(data_path)), num_clients=8, num_clusters=2, dirichlet_alpha=0.5, batch_size=8, seed=0
    )
    cls = LocalAdaptorModule if args.method == "local_adaptor" else FloralModule
    base = {
        "class_path": "floral_lightning.models.MLP",
        "init_args": {"in_features": 8, "hidden": [16], "out_features": 4},
    }
    extra = {} if args.method == "local_adaptor" else {"num_adaptors": 2}
    module = cls(base=base, num_clients=8, rank=0.5, **extra)
    loop = FederatedCallback(clients_per_round=args.clients_per_round, seed=0, server_optimizer="adam")
    callbacks = [loop, Record(loop, args.out)]
    if args.ckpt_dir:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=args.ckpt_dir, save_last=True, every_n_epochs=1))
    if args.nan_round is not None:
        callbacks.append(PoisonClient(args.nan_round))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="client_parallel" if args.devices > 1 else "auto",
        max_epochs=args.rounds,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=bool(args.ckpt_dir),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=data, ckpt_path=args.resume)


class PoisonClient(L.Callback):
    """From round ``round_idx`` on, client 0's first training batch is multiplied by infinity."""

    def __init__(self, round_idx: int) -> None:
        self.round_idx = round_idx

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch >= self.round_idx and batch[2] == 0:
            batch[0].mul_(float("inf"))


if __name__ == "__main__":
    main()
