"""Lightning's options in a federated run: schedules over rounds, a refused --optimizer, and the Trainer
settings that would cut a round short refused by name."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from federated_helpers import linear_data
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.callbacks import timer as timer_module
from torch import nn

from callbacks import FederatedCallback
from floral_lightning.cli import main
from floral_lightning.module import ClientOptimizer, RegressionModule

CONFIG = Path(__file__).resolve().parents[1] / "conf" / "synthetic_linear.yaml"
QUIET = [
    "--trainer.logger=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.callbacks=[]",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.check_val_every_n_epoch=100",
]


def fit(module, rounds: int, *callbacks: L.Callback, **trainer_options) -> L.Trainer:
    """Fit on the tiny linear task with the round loop and ``callbacks``, no logger or checkpoints."""
    if not any(isinstance(c, FederatedCallback) for c in callbacks):
        callbacks = (FederatedCallback(), *callbacks)
    options = {"limit_val_batches": 0, "num_sanity_val_steps": 0} | trainer_options
    trainer = L.Trainer(
        max_epochs=rounds, callbacks=list(callbacks), logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, **options,
    )  # fmt: skip
    trainer.fit(module, datamodule=linear_data())
    return trainer


class LearningRates(L.Callback):
    """The learning rate of every parameter group at every client's batches, by round."""

    def __init__(self) -> None:
        self.by_round: dict[int, set[tuple[float, ...]]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        rates = tuple(g["lr"] for g in trainer.optimizers[0].param_groups)
        self.by_round.setdefault(trainer.current_epoch, set()).add(rates)


def test_cli_lr_scheduler_changes_the_client_learning_rate_once_per_round(tmp_path):
    # base 0.2, adaptors 0.3, router 0.05: StepLR(gamma=0.5) must halve each of them once per round
    cli = main(
        [
            f"--config={CONFIG}",
            "--trainer.max_epochs=4",
            "--model.init_args.optimizer.lr=0.2",
            "--model.init_args.optimizer.adaptor_lr=0.3",
            "--model.init_args.optimizer.router_lr=0.05",
            "--lr_scheduler=StepLR",
            "--lr_scheduler.step_size=1",
            "--lr_scheduler.gamma=0.5",
            f"--trainer.default_root_dir={tmp_path}",
            *QUIET,
        ],
        run=False,
    )
    rates = LearningRates()
    cli.trainer.callbacks.append(rates)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert sorted(rates.by_round) == [0, 1, 2, 3]
    for r, seen in rates.by_round.items():
        # every client of round r trained at the same rates (the per-client optimizer reset keeps them)
        (only,) = seen
        torch.testing.assert_close(only, (0.2 * 0.5**r, 0.3 * 0.5**r, 0.05 * 0.5**r))
    # the schedule is a model option: saved with the hyperparameters, so checkpoints rebuild it
    assert cli.model.hparams["lr_scheduler"]["class_path"] == "torch.optim.lr_scheduler.StepLR"


def test_lr_scheduler_as_a_module_option_and_its_errors():
    def module(schedule):
        return RegressionModule(
            nn.Linear(10, 3), num_clients=6, num_adaptors=2, rank=1, optimizer=ClientOptimizer(lr=0.1),
            lr_scheduler=schedule,
        )  # fmt: skip

    rates = LearningRates()
    fit(module({"class_path": "ExponentialLR", "init_args": {"gamma": 0.9}}), 3, rates)
    assert [next(iter(rates.by_round[r]))[0] for r in range(3)] == pytest.approx([0.1, 0.09, 0.081])

    with pytest.raises(ValueError, match="class_path"):
        module({"init_args": {}})
    with pytest.raises(ValueError, match="cannot be imported"):
        module({"class_path": "NoSuchLR"}).configure_optimizers()
    with pytest.raises(ValueError, match="needs init_args.monitor"):
        module({"class_path": "ReduceLROnPlateau"}).configure_optimizers()
    plateau = module({"class_path": "ReduceLROnPlateau", "init_args": {"monitor": "val/mse"}}).configure_optimizers()
    assert plateau["lr_scheduler"]["monitor"] == "val/mse"


def test_cli_refuses_a_top_level_optimizer_by_name():
    with pytest.raises(ValueError, match="--optimizer=torch.optim.Adam is not supported.*router"):
        main([f"--config={CONFIG}", "--optimizer=torch.optim.Adam", *QUIET], run=False)


@pytest.mark.parametrize(
    ("setting", "name"),
    [
        ({"limit_train_batches": 0.5}, "limit_train_batches=0.5"),
        ({"limit_train_batches": 3}, "limit_train_batches=3"),
        ({"overfit_batches": 2}, "overfit_batches=2"),
        ({"max_steps": 10}, "max_steps=10"),
        ({"min_steps": 3}, "min_steps=3"),
        ({"limit_val_batches": 0.5}, "limit_val_batches=0.5"),
        ({"max_time": "00:00:10:00"}, "max_time"),
    ],
)
def test_trainer_settings_that_cut_a_round_short_are_refused_by_name(setting, name):
    module = RegressionModule(nn.Linear(10, 3), num_clients=6, num_adaptors=2, rank=1)
    with pytest.raises(ValueError, match=f"cannot honour: {name}"):
        fit(module, 1, **setting)


class SlowRound(L.Callback):
    """Makes every round last ``seconds`` on the clock the timer reads (a fake one: the test must not depend on
    how fast this machine trains a round)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def on_train_epoch_end(self, trainer, pl_module):
        self.now += self.seconds


def test_an_epoch_timer_stops_at_the_end_of_a_round(monkeypatch):
    module = RegressionModule(nn.Linear(10, 3), num_clients=6, num_adaptors=2, rank=1)
    callback, slow = FederatedCallback(), SlowRound(0.6)
    monkeypatch.setattr(timer_module, "time", SimpleNamespace(monotonic=slow.monotonic))  # the Timer's clock only
    trainer = fit(module, 5, callback, slow, Timer("00:00:00:01", interval="epoch"))
    assert trainer.current_epoch == 2 and callback.round == 2  # two whole rounds, both aggregated
    assert callback._active_client is None


@pytest.mark.slow
def test_the_schedule_continues_when_a_run_is_resumed(tmp_path):
    schedule = ["--lr_scheduler=StepLR", "--lr_scheduler.step_size=1", "--lr_scheduler.gamma=0.5"]
    args = [f"--config={CONFIG}", "--model.init_args.optimizer.lr=0.2", *schedule, *QUIET[:1], *QUIET[3:]]
    main(["fit", *args, "--trainer.max_epochs=2", f"--trainer.default_root_dir={tmp_path}"])
    (ckpt,) = (tmp_path / "checkpoints").glob("last.ckpt")
    args += [f"--trainer.default_root_dir={tmp_path / 'resumed'}"]
    # the same command again with --ckpt_path: the checkpoint's schedule equals --lr_scheduler, so it is accepted
    resumed = main(
        [
            "fit",
            *args,
            "--trainer.max_epochs=4",
            f"--ckpt_path={ckpt}",
            "--trainer.callbacks+=test_lightning_options.LearningRates",
        ]
    )
    (rates,) = [c for c in resumed.trainer.callbacks if isinstance(c, LearningRates)]
    assert sorted(rates.by_round) == [2, 3]
    for r in (2, 3):
        assert next(iter(rates.by_round[r]))[0] == pytest.approx(0.2 * 0.5**r)  # the schedule's state was restored
    with pytest.raises(ValueError, match="differs from model.init_args.lr_scheduler"):
        main(["fit", *args, "--lr_scheduler.gamma=0.9", f"--ckpt_path={ckpt}"])
