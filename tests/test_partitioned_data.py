"""Naturally partitioned data: clients given by the data (a client id per sample, or a Dataset per client),
with their own train/test splits and optional true clusters, through the round loop."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from callbacks import FederatedCallback
from floral_lightning.data import (
    ClientDatasets,
    DatasetRoundLoader,
    FederatedDataModule,
    HuggingFaceClients,
    NpzClients,
    SyntheticLinear,
)
from floral_lightning.module import ClientOptimizer, FloralModule, RegressionModule, RouterOptions

NUM_CLIENTS, SAMPLES = 6, 15


def regression_clients(seed: int = 0) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[int]]:
    """Per-client (x, y) float arrays from the synthetic linear task (cluster = k mod 2)."""
    clusters = torch.arange(NUM_CLIENTS) % 2
    splits = SyntheticLinear(samples_per_client=SAMPLES, test_fraction=0.0).make_clients(NUM_CLIENTS, clusters, seed)
    return [(c.x_train.numpy(), c.y_train.numpy()) for c in splits], clusters.tolist()


class FileBackedClient(Dataset):
    """One client's samples stored one file per item: read from disk at every access (not in memory)."""

    def __init__(self, folder, x: np.ndarray, y: np.ndarray) -> None:
        self.paths = []
        for i in range(len(x)):
            path = folder / f"{i}.npz"
            np.savez(path, x=x[i], y=y[i])
            self.paths.append(path)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with np.load(self.paths[i]) as item:
            worker = torch.utils.data.get_worker_info()
            if worker is None:
                raise RuntimeError("FileBackedClient is meant to be read by loader workers in this test")
            return torch.from_numpy(item["x"]), torch.from_numpy(item["y"])


def module() -> RegressionModule:
    torch.manual_seed(0)
    return RegressionModule(
        nn.Linear(10, 3), num_clients=NUM_CLIENTS, num_adaptors=2, rank=1,
        router=RouterOptions(noise="none"), optimizer=ClientOptimizer(lr=0.05, router_lr=0.1),
    )  # fmt: skip


def fit(model, data, rounds: int = 2) -> L.Trainer:
    trainer = L.Trainer(
        max_epochs=rounds, callbacks=[FederatedCallback(clients_per_round=4, seed=1)], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, datamodule=data)
    return trainer


