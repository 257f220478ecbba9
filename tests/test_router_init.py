"""The router's opt-in symmetry breakers and its diagnostics (issue 12), against their definitions:

* with the paper's zero second factor, the loss gradient w.r.t. the router logits is exactly zero at step 0;
  ``AdaptorInitNoise`` makes it non-zero (distinct adaptors);
* ``ClusteredRouterInit`` gives the clients of one true cluster one argmax adaptor, distinct clusters distinct
  ones, logits ``logit`` / 0, from each client's full-batch gradient of the shared weights (checked by hand);
* ``RouterDiagnostics``' spread, ARI and gradient norm equal the quantities computed by hand.
"""

from __future__ import annotations

import itertools

import lightning as L
import pytest
import torch
from federated_helpers import fit
from torch import nn

from callbacks import AdaptorInitNoise, ClusteredRouterInit, FederatedCallback, RouterDiagnostics
from callbacks.router_init import client_gradients, lowest_loss_adaptor, spherical_kmeans
from floral_lightning.data import FederatedDataModule, SyntheticLinear
from floral_lightning.metrics import adjusted_rand_index
from floral_lightning.module import RouterOptions
from floral_lightning.seeding import Stream, seeded_generator
from floral_lightning.tasks import RegressionModule

NUM_CLIENTS = 8


def data(seed: int = 0) -> FederatedDataModule:
    return FederatedDataModule(
        SyntheticLinear(samples_per_client=40), num_clients=NUM_CLIENTS, num_clusters=2, batch_size=8, seed=seed
    )


def module(**kwargs) -> RegressionModule:
    torch.manual_seed(0)
    options = {"num_clients": NUM_CLIENTS, "num_adaptors": 2, "rank": 1, **kwargs}
    return RegressionModule(nn.Linear(10, 3), **options)


class LogitsAtTrainStart(L.Callback):
    """Keeps the router logits as round 0 begins (after every callback's ``on_fit_start``)."""

    def on_train_start(self, trainer, pl_module):
        self.logits = pl_module.model.router.logits.detach().clone()


def fit_with(callbacks: list, rounds: int = 1, seed: int = 0, **module_kwargs):
    m, d = module(**module_kwargs), data(seed)
    recorder = LogitsAtTrainStart()
    fit(m, d, rounds, FederatedCallback(seed=seed), extra_callbacks=[*callbacks, recorder])
    return m, d, recorder.logits


# --- the diagnosis: zero second factor, zero router gradient ---------------------------------------------
def router_gradient_at_step0(m: RegressionModule, d: FederatedDataModule) -> torch.Tensor:
    d.setup("fit")
    x, y = d.client_split(3, "train")
    m.train()
    loss = m.compute_loss(m(x, 3), y)
    (grad,) = torch.autograd.grad(loss, [m.model.router.logits])
    return grad


def test_zero_second_factor_gives_exactly_zero_router_gradient_and_noise_init_does_not():
    m, d = module(), data()
    assert torch.count_nonzero(router_gradient_at_step0(m, d)) == 0  # the paper's init: the loss ignores w
    noisy = module()
    AdaptorInitNoise(std=0.1, seed=0).setup(_FakeTrainer(), noisy, "fit")
    grad = router_gradient_at_step0(noisy, d)
    assert grad[3].abs().min() > 0 and torch.count_nonzero(grad[torch.arange(NUM_CLIENTS) != 3]) == 0


class _FakeTrainer:
    ckpt_path = None


def test_adaptor_noise_draws_the_zero_factor_distinct_per_adaptor_and_leaves_the_rest():
    m = module(num_adaptors=4, rank=2)
    layer = next(iter(m.model.floral_layers().values()))
    a_before = layer.adaptor_A.detach().clone()
    AdaptorInitNoise(std=0.05, seed=7).setup(_FakeTrainer(), m, "fit")
    b = layer.adaptor_B.detach()
    assert torch.equal(layer.adaptor_A.detach(), a_before)  # the drawn factor only
    assert all(not torch.equal(b[i], b[j]) for i, j in itertools.combinations(range(4), 2))
    assert 0.03 < float(b.std()) < 0.07  # N(0, 0.05^2) over 24 entries
    again = module(num_adaptors=4, rank=2)
    AdaptorInitNoise(std=0.05, seed=7).setup(_FakeTrainer(), again, "fit")
    assert torch.equal(next(iter(again.model.floral_layers().values())).adaptor_B.detach(), b)  # seeded


def test_adaptor_noise_skips_a_resumed_fit():
    class Resumed:
        ckpt_path = "last.ckpt"

    m = module()
    AdaptorInitNoise(std=0.1).setup(Resumed(), m, "fit")
    assert not any(layer.adaptor_B.any() for layer in m.model.floral_layers().values())


