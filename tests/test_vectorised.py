"""``federated.vectorise``: a round's clients trained at once give the rounds of training them one after another.

The reference is the round loop itself with ``vectorise=False`` (Lightning's training loop, one client after
another, which ``test_round_loop`` checks against a hand-written federated loop). The settings are chosen to
exercise everything the vectorised step writes out itself: unequal client sizes (partial last batches, clients
with different numbers of steps), two local epochs (a partial batch in the middle of a client's steps, so the
groups of a step are not consecutive slots), client sampling, momentum with weight decay and Adam, router noise
(gaussian, scaled), temperature, min_prob, the entropy penalty, alpha != 1, preconditioning at rank 1 and 2.
"""

from __future__ import annotations

import copy
import logging

import lightning as L
import pytest
import torch
from federated_helpers import RecordingCallback, fit
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from floral_lightning.aggregation import StreamingAggregator
from floral_lightning.data import ArraySplits, ClientSource, FederatedDataModule
from floral_lightning.methods import (
    DittoModule,
    EnsembleModule,
    FedAvgModule,
    FedProxModule,
    FineTuneModule,
    LocalAdaptorModule,
)
from floral_lightning.models import MLP
from floral_lightning.module import ClientOptimizer, RouterOptions
from floral_lightning.tasks import RegressionModule
from floral_lightning.vectorised import RoundBatch

NUM_CLIENTS = 5
TRAIN_SIZES = [5, 9, 14, 22, 7]  # unequal on purpose: 2, 3, 4, 6 and 2 batches of 4 per epoch
ATOL, RTOL = 2e-5, 1e-4  # float32 sums in another order (batched products), over a few rounds


class UnequalClients(ClientSource):
    """Regression clients with train sizes ``TRAIN_SIZES``; cluster c = k mod 2 has its own teacher."""

    def make_clients(self, num_clients: int, clusters: torch.Tensor, seed: int) -> list[ArraySplits]:
        g = torch.Generator().manual_seed(seed)
        weights = torch.randn(2, 6, 2, generator=g)
        out = []
        for k in range(num_clients):
            n = TRAIN_SIZES[k]
            x = torch.randn(n + 4, 6, generator=g)
            y = torch.tanh(x @ weights[int(clusters[k])])
            out.append(ArraySplits(x[:n], y[:n], x[n:], y[n:]))
        return out


def unequal_data() -> FederatedDataModule:
    return FederatedDataModule(UnequalClients(), num_clients=NUM_CLIENTS, num_clusters=2, batch_size=4, seed=0)


SGD = ClientOptimizer(lr=0.05, router_lr=0.5, momentum=0.9, weight_decay=0.01)
ADAM = ClientOptimizer(name="adam", lr=0.01, adaptor_lr=0.02, router_lr=0.1, weight_decay=0.01)
NOISY = RouterOptions(noise="gaussian", noise_std=0.5, temperature=2.0, min_prob=0.05, entropy_penalty=0.1)


def make_module(
    optimizer: ClientOptimizer,
    rank: int = 1,
    num_adaptors: int = 3,
    router=NOISY,
    cls=RegressionModule,
    base=None,
    **options,
):
    torch.manual_seed(0)
    extra = {} if num_adaptors == 0 else {"rank": rank, "alpha": 0.5, "router": router, "precondition": True}
    extra.update(options)
    base = MLP(6, [8], 2) if base is None else base
    module = cls(base, num_clients=NUM_CLIENTS, num_adaptors=num_adaptors, optimizer=optimizer, **extra)
    if num_adaptors:
        with torch.no_grad():  # distinct mixtures and non-zero B, so mixtures and p(k|c) matter from step 0
            module.model.router.logits.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(1))
            for layer in module.model.floral_layers().values():
                layer.adaptor_B.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(2))
    return module


def run(module, vectorise: bool, rounds: int = 3, trainer_options: dict | None = None, **options):
    callback = RecordingCallback(clients_per_round=4, local_epochs=2, seed=3, vectorise=vectorise, **options)
    trainer = fit(module, unequal_data(), rounds, callback, **(trainer_options or {}))
    return callback, trainer


