"""Extending the package from outside it: a new layer type, a new personalised method, a new task."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from federated_helpers import fit, linear_data
from torch import nn

from callbacks import FederatedCallback
from floral_lightning import FloralModel, FloralModule
from floral_lightning.cli import main
from floral_lightning.layers import FloralLayer, register_layer, unregister_layer
from floral_lightning.module import ClientOptimizer
from floral_lightning.personalized import PersonalizedModel
from floral_lightning.tasks import TASKS, Task, register_task

CONF = Path(__file__).resolve().parents[1] / "conf"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false"]


# --- a user-defined layer type and its wrapper ------------------------------------------------------------
class Scale(nn.Module):
    """A layer FLoRAL does not know: ``x * weight + bias`` elementwise."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(features))
        self.bias = nn.Parameter(torch.zeros(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.bias


class FloralScale(FloralLayer):
    """C adaptors of ``Scale``'s weight: ``x * (weight + alpha * sum_c w_c a_c) + bias``."""

    adapts = (Scale,)

    def __init__(self, base: Scale, num_adaptors: int, rank=None, *, alpha=1.0, min_rank=1, name="scale") -> None:
        super().__init__(base, num_adaptors, alpha)
        self.adaptor_weight = nn.Parameter(torch.zeros(num_adaptors, base.weight.numel()))

    def delta_weight(self, w):
        return self.alpha * (w @ self.adaptor_weight), None

    def _base_forward(self, x, weight, bias):
        return x * weight + bias

    def forward_factorised(self, x, w):
        return self.base(x) + self.alpha * x * (w @ self.adaptor_weight)

    def forward_naive(self, x, w):
        return self.base(x) + sum(self.alpha * w[:, c : c + 1] * x * a for c, a in enumerate(self.adaptor_weight))


@pytest.fixture
def scale_registered():
    register_layer(FloralScale, kind="scale")
    yield
    unregister_layer(FloralScale)


def test_a_registered_wrapper_adapts_its_type_and_trains_through_floral_model(scale_registered):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(10, 3), Scale(3))
    model = FloralModel(base, num_clients=6, num_adaptors=2, rank=1, linear=False, alpha=0.5)
    (layer,) = model.floral_layers().values()
    assert isinstance(layer, FloralScale) and model.roles["base.1.adaptor_weight"] == "adaptor"
    with torch.no_grad():
        layer.adaptor_weight.normal_()
    x, ids = torch.randn(8, 10), torch.tensor([0, 1, 2, 3, 4, 5, 0, 1])
    model.eval()
    w = model.router(ids)
    h = base[0](x)
    expected = h * base[1].base.weight + base[1].base.bias + 0.5 * h * (w @ layer.adaptor_weight)  # the definition
    torch.testing.assert_close(model(x, ids), expected)
    torch.testing.assert_close(model(x, 3), model(x, torch.full((8,), 3)))  # merged = factorised

    from floral_lightning.module import RegressionModule

    module = RegressionModule(base=nn.Sequential(nn.Linear(10, 3), Scale(3)), num_clients=6, num_adaptors=2)
    before = module.model.floral_layers()["1"].adaptor_weight.detach().clone()
    fit(module, linear_data(), 2, FederatedCallback(clients_per_round=3))
    assert not torch.equal(module.model.floral_layers()["1"].adaptor_weight, before)


def test_a_registration_comes_before_the_built_in_wrapper_of_its_type():
    from floral_lightning.layers import FloralLinear

    class MyLinear(FloralLinear):
        pass

    register_layer(MyLinear, kind="linear")
    try:
        model = FloralModel(nn.Sequential(nn.Linear(10, 3)), num_clients=2, rank=1)
        assert type(model.floral_layers()["0"]) is MyLinear
        with pytest.raises(ValueError, match="no layer of the base model was selected"):  # governed by `linear`
            FloralModel(nn.Sequential(nn.Linear(10, 3)), num_clients=2, rank=1, linear=False)
    finally:
        unregister_layer(MyLinear)
    assert (
        type(FloralModel(nn.Sequential(nn.Linear(10, 3)), num_clients=2, rank=1).floral_layers()["0"]) is FloralLinear
    )


def test_an_unregistered_type_is_named_in_the_error():
    with pytest.raises(TypeError, match="'1' is a Scale.*register_layer"):
        FloralModel(nn.Sequential(nn.Linear(10, 3), Scale(3)), num_clients=2, target_modules=["1"])


# --- a new personalised method, defined here in under 40 lines, run through the CLI ------------------------
class PerClientBias(PersonalizedModel):
    """A shared model plus a private output bias per client (never averaged)."""

    def __init__(self, base: nn.Module, num_clients: int, out_features: int) -> None:
        super().__init__()
        self.base = base
        self.client_bias = nn.Parameter(torch.zeros(num_clients, out_features))
        self._roles = {n: "private" if n == "client_bias" else "shared" for n, _ in self.named_tensors()}

    def forward(self, x, client_ids=None):
        return self.base(x) + self.client_bias[client_ids]


class PerClientBiasModule(FloralModule):
    hparams_not_saved = ("num_adaptors",)

    def __init__(
        self, base: nn.Module, num_clients: int = 1, out_features: int = 1, optimizer: ClientOptimizer | None = None
    ) -> None:
        super().__init__(base, num_clients, num_adaptors=0, optimizer=optimizer, task="regression")
        self.model = PerClientBias(base, num_clients, out_features)


def test_a_new_method_runs_through_the_cli_without_touching_the_package(tmp_path):
    cli = main(
        [
            "fit",
            "--config",
            str(CONF / "synthetic_linear.yaml"),
            f"--model.class_path={__name__}.PerClientBiasModule",
            "--model.init_args.out_features=3",
            "--federated.clients_per_round=4",
            "--trainer.max_epochs=3",
            "--trainer.check_val_every_n_epoch=3",
            "--trainer.enable_checkpointing=false",
            "--trainer.callbacks=[]",
            f"--trainer.default_root_dir={tmp_path}",
            *QUIET,
        ]
    )
    module = cli.model
    assert type(module) is PerClientBiasModule and "val/mse" in cli.trainer.callback_metrics
    assert "client_bias" not in module.federated_state()  # private: never sent to the server
    trained = module.model.client_bias.detach().abs().sum(1) > 0
    fed = next(cb for cb in cli.trainer.callbacks if isinstance(cb, FederatedCallback))
    assert 4 <= int(trained.sum()) < 10 and fed.round == 3  # only sampled clients moved their bias


# --- a new task, registered by name and used by any method --------------------------------------------------
class MeanAbsoluteError(Task):
    def loss(self, outputs, targets):
        return (outputs - targets).abs().mean()

    def metrics(self, outputs, targets):
        return {"mae": (outputs - targets).abs().flatten(1).mean(1)}


def test_a_registered_task_is_used_by_every_method():
    from floral_lightning.methods import EnsembleModule, LocalAdaptorModule

    register_task("mae", MeanAbsoluteError())
    try:
        for cls, kwargs in [
            (FloralModule, {"num_adaptors": 2, "rank": 1}),
            (EnsembleModule, {}),
            (LocalAdaptorModule, {}),
        ]:
            module = cls(nn.Linear(10, 3), num_clients=6, task="mae", **kwargs)
            out, y = torch.randn(4, 3), torch.randn(4, 3)
            assert module.compute_loss(out, y) == (out - y).abs().mean()
            assert set(module.compute_metrics(out, y)) == {"mae"} and module.higher_is_better == frozenset()
    finally:
        TASKS.pop("mae")
    with pytest.raises(ValueError, match="task='mae': expected one of"):
        FloralModule(nn.Linear(10, 3), task="mae")
