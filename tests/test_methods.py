"""The baselines (spec §4): private state stays private, evaluation is personalised, and each reduces to FedAvg
where it should."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from federated_helpers import RecordingCallback, fit, linear_data, quiet_trainer
from torch import nn
from torch.func import functional_call

from callbacks import FederatedCallback, sample_clients
from floral_lightning.aggregation import aggregate
from floral_lightning.data import FederatedDataModule, RandomImages, SyntheticLinear
from floral_lightning.ensemble import EnsembleModel
from floral_lightning.methods import (
    ClientStates,
    DittoModule,
    EnsembleModule,
    FedAvgModule,
    FedProxModule,
    FineTuneModule,
    LocalAdaptorModule,
    per_client_outputs,
)
from floral_lightning.models import MLP
from floral_lightning.module import ClientOptimizer, RegressionModule, RouterOptions

OPTIMIZER = ClientOptimizer(lr=0.05, router_lr=0.1)


def image_data(num_clients: int = 4) -> FederatedDataModule:
    return FederatedDataModule(
        RandomImages(160, 80, shape=(1, 6, 6), num_classes=4),
        num_clients=num_clients,
        num_clusters=2,
        cluster_transform="label_shift",
        batch_size=16,
        eval_batch_size=50,  # batches that span clients
    )


def linear(cls, num_clients: int = 6, seed: int = 0, **kwargs):
    """``cls`` on a linear model and the regression task (any method takes ``task``)."""
    torch.manual_seed(seed)
    defaults = {"optimizer": OPTIMIZER} | ({} if cls is RegressionModule else {"task": "regression"})
    return cls(nn.Linear(10, 3), num_clients=num_clients, **(defaults | kwargs))


def validate(t: L.Trainer, module, data) -> dict[str, float]:
    t.limit_val_batches = 1.0
    (metrics,) = t.validate(module, datamodule=data, verbose=False)
    return metrics


class Recorder(RecordingCallback):
    """Also keeps, per client, the private state it loaded and the private state it trained."""

    def on_fit_start(self, trainer, pl_module):
        super().on_fit_start(trainer, pl_module)
        # private tensors by (round, client): as loaded when the client started, as trained when it finished
        self.loaded: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self.trained: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    def on_client_start(self, trainer, pl_module, client_id):
        if hasattr(pl_module, "private_tensors"):
            self.loaded[self.round, client_id] = clone(pl_module.private_tensors())

    def on_client_update(self, trainer, pl_module, update):
        super().on_client_update(trainer, pl_module, update)
        if hasattr(pl_module, "private_tensors"):
            self.trained[self.round, update.client_id] = clone(pl_module.private_tensors())


def clone(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in tensors.items()}


def stored_states(module) -> dict[int, dict[str, torch.Tensor]]:
    return {k: clone(module.client_states.client(k)) for k in range(module.client_states.num_clients)}


def assert_private_protocol(module, recorder: Recorder, before: dict[int, dict[str, torch.Tensor]]) -> None:
    """Each client trained from its own stored state, and what it trained is stored; nothing else changed."""
    expected = dict(before)
    for (round_idx, k), loaded in sorted(recorder.loaded.items()):
        assert_states_equal(loaded, expected[k])
        assert any(not torch.equal(t, loaded[n]) for n, t in recorder.trained[round_idx, k].items())
        expected[k] = recorder.trained[round_idx, k]
    for k, state in stored_states(module).items():
        assert_states_equal(state, expected[k])


def assert_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# --- ClientStates ------------------------------------------------------------------------------------------
def test_client_states_store_and_load_by_exact_name():
    live = {"layer.weight": torch.randn(3, 2), "layer.count": torch.tensor(4)}
    states = ClientStates(5, live)
    assert states.num_clients == 5
    assert {n: tuple(t.shape) for n, t in states.state_dict().items()} == {
        "layer__weight": (5, 3, 2),
        "layer__count": (5,),
    }
    assert torch.equal(states.client(3)["layer.weight"], live["layer.weight"])  # every client starts there
    trained = {"layer.weight": torch.randn(3, 2), "layer.count": torch.tensor(9)}
    states.store(1, trained)
    states.load(1, live)
    assert torch.equal(live["layer.weight"], trained["layer.weight"]) and int(live["layer.count"]) == 9
    assert not torch.equal(states.client(0)["layer.weight"], trained["layer.weight"])
    with pytest.raises(KeyError, match="missing"):
        states.store(0, {"layer.weight": trained["layer.weight"]})
    with pytest.raises(KeyError, match="unexpected"):
        states.load(0, trained | {"other.layer.weight": torch.zeros(3, 2)})  # no substring matching
    with pytest.raises(IndexError):
        states.client(5)


def test_per_client_outputs_puts_outputs_back_in_batch_order():
    x = torch.arange(6.0)[:, None]
    ids = torch.tensor([2, 0, 2, 1, 0, 2])
    out = per_client_outputs(x, ids, lambda k, xk: xk * 10 + k)
    assert torch.equal(out, x * 10 + ids[:, None])


# --- Local Adaptor -----------------------------------------------------------------------------------------
def test_local_adaptor_adaptors_are_never_averaged():
    data = linear_data()
    module = linear(LocalAdaptorModule, rank=1)
    assert module.private_names == ("base.adaptor_A", "base.adaptor_B", "base.adaptor_bias")
    assert set(module.private_names).isdisjoint(module.federated_roles())
    assert set(module.private_names).isdisjoint(module.federated_state())
    with torch.no_grad():  # every client starts from its own adaptor
        for buffer in module.client_states.buffers():
            buffer.normal_()
    before = stored_states(module)
    recorder = Recorder(clients_per_round=3, seed=1)
    fit(module, data, 2, recorder)
    trained = set(sample_clients(6, 3, 1, 0)) | set(sample_clients(6, 3, 1, 1))
    assert {k for _, k in recorder.trained} == trained and len(trained) < 6
    assert_private_protocol(module, recorder, before)
    for k in set(range(6)) - trained:
        assert_states_equal(module.client_states.client(k), before[k])
    # the aggregator saw the base only, and the new base is the plain average of the last round's clients' bases
    assert all(set(u.state) == {"base.base.weight", "base.base.bias"} for u in recorder.updates)
    expected = aggregate(recorder.start, module.federated_roles(), recorder.updates[3:])
    for name, tensor in module.federated_state().items():
        torch.testing.assert_close(tensor, expected[name], msg=name)
    assert module.client_mixtures() is None and module.model.router.frozen


def test_local_adaptor_evaluates_each_client_with_its_own_adaptor():
    data = linear_data()
    module = linear(LocalAdaptorModule, rank=1)
    t = fit(module, data, 2, FederatedCallback(clients_per_round=1.0))
    module.eval()
    errors = []
    for x, y, ids in data.val_dataloader():
        assert len(ids.unique()) > 1  # the batch mixes clients
        with torch.no_grad():
            out = module.evaluation_outputs(x, ids)
            for i, k in enumerate(ids.tolist()):
                reference = copy.deepcopy(module.model)
                reference.load_state_dict(module.client_states.client(k), strict=False)
                torch.testing.assert_close(out[i], reference(x[i : i + 1], k)[0])
            # the live adaptor (the last client's) would give other predictions for the other clients
            assert not torch.allclose(out, module(x, ids))
        errors.append((out - y).pow(2).mean(1))
    metrics = validate(t, module, data)
    assert metrics["val/mse"] == pytest.approx(torch.cat(errors).mean().item(), rel=1e-5)


# --- oracle routers ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["floral", "ensemble"])
def test_oracle_router_never_changes(method):
    router = RouterOptions(oracle=True, noise="uniform")
    if method == "floral":
        module = linear(RegressionModule, num_adaptors=2, rank=1, router=router)
    else:
        module = linear(EnsembleModule, num_members=2, router=router)
    before = copy.deepcopy(module.federated_state())
    recorder = Recorder(clients_per_round=1.0)
    fit(module, linear_data(), 2, recorder)
    expected = torch.full((6, 2), -100.0)
    expected[torch.arange(6), torch.arange(6) % 2] = 0.0
    assert module.model.router.frozen
    assert torch.equal(module.model.router.logits.detach(), expected)
    assert any(not torch.equal(t, before[n]) for n, t in module.federated_state().items())  # it did train
    if method == "ensemble":  # member c is the average of its own cluster's clients' member c (p(k|c))
        last_round = recorder.updates[6:]
        for name, tensor in module.federated_state().items():
            for c in range(2):
                own = [u for u in last_round if u.client_id % 2 == c]
                mean = sum(u.num_samples * u.state[name][c] for u in own) / sum(u.num_samples for u in own)
                torch.testing.assert_close(tensor[c], mean, msg=name)


# --- Ensemble ----------------------------------------------------------------------------------------------
def test_ensemble_model_mixes_independent_members_on_the_outputs():
    torch.manual_seed(0)
    base = MLP(5, [8], 3)
    model = EnsembleModel(base, num_clients=4, num_members=3, router={"noise": "none"})
    with torch.no_grad():
        model.router.logits.normal_()
    weights = model.members.get_parameter("1.weight")
    assert weights.shape == (3, 8, 5)
    assert torch.equal(weights[0], base[1].weight)  # member 0 keeps the base's initialisation
    assert not torch.equal(weights[1], weights[0]) and not torch.equal(weights[2], weights[1])
    assert set(model.roles.values()) == {"adaptor", "private"} and model.shared_parameters() == []
    assert "router.logits" not in model.federated_state()
    overhead = model.overhead()
    assert overhead.base == sum(p.numel() for p in base.parameters()) and overhead.adaptor_percent == 200.0

    x = torch.randn(7, 5)
    ids = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    members = [functional_call(base, model.member_state(c), (x,)) for c in range(3)]
    w = model.router(2)
    torch.testing.assert_close(model(x, 2), sum(w[c] * members[c] for c in range(3)))
    w = model.router(ids)
    torch.testing.assert_close(model(x, ids), sum(w[:, c : c + 1] * members[c] for c in range(3)))


@pytest.mark.parametrize(
    "base, chain",
    [
        (nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.Tanh(), nn.Linear(7, 5, bias=False), nn.GELU(),
                       nn.Linear(5, 3)), True),
        (MLP(12, [6], 3), True),
        (nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.Softmax(dim=-1), nn.Linear(7, 3)), False),  # not elementwise
    ],
    ids=["deep-chain", "mlp", "vmap"],
)  # fmt: skip
def test_ensemble_members_outputs_and_gradients_are_each_members_own(base, chain):
    """Stacked products (a chain of linear layers and elementwise activations) or ``vmap``: member c's output is
    the base network run with member c's tensors, and so are the gradients of every member's tensors."""
    torch.manual_seed(0)
    model = EnsembleModel(base, num_clients=3, num_members=3, router={"noise": "none"})
    assert (model._chain is not None) == chain
    x = torch.randn(5, 3, 4)  # flattened to 12 features
    names = [n for n, _ in model.members.named_parameters()]
    stacked = dict(model.members.named_parameters())
    outputs = model.member_outputs(x)
    expected = torch.stack([functional_call(base, {n: stacked[n][c] for n in names}, (x,)) for c in range(3)])
    torch.testing.assert_close(outputs, expected)
    upstream = torch.randn_like(outputs)
    got = torch.autograd.grad((outputs * upstream).sum(), [stacked[n] for n in names])
    want = torch.autograd.grad((expected * upstream).sum(), [stacked[n] for n in names])
    for name, g, w in zip(names, got, want):
        torch.testing.assert_close(g, w, msg=name)


def test_ensemble_members_with_batch_norm_update_their_own_statistics():
    torch.manual_seed(0)
    model = EnsembleModel(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6)), num_clients=2, num_members=2)
    stats = model.members.get_buffer("1.running_mean")
    model(torch.randn(8, 4), 0).sum().backward()
    assert stats.shape == (2, 6) and not torch.equal(stats[0], stats[1]) and stats.abs().sum() > 0
    assert model.members.get_buffer("1.num_batches_tracked").tolist() == [1, 1]


def test_ensemble_with_one_member_equals_fedavg():
    torch.manual_seed(0)
    base = MLP(36, [16], 4)
    fedavg = FedAvgModule(copy.deepcopy(base), num_clients=4, optimizer=OPTIMIZER)
    ensemble = EnsembleModule(copy.deepcopy(base), num_clients=4, num_members=1, optimizer=OPTIMIZER)
    fit(fedavg, image_data(), 2, FederatedCallback(clients_per_round=2, seed=3))
    fit(ensemble, image_data(), 2, FederatedCallback(clients_per_round=2, seed=3))
    assert not torch.equal(fedavg.model.base[1].weight, base[1].weight)  # it trained
    for name, tensor in fedavg.model.base.state_dict().items():
        torch.testing.assert_close(ensemble.model.member_state(0)[name], tensor, msg=name)
    fedavg.eval(), ensemble.eval()
    data = image_data()
    data.setup()
    x, _, ids = next(iter(data.val_dataloader()))
    with torch.no_grad():
        torch.testing.assert_close(ensemble.evaluation_outputs(x, ids), fedavg.evaluation_outputs(x, ids))


# --- FedProx -----------------------------------------------------------------------------------------------
def test_fedprox_with_mu_zero_is_fedavg_and_mu_keeps_clients_near_the_global_model():
    runs = {}
    for name, cls, kwargs in [
        ("fedavg", FedAvgModule, {}),
        ("mu0", FedProxModule, {"mu": 0.0}),
        ("mu5", FedProxModule, {"mu": 5.0}),
    ]:
        module = linear(cls, **kwargs)
        recorder = Recorder(clients_per_round=1.0)
        fit(module, linear_data(), 2, recorder)
        runs[name] = (module, recorder)
    fedavg, mu0, mu5 = (runs[n][0].federated_state() for n in ("fedavg", "mu0", "mu5"))
    assert fedavg.keys() == mu0.keys() == mu5.keys() == {"base.weight", "base.bias"}
    for name in fedavg:
        torch.testing.assert_close(mu0[name], fedavg[name], rtol=0, atol=0)
        assert not torch.allclose(mu5[name], fedavg[name])

    def drift(recorder):  # each client's distance from the global weights it started from (first round)
        start = recorder.start
        return torch.stack(
            [sum((u.state[n] - start[n]).pow(2).sum() for n in start).sqrt() for u in recorder.updates[:6]]
        )

    assert (drift(runs["mu5"][1]) < drift(runs["fedavg"][1])).all()


def test_a_local_penalty_without_the_clients_start_is_refused_by_name():
    """An override of on_client_start that does not call FloralModule's leaves local_penalty without its start."""

    class ForgetfulFedProx(FedProxModule):
        def on_client_start(self, client_id: int) -> None:
            pass

    with pytest.raises(RuntimeError, match=r"ForgetfulFedProx.local_penalty .* super\(\).on_client_start"):
        fit(linear(ForgetfulFedProx, mu=1.0), linear_data(), 1, FederatedCallback())