# --- clustering of the first updates ---------------------------------------------------------------------
def test_spherical_kmeans_finds_directions_up_to_sign_of_scale_and_is_seeded():
    torch.manual_seed(1)
    directions = torch.nn.functional.normalize(torch.randn(3, 50), dim=1)
    truth = torch.arange(30) % 3
    scale = torch.rand(30, 1) * 5 + 0.1  # cosine ignores the length
    rows = directions[truth] * scale + 0.05 * torch.randn(30, 50)
    labels = spherical_kmeans(rows, 3, seeded_generator(0, 4, 0))
    assert adjusted_rand_index(truth, labels) == 1.0
    assert torch.equal(labels, spherical_kmeans(rows, 3, seeded_generator(0, 4, 0)))


def kmeans_on_the_vectors(vectors: torch.Tensor, k: int, generator: torch.Generator, restarts: int) -> torch.Tensor:
    """Spherical k-means written out on the vectors themselves (the definition ``spherical_kmeans`` follows on
    their Gram matrix): k-means++ seeding by ``1 - cos``, assign to the centre of highest cosine, centres the
    normalised sums of their rows (an emptied group keeps its centre), the restart of highest total cosine."""
    v = torch.nn.functional.normalize(vectors.double(), dim=1)
    best, best_score = None, -float("inf")
    for _ in range(restarts):
        centres = v[torch.randint(len(v), (1,), generator=generator)]
        while len(centres) < k:
            distance = (1.0 - v @ centres.T).clamp_min(0.0).min(dim=1).values
            if float(distance.sum()) <= 0.0:
                pick = torch.randint(len(v), (1,), generator=generator)
            else:
                pick = torch.multinomial(distance, 1, generator=generator)
            centres = torch.cat([centres, v[pick]])
        labels = (v @ centres.T).argmax(dim=1)
        for _ in range(100):
            for c in range(k):
                if (labels == c).any():
                    centres[c] = torch.nn.functional.normalize(v[labels == c].sum(0), dim=0)
            new = (v @ centres.T).argmax(dim=1)
            if torch.equal(new, labels):
                break
            labels = new
        score = float((v * centres[labels]).sum())
        if score > best_score + 1e-12:
            best, best_score = labels, score
    return best


def test_spherical_kmeans_on_the_gram_matrix_groups_as_on_the_vectors():
    """Overlapping groups of unequal spread and size, k from 1 to 5: the labels of the definition, every time."""
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        n = int(torch.randint(5, 60, (), generator=g))
        k = min(int(torch.randint(1, 6, (), generator=g)), n)
        centres = torch.randn(k, 8, generator=g)
        spread = float(torch.rand((), generator=g)) * 2
        rows = centres[torch.randint(k, (n,), generator=g)] + spread * torch.randn(n, 8, generator=g)
        expected = kmeans_on_the_vectors(rows, k, seeded_generator(trial), restarts=3)
        assert torch.equal(spherical_kmeans(rows, k, seeded_generator(trial), restarts=3), expected), trial


@pytest.mark.parametrize(
    "k, restarts, match", [(0, 1, "k=0"), (31, 1, "k=31"), (2, 0, "restarts=0")]
)  # fmt: skip
def test_spherical_kmeans_refuses_bad_arguments(k, restarts, match):
    with pytest.raises(ValueError, match=match):
        spherical_kmeans(torch.randn(30, 4), k, seeded_generator(0), restarts=restarts)


def test_client_gradients_are_each_clients_full_batch_gradient_of_the_base():
    m, d = module(), data()
    d.setup("fit")
    grads = client_gradients(m, d, [0, 5])
    (layer,) = m.model.floral_layers().values()
    weight, bias = layer.base.weight, layer.base.bias
    for row, k in zip(grads, [0, 5], strict=True):
        x, y = d.client_split(k, "train")
        w, b = weight.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
        loss = ((x @ w.T + b - y) ** 2).mean()  # the adaptors add nothing while their second factor is zero
        loss.backward()
        torch.testing.assert_close(row, torch.cat([w.grad.flatten(), b.grad.flatten()]))


