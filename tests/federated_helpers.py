"""Shared by the round-loop tests: tiny federated data, a quiet Trainer, and a callback that records each
client's report."""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import lightning as L

from callbacks import FederatedCallback
from floral_lightning.aggregation import ClientUpdate
from floral_lightning.data import FederatedDataModule, SyntheticLinear


def linear_data(num_clients: int = 6, seed: int = 0) -> FederatedDataModule:
    return FederatedDataModule(
        SyntheticLinear(samples_per_client=20), num_clients=num_clients, num_clusters=2, batch_size=4, seed=seed
    )


def quiet_trainer(
    rounds: int, callback: FederatedCallback, validate: bool = False, extra_callbacks: tuple = (), **kwargs
) -> L.Trainer:
    """A Trainer of `rounds` rounds with no logger, checkpoints, progress bar or (unless asked) validation."""
    return L.Trainer(
        max_epochs=rounds,
        callbacks=[callback, *extra_callbacks],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1.0 if validate else 0,
        **kwargs,
    )


def fit(module, data, rounds: int, callback: FederatedCallback | None = None, **kwargs) -> L.Trainer:
    trainer = quiet_trainer(rounds, callback or FederatedCallback(), **kwargs)
    trainer.fit(module, datamodule=data)
    return trainer


class RecordingCallback(FederatedCallback):
    """Keeps the global weights the fit started from and every client's report (what it sends the server)."""

    def on_fit_start(self, trainer, pl_module):
        super().on_fit_start(trainer, pl_module)
        self.start = copy.deepcopy(self.global_state)
        self.updates: list[ClientUpdate] = []

    def on_client_update(self, trainer, pl_module, update):
        state = {n: t.detach().clone() for n, t in update.state.items()}
        self.updates.append(ClientUpdate(update.client_id, state, update.num_samples, update.logits.clone()))


class PauseMidRound(L.Callback):
    """Test helper for crash tests run as a subprocess: at local step ``step`` of round ``round_idx`` (after
    that round's previous round-end checkpoint exists) it writes ``marker`` and sleeps, so the test can SIGKILL
    the process at a known point in the middle of a round."""

    def __init__(self, marker: str, round_idx: int, step: int) -> None:
        self.marker, self.round_idx, self.step = marker, round_idx, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.round_idx and batch_idx == self.step:
            Path(self.marker).write_text(str(os.getpid()))
            time.sleep(600)  # never returns: the test kills the process here


class SignalAtRound(L.Callback):
    """Test helper for stop tests run as a subprocess: the process sends itself ``signum`` at local step ``step``
    of round ``round_idx`` (0-based, so rounds ``1..round_idx`` are complete), a known point in the middle of a
    round with no sleep to race against. It signals once: it writes ``marker`` first and never signals while
    ``marker`` exists, so the very same command, rerun to resume, runs to the end. With ``only_under``, only a
    run whose ``default_root_dir`` contains that text signals (one cell of a grid whose cells all get it). With
    ``to_parent``, the signal goes to the parent process instead (a grid running the run as one of its cells)."""

    def __init__(
        self,
        marker: str,
        round_idx: int,
        step: int = 0,
        signum: int = 15,
        only_under: str = "",
        to_parent: bool = False,
    ) -> None:
        self.marker, self.round_idx, self.step = Path(marker), round_idx, step
        self.signum, self.only_under, self.to_parent = signum, only_under, to_parent

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if (
            trainer.current_epoch == self.round_idx
            and batch_idx == self.step
            and self.only_under in str(trainer.default_root_dir)
            and not self.marker.exists()
        ):
            self.marker.write_text(str(os.getpid()))
            os.kill(os.getppid() if self.to_parent else os.getpid(), self.signum)