def test_fedprox_adds_its_term_to_floral():
    module = linear(FedProxModule, mu=1.0, num_adaptors=2, rank=1)
    assert module.model.router is not None
    fit(module, linear_data(), 1, FederatedCallback(clients_per_round=1.0))
    assert module.proximal_term() is None  # outside a client's training


# --- Ditto -------------------------------------------------------------------------------------------------
def test_ditto_global_model_is_fedavg_and_personal_models_stay_private():
    fedavg = linear(FedAvgModule)
    ditto = linear(DittoModule, lam=0.1)
    assert set(ditto.federated_state()) == set(fedavg.federated_state()) == {"base.weight", "base.bias"}
    assert set(ditto.federated_roles()) == {"base.weight", "base.bias"}
    with torch.no_grad():  # every client starts from its own personal model
        for buffer in ditto.client_states.buffers():
            buffer.normal_()
    before = stored_states(ditto)
    fit(fedavg, linear_data(), 2, FederatedCallback(clients_per_round=3, seed=4))
    recorder = Recorder(clients_per_round=3, seed=4)
    fit(ditto, linear_data(), 2, recorder)
    # the aggregator never saw a personal model, and the global model trained exactly as FedAvg's
    assert all(set(u.state) == {"base.weight", "base.bias"} for u in recorder.updates)
    for name, tensor in fedavg.federated_state().items():
        torch.testing.assert_close(ditto.federated_state()[name], tensor, msg=name)

    assert_private_protocol(ditto, recorder, before)
    trained = {k for _, k in recorder.trained}
    assert trained == set(sample_clients(6, 3, 4, 0)) | set(sample_clients(6, 3, 4, 1)) and len(trained) < 6
    for k in set(range(6)) - trained:
        assert_states_equal(ditto.client_states.client(k), before[k])


