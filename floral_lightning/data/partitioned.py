"""Data that already belongs to clients (a writer, a hospital, a device): no pooled split, no synthetic
cluster transform.

* :class:`NpzClients`: arrays in an ``.npz`` with a client id per sample;
* :class:`HuggingFaceClients`: a Hugging Face ``datasets`` dataset with a client column (optional extra:
  ``pip install datasets``);
* :class:`ClientDatasets`: any ``torch.utils.data.Dataset`` per client, read item by item (images on disk,
  decoded records, ...) by loaders that can use worker processes (``FederatedDataModule(num_workers=N)``).

The first two are tensors in memory and go through the data module's fast sliced loaders. Every source has
each client's own train/test split: given (``x_test``/``client_test`` arrays, a test split, a test dataset)
or drawn per client with ``test_fraction`` (seeded by the data module's seed). Clients are the distinct ids,
in sorted order, numbered ``0..K-1`` (``client_names`` keeps the original ids). True clusters are optional:
with them the routing metrics (ARI, per-cluster accuracy) and the oracle router work; without them the data
module's ``clusters`` is ``None`` and those metrics are not reported.
"""

from __future__ import annotations

import os
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..seeding import SplitStep, Stream, seeded_generator
from .sources import ArraySplits, ClientSource, _inputs, _labels, channel_stats

__all__ = ["ClientDatasets", "HuggingFaceClients", "NpzClients", "PartitionedArrays"]