def test_a_dataset_per_client_with_loader_workers_trains_exactly_like_the_same_arrays(tmp_path):
    clients, clusters = regression_clients()
    datasets = []
    for k, (x, y) in enumerate(clients):
        (tmp_path / str(k)).mkdir()
        datasets.append(FileBackedClient(tmp_path / str(k), x, y))
    by_items = FederatedDataModule(
        ClientDatasets(datasets, clusters=clusters, test_fraction=0.2), NUM_CLIENTS, batch_size=4, num_workers=2,
        seed=3, eval_batch_size=7,
    )  # fmt: skip
    by_items_model = module()
    trainer = fit(by_items_model, by_items)
    loader = by_items.train_dataloader()
    assert isinstance(loader, DatasetRoundLoader) and loader.num_workers == 2
    # every client's own split: 12 train, 3 test items, disjoint, together its 15
    assert by_items.train_sizes.tolist() == [12] * NUM_CLIENTS
    assert by_items.test_dataloader().sizes.tolist() == [3] * NUM_CLIENTS
    assert torch.equal(by_items.clusters, torch.tensor(clusters))
    assert {"val/mse", "val/routing_ari", "val/mse_cluster1"} <= set(trainer.callback_metrics)

    # The same samples as arrays with a client id per sample (.npz): the same seeds pick the same test
    # items and batches, so the two runs must end with identical weights.
    x = np.concatenate([c[0] for c in clients])
    y = np.concatenate([c[1] for c in clients])
    client = np.repeat(np.arange(NUM_CLIENTS), SAMPLES)
    np.savez(tmp_path / "clients.npz", x=x, y=y, client=client, cluster=np.array(clusters)[client])
    by_arrays = FederatedDataModule(NpzClients(str(tmp_path / "clients.npz"), test_fraction=0.2), NUM_CLIENTS,
                                    batch_size=4, seed=3)  # fmt: skip
    by_arrays_model = module()
    fit(by_arrays_model, by_arrays)
    for name, tensor in by_arrays_model.state_dict().items():
        torch.testing.assert_close(by_items_model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


def test_npz_with_client_ids_keeps_each_clients_samples_and_clusters(tmp_path):
    rng = np.random.default_rng(0)
    names = np.array([f"writer_{i:02d}" for i in (7, 3, 11, 5, 2)])
    owner = rng.permutation(np.repeat(np.arange(5), [10, 11, 12, 13, 14]))  # clients interleaved in the file
    x = rng.normal(size=(len(owner), 10)).astype(np.float32)
    y = rng.integers(0, 4, size=len(owner))
    cluster = np.array([1, 0, 1, 0, 2])[owner]
    np.savez(tmp_path / "c.npz", x=x, y=y, client=names[owner], cluster=cluster)

    source = NpzClients(str(tmp_path / "c.npz"), test_fraction=0.25)
    with pytest.raises(ValueError, match=r"hold 5 clients .* num_clients=4; set data.num_clients=5"):
        FederatedDataModule(source, num_clients=4).setup()
    data = FederatedDataModule(source, num_clients=5, seed=0)
    data.setup()
    assert source.client_names == sorted(names.tolist())  # client k = the k-th id in sorted order
    assert source.num_classes == 4
    for k, name in enumerate(source.client_names):
        rows = np.flatnonzero(names[owner] == name)  # a hand-written selection of the client's samples
        x_tr, y_tr = data.client_split(k, "train")
        x_te, y_te = data.client_split(k, "test")
        assert len(x_te) == round(0.25 * len(rows)) and len(x_tr) + len(x_te) == len(rows)
        got = np.concatenate([x_tr.numpy(), x_te.numpy()])
        assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, x[rows].tolist()))
        assert int(data.clusters[k]) == int(cluster[rows[0]])
    # through the round loop, with the clusters for the routing metrics
    model = FloralModule(nn.Linear(10, 4), num_clients=5, num_adaptors=3, rank=1)  # classification
    trainer = fit(model, data, rounds=1)
    assert "val/routing_ari" in trainer.callback_metrics
    # the oracle router takes the given clusters
    oracle = FloralModule(nn.Linear(10, 4), num_clients=5, num_adaptors=3, rank=1, router=RouterOptions(oracle=True))
    fit(oracle, data, rounds=1)
    assert oracle.model.router.frozen
    assert torch.equal(oracle.model.router.logits.argmax(-1), data.clusters % 3)


