"""``federated.lightning_step``: one Lightning step per client, or per round, gives the rounds of one step per
batch, bit for bit.

The reference is the round loop with ``lightning_step="batch"`` (Lightning's loop, one training step per local
batch, which ``test_round_loop`` checks against a hand-written federated loop). Settings as in
``test_vectorised``: unequal client sizes, two local epochs, sampling, momentum with weight decay and Adam,
noisy router with temperature, min_prob and entropy penalty, alpha != 1, preconditioning; and the methods whose
training step differs (FedProx, Ditto, Local Adaptor).
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import pytest
import torch
from federated_helpers import RecordingCallback, fit
from lightning.pytorch.callbacks import Callback
from test_vectorised import ADAM, NUM_CLIENTS, SGD, TRAIN_SIZES, make_module, unequal_data

from callbacks import FederatedCallback
from floral_lightning.data import BatchRun
from floral_lightning.methods import DittoModule, FedProxModule, LocalAdaptorModule
from floral_lightning.tasks import RegressionModule


class CountSteps(Callback):
    """Counts Lightning's training steps and the batches that reach ``training_step``."""

    def __init__(self) -> None:
        self.lightning_steps = 0
        self.kinds: list[type] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lightning_steps += 1
        self.kinds.append(type(batch))


ROUNDS = 3
STEPS = ["client", "round"]


def run(module, lightning_step: str, rounds: int = ROUNDS, **options):
    callback = RecordingCallback(clients_per_round=4, local_epochs=2, seed=3, lightning_step=lightning_step, **options)
    counter = CountSteps()
    trainer = fit(module, unequal_data(), rounds, callback, extra_callbacks=[counter])
    return callback, trainer, counter