def assert_same_rounds(
    optimizer: ClientOptimizer, frozen: tuple[str, ...] = (), loop_options: dict | None = None, **module_options
) -> None:
    sequential, vectorised = make_module(optimizer, **module_options), make_module(optimizer, **module_options)
    start = copy.deepcopy(sequential.state_dict())
    seq_cb, seq_trainer = run(sequential, False, **(loop_options or {}))
    vec_cb, vec_trainer = run(vectorised, True, **(loop_options or {}))
    assert seq_cb.vectorised is None and vec_cb.vectorised is not None, vec_cb.sequential_reason
    # every client's report (its trained weights and logits), in the same order
    assert [u.client_id for u in vec_cb.updates] == [u.client_id for u in seq_cb.updates]
    assert len({u.client_id for u in seq_cb.updates}) == NUM_CLIENTS  # sampling left some out in some round
    for a, b in zip(seq_cb.updates, vec_cb.updates):
        assert a.num_samples == b.num_samples
        torch.testing.assert_close(b.logits, a.logits, atol=ATOL, rtol=RTOL)
        for name in a.state:
            torch.testing.assert_close(b.state[name], a.state[name], atol=ATOL, rtol=RTOL, msg=name)
    # the global weights, adaptors and every client's router row (mixture) after the rounds
    seq_state, vec_state = sequential.state_dict(), vectorised.state_dict()
    for name, value in seq_state.items():
        if name in frozen:  # set when the fit starts (oracle mixtures), then never trained
            assert torch.equal(vec_state[name], value), f"{name} is frozen but differs"
            continue
        assert not torch.equal(value, start[name]), f"{name} never changed: the comparison would be vacuous"
        torch.testing.assert_close(vec_state[name], value, atol=ATOL, rtol=RTOL, msg=name)
    if sequential.client_mixtures() is not None:
        torch.testing.assert_close(vectorised.client_mixtures(), sequential.client_mixtures(), atol=ATOL, rtol=RTOL)
    # the logged local loss: the sample-weighted mean of the round's training losses (and of a local penalty)
    logged = [m for m in ("train/loss", "train/local_penalty") if m in seq_trainer.callback_metrics]
    assert logged == (["train/loss", "train/local_penalty"] if sequential.has_local_penalty else ["train/loss"])
    for metric in logged:
        seq_value, vec_value = seq_trainer.callback_metrics[metric], vec_trainer.callback_metrics[metric]
        assert seq_value != 0, metric  # a logged zero would make the comparison vacuous
        torch.testing.assert_close(vec_value, seq_value, atol=ATOL, rtol=RTOL, msg=metric)


@pytest.mark.parametrize(
    "optimizer, rank", [(SGD, 1), (ADAM, 1), (SGD, 2)], ids=["sgd-momentum-rank1", "adam-rank1", "sgd-rank2"]
)
def test_vectorised_rounds_equal_sequential_rounds(optimizer, rank):
    assert_same_rounds(optimizer, rank=rank)


def test_vectorised_fedavg_rounds_equal_sequential_rounds():
    assert_same_rounds(SGD, num_adaptors=0)


def test_uniform_noise_and_top_k_rounds_are_the_same():
    assert_same_rounds(SGD, router=RouterOptions(noise="uniform", noise_std=1.0, top_k=2))


def test_a_learning_rate_schedule_and_a_server_optimizer_give_the_same_rounds():
    """The client rates are read from the optimizer's groups every round (StepLR halves them); the server step
    (FedAdam) is the round loop's own code in both modes."""
    schedule = {"class_path": "StepLR", "init_args": {"step_size": 1, "gamma": 0.5}}
    server = {"server_optimizer": "adam", "server_lr": 0.05}
    assert_same_rounds(SGD, lr_scheduler=schedule, loop_options=server)


def test_oracle_mixtures_rounds_are_the_same():
    """Frozen router rows (the true clusters): the noise still applies, the rows are not trained but still weight
    the adaptor average (C = 3 > 2 clusters: one adaptor averages with weights p(k|c) ~ 1e-44)."""
    router = RouterOptions(oracle=True, noise="uniform")
    assert_same_rounds(SGD, router=router, frozen=("model.router.logits",))


@pytest.mark.parametrize("cls", [FedAvgModule, FineTuneModule])
def test_methods_that_keep_floral_local_training_vectorise(cls):
    assert_same_rounds(SGD, num_adaptors=0, cls=cls)


@pytest.mark.parametrize("num_adaptors", [0, 3], ids=["fedavg", "floral"])
def test_fedprox_rounds_are_the_same(num_adaptors):
    """FedProx's proximal term (its local_penalty) inside vmap: from the global weights, over the adaptors too."""
    assert_same_rounds(SGD, num_adaptors=num_adaptors, cls=FedProxModule, mu=0.7)