class PartitionedArrays(ClientSource):
    """Base of the array sources with a client id per sample; subclasses say where the arrays come from.

    After :meth:`make_clients`: ``client_names`` (the original id of client k) and ``client_clusters`` (int64
    [K] or ``None``). The data module reads ``partitioned`` to take the clients and clusters as given.
    """

    partitioned = True

    def __init__(
        self,
        test_fraction: float = 0.2,
        num_classes: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        if not 0.0 <= test_fraction < 1.0:
            raise ValueError(f"{type(self).__name__}: test_fraction={test_fraction} must lie in [0, 1)")
        if (mean is None) != (std is None):
            raise ValueError(f"{type(self).__name__}: give both mean and std or neither, got mean={mean}, std={std}")
        self.test_fraction = float(test_fraction)
        self.num_classes = num_classes
        self.mean = None if mean is None else tuple(float(m) for m in mean)
        self.std = None if std is None else tuple(float(s) for s in std)
        self.client_names: list[Any] = []
        self.client_clusters: torch.Tensor | None = None

    @abstractmethod
    def arrays(self) -> dict[str, np.ndarray]:
        """``x``, ``y``, ``client`` (and optionally ``cluster``) per sample; for a given test split, the same
        with the suffixes ``_train`` and ``_test``."""

    def make_clients(self, num_clients: int, clusters: torch.Tensor, seed: int) -> list[ArraySplits]:
        name = type(self).__name__
        arrays = self.arrays()
        if "x_train" in arrays:
            train = _columns(arrays, "_train", name)
            test = _columns(arrays, "_test", name)
        else:
            train, test = _columns(arrays, "", name), None
        ids = np.unique(train["client"] if test is None else np.concatenate([train["client"], test["client"]]))
        if len(ids) != num_clients:
            raise ValueError(
                f"{name}: the data hold {len(ids)} clients (ids {_preview(ids)}) but num_clients={num_clients}; "
                f"set data.num_clients={len(ids)}"
            )
        self.client_names = ids.tolist()
        x_all, y_all = _inputs(train["x"], f"{name}.x"), _labels(train["y"], f"{name}.y")
        owner = np.searchsorted(ids, train["client"])
        if test is not None:
            x_test_all, y_test_all = _inputs(test["x"], f"{name}.x_test"), _labels(test["y"], f"{name}.y_test")
            owner_test = np.searchsorted(ids, test["client"])
        self.client_clusters = _client_clusters(train, test, ids, name)

        out = []
        for k in range(num_clients):
            idx = torch.from_numpy(np.flatnonzero(owner == k))
            if test is None:
                n = len(idx)
                n_test = min(max(n - 1, 0), round(self.test_fraction * n))
                g = seeded_generator(seed, Stream.SETUP, SplitStep.CLIENT_TEST, k, 0)
                perm = idx[torch.randperm(n, generator=g)]
                train_idx, test_idx = perm[n_test:].sort().values, perm[:n_test].sort().values
                out.append(ArraySplits(x_all[train_idx], y_all[train_idx], x_all[test_idx], y_all[test_idx]))
            else:
                test_idx = torch.from_numpy(np.flatnonzero(owner_test == k))
                out.append(ArraySplits(x_all[idx], y_all[idx], x_test_all[test_idx], y_test_all[test_idx]))
        empty = [self.client_names[k] for k, c in enumerate(out) if len(c.y_train) == 0]
        if empty:
            raise ValueError(f"{name}: clients {_preview(empty)} have no training samples")
        self._infer_statistics(x_all, y_all)
        return out

    def _infer_statistics(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.num_classes is None and not y.dtype.is_floating_point and y.numel():
            self.num_classes = int(y.max()) + 1
        if x.dtype == torch.uint8 and self.mean is None:
            self.mean, self.std = channel_stats(x)


def _columns(arrays: dict[str, np.ndarray], suffix: str, name: str) -> dict[str, np.ndarray]:
    keys = {k: k + suffix for k in ("x", "y", "client")}
    missing = [v for v in keys.values() if v not in arrays]
    if missing:
        raise KeyError(
            f"{name}: missing {missing}; expected x, y, client (a client id per sample) and optionally cluster, "
            f"or the same with _train and _test suffixes (found {sorted(arrays)})"
        )
    out = {k: np.asarray(arrays[v]) for k, v in keys.items()}
    if "cluster" + suffix in arrays:
        out["cluster"] = np.asarray(arrays["cluster" + suffix])
    n = len(out["x"])
    for key, values in out.items():
        if len(values) != n:
            raise ValueError(f"{name}: {key}{suffix} has {len(values)} entries but x{suffix} has {n}")
        if key in ("client", "cluster") and values.ndim != 1:
            raise ValueError(f"{name}: {key}{suffix} must be one id per sample [N], got shape {values.shape}")
    return out


def _client_clusters(
    train: dict[str, np.ndarray], test: dict[str, np.ndarray] | None, ids: np.ndarray, name: str
) -> torch.Tensor | None:
    """One cluster per client from a per-sample ``cluster`` column (each client must have one), or None."""
    parts = [p for p in (train, test) if p is not None]
    if not any("cluster" in p for p in parts):
        return None
    if not all("cluster" in p for p in parts):
        raise KeyError(f"{name}: cluster is given for one split only; give cluster_train and cluster_test")
    client = np.concatenate([p["client"] for p in parts])
    cluster = np.concatenate([p["cluster"] for p in parts])
    if not np.issubdtype(cluster.dtype, np.integer) or (cluster < 0).any():
        raise ValueError(f"{name}: cluster must hold non-negative integers, got {cluster.dtype}")
    out = torch.empty(len(ids), dtype=torch.int64)
    for k, cid in enumerate(ids):
        values = np.unique(cluster[client == cid])
        if len(values) != 1:
            raise ValueError(f"{name}: client {cid!r} has samples in clusters {values.tolist()}; a client has one")
        out[k] = int(values[0])
    return out


def _preview(values: Sequence[Any] | np.ndarray, limit: int = 8) -> str:
    values = list(values)
    shown = ", ".join(repr(v) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


class NpzClients(PartitionedArrays):
    """Arrays in an ``.npz`` file with a client id per sample.

    Keys: ``x``, ``y``, ``client`` (any sortable ids: ints or strings) and optionally ``cluster`` (the true
    cluster of each sample's client), each client's test split drawn with ``test_fraction``; or the same keys
    with ``_train`` and ``_test`` suffixes for a given split. uint8 inputs are images, as in ``NpzArrays``.
    """

    def __init__(
        self,
        path: str,
        test_fraction: float = 0.2,
        num_classes: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__(test_fraction, num_classes, mean, std)
        self.path = path

    def arrays(self) -> dict[str, np.ndarray]:
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"NpzClients: no file at path={self.path!r}")
        with np.load(self.path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}


class HuggingFaceClients(PartitionedArrays):
    """A Hugging Face ``datasets`` dataset with a client column (needs ``pip install datasets``).

    ``dataset`` is a ``datasets.Dataset`` (or ``DatasetDict``) or the name/path for ``datasets.load_dataset``
    (with ``name`` as its configuration). ``input_column``, ``label_column`` and ``client_column`` (and
    optionally ``cluster_column``) name the columns; inputs must convert to numeric arrays. ``test_split``
    names a test split of a ``DatasetDict`` whose clients match the train split's (``train_split``);
    without it, each client's test samples are drawn with ``test_fraction``.
    """

    def __init__(
        self,
        dataset: Any,
        client_column: str,
        input_column: str = "x",
        label_column: str = "y",
        cluster_column: str | None = None,
        name: str | None = None,
        train_split: str = "train",
        test_split: str | None = None,
        test_fraction: float = 0.2,
        num_classes: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__(test_fraction, num_classes, mean, std)
        self.dataset, self.name = dataset, name
        self.columns = {"x": input_column, "y": label_column, "client": client_column}
        if cluster_column is not None:
            self.columns["cluster"] = cluster_column
        self.train_split, self.test_split = train_split, test_split

    def _load(self) -> Any:
        if not isinstance(self.dataset, str):
            return self.dataset
        try:
            import datasets
        except ImportError as err:
            raise ImportError(
                "HuggingFaceClients needs the Hugging Face datasets library: pip install datasets"
            ) from err
        return datasets.load_dataset(self.dataset, self.name)

    def _split_arrays(self, split: Any, suffix: str) -> dict[str, np.ndarray]:
        missing = [c for c in self.columns.values() if c not in split.column_names]
        if missing:
            raise KeyError(f"HuggingFaceClients: columns {missing} not in the dataset (has {split.column_names})")
        table = split.with_format("numpy")
        return {key + suffix: np.asarray(table[column]) for key, column in self.columns.items()}

    def arrays(self) -> dict[str, np.ndarray]:
        data = self._load()
        if hasattr(data, "column_names") and isinstance(data.column_names, list):  # one Dataset
            if self.test_split is not None:
                raise ValueError(f"HuggingFaceClients: test_split={self.test_split!r} needs a DatasetDict")
            return self._split_arrays(data, "")
        for split in (self.train_split, self.test_split):
            if split is not None and split not in data:
                raise KeyError(f"HuggingFaceClients: no split {split!r}; the dataset has {list(data)}")
        if self.test_split is None:
            return self._split_arrays(data[self.train_split], "")
        return self._split_arrays(data[self.train_split], "_train") | self._split_arrays(data[self.test_split], "_test")


class ClientDatasets:
    """Any ``torch.utils.data.Dataset`` per client: client k's train and test items are ``(x, y)`` pairs.

    The data module reads them item by item with ``torch.utils.data.DataLoader`` (``num_workers`` worker
    processes, kept alive between rounds), so the data need not be tensors in memory. ``test`` may be
    ``None``: each client's test items are then drawn from its train dataset with ``test_fraction``.
    ``clusters`` gives each client's true cluster (optional). ``num_classes`` is needed only by label-based
    options; inputs are used as the datasets return them (``mean``/``std`` are not applied).

    Args:
        train: client k's training dataset at position k.
        test: client k's test dataset at position k, or ``None``.
        clusters: the true cluster of every client, or ``None``.
        test_fraction: with ``test=None``: the fraction of each client's items held out for testing.
        num_classes: the number of classes (``None`` for regression or when unknown).
    """

    partitioned = True
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __init__(
        self,
        train: Sequence[Dataset],
        test: Sequence[Dataset] | None = None,
        clusters: Sequence[int] | None = None,
        test_fraction: float = 0.2,
        num_classes: int | None = None,
    ) -> None:
        train = list(train)
        if not train:
            raise ValueError("ClientDatasets: train must hold one dataset per client, got none")
        if test is not None and len(test) != len(train):
            raise ValueError(f"ClientDatasets: {len(train)} train datasets but {len(test)} test datasets")
        if clusters is not None and len(clusters) != len(train):
            raise ValueError(f"ClientDatasets: {len(train)} clients but {len(clusters)} clusters")
        if not 0.0 <= test_fraction < 1.0:
            raise ValueError(f"ClientDatasets: test_fraction={test_fraction} must lie in [0, 1)")
        empty = [k for k, d in enumerate(train) if len(d) == 0]
        if empty:
            raise ValueError(f"ClientDatasets: clients {_preview(empty)} have empty train datasets")
        self.train = train
        self.test = None if test is None else list(test)
        self.client_clusters = None if clusters is None else torch.as_tensor(list(clusters), dtype=torch.int64)
        self.test_fraction = float(test_fraction)
        self.num_classes = num_classes
        self.client_names = list(range(len(train)))

    @property
    def num_clients(self) -> int:
        return len(self.train)
