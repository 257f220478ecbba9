"""Models out: checkpoints reload with no arguments, one client's network exports as a plain module, and the
whole federated model round-trips through a folder without Lightning."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from federated_helpers import linear_data
from torch import nn

from callbacks import FederatedCallback
from experiments.cells import METHODS, TASKS, config_args, method_overrides
from floral_lightning import FloralModel, FloralModule
from floral_lightning.cli import main
from floral_lightning.export import main as export_main
from floral_lightning.module import RegressionModule
from floral_lightning.pretrained import build_module, load_pretrained, save_client_model, save_pretrained

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false"]


def test_three_rounds_reload_without_arguments_and_export_client_3(tmp_path):
    """The issue's "done when": train 3 rounds, reload with no arguments, export client 3 and compare."""
    cli = main(
        [
            "fit",
            "--config",
            str(ROOT / "conf" / "synthetic_linear.yaml"),
            "--trainer.max_epochs=3",
            "--trainer.check_val_every_n_epoch=100",
            f"--trainer.default_root_dir={tmp_path}",
            *QUIET,
        ]
    )
    (ckpt,) = (tmp_path / "checkpoints").glob("last.ckpt")
    trained = cli.model.eval()

    reloaded = FloralModule.load_from_checkpoint(ckpt)  # no arguments: the base is rebuilt from its spec
    assert type(reloaded) is type(trained)
    for name, tensor in trained.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor, rtol=0, atol=0, msg=name)

    out = tmp_path / "client3.pt"
    export_main([str(ckpt), "--client", "3", "--out", str(out), "--folder", str(tmp_path / "floral")])
    exported = torch.load(out, weights_only=False)  # a plain nn.Linear with client 3's mixture folded in
    assert type(exported) is nn.Linear
    x = torch.randn(16, 10)
    with torch.no_grad():
        expected = trained(x, 3)
        torch.testing.assert_close(exported(x), expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(exported(x), trained(x, 0), atol=1e-3)  # really client 3's, not any client's
        fresh = nn.Linear(10, 3)
        fresh.load_state_dict(torch.load(tmp_path / "client3.state_dict.pt", weights_only=True))
        torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-6)

    folder = load_pretrained(tmp_path / "floral")  # no Lightning involved: JSON + safetensors
    assert isinstance(folder, FloralModel)
    assert torch.equal(folder.router.logits, trained.model.router.logits)
    ids = torch.arange(16) % 10
    with torch.no_grad():
        torch.testing.assert_close(folder(x, ids), trained(x, ids), rtol=0, atol=0)


def _mlp_spec() -> dict:
    return {
        "class_path": "floral_lightning.models.MLP",
        "init_args": {"in_features": 10, "hidden": [8], "out_features": 3},
    }


def _fit_python(module: FloralModule, tmp_path: Path, rounds: int = 2) -> Path:
    trainer = L.Trainer(
        max_epochs=rounds, callbacks=[FederatedCallback()], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, datamodule=linear_data())
    path = tmp_path / "python.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_python_built_module_with_a_base_spec_reloads_and_round_trips(tmp_path):
    torch.manual_seed(0)
    module = RegressionModule(_mlp_spec(), num_clients=6, num_adaptors=2, rank=2)
    ckpt = _fit_python(module, tmp_path)
    reloaded = FloralModule.load_from_checkpoint(ckpt)
    assert type(reloaded) is RegressionModule and reloaded.base_spec == _mlp_spec()
    x = torch.randn(5, 10)
    module.eval()
    with torch.no_grad():
        for k in range(6):
            torch.testing.assert_close(reloaded.client_model(k)(x), module(x, k), rtol=1e-5, atol=1e-6)

    folder = module.save_pretrained(tmp_path / "pretrained")
    config = json.loads((folder / "config.json").read_text())
    assert config["base"] == _mlp_spec() and config["floral"]["num_clients"] == 6 and config["kind"] == "floral"
    loaded = load_pretrained(folder)
    assert loaded.state_dict().keys() == module.model.state_dict().keys()
    for name, tensor in module.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_python_built_network_needs_base_when_loading(tmp_path):
    torch.manual_seed(0)
    module = RegressionModule(nn.Linear(10, 3), num_clients=6, num_adaptors=2, rank=1)
    ckpt = _fit_python(module, tmp_path, rounds=1)
    assert module.hparams["base"] is None  # no pickled network in the hyperparameters
    with pytest.raises(ValueError, match=r"load_from_checkpoint\(path, base=MyNet"):
        FloralModule.load_from_checkpoint(ckpt)
    reloaded = FloralModule.load_from_checkpoint(ckpt, base=nn.Linear(10, 3))
    assert torch.equal(reloaded.model.router.logits, module.model.router.logits)

    save_pretrained(module.model, tmp_path / "folder")  # no spec: PEFT-style, the base is passed back in
    with pytest.raises(ValueError, match="has no spec of the base network"):
        load_pretrained(tmp_path / "folder")
    loaded = load_pretrained(tmp_path / "folder", base=nn.Linear(10, 3))
    assert torch.equal(loaded.router.logits, module.model.router.logits)