def test_ditto_personal_models_are_pulled_towards_the_global_model():
    def personal_distance(lam):
        module = linear(DittoModule, lam=lam)
        recorder = Recorder(clients_per_round=1.0)
        fit(module, linear_data(), 1, recorder)
        start = recorder.start
        return torch.stack(
            [sum((v[n] - start[n]).pow(2).sum() for n in start).sqrt() for v in recorder.trained.values()]
        )

    assert (personal_distance(5.0) < personal_distance(0.0)).all()


def test_ditto_evaluates_each_clients_personal_model():
    data = linear_data()
    module = linear(DittoModule, lam=0.1)
    t = fit(module, data, 2, FederatedCallback(clients_per_round=1.0))
    first = validate(t, module, data)

    # the personal models alone, evaluated by hand
    errors = []
    for x, y, ids in data.val_dataloader():
        for i, k in enumerate(ids.tolist()):
            personal = copy.deepcopy(module.personal)
            personal.load_state_dict(module.client_states.client(k))
            with torch.no_grad():
                errors.append((personal(x[i : i + 1]) - y[i : i + 1]).pow(2).mean())
    assert first["val/mse"] == pytest.approx(torch.stack(errors).mean().item(), rel=1e-5)

    with torch.no_grad():  # wreck the global model: the evaluation must not move
        for p in module.model.parameters():
            p.add_(100.0)
    assert validate(t, module, data) == first