def test_round_batch_groups_clients_by_batch_shape_and_keeps_every_batch():
    data = unequal_data()
    data.setup("fit")
    loader = data.train_dataloader()
    loader.local_epochs = 2
    loader.set_round(0, [0, 1, 2, 3, 4])
    batches = list(loader)
    batch = RoundBatch.collect(iter(batches))
    per_client = {k: [(x, y) for x, y, j in batches if j == k] for k in range(NUM_CLIENTS)}
    assert sorted(batch.clients) == list(range(NUM_CLIENTS))
    assert [batch.clients[i] for i in batch.order] == [0, 1, 2, 3, 4]  # the round's order
    for i, k in enumerate(batch.clients):
        assert batch.num_steps[i] == len(per_client[k]) == 2 * -(-TRAIN_SIZES[k] // 4)
    for s, groups in enumerate(batch.steps):
        seen = []
        for group in groups:
            positions = group.positions.tolist()
            if group.start is not None:
                assert positions == list(range(group.start, group.start + len(positions)))
            for row, i in enumerate(positions):
                x, y = per_client[batch.clients[i]][s]
                assert torch.equal(group.x[row], x) and torch.equal(group.y[row], y)
            seen += positions
        assert sorted(seen) == [i for i, n in enumerate(batch.num_steps) if s < n]
    assert any(g.start is None for groups in batch.steps for g in groups)  # the gathered path is exercised too


def test_whole_round_loader_serves_one_item_and_is_restored_after_fit():
    callback, _ = run(make_module(SGD), True, rounds=1)
    loader = callback._loader  # the data module's one train loader
    assert loader.whole_round is None and len(loader) > 1 and isinstance(next(iter(loader)), tuple)
    loader.whole_round = RoundBatch.collect
    assert len(loader) == 1 and isinstance(next(iter(loader)), RoundBatch)


def test_add_stacked_equals_adding_clients_one_by_one():
    g = torch.Generator().manual_seed(0)
    template = {"w": torch.zeros(3, 2), "a": torch.zeros(4, 5), "n": torch.zeros((), dtype=torch.long)}
    roles = {"w": "shared", "a": "adaptor", "n": "shared"}
    # "w" laid out transposed, as the vectorised loop stacks a linear weight (contracted on a permuted view)
    w = torch.randn(6, 2, 3, generator=g).permute(0, 2, 1)
    states = {"w": w, "a": torch.randn(6, 4, 5, generator=g), "n": torch.arange(6)}
    sizes, logits = torch.tensor([3, 1, 4, 1, 5, 9]), torch.randn(6, 4, generator=g)
    one_by_one, stacked = StreamingAggregator(template, roles), StreamingAggregator(template, roles)
    for i in range(6):
        one_by_one.add({n: t[i] for n, t in states.items()}, int(sizes[i]), logits[i])
    stacked.add_stacked(states, sizes, logits)
    expected, got = one_by_one.result(template), stacked.result(template)
    assert stacked.num_clients == 6
    for name in template:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="num_samples"):
        stacked.add_stacked(states, torch.tensor([3, 0, 4, 1, 5, 9]), logits)


# --- what falls back to one client after another, by name -----------------------------------------------


def reason_of(module, caplog, **trainer_options) -> str | None:
    with caplog.at_level(logging.INFO):
        callback, _ = run(module, True, rounds=1, trainer_options=trainer_options)
    assert callback.vectorised is None
    assert any(callback.sequential_reason in r.getMessage() for r in caplog.records)
    return callback.sequential_reason


@pytest.mark.parametrize(
    "cls, reason",
    [
        (DittoModule, "DittoModule overrides training_step"),
        (LocalAdaptorModule, "LocalAdaptorModule overrides on_client_start"),
    ],
)
def test_methods_with_their_own_local_training_fall_back_and_train_as_before(cls, reason, caplog):
    options = {"num_adaptors": 1 if cls is LocalAdaptorModule else 0}
    fallback, reference = make_module(SGD, cls=cls, **options), make_module(SGD, cls=cls, **options)
    assert reason in reason_of(fallback, caplog)
    run(reference, False, rounds=1)
    for name, value in reference.state_dict().items():
        assert torch.equal(fallback.state_dict()[name], value), name  # the very same sequential rounds


def test_dropout_falls_back(caplog):
    base = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 2))
    assert "Dropout" in reason_of(make_module(SGD, base=base), caplog)


def test_gradient_clipping_falls_back(caplog):
    assert "gradient_clip_val" in reason_of(make_module(SGD), caplog, gradient_clip_val=1.0)