def test_client_gradients_over_local_steps_sum_the_gradients_of_a_hand_written_descent():
    m, d = module(), data()
    d.setup("fit")
    lr, steps = 0.05, 3
    before = {n: t.detach().clone() for n, t in m.state_dict().items()}
    rows = client_gradients(m, d, [2, 6], local_steps=steps, lr=lr)
    (layer,) = m.model.floral_layers().values()
    for row, k in zip(rows, [2, 6], strict=True):
        x, y = d.client_split(k, "train")
        w, b = layer.base.weight.detach().clone(), layer.base.bias.detach().clone()
        w0, b0 = w.clone(), b.clone()
        for _ in range(steps):  # full-batch gradient descent on the base alone
            w.requires_grad_(), b.requires_grad_()
            gw, gb = torch.autograd.grad(((x @ w.T + b - y) ** 2).mean(), (w, b))
            w, b = (w - lr * gw).detach(), (b - lr * gb).detach()
        # the sum of the gradients is the whole update over the step size
        torch.testing.assert_close(row, torch.cat([(w0 - w).flatten(), (b0 - b).flatten()]) / lr)
    for name, tensor in m.state_dict().items():  # the weights are restored
        assert torch.equal(tensor, before[name]), name


@pytest.mark.parametrize("kwargs, match", [({"local_steps": 0}, "local_steps=0"), ({"local_steps": 2}, "lr=None")])
def test_client_gradients_refuse_bad_steps(kwargs, match):
    m, d = module(), data()
    d.setup("fit")
    with pytest.raises(ValueError, match=match):
        client_gradients(m, d, [0], **kwargs)


def test_local_steps_separate_the_synthetic_mlp_clusters_that_the_first_gradient_mixes():
    """synthetic_mlp, seed 1 (the shipped config): the clients' first gradients at the random ReLU network group
    them badly; their updates after 20 full-batch steps at the config's lr group them exactly."""
    from floral_lightning.cli import main

    cli = main(["--config", "conf/synthetic_mlp.yaml", "--seed_everything=1"], run=False)
    m, d = cli.model, cli.datamodule
    d.setup("fit")
    clients = list(range(d.num_clients))
    ari = {}
    for steps in (1, 20):
        rows = client_gradients(m, d, clients, local_steps=steps, lr=m.optimizer_options.lr)
        groups = spherical_kmeans(rows, 4, seeded_generator(1, Stream.ROUTER_INIT, 0), restarts=10)
        ari[steps] = adjusted_rand_index(d.clusters, groups)
    assert ari[1] < 0.8
    assert ari[20] == pytest.approx(1.0)


def test_clustered_init_gives_one_cluster_one_argmax_and_the_logit_value():
    init = ClusteredRouterInit(logit=2.5, seed=0)
    m, d, logits = fit_with([init])
    clusters = d.clusters
    argmax = logits.argmax(dim=1)
    for c in clusters.unique():  # one argmax per true cluster, distinct across clusters
        assert argmax[clusters == c].unique().numel() == 1
    assert argmax[clusters == 0][0] != argmax[clusters == 1][0]
    expected = torch.zeros(NUM_CLIENTS, 2)
    expected[torch.arange(NUM_CLIENTS), init.assignment] = 2.5
    assert torch.equal(logits, expected)
    assert not torch.equal(m.model.router.logits.detach(), logits)  # the router keeps learning


def test_clustered_init_is_a_pure_function_of_the_seed():
    first, _, l1 = fit_with([ClusteredRouterInit(seed=3)], rounds=2, seed=3)
    second, _, l2 = fit_with([ClusteredRouterInit(seed=3)], rounds=2, seed=3)
    assert torch.equal(l1, l2)
    assert torch.equal(first.model.router.logits, second.model.router.logits)


def test_lowest_loss_adaptor_picks_the_adaptor_with_the_lowest_loss_and_restores_the_logits():
    m, d = module(), data()
    d.setup("fit")
    layer = next(iter(m.model.floral_layers().values()))
    with torch.no_grad():
        layer.adaptor_B[0].fill_(50.0)  # adaptor 0 wrecks every prediction, adaptor 1 adds nothing
        m.model.router.logits.copy_(torch.randn(NUM_CLIENTS, 2))
    before = m.model.router.logits.detach().clone()
    assert torch.equal(lowest_loss_adaptor(m, d), torch.ones(NUM_CLIENTS, dtype=torch.long))
    assert torch.equal(m.model.router.logits.detach(), before)
    with torch.no_grad():
        layer.adaptor_B[1].fill_(-80.0)  # now adaptor 1 is the worse one
    assert torch.equal(lowest_loss_adaptor(m, d), torch.zeros(NUM_CLIENTS, dtype=torch.long))


def test_reassignment_sets_the_lowest_loss_adaptor_at_its_rounds():
    class Record(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):  # after the init's own (it is listed first)
            if trainer.current_epoch == 2:
                self.logits = pl_module.model.router.logits.detach().clone()
                self.best = lowest_loss_adaptor(pl_module, trainer.datamodule)

    record = Record()
    fit_with([ClusteredRouterInit(logit=4.0, reassign_every=2, seed=0), record], rounds=3)
    expected = torch.zeros(NUM_CLIENTS, 2)
    expected[torch.arange(NUM_CLIENTS), record.best] = 4.0
    assert torch.equal(record.logits, expected)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"logit": 0.0}, "logit=0.0"), ({"restarts": 0}, "restarts=0"), ({"reassign_every": -1}, "reassign_every=-1")],
)
def test_clustered_init_refuses_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClusteredRouterInit(**kwargs)