# --- FedAvg + fine-tuning ----------------------------------------------------------------------------------
def test_finetune_changes_the_evaluated_weights_but_not_the_global_model():
    data = linear_data()
    fedavg = linear(FedAvgModule)
    finetune = linear(FineTuneModule, finetune_epochs=2)
    untuned = linear(FineTuneModule, finetune_epochs=0)
    runs = [(m, fit(m, data, 2, FederatedCallback(clients_per_round=1.0), validate=True)) for m in (fedavg, finetune)]
    # training unaffected by the per-round evaluations with fine-tuning
    for name, tensor in fedavg.state_dict().items():
        torch.testing.assert_close(finetune.state_dict()[name], tensor, msg=name)

    (_, t_fedavg), (_, t_finetune) = runs
    before = copy.deepcopy(finetune.state_dict())
    tuned_metrics = validate(t_finetune, finetune, data)
    assert_states_equal(finetune.state_dict(), before)  # global weights restored
    assert validate(t_finetune, finetune, data) == tuned_metrics  # deterministic
    fedavg_metrics = validate(t_fedavg, fedavg, data)
    # the clients' own data pull each model towards its cluster: fine-tuning lowers the personalised error
    assert tuned_metrics["val/mse"] < fedavg_metrics["val/mse"]

    untuned.load_state_dict(fedavg.state_dict())
    t_untuned = quiet_trainer(1, FederatedCallback())
    assert validate(t_untuned, untuned, data) == pytest.approx(fedavg_metrics)

    state = finetune.finetuned_state(3)
    assert any(not torch.equal(state[n], t) for n, t in finetune.model.state_dict().items())