def assert_identical_rounds(make, lightning_step: str, constant: tuple[str, ...] = ()) -> None:
    by_batch, by_client = make(), make()
    start = copy.deepcopy(by_batch.state_dict())
    batch_cb, batch_trainer, batch_count = run(by_batch, "batch")
    client_cb, client_trainer, client_count = run(by_client, lightning_step)
    assert client_cb.batch_by_batch_reason is None
    # one Lightning step per sampled client or per round, against one per local batch (2 epochs of ceil(n / 4))
    clients = [u.client_id for u in batch_cb.updates]
    assert client_count.lightning_steps == (len(clients) if lightning_step == "client" else ROUNDS)
    assert batch_count.lightning_steps == sum(2 * -(-TRAIN_SIZES[k] // 4) for k in clients)
    assert set(client_count.kinds) == {BatchRun}
    # every client's report, in the same order, and the state after the rounds: the same bits
    assert [u.client_id for u in client_cb.updates] == clients
    assert len(set(clients)) == NUM_CLIENTS
    for a, b in zip(batch_cb.updates, client_cb.updates):
        assert torch.equal(a.logits, b.logits)
        for name in a.state:
            assert torch.equal(a.state[name], b.state[name]), name
    for name, value in by_batch.state_dict().items():
        if value.is_floating_point() and name not in constant:  # the comparison is not vacuous
            assert not torch.equal(value, start[name]), f"{name} never changed"
        assert torch.equal(by_client.state_dict()[name], value), name
    for key in ("train/loss", *(k for k in batch_trainer.callback_metrics if k.startswith("train/"))):
        assert torch.equal(client_trainer.callback_metrics[key], batch_trainer.callback_metrics[key]), key


@pytest.mark.parametrize("lightning_step", STEPS)
@pytest.mark.parametrize("optimizer", [SGD, ADAM], ids=["sgd_momentum", "adam"])
def test_runs_of_batches_give_the_rounds_of_one_step_per_batch_bit_for_bit(optimizer, lightning_step):
    assert_identical_rounds(lambda: make_module(optimizer), lightning_step)


@pytest.mark.parametrize(
    "cls, options",
    [(FedProxModule, {"num_adaptors": 0, "mu": 0.5}), (DittoModule, {"num_adaptors": 0, "lam": 0.3}),
     (LocalAdaptorModule, {"num_adaptors": 1})],
    ids=["fedprox", "ditto", "local_adaptor"],
)  # fmt: skip
@pytest.mark.parametrize("lightning_step", STEPS)
def test_methods_with_their_own_training_step_train_the_same_in_runs_of_batches(cls, options, lightning_step):
    # a single adaptor's mixture is 1 whatever its logit: the logit gets no gradient
    constant = ("model.router.logits",) if cls is LocalAdaptorModule else ()
    assert_identical_rounds(lambda: make_module(SGD, cls=cls, **options), lightning_step, constant)


@pytest.mark.parametrize("lightning_step", STEPS)
def test_a_nonfinite_loss_in_an_earlier_batch_stops_the_run_naming_the_client_and_local_step(lightning_step):
    module = make_module(dataclasses.replace(SGD, lr=1e30))  # the second local step of a client overflows
    with pytest.raises(FloatingPointError, match=r"non-finite training loss .* at local step 1 of client \d+"):
        run(module, lightning_step)


class StepHook(Callback):
    def on_after_backward(self, trainer, pl_module):
        pass


class BackwardHookModule(RegressionModule):
    def on_after_backward(self) -> None:
        pass


@pytest.mark.parametrize(
    "trainer_options, callbacks, cls, reason",
    [({"gradient_clip_val": 1.0}, [], RegressionModule, "gradient_clip_val=1.0"),
     ({"precision": "bf16-mixed"}, [], RegressionModule, "precision='bf16-mixed'"),
     ({}, [StepHook()], RegressionModule, "callback StepHook runs ['on_after_backward']"),
     ({}, [], BackwardHookModule, "BackwardHookModule overrides on_after_backward")],
)  # fmt: skip
def test_settings_that_act_on_every_local_step_keep_one_step_per_batch_and_say_why(
    trainer_options, callbacks, cls, reason, caplog
):
    callback = RecordingCallback(clients_per_round=4, local_epochs=2, seed=3, lightning_step="round")
    counter = CountSteps()
    module = make_module(SGD, cls=cls)
    with caplog.at_level(logging.INFO):
        fit(module, unequal_data(), 1, callback, extra_callbacks=[counter, *callbacks], **trainer_options)
    assert callback.batch_by_batch_reason is not None and reason in callback.batch_by_batch_reason
    said = f"federated.lightning_step=round: one Lightning step per batch: {callback.batch_by_batch_reason}"
    assert said in caplog.text
    assert BatchRun not in counter.kinds


@pytest.mark.parametrize("per, clients", [("client", [3, 0, 4]), ("round", [4])])
def test_the_loader_groups_each_clients_or_the_rounds_batches_and_moves_them_whole(per, clients):
    data = unequal_data()
    data.setup("fit")
    loader = data.train_dataloader()
    loader.set_round(0, [3, 0, 4])
    batches = list(loader)
    loader.batch_runs = per
    runs = list(loader)
    assert len(loader) == len(runs) == len(clients)
    assert [int(r[-1]) for r in runs] == clients  # the client of each run's last batch
    flat = [b for r in runs for b in (*r.earlier, tuple(r))]
    assert len(flat) == len(batches)
    for a, b in zip(flat, batches):
        assert all(torch.equal(u, v) if torch.is_tensor(u) else u == v for u, v in zip(a, b))
    moved = runs[0].to(torch.float64)
    assert isinstance(moved, BatchRun) and moved[0].dtype == torch.float64
    assert all(b[0].dtype == torch.float64 for b in moved.earlier)


def test_a_bad_lightning_step_is_refused_naming_the_valid_ones():
    with pytest.raises(ValueError, match=r"lightning_step='epoch': expected one of \('batch', 'client', 'round'\)"):
        RecordingCallback(lightning_step="epoch")


def test_the_command_line_option_trains_one_lightning_step_per_client(tmp_path):
    from floral_lightning.cli import main

    args = ["--config", "conf/synthetic_linear.yaml", "--federated.lightning_step=client", "--trainer.max_epochs=1",
            "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]",
            "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}"]  # fmt: skip
    cli = main(args, run=False)
    counter = CountSteps()
    cli.trainer.callbacks.append(counter)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, FederatedCallback)]
    assert callback.lightning_step == "client" and callback.batch_by_batch_reason is None
    assert counter.lightning_steps == cli.trainer.global_step == 10  # the config's 10 clients of a round
    assert set(counter.kinds) == {BatchRun}