def test_noise_init_refuses_a_non_positive_std():
    with pytest.raises(ValueError, match="std=0"):
        AdaptorInitNoise(std=0)


@pytest.mark.parametrize("callback", [ClusteredRouterInit(), AdaptorInitNoise()])
def test_router_inits_refuse_the_oracle_and_fedavg(callback):
    with pytest.raises(ValueError, match="oracle"):
        fit_with([callback], router=RouterOptions(oracle=True))
    with pytest.raises(ValueError, match="router"):
        fit_with([callback], num_adaptors=0)


# --- diagnostics -----------------------------------------------------------------------------------------
def test_diagnostics_spread_ari_and_gradient_norm_are_the_hand_computed_values(tmp_path):
    class StepGradients(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            self.norms = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.norms.append(float(pl_module.model.router.logits.grad.norm()))

    steps = StepGradients()
    diagnostics = RouterDiagnostics(path=str(tmp_path / "diag.json"))
    m, d, _ = fit_with([AdaptorInitNoise(std=0.1, seed=0), diagnostics, steps], rounds=2)
    row = diagnostics.history[-1]
    assert row["round"] == 2.0 and len(diagnostics.history) == 2
    assert row["router/grad_norm"] == pytest.approx(sum(steps.norms) / len(steps.norms))
    layer = next(iter(m.model.floral_layers().values()))
    deltas = [
        torch.cat([(layer.adaptor_B[c] @ layer.adaptor_A[c]).flatten(), layer.adaptor_bias[c]]).detach()
        for c in range(2)
    ]  # alpha = 1: adaptor c changes the weight by B_c A_c and the bias by b_c
    assert row["router/adaptor_spread"] == pytest.approx(float((deltas[0] - deltas[1]).norm()), rel=1e-5)
    argmax = m.model.router.logits.detach().argmax(1)
    assert row["router/ari"] == adjusted_rand_index(d.clusters, argmax)
    import json

    assert json.loads((tmp_path / "diag.json").read_text()) == diagnostics.history


# --- router.init="clustered": the module's own clustered start ------------------------------------------------------
def test_the_module_option_starts_the_router_as_the_callback_does(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")  # the run's seed (seed_everything sets it): both are seeded by it
    by_callback, _, from_callback = fit_with([ClusteredRouterInit()])
    by_option, d, from_option = fit_with([], router=RouterOptions(init="clustered"))
    assert torch.equal(from_option, from_callback)  # the same clustering, seeded by the run's seed
    argmax = from_option.argmax(dim=1)
    for c in d.clusters.unique():  # one argmax per true cluster
        assert argmax[d.clusters == c].unique().numel() == 1
    assert torch.equal(by_option.model.router.logits, by_callback.model.router.logits)


def test_the_module_option_keeps_logits_already_set_and_does_nothing_without_a_learned_router():
    class PresetLogits(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            with torch.no_grad():
                pl_module.model.router.logits.fill_(0.5)

    _, _, kept = fit_with([PresetLogits()], router=RouterOptions(init="clustered"))
    assert torch.equal(kept, torch.full_like(kept, 0.5))
    _, d, oracle = fit_with([], router=RouterOptions(init="clustered", oracle=True))
    assert torch.equal(oracle.argmax(dim=1), d.clusters % 2)  # the oracle's logits, untouched
    fedavg = module(num_adaptors=0, router=RouterOptions(init="clustered"))
    fit(fedavg, data(), 1, FederatedCallback(seed=0))  # FedAvg: nothing to start, no error


def test_a_bad_router_init_is_refused_naming_the_valid_ones():
    with pytest.raises(ValueError, match=r"router.init='kmeans': expected one of \('zeros', 'clustered'\)"):
        module(router=RouterOptions(init="kmeans"))


@pytest.mark.parametrize(
    "config, init",
    [("mnist", "clustered"), ("mnist_label_shift", "clustered"), ("synthetic_linear", "clustered"),
     ("synthetic_mlp", "clustered"), ("cifar", "zeros"), ("cifar_label_shift", "zeros"), ("cifar100", "zeros")],
)  # fmt: skip
def test_the_shipped_configs_start_the_router_where_the_clustered_start_was_measured(config, init):
    from floral_lightning.cli import main

    cli = main(["--config", f"conf/{config}.yaml"], run=False)  # builds the data source, downloads nothing
    assert cli.model.router_options.init == init