def test_finetune_works_with_images_and_floral():
    data = image_data()
    torch.manual_seed(0)
    module = FineTuneModule(MLP(36, [16], 4), num_clients=4, num_adaptors=2, rank=2, optimizer=OPTIMIZER)
    t = fit(module, data, 1, FederatedCallback())
    before = copy.deepcopy(module.state_dict())
    assert "val/acc" in validate(t, module, data)
    assert_states_equal(module.state_dict(), before)


# --- checkpoints -------------------------------------------------------------------------------------------
METHODS = {
    "fedavg": (FedAvgModule, {}),
    "local_adaptor": (LocalAdaptorModule, {"rank": 2}),
    "ensemble": (EnsembleModule, {"num_members": 2}),
    "fedprox": (FedProxModule, {"mu": 0.1}),
    "ditto": (DittoModule, {"lam": 0.1}),
    "finetune": (FineTuneModule, {"finetune_epochs": 1}),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_state_survives_a_checkpoint_round_trip(method, tmp_path):
    cls, kwargs = METHODS[method]

    def make(seed):
        torch.manual_seed(seed)
        return cls(MLP(36, [16], 4), num_clients=4, optimizer=OPTIMIZER, **kwargs)

    module = make(0)
    t = fit(module, image_data(), 1, FederatedCallback(clients_per_round=2), default_root_dir=tmp_path)
    path = tmp_path / "round1.ckpt"
    t.save_checkpoint(path)
    state = module.state_dict()
    if method in ("local_adaptor", "ditto"):
        private = [n for n in state if n.startswith("client_states.")]
        assert private and all(state[n].shape[0] == 4 for n in private)

    fresh = make(1)
    assert any(not torch.equal(t, state[n]) for n, t in fresh.state_dict().items())
    fresh.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    assert_states_equal(fresh.state_dict(), state)

    torch.manual_seed(2)
    reloaded = cls.load_from_checkpoint(path, base=MLP(36, [16], 4), weights_only=True)
    assert type(reloaded) is cls and reloaded.hparams == module.hparams
    assert_states_equal(reloaded.state_dict(), state)


@pytest.mark.parametrize("cls", [LocalAdaptorModule, DittoModule])
def test_private_state_resumes_exactly(cls, tmp_path):
    def run(rounds, module, **kwargs):
        t = quiet_trainer(rounds, FederatedCallback(clients_per_round=3, seed=2), default_root_dir=tmp_path)
        t.fit(module, datamodule=linear_data(), **kwargs)
        return t

    kwargs = {"rank": 1} if cls is LocalAdaptorModule else {}
    full = linear(cls, **kwargs)
    run(4, full)
    first = linear(cls, **kwargs)
    t = run(2, first)
    t.save_checkpoint(tmp_path / "round2.ckpt")
    resumed = linear(cls, seed=5, **kwargs)
    run(4, resumed, ckpt_path=tmp_path / "round2.ckpt")
    for name, tensor in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, msg=name)


