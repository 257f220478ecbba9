"""The round loop (``callbacks/federated.py``) against an independent, hand-written federated loop (spec §2).

The reference loop below uses nothing of the package's aggregation or server code: it loads the global
weights, trains each sampled client with a *fresh* torch optimizer (momentum SGD or Adam, so a leaked
optimizer state shows), computes p(k) = n_k / sum n_j, p(c|k) = softmax(theta_k) and
p(k|c) = p(k) p(c|k) / sum_j p(j) p(c|j) with exp and sums, averages, and applies the server update
(FedAvgM's momentum buffer, FedAdam's bias-corrected moments) written out. Clients have unequal train
sizes, so a wrong p(k) shows too.
"""

from __future__ import annotations

import copy

import pytest
import torch
from federated_helpers import RecordingCallback, fit
from torch import nn

from callbacks import FederatedCallback, sample_clients
from floral_lightning.data import ArraySplits, ClientSource, FederatedDataModule
from floral_lightning.module import ClientOptimizer, RouterOptions
from floral_lightning.tasks import RegressionModule

NUM_CLIENTS = 4
TRAIN_SIZES = [5, 9, 14, 22]  # unequal on purpose


class UnequalClients(ClientSource):
    """Linear regression clients with train sizes ``TRAIN_SIZES`` (4 test samples each); cluster c = k mod 2
    has its own weight, so the clients' updates differ."""

    def make_clients(self, num_clients: int, clusters: torch.Tensor, seed: int) -> list[ArraySplits]:
        g = torch.Generator().manual_seed(seed)
        weights = torch.randn(2, 5, 2, generator=g)
        out = []
        for k in range(num_clients):
            n = TRAIN_SIZES[k]
            x = torch.randn(n + 4, 5, generator=g)
            y = x @ weights[int(clusters[k])]
            out.append(ArraySplits(x[:n], y[:n], x[n:], y[n:]))
        return out


def unequal_data(batch_size: int = 4) -> FederatedDataModule:
    return FederatedDataModule(UnequalClients(), num_clients=NUM_CLIENTS, num_clusters=2, batch_size=batch_size, seed=0)


def make_module(optimizer: ClientOptimizer) -> RegressionModule:
    torch.manual_seed(0)
    module = RegressionModule(
        nn.Linear(5, 2),
        num_clients=NUM_CLIENTS,
        num_adaptors=2,
        rank=1,
        alpha=0.8,
        router=RouterOptions(noise="none", min_prob=0.0),
        optimizer=optimizer,
    )
    with torch.no_grad():  # distinct mixtures, so p(k|c) differs from p(k)
        module.model.router.logits.copy_(torch.randn(NUM_CLIENTS, 2, generator=torch.Generator().manual_seed(1)))
        for layer in module.model.floral_layers().values():  # B = 0 at init would hide the adaptor averaging
            layer.adaptor_B.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(2))
    return module


def client_optimizer(model, opt: ClientOptimizer) -> torch.optim.Optimizer:
    groups = [
        {"params": model.shared_parameters(), "lr": opt.lr},
        {"params": model.adaptor_parameters(), "lr": opt.adaptor_lr or opt.lr},
        {"params": model.private_parameters(), "lr": opt.router_lr},
    ]
    if opt.name == "sgd":
        return torch.optim.SGD(groups, momentum=opt.momentum)
    return torch.optim.Adam(groups)


class HandServer:
    """The server update on the pseudo-gradient g = x_prev - x_avg, written out per tensor."""

    def __init__(self, kind: str, lr: float, adaptor_lr: float, momentum=0.0, betas=(0.9, 0.99), eps=1e-8):
        self.kind, self.lr, self.adaptor_lr, self.momentum, self.betas, self.eps = (
            kind,
            lr,
            adaptor_lr,
            momentum,
            betas,
            eps,
        )
        self.state: dict[str, dict] = {}

    def step(self, name: str, role: str, x: torch.Tensor, avg: torch.Tensor) -> torch.Tensor:
        lr = self.adaptor_lr if role == "adaptor" else self.lr
        g = x - avg
        s = self.state.setdefault(name, {"t": 0})
        s["t"] += 1
        if self.kind == "sgd":  # heavy ball: b = mu b + g (b = g at the first step), x -= lr b
            s["b"] = g.clone() if s["t"] == 1 else self.momentum * s["b"] + g
            return x - lr * s["b"]
        b1, b2 = self.betas
        s["m"] = (1 - b1) * g + (b1 * s["m"] if "m" in s else 0)
        s["v"] = (1 - b2) * g * g + (b2 * s["v"] if "v" in s else 0)
        m_hat, v_hat = s["m"] / (1 - b1 ** s["t"]), s["v"] / (1 - b2 ** s["t"])
        return x - lr * m_hat / (v_hat.sqrt() + self.eps)