def test_npz_with_given_train_and_test_splits(tmp_path):
    np.savez(
        tmp_path / "s.npz",
        x_train=np.arange(12, dtype=np.float32).reshape(6, 2), y_train=np.arange(6), client_train=[0, 0, 1, 1, 2, 2],
        x_test=np.zeros((3, 2), np.float32), y_test=np.arange(3), client_test=[2, 1, 0],
    )  # fmt: skip
    data = FederatedDataModule(NpzClients(str(tmp_path / "s.npz")), num_clients=3)
    data.setup()
    assert data.clusters is None  # no true clusters given: no routing metrics
    assert data.client_split(1, "train")[1].tolist() == [2, 3]
    assert data.client_split(1, "test")[1].tolist() == [1]


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((2, 1)), "y": [0, 1]}, r"missing \['client'\]"),
        ({"x": np.zeros((2, 1)), "y": [0, 1], "client": [0]}, "client has 1 entries but x has 2"),
        ({"x": np.zeros((2, 1)), "y": [0, 1], "client": [0, 0], "cluster": [0, 1]}, "has samples in clusters"),
    ],
)
def test_bad_client_arrays_are_named(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises((KeyError, ValueError), match=message):
        FederatedDataModule(NpzClients(str(tmp_path / "bad.npz")), num_clients=1).setup()


def test_loader_workers_only_for_datasets_and_dataset_count_checked():
    with pytest.raises(ValueError, match="num_workers=2 is invalid.*SyntheticLinear is served from memory"):
        FederatedDataModule(SyntheticLinear(), num_clients=2, num_workers=2)
    datasets = [torch.utils.data.TensorDataset(torch.zeros(3, 1), torch.zeros(3)) for _ in range(3)]
    with pytest.raises(ValueError, match="the source has 3 clients but num_clients=4"):
        FederatedDataModule(ClientDatasets(datasets), num_clients=4)
    with pytest.raises(ValueError, match="cluster_transform='rotate' needs a pooled DataSource"):
        FederatedDataModule(ClientDatasets(datasets), num_clients=3, cluster_transform="rotate")


class _FakeHFDataset:
    """The two calls HuggingFaceClients makes on a ``datasets.Dataset``: ``column_names`` and
    ``with_format("numpy")[column]`` (a stand-in: the real library is an optional extra)."""

    def __init__(self, columns: dict) -> None:
        self.columns = {k: np.asarray(v) for k, v in columns.items()}
        self.column_names = list(columns)

    def with_format(self, kind: str):
        assert kind == "numpy"
        return self.columns


def test_hugging_face_columns_map_to_clients():
    train = _FakeHFDataset(
        {"pixels": np.ones((4, 2), np.float32), "label": [0, 1, 1, 0], "hospital": ["b", "a", "b", "a"]}
    )
    test = _FakeHFDataset({"pixels": np.zeros((2, 2), np.float32), "label": [1, 0], "hospital": ["a", "b"]})
    source = HuggingFaceClients(
        {"train": train, "test": test}, client_column="hospital", input_column="pixels", label_column="label",
        test_split="test",
    )  # fmt: skip
    data = FederatedDataModule(source, num_clients=2)
    data.setup()
    assert source.client_names == ["a", "b"]
    assert data.client_split(0, "train")[1].tolist() == [1, 0] and data.client_split(0, "test")[1].tolist() == [1]
    with pytest.raises(KeyError, match=r"columns \['writer'\] not in the dataset"):
        HuggingFaceClients(train, client_column="writer", input_column="pixels", label_column="label").arrays()


def test_cli_trains_on_an_npz_with_client_ids(tmp_path):
    from floral_lightning.cli import main

    clients, clusters = regression_clients()
    x = np.concatenate([c[0] for c in clients])
    y = np.concatenate([c[1] for c in clients])
    client = np.repeat(np.arange(NUM_CLIENTS), SAMPLES)
    np.savez(tmp_path / "clients.npz", x=x, y=y, client=client, cluster=np.array(clusters)[client])
    config = Path(__file__).resolve().parents[1] / "conf" / "synthetic_linear.yaml"
    cli = main(
        [
            f"--config={config}",
            "--data.init_args.source=floral_lightning.data.NpzClients",
            f"--data.init_args.source.init_args.path={tmp_path / 'clients.npz'}",
            f"--data.init_args.num_clients={NUM_CLIENTS}",
            "--data.init_args.cluster_transform=none",
            "--trainer.max_epochs=2",
            "--trainer.check_val_every_n_epoch=2",
            "--trainer.logger=false",
            "--trainer.callbacks=[]",
            "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert torch.equal(cli.datamodule.clusters, torch.tensor(clusters))
    assert {"val/mse", "val/routing_ari"} <= set(cli.trainer.callback_metrics)


def test_dataset_clients_get_reduction_and_a_validation_split():
    datasets = [torch.utils.data.TensorDataset(torch.arange(20.0)[:, None], torch.arange(20)) for _ in range(3)]
    test = [torch.utils.data.TensorDataset(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long)) for _ in range(3)]
    data = FederatedDataModule(ClientDatasets(datasets, test), num_clients=3, val_fraction=0.25, train_fraction=0.5,
                               min_train_size=4, seed=0)  # fmt: skip
    data.setup()
    assert data.clusters is None
    assert data.train_sizes.tolist() == [8, 8, 8]  # 10 kept of 20, then 2 (25 %) moved to validation
    assert data.val_dataloader().sizes.tolist() == [2, 2, 2] and data.test_dataloader().sizes.tolist() == [2, 2, 2]
    train_items = {int(y) for x, y, k in data.train_dataloader() if k == 0 for y in y}
    val_items = {int(y) for x, y, ids in data.val_dataloader() for y, k in zip(y, ids) if k == 0}
    assert len(train_items) == 8 and len(val_items) == 2 and not train_items & val_items
    with pytest.raises(TypeError, match="serves datasets item by item"):
        data.client_split(0, "train")