def test_methods_fix_what_they_define():
    with pytest.raises(ValueError, match="fixes num_adaptors=1"):
        LocalAdaptorModule(nn.Linear(2, 2), num_adaptors=3)
    with pytest.raises(ValueError, match="fixes num_adaptors=0"):
        DittoModule(nn.Linear(2, 2), num_adaptors=2)
    assert FedAvgModule(nn.Linear(2, 2)).model.router is None
    assert EnsembleModule(nn.Linear(2, 2), num_members=2).model.router is not None


class LossChecker(FederatedCallback):
    """Before each step, the expected local loss by the definition; after it, the loss the module returned."""

    def __init__(self, expected_loss, **kwargs):
        super().__init__(**kwargs)
        self.expected_loss, self.pairs = expected_loss, []

    def on_client_start(self, trainer, pl_module, client_id):
        self.anchor = {n: t.detach().clone() for n, t in self.global_state.items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        with torch.no_grad():
            self.expected = self.expected_loss(pl_module, batch, self.anchor)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.pairs.append((outputs["loss"].item(), self.expected.item()))
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def test_fedprox_local_loss_is_the_task_loss_plus_half_mu_times_the_squared_distance():
    distances = []

    def expected(module, batch, anchor):
        x, y, k = batch
        distance = sum((t - anchor[n]).pow(2).sum() for n, t in module.federated_state().items())
        distances.append(distance.item())
        return nn.functional.mse_loss(module(x, k), y) + 0.5 * 3.0 * distance

    module = linear(FedProxModule, mu=3.0)
    checker = LossChecker(expected, clients_per_round=2)
    fit(module, linear_data(), 1, checker)
    assert len(checker.pairs) > 4 and max(distances) > 1e-3  # clients moved away from the anchor
    for got, want in checker.pairs:
        assert got == pytest.approx(want, rel=1e-5)


def test_ditto_local_loss_adds_the_personal_loss_and_half_lam_times_its_distance_to_the_global_model():
    distances = []

    def expected(module, batch, anchor):
        x, y, k = batch
        personal = dict(module.personal.named_parameters())
        distance = sum((personal[n] - anchor[n]).pow(2).sum() for n in personal)
        distances.append(distance.item())
        loss = nn.functional.mse_loss(module(x, k), y) + nn.functional.mse_loss(module.personal(x), y)
        return loss + 0.5 * 2.0 * distance

    module = linear(DittoModule, lam=2.0)
    checker = LossChecker(expected, clients_per_round=2)
    fit(module, linear_data(), 2, checker)  # round 2: personal models start away from the global one
    assert len(checker.pairs) > 4 and max(distances) > 1e-3
    for got, want in checker.pairs:
        assert got == pytest.approx(want, rel=1e-5)


def test_finetuning_is_finetune_epochs_of_sgd_at_finetune_lr_from_the_global_weights():
    """With the whole client split in one batch the order is irrelevant: each epoch is one gradient step."""
    data = FederatedDataModule(SyntheticLinear(samples_per_client=20), num_clients=6, num_clusters=2, batch_size=64)
    module = linear(FineTuneModule, finetune_epochs=3, finetune_lr=0.07)
    fit(module, data, 1, FederatedCallback())
    weights = {n: t.detach().clone().requires_grad_() for n, t in module.model.named_parameters()}
    x, y = data.client_split(2, "train")
    for _ in range(3):
        loss = nn.functional.mse_loss(functional_call(module.model, weights, (x,)), y)
        grads = torch.autograd.grad(loss, list(weights.values()))
        weights = {n: (w - 0.07 * g).detach().requires_grad_() for (n, w), g in zip(weights.items(), grads)}
    tuned = module.finetuned_state(2)
    for name, w in weights.items():
        torch.testing.assert_close(tuned[name], w.detach(), msg=name)