def hand_rounds(module, data, opt: ClientOptimizer, server: HandServer, rounds: int, per_round: int, seed: int,
                local_epochs: int = 1) -> dict[str, torch.Tensor]:  # fmt: skip
    """The reference: ``rounds`` rounds of FLoRAL written out; returns the final model state."""
    model = copy.deepcopy(module.model)
    roles = {n: r for n, r in model.roles.items() if r != "private"}
    global_state = {n: t.detach().clone() for n, t in model.federated_state().items()}
    data.setup("fit")
    loader = data.train_dataloader()
    loader.local_epochs = local_epochs
    for round_idx in range(rounds):
        clients = sample_clients(NUM_CLIENTS, per_round, seed, round_idx)
        loader.set_round(round_idx, clients)
        batches: dict[int, list] = {}
        for x, y, k in loader:
            batches.setdefault(k, []).append((x, y))
        states, sizes, logits = [], [], []
        for k in clients:
            model.load_state_dict(global_state, strict=False)
            optimizer = client_optimizer(model, opt)  # fresh state for every client
            for x, y in batches[k]:
                optimizer.zero_grad()
                nn.functional.mse_loss(model(x, k), y).backward()
                optimizer.step()
            states.append({n: t.detach().clone() for n, t in model.federated_state().items()})
            sizes.append(TRAIN_SIZES[k])
            logits.append(model.router.logits[k].detach().clone())
        n = torch.tensor(sizes, dtype=torch.float64)
        p_k = n / n.sum()
        e = torch.stack(logits).double().exp()
        joint = p_k[:, None] * e / e.sum(1, keepdim=True)  # p(k) p(c|k)
        p_k_given_c = joint / joint.sum(0, keepdim=True)
        for name, role in roles.items():
            x = torch.stack([s[name] for s in states]).double()
            if role == "shared":
                avg = (p_k.view(-1, *[1] * (x.dim() - 1)) * x).sum(0)
            else:  # slice c of an adaptor tensor averages with p(k|c)
                avg = torch.stack([(p_k_given_c[:, c].view(-1, *[1] * (x.dim() - 2)) * x[:, c]).sum(0)
                                   for c in range(x.shape[1])])  # fmt: skip
            global_state[name] = server.step(name, role, global_state[name].double(), avg).float()
    model.load_state_dict(global_state, strict=False)
    return model.state_dict()