def test_client_model_of_every_method_matches_its_evaluation(tmp_path):
    """Every method's exported network predicts what the method evaluates for that client."""
    from floral_lightning import methods

    x = torch.randn(7, 10)
    spec = {"class_path": "torch.nn.Linear", "init_args": {"in_features": 10, "out_features": 3}}
    for cls, options in [
        (methods.FedAvgModule, {}),
        (methods.LocalAdaptorModule, {"rank": 1}),
        (methods.EnsembleModule, {"num_members": 2}),
        (methods.FedProxModule, {"num_adaptors": 2, "rank": 1}),
        (methods.DittoModule, {}),
        (methods.FineTuneModule, {"finetune_epochs": 1}),  # fine-tunes on the attached data
    ]:
        torch.manual_seed(0)
        module = cls(spec, num_clients=6, task="regression", **options)
        ckpt = _fit_python(module, tmp_path, rounds=2)
        module.eval()
        reloaded = FloralModule.load_from_checkpoint(ckpt)  # the method's own class, from the checkpoint
        assert type(reloaded) is cls
        with torch.no_grad():
            for k in (1, 4):
                expected = module.evaluation_outputs(x, torch.full((7,), k))
                torch.testing.assert_close(module.client_model(k)(x), expected, rtol=1e-5, atol=1e-5, msg=cls)
                if cls is methods.FineTuneModule:  # fine-tuning reads the client's data: none attached
                    with pytest.raises(RuntimeError, match="federated data module"):
                        reloaded.client_model(k)
                else:
                    torch.testing.assert_close(reloaded.client_model(k)(x), expected, rtol=1e-5, atol=1e-5, msg=cls)
        path, _ = save_client_model(module.client_model(4), tmp_path / f"{cls.__name__}.pt")
        torch.testing.assert_close(torch.load(path, weights_only=False)(x), module.client_model(4)(x))
        if module.has_private_networks:
            with pytest.raises(TypeError, match="export the clients one by one"):
                module.save_pretrained(tmp_path / "nope")


def test_build_module_names_what_is_wrong():
    nested = build_module({"class_path": "torch.nn.Sequential", "init_args": {}})
    assert isinstance(nested, nn.Sequential)
    with pytest.raises(ValueError, match="cannot be imported"):
        build_module({"class_path": "torch.nn.NoSuchLayer"})
    with pytest.raises(ValueError, match="unknown key"):
        build_module({"class_path": "torch.nn.Linear", "init": {}})
    with pytest.raises(TypeError, match="not an nn.Module"):
        build_module({"class_path": "collections.OrderedDict"})


def _save_untrained(cli, path: Path) -> Path:
    cli.trainer.strategy.connect(cli.model)
    cli.trainer.save_checkpoint(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    ("task", "method"),
    [(task, None) for task in TASKS]
    + [(task, method) for task in ("mnist_rotate", "synthetic_linear") for method in METHODS],
)
def test_every_shipped_config_and_method_reloads_without_arguments(tmp_path, task, method):
    args = [*config_args(task), *(method_overrides(task, method) if method else []), *QUIET]
    cli = main([*args, f"--trainer.default_root_dir={tmp_path}"], run=False)
    reloaded = FloralModule.load_from_checkpoint(_save_untrained(cli, tmp_path / "model.ckpt"))
    assert type(reloaded) is type(cli.model)
    state = cli.model.state_dict()
    assert reloaded.state_dict().keys() == state.keys()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, state[name]), name