def test_a_loss_vmap_cannot_batch_falls_back(caplog):
    class ItemLoss(RegressionModule):
        def compute_loss(self, outputs, targets):
            return (outputs - targets).pow(2).mean() * float((outputs.detach() > 0).float().mean().item() + 1)

    assert "vmap cannot batch" in reason_of(make_module(SGD, cls=ItemLoss), caplog)


def test_a_diverging_client_stops_the_vectorised_round_by_name():
    module = make_module(ClientOptimizer(lr=1e30, momentum=0.0))
    with pytest.raises(FloatingPointError, match=r"client \d+ in round 0"):
        run(module, True, rounds=1)


def test_skipped_nonfinite_clients_are_dropped_as_in_the_sequential_loop():
    """At lr 3 some clients overflow and some do not: both loops drop the same clients at the same local step
    (a warning names them), keep their mixtures, and aggregate the others to the same weights."""
    optimizer = ClientOptimizer(lr=3.0, router_lr=0.1)
    sequential, vectorised = make_module(optimizer), make_module(optimizer)
    before = sequential.model.router.logits.detach().clone()
    dropped = {}
    for vectorise, module in ((False, sequential), (True, vectorised)):
        with pytest.warns(UserWarning, match="dropped") as record:
            callback, _ = run(module, vectorise, rounds=1, skip_nonfinite_clients=True)
        # "... at local step S of client K in round R (global step G)": the global step counts Lightning's steps
        messages = [str(w.message).split(" (global step")[0] for w in record if "dropped" in str(w.message)]
        dropped[vectorise] = sorted(m.split(" of client ")[1].split()[0] for m in messages)
        dropped[vectorise, "messages"] = sorted(messages)
        reported = {u.client_id for u in callback.updates}
    assert dropped[True, "messages"] == dropped[False, "messages"]
    assert dropped[True] == dropped[False] and 0 < len(dropped[False]) < 4, dropped
    assert reported and not reported & {int(k) for k in dropped[True]}
    for k in dropped[True]:
        assert torch.equal(vectorised.model.router.logits.detach()[int(k)], before[int(k)])  # mixture kept
    for name, value in sequential.state_dict().items():  # weights near overflow (|w| ~ 1e4): relative tolerance
        torch.testing.assert_close(vectorised.state_dict()[name], value, atol=ATOL, rtol=1e-3, msg=name)


def test_resuming_a_vectorised_run_at_a_round_end_reproduces_it(tmp_path):
    def trainer(callbacks: list) -> L.Trainer:
        return L.Trainer(
            max_epochs=3,
            callbacks=callbacks,
            default_root_dir=tmp_path,  # the resumed fit's own checkpoints land here, not in the working directory
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
        )

    def callback() -> RecordingCallback:
        return RecordingCallback(clients_per_round=4, local_epochs=2, seed=3, vectorise=True)

    straight, resumed = make_module(ADAM), make_module(ADAM)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1)
    trainer([callback(), checkpoints]).fit(straight, datamodule=unequal_data())
    (after_round_2,) = tmp_path.glob("epoch=1-*.ckpt")
    second = callback()
    trainer([second]).fit(resumed, datamodule=unequal_data(), ckpt_path=after_round_2)
    assert second.vectorised is not None and [u.client_id for u in second.updates]  # round 3 ran, vectorised
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


def test_ensemble_rounds_are_the_same():
    """The Ensemble's members (stacked tensors under their own inner ``vmap``) and its router, at once."""

    def make():
        torch.manual_seed(0)
        base = MLP(6, [8], 2)
        module = EnsembleModule(base, NUM_CLIENTS, num_members=3, router=NOISY, optimizer=SGD, task="regression")
        with torch.no_grad():
            module.model.router.logits.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(1))
        return module

    sequential, vectorised = make(), make()
    start = copy.deepcopy(sequential.state_dict())
    seq_cb, _ = run(sequential, False)
    vec_cb, _ = run(vectorised, True)
    assert seq_cb.vectorised is None and vec_cb.vectorised is not None, vec_cb.sequential_reason
    assert [u.client_id for u in vec_cb.updates] == [u.client_id for u in seq_cb.updates]
    for name, value in sequential.state_dict().items():
        assert not torch.equal(value, start[name]), f"{name} never changed: the comparison would be vacuous"
        torch.testing.assert_close(vectorised.state_dict()[name], value, atol=ATOL, rtol=RTOL, msg=name)