CASES = {
    "momentum-sgd clients, plain averaging": (
        ClientOptimizer(name="sgd", lr=0.05, router_lr=0.3, momentum=0.9),
        {},
        HandServer("sgd", 1.0, 1.0),
    ),
    "adam clients, plain averaging, 2 local epochs": (
        ClientOptimizer(name="adam", lr=0.01, adaptor_lr=0.03, router_lr=0.05),
        {"local_epochs": 2},
        HandServer("sgd", 1.0, 1.0),
    ),
    "momentum-sgd clients, FedAvgM server with its own adaptor lr": (
        ClientOptimizer(name="sgd", lr=0.05, router_lr=0.3, momentum=0.5),
        {"server_optimizer": "sgd", "server_lr": 0.7, "server_adaptor_lr": 1.3, "server_momentum": 0.6},
        HandServer("sgd", 0.7, 1.3, momentum=0.6),
    ),
    "adam clients, FedAdam server": (
        ClientOptimizer(name="adam", lr=0.01, router_lr=0.05),
        {"server_optimizer": "adam", "server_lr": 0.05, "server_betas": (0.8, 0.95), "server_eps": 1e-3},
        HandServer("adam", 0.05, 0.05, betas=(0.8, 0.95), eps=1e-3),  # the adaptor lr defaults to the base's
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_round_loop_equals_a_hand_written_federated_loop(case):
    opt, options, server = CASES[case]
    rounds, per_round, seed = 3, 3, 4
    module = make_module(opt)
    expected = hand_rounds(module, unequal_data(), opt, server, rounds, per_round, seed, options.get("local_epochs", 1))
    fit(module, unequal_data(), rounds, FederatedCallback(clients_per_round=per_round, seed=seed, **options))
    got = module.model.state_dict()
    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=2e-5, atol=2e-6, msg=name)


def test_sampled_count_rounds_a_fraction_to_the_nearest_client():
    assert len(sample_clients(10, 0.37, 0, 0)) == 4  # 3.7 clients -> 4, not 3
    assert len(sample_clients(10, 0.32, 0, 0)) == 3
    assert len(sample_clients(10, 0.01, 0, 0)) == 1  # at least one


def test_the_sampled_clients_really_differ_in_size_and_mixture():
    """The set-up the loop test relies on: at least one round leaves a client out, sizes and mixtures differ."""
    data = unequal_data()
    data.setup("fit")
    assert data.train_sizes.tolist() == TRAIN_SIZES
    assert any(len(sample_clients(NUM_CLIENTS, 3, 4, r)) == 3 for r in range(3))
    logits = make_module(ClientOptimizer()).model.router.logits.detach()
    assert len({tuple(row.tolist()) for row in logits.softmax(-1)}) == NUM_CLIENTS


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_a_client_not_sampled_keeps_its_mixture_exactly(name):
    opt = ClientOptimizer(name=name, lr=0.05, router_lr=0.5, momentum=0.9 if name == "sgd" else 0.0, weight_decay=0.01)
    module = make_module(opt)
    before = module.model.router.logits.detach().clone()
    fit(module, unequal_data(), 1, FederatedCallback(clients_per_round=2, seed=1))
    sampled = sample_clients(NUM_CLIENTS, 2, 1, 0)
    after = module.model.router.logits.detach()
    for k in range(NUM_CLIENTS):
        assert torch.equal(after[k], before[k]) != (k in sampled), f"client {k} (sampled: {k in sampled})"


def test_norm_buffers_are_averaged_not_server_optimised():
    """With FedAdam, parameters take the server step but buffers (BatchNorm statistics) take the p(k)-weighted
    average of the clients' reports, and the integer ``num_batches_tracked`` their maximum."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    module = RegressionModule(base, num_clients=NUM_CLIENTS, num_adaptors=2, rank=1)
    callback = RecordingCallback(server_optimizer="adam", server_lr=0.1)
    fit(module, unequal_data(batch_size=6), 1, callback)  # no batch of one sample (BatchNorm needs two)
    state = module.model.federated_state()
    n = torch.tensor([u.num_samples for u in callback.updates], dtype=torch.float64)
    buffers = [name for name in state if "running" in name]
    assert buffers
    for name in buffers:
        reports = torch.stack([u.state[name] for u in callback.updates]).double()
        expected = (n.view(-1, *[1] * (reports.dim() - 1)) * reports).sum(0) / n.sum()
        torch.testing.assert_close(state[name].double(), expected, msg=name)
    tracked = [name for name in state if name.endswith("num_batches_tracked")]
    for name in tracked:
        assert state[name] == max(u.state[name] for u in callback.updates)
    weight = "base.0.base.weight"
    average = sum(w * u.state[weight] for w, u in zip(n / n.sum(), callback.updates))
    assert not torch.allclose(state[weight], average.float())  # the parameters did take Adam's step


class DrawRecorder(RegressionModule):
    """Records the first draw of the global RNG each time a client starts (router noise and dropout draw next)."""

    def on_client_start(self, client_id: int) -> None:
        super().on_client_start(client_id)
        self.draws.append((self.current_epoch, client_id, torch.rand(()).item()))


def test_local_training_draws_are_seeded_per_round_and_client():
    """Router noise and dropout of client k in round r come from a stream of (seed, r, k): they repeat in a
    rerun, and differ between rounds and between clients."""

    def draws(seed: int) -> list[tuple[int, int, float]]:
        torch.manual_seed(0)
        module = DrawRecorder(nn.Linear(5, 2), num_clients=NUM_CLIENTS, num_adaptors=2, rank=1)
        module.draws = []
        fit(module, unequal_data(), 2, FederatedCallback(seed=seed))
        return module.draws

    first = draws(seed=3)
    assert [(r, k) for r, k, _ in first] == [(r, k) for r in range(2) for k in range(NUM_CLIENTS)]
    assert draws(seed=3) == first
    values = [v for _, _, v in first]
    assert len(set(values)) == len(values)  # every (round, client) its own stream
    assert [v for _, _, v in draws(seed=4)] != values
