"""End-to-end runs of ``train.py`` on tiny versions of the shipped configs."""

from __future__ import annotations

import glob
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from floral_lightning.cli import main
from floral_lightning.module import RegressionModule

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]

pytestmark = pytest.mark.slow


def run(*args: str):
    return main(list(args))


def events(log_dir: Path) -> EventAccumulator:
    (path,) = glob.glob(str(log_dir / "events.out.tfevents.*"))
    acc = EventAccumulator(path, size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def assert_mean_is_the_sample_weighted_mean_of_the_clusters(cli, metric: str = "val/acc") -> None:
    """The logged mean equals sum_c n_c * mean_c / sum_c n_c over the logged per-cluster means, n_c the
    cluster's evaluation samples, and lies between the worst client and the best cluster."""
    data, logged = cli.datamodule, cli.trainer.callback_metrics
    sizes, clusters = data.sizes("val").double(), data.clusters
    weighted, total = 0.0, 0.0
    for c in clusters.unique().tolist():
        n_c = float(sizes[clusters == c].sum())
        weighted, total = weighted + n_c * float(logged[f"{metric}_cluster{c}"]), total + n_c
    assert float(logged[metric]) == pytest.approx(weighted / total, rel=1e-5)
    assert float(logged[f"{metric}_worst"]) <= float(logged[metric])


def test_fit_then_test_from_checkpoint(tmp_path):
    config = str(CONF / "synthetic_linear.yaml")
    cli = run(
        "fit",
        "--config",
        config,
        "--trainer.max_epochs=4",
        "--trainer.check_val_every_n_epoch=2",
        f"--trainer.default_root_dir={tmp_path}",
        *QUIET,
    )
    log_dir = Path(cli.trainer.log_dir)
    ckpt = log_dir / "checkpoints" / "last.ckpt"
    assert ckpt.exists()

    acc = events(log_dir)
    scalars = set(acc.Tags()["scalars"])
    assert {
        "val/mse",
        "val/mse_unweighted",
        "val/mse_worst",
        "val/mse_cluster0",
        "val/routing_ari",
        "val/router_entropy",
        "train/loss",
    } <= scalars
    assert "val/mixtures" in acc.Tags()["images"]
    assert len(acc.Images("val/mixtures")) == 2  # one heatmap per evaluation
    assert any("overhead" in t for t in acc.Tags()["tensors"])

    mixtures = json.loads((log_dir / "checkpoints" / "last.mixtures.json").read_text())
    assert mixtures["round"] == 4 and mixtures["num_clients"] == 10
    assert [c["client_id"] for c in mixtures["clients"]] == list(range(10))
    for client in mixtures["clients"]:
        assert abs(sum(client["mixture"]) - 1.0) < 1e-5
        assert client["cluster"] == client["client_id"] % 2

    tested = run("test", "--config", config, f"--ckpt_path={ckpt}", f"--trainer.default_root_dir={tmp_path}", *QUIET)
    metrics = tested.trainer.callback_metrics
    assert {"test/mse", "test/mse_worst", "test/routing_ari"} <= set(metrics)
    # the tested model is the checkpoint's: its mixtures are the ones written beside it
    logits = tested.model.model.router.logits.detach()
    torch.testing.assert_close(logits, torch.tensor([c["logits"] for c in mixtures["clients"]]))


def test_cifar_config_runs_on_generated_images(tmp_path):
    cli = run(
        "fit",
        "--config",
        str(CONF / "cifar.yaml"),
        "--data.init_args.source=floral_lightning.data.RandomImages",
        "--data.init_args.source.init_args.num_train=640",
        "--data.init_args.source.init_args.num_test=160",
        "--trainer.max_epochs=2",
        "--trainer.check_val_every_n_epoch=1",
        f"--trainer.default_root_dir={tmp_path}",
        *QUIET,
    )
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.current_epoch == 2
    assert "val/acc_cluster3" in metrics
    assert_mean_is_the_sample_weighted_mean_of_the_clusters(cli)
    assert len(list((Path(cli.trainer.log_dir) / "checkpoints").glob("*.mixtures.json"))) >= 1


class HuberRegression(RegressionModule):
    """A new task by overriding two methods: Huber loss, and mean absolute error as a second metric."""

    def compute_loss(self, outputs, targets):
        return F.huber_loss(outputs, targets)

    def compute_metrics(self, outputs, targets):
        return super().compute_metrics(outputs, targets) | {"mae": (outputs - targets).abs().flatten(1).mean(1)}


def test_a_subclassed_task_trains_through_the_cli(tmp_path):
    cli = run(
        "fit",
        "--config",
        str(CONF / "synthetic_mlp.yaml"),
        f"--model.class_path={__name__}.HuberRegression",
        "--trainer.max_epochs=3",
        "--trainer.check_val_every_n_epoch=3",
        f"--trainer.default_root_dir={tmp_path}",
        *QUIET,
    )
    assert type(cli.model) is HuberRegression
    metrics = cli.trainer.callback_metrics
    assert {"val/mse", "val/mae", "val/mae_worst"} <= set(metrics)
    assert float(metrics["val/mae_worst"]) >= float(metrics["val/mae"])  # lower is better: worst is the max


def test_print_config_and_reduced_overlay(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run("fit", "--config", str(CONF / "mnist.yaml"), "--config", str(CONF / "reduced.yaml"), "--print_config")
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "train_fraction: 0.05" in printed and "router_lr: 0.3" in printed and "max_epochs: 1500" in printed
    assert "floral_lightning.models.MLP" in printed and "cluster_transform: rotate" in printed
    assert "num_clients: 300" in printed  # linked from data into model


def test_unknown_key_is_rejected_by_name(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args:\n    rnak: 3\n")
    with pytest.raises(SystemExit) as exit_info:
        run("fit", "--config", str(CONF / "synthetic_linear.yaml"), "--config", str(bad))
    assert exit_info.value.code != 0
    assert "rnak" in capsys.readouterr().err


def test_mnist_config_on_the_offline_subset(tmp_path, mnist_npz):
    cli = run(
        "fit",
        "--config",
        str(CONF / "mnist_label_shift.yaml"),
        "--data.init_args.source=floral_lightning.data.NpzArrays",
        f"--data.init_args.source.init_args.path={mnist_npz}",
        "--trainer.max_epochs=2",
        "--trainer.check_val_every_n_epoch=2",
        f"--trainer.default_root_dir={tmp_path}",
        *QUIET,
    )
    # ten classes and four labelings: 0.16 after two rounds when written; chance is 0.10 (+-0.003 on 10,000 images)
    assert float(cli.trainer.callback_metrics["val/acc"]) > 0.13
    assert_mean_is_the_sample_weighted_mean_of_the_clusters(cli)


def test_floral_beats_fedavg_on_mnist_label_shift_and_recovers_the_clusters(tmp_path, mnist_npz):
    """mnist_label_shift.yaml shortened (8 clients, all every round, 5 % of the data, 150 rounds, about
    25 s for both runs): FedAvg cannot fit four conflicting labelings, FLoRAL routes the clusters apart."""
    shortened = [
        "fit",
        "--config",
        str(CONF / "mnist_label_shift.yaml"),
        "--data.init_args.source=floral_lightning.data.NpzArrays",
        f"--data.init_args.source.init_args.path={mnist_npz}",
        "--data.init_args.num_clients=8",
        "--data.init_args.train_fraction=0.05",
        "--federated.clients_per_round=1.0",
        "--trainer.max_epochs=150",
        "--trainer.check_val_every_n_epoch=150",
        "--trainer.callbacks=[]",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        *QUIET,
    ]
    floral = run(*shortened, f"--trainer.default_root_dir={tmp_path / 'floral'}").trainer.callback_metrics
    fedavg = run(
        *shortened, f"--trainer.default_root_dir={tmp_path / 'fedavg'}", "--model.init_args.num_adaptors=0"
    ).trainer.callback_metrics
    assert float(fedavg["val/acc"]) < 0.3  # one model for four labelings: about chance on three of them
    assert float(floral["val/acc"]) > float(fedavg["val/acc"]) + 0.1
    assert float(floral["val/acc_worst"]) > float(fedavg["val/acc_worst"])
    assert float(floral["val/routing_ari"]) > 0.3


def test_train_py_entry_point(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "fit",
            "--config",
            "conf/synthetic_linear.yaml",
            "--trainer.max_epochs=2",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(tmp_path.glob("lightning_logs/version_0/checkpoints/last.ckpt"))


def test_round_loop_options_are_a_top_level_section(capsys):
    with pytest.raises(SystemExit):
        run("fit", "--config", str(CONF / "mnist.yaml"), "--federated.clients_per_round=7",
            "--federated.server_optimizer=adam", "--print_config")  # fmt: skip
    printed = capsys.readouterr().out
    assert "clients_per_round: 7" in printed and "server_optimizer: adam" in printed
