"""Federated data: per-client splits of a source, and the loaders the round-based trainer iterates.

Every split keeps all clients' samples in ONE tensor sorted by client plus an offsets vector, so memory does
not grow with the number of clients and a client's data is a slice (no copy).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import lightning
import numpy as np
import torch
from lightning_utilities.core.apply_func import apply_to_collection

from ..seeding import SplitStep, Stream, run_seed, seeded_generator
from .partitioned import ClientDatasets
from .sources import ArraySplits, ClientSource, DataSource
from .transforms import label_shift, label_subset_mask, normalize, random_flip_crop, rotate

__all__ = [
    "BatchPrep",
    "ClientEvalLoader",
    "ClientTensors",
    "DatasetEvalLoader",
    "DatasetRoundLoader",
    "FederatedDataModule",
    "RoundLoader",
    "run_seed",
    "seeded_generator",
]


@dataclass
class ClientTensors:
    """One split of all clients: client k owns rows ``offsets[k]:offsets[k + 1]`` of ``x`` and ``y``."""

    x: torch.Tensor
    y: torch.Tensor
    offsets: torch.Tensor  # int64 [K + 1], offsets[0] == 0, offsets[-1] == len(x)

    @classmethod
    def gather(cls, x: torch.Tensor, y: torch.Tensor, parts: Sequence[torch.Tensor]) -> ClientTensors:
        """Copy the rows ``parts[k]`` (index tensors) of a pool into one client-sorted split."""
        sizes = torch.tensor([len(p) for p in parts], dtype=torch.int64)
        idx = torch.cat(list(parts)) if parts else torch.zeros(0, dtype=torch.int64)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
        return cls(x[idx], y[idx], offsets)

    @property
    def num_clients(self) -> int:
        return len(self.offsets) - 1

    @property
    def sizes(self) -> torch.Tensor:
        """Samples per client, int64 [K]."""
        return self.offsets.diff()

    def bounds(self, k: int) -> tuple[int, int]:
        return int(self.offsets[k]), int(self.offsets[k + 1])

    def client(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Client k's ``(x, y)`` as views into the shared tensors."""
        lo, hi = self.bounds(k)
        return self.x[lo:hi], self.y[lo:hi]

    def client_ids(self) -> torch.Tensor:
        """Owner of every row, int64 [N]."""
        return torch.repeat_interleave(torch.arange(self.num_clients), self.sizes)


class BatchPrep:
    """Turns stored inputs into model inputs: uint8 images → normalised float32 (+ optional flip/crop);
    float vectors pass through unchanged."""

    def __init__(
        self,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        augment: bool = False,
        padding: int = 4,
    ) -> None:
        self.mean = None if mean is None else tuple(mean)
        self.std = None if std is None else tuple(std)
        self.augment = augment
        self.padding = padding

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if x.dtype != torch.uint8:
            return x
        if self.mean is None or self.std is None:
            # no statistics known: still serve a sensible 0..1 scale rather than raw bytes
            out = x.to(torch.float32).div_(255.0)
        else:
            out = normalize(x, self.mean, self.std)
        if self.augment:
            out = random_flip_crop(out, self.padding, generator)
        return out


#: what a round loader serves when set as its ``whole_round``: the round's ``(x, y, k)`` batches in -> one item
WholeRound = Callable[[Iterator[tuple[Any, Any, int]]], Any]

#: the client id of a padding batch (see :class:`_RoundSchedule`): no client trains on it
PADDING_CLIENT = -1


def is_padding(batch: Any) -> bool:
    """Whether ``batch`` is a padding batch of a round loader (client id :data:`PADDING_CLIENT`)."""
    return (
        isinstance(batch, (tuple, list))
        and len(batch) == 3
        and isinstance(batch[2], int)
        and batch[2] == PADDING_CLIENT
    )


class BatchRun(tuple):
    """A run of consecutive local batches as one item of a round loader (``federated.lightning_step`` ``client``
    or ``round``): the run's last batch ``(x, y, k)``, which Lightning's own training step trains, carrying the
    run's earlier batches in ``earlier``, which the round loop trains just before it
    (``callbacks.FederatedCallback``).

    A tuple, so ``training_step`` sees a plain batch; with a ``to`` method, so Lightning moves it, earlier
    batches included, to the device as one object.
    """

    earlier: list[tuple[Any, Any, int]]

    def __new__(cls, last: tuple[Any, Any, int], earlier: list[tuple[Any, Any, int]]) -> BatchRun:
        item = super().__new__(cls, last)
        item.earlier = earlier
        return item

    def to(self, *args: Any, **kwargs: Any) -> BatchRun:
        """The run with every tensor of every batch moved by ``Tensor.to(*args, **kwargs)``."""

        def move(batch: tuple) -> tuple:
            return tuple(apply_to_collection(batch, torch.Tensor, lambda t: t.to(*args, **kwargs)))

        return BatchRun(move(tuple(self)), [move(batch) for batch in self.earlier])

    @staticmethod
    def group(batches: Iterator[tuple[Any, Any, int]], per: str) -> Iterator[Any]:
        """The batches as runs, one per client (``per="client"``) or one for the whole round (``per="round"``);
        padding batches as they are."""
        if per not in ("client", "round"):
            raise ValueError(f"per={per!r}: expected 'client' or 'round'")
        pending: list[tuple[Any, Any, int]] = []
        for batch in batches:
            if is_padding(batch):
                yield batch
                continue
            if pending and per == "client" and int(batch[-1]) != int(pending[-1][-1]):
                yield BatchRun(pending[-1], pending[:-1])
                pending = []
            pending.append(batch)
        if pending:
            yield BatchRun(pending[-1], pending[:-1])


class _RoundSchedule:
    """What the round loaders share: the round number, its clients in order, their batch counts, and the
    padding batches that keep processes in step.

    With several processes (``floral_lightning.distributed``), each trains its share of a round's clients, and
    Lightning runs one collective per training step in every process; a process with fewer batches than the
    busiest one therefore yields ``padding_batches`` padding batches ``(empty, empty, PADDING_CLIENT)`` first, on
    which nothing trains. They come first so that the round's last batch is a real one wherever there is one.
    Subclasses set ``batch_size`` and ``local_epochs``, call :meth:`_start_schedule`, and define
    :meth:`_client_size` and :meth:`_real_batches`.
    """

    batch_size: int
    local_epochs: int

    def _start_schedule(self, num_clients: int) -> None:
        self._num_clients = num_clients
        self.round_idx = 0
        self._clients = list(range(num_clients))
        self.padding_batches = 0
        #: when set (by the vectorised round loop), the round is served as one item: ``whole_round(batches)``
        self.whole_round: WholeRound | None = None
        #: when set (by the round loop's ``lightning_step``), each client's batches (``"client"``) or the whole
        #: round's (``"round"``) are served as one :class:`BatchRun`
        self.batch_runs: str | None = None

    def _client_size(self, client_id: int) -> int:
        raise NotImplementedError

    def _real_batches(self, round_idx: int, clients: list[int]) -> Iterator[tuple[Any, Any, int]]:
        raise NotImplementedError

    def set_round(self, round_idx: int, clients: Sequence[int], padding_batches: int = 0) -> None:
        """Select the round number (for seeding), the clients that train in it (in order) and the number of
        padding batches yielded before them (0 in a single process)."""
        ids = [int(k) for k in clients]
        bad = [k for k in ids if not 0 <= k < self._num_clients]
        if bad:
            raise ValueError(f"clients {bad} out of range; valid ids are 0..{self._num_clients - 1}")
        if padding_batches < 0:
            raise ValueError(f"padding_batches={padding_batches}: must be >= 0")
        self.round_idx = int(round_idx)
        self._clients = ids
        self.padding_batches = int(padding_batches)

    @property
    def clients(self) -> list[int]:
        """The clients of the current round, in training order."""
        return list(self._clients)

    def num_batches(self, client_id: int) -> int:
        """``ceil(n_k / batch_size) * local_epochs``."""
        return math.ceil(self._client_size(client_id) / self.batch_size) * self.local_epochs

    def __len__(self) -> int:
        if self.whole_round is not None:
            return 1
        if self.batch_runs == "client":
            return self.padding_batches + sum(self.num_batches(k) > 0 for k in self._clients)
        if self.batch_runs == "round":
            return self.padding_batches + int(any(self.num_batches(k) > 0 for k in self._clients))
        return self.padding_batches + sum(self.num_batches(k) for k in self._clients)

    def __iter__(self) -> Iterator[Any]:
        batches = self._batches()
        if self.whole_round is not None:
            yield self.whole_round(batches)
            return
        if self.batch_runs is not None:
            yield from BatchRun.group(batches, self.batch_runs)
            return
        yield from batches

    def _batches(self) -> Iterator[tuple[Any, Any, int]]:
        # snapshot the round so a set_round during iteration cannot mix two rounds
        round_idx, clients = self.round_idx, list(self._clients)
        for _ in range(self.padding_batches):
            yield torch.zeros(0), torch.zeros(0), PADDING_CLIENT
        yield from self._real_batches(round_idx, clients)


class RoundLoader(_RoundSchedule):
    """The training batches of one federated round: each sampled client's shuffled data in turn.

    Yields ``(x, y, k)`` with ``k`` a plain ``int``; a client's batches are contiguous and the last partial
    batch is kept. Client k's epoch e of round r is shuffled (and augmented) by a generator seeded with
    ``(seed, r, k, e)``, so a round's batches do not depend on which other clients were sampled or on the
    global RNG. Before the first :meth:`set_round` the round is 0 with all clients.

    ``whole_round`` (``None`` by default) serves the round as one item instead: the loader's length is 1 and
    it yields ``whole_round(batches)`` of the same batches (the vectorised round loop,
    ``floral_lightning.vectorised``, stacks them so that Lightning moves a whole round to the device at once).
    """

    def __init__(
        self,
        data: ClientTensors,
        batch_size: int,
        prep: BatchPrep | None = None,
        seed: int = 0,
        local_epochs: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.data = data
        self.batch_size = batch_size
        self.prep = prep or BatchPrep()
        self.seed = seed
        self.local_epochs = local_epochs
        self._start_schedule(data.num_clients)

    def _client_size(self, client_id: int) -> int:
        lo, hi = self.data.bounds(client_id)
        return hi - lo

    def _real_batches(self, round_idx: int, clients: list[int]) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        bs = self.batch_size
        for k in clients:
            lo, hi = self.data.bounds(k)
            for epoch in range(self.local_epochs):
                g = seeded_generator(self.seed, Stream.LOADER, round_idx, k, epoch)
                perm = torch.randperm(hi - lo, generator=g) + lo
                for start in range(0, hi - lo, bs):
                    idx = perm[start : start + bs]
                    # index_select, not x[idx]: the same rows, and on CPU a gather of a small batch of images
                    # through advanced indexing costs about 15 times as much (55 against 4 us for 32 MNIST rows)
                    yield self.prep(self.data.x.index_select(0, idx), g), self.data.y.index_select(0, idx), k


class _EvalShard:
    """What the evaluation loaders share: the contiguous block of clients this process evaluates.

    Without :meth:`set_shard` a loader serves every client. With several processes each serves a block of
    consecutive clients holding about ``1 / world_size`` of the samples
    (:func:`floral_lightning.distributed.contiguous_shard`); a process whose block holds no sample serves one
    empty batch, so that it still takes part in the evaluation's reduction of the per-client metrics.
    Subclasses have ``data.offsets`` (the first row of every client, and the total).
    """

    data: Any
    _shard: tuple[int, int] | None = None

    def set_shard(self, rank: int, world_size: int) -> None:
        """Serve the clients of process ``rank`` out of ``world_size``."""
        from ..distributed import contiguous_shard  # the data package does not need torch.distributed otherwise

        self._shard = contiguous_shard(self.data.offsets.diff().tolist(), rank, world_size)

    @property
    def shard_clients(self) -> range:
        """The clients this loader serves."""
        lo, hi = self._shard if self._shard is not None else (0, len(self.data.offsets) - 1)
        return range(lo, hi)

    def _rows(self) -> tuple[int, int]:
        clients = self.shard_clients
        return int(self.data.offsets[clients.start]), int(self.data.offsets[clients.stop])


class ClientEvalLoader(_EvalShard):
    """All clients' evaluation data in client order, in batches that may span clients.

    Yields ``(x, y, client_ids)`` with ``client_ids`` int64 [B]; no augmentation.
    """

    def __init__(self, data: ClientTensors, batch_size: int, prep: BatchPrep | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"eval batch_size must be >= 1, got {batch_size}")
        self.data = data
        self.batch_size = batch_size
        self.prep = prep or BatchPrep()
        self._ids = data.client_ids()

    @property
    def sizes(self) -> torch.Tensor:
        """Evaluation samples per client, int64 [K] (the weights of a sample-weighted mean)."""
        return self.data.sizes

    def __len__(self) -> int:
        lo, hi = self._rows()
        if hi == lo and self._shard is not None:
            return 1  # the empty batch of a sharded process without samples
        return math.ceil((hi - lo) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        lo, hi = self._rows()
        if hi == lo and self._shard is not None:
            yield self.prep(self.data.x[:0]), self.data.y[:0], self._ids[:0]
            return
        for start in range(lo, hi, self.batch_size):
            sl = slice(start, min(start + self.batch_size, hi))
            yield self.prep(self.data.x[sl]), self.data.y[sl], self._ids[sl]


class _TaggedDatasets(torch.utils.data.Dataset):
    """Every client's dataset as one, item ``i`` of the concatenation returned as ``(x, y, client)``."""

    def __init__(self, datasets: Sequence[torch.utils.data.Dataset]) -> None:
        self.datasets = list(datasets)
        sizes = torch.tensor([len(d) for d in self.datasets], dtype=torch.int64)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])

    @property
    def num_clients(self) -> int:
        return len(self.datasets)

    @property
    def sizes(self) -> torch.Tensor:
        return self.offsets.diff()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> tuple[Any, Any, int]:
        k = int(torch.searchsorted(self.offsets, i, right=True)) - 1
        x, y = self.datasets[k][i - int(self.offsets[k])]
        return x, y, k


class _RoundBatches(torch.utils.data.Sampler):
    """The index batches of a round over a :class:`_TaggedDatasets`: each client's shuffled items in turn,
    shuffled exactly like :class:`RoundLoader` (by ``(seed, round, client, epoch)``)."""

    def __init__(self, loader: DatasetRoundLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader) - self.loader.padding_batches

    def __iter__(self) -> Iterator[list[int]]:
        loader = self.loader
        round_idx, clients, bs = loader.round_idx, list(loader.clients), loader.batch_size
        for k in clients:
            lo, hi = int(loader.data.offsets[k]), int(loader.data.offsets[k + 1])
            for epoch in range(loader.local_epochs):
                g = seeded_generator(loader.seed, Stream.LOADER, round_idx, k, epoch)
                perm = torch.randperm(hi - lo, generator=g) + lo
                for start in range(0, hi - lo, bs):
                    yield perm[start : start + bs].tolist()


class DatasetRoundLoader(_RoundSchedule):
    """:class:`RoundLoader` for clients given as ``torch.utils.data.Dataset`` objects, read item by item.

    One ``DataLoader`` with ``num_workers`` processes (kept alive between rounds) serves every round; the
    round's batches come from a batch sampler in the main process, so ``set_round`` takes effect at the next
    pass. Yields ``(x, y, k)`` with ``k`` an ``int``, a client's batches contiguous, the last partial batch kept.
    """

    def __init__(
        self,
        datasets: Sequence[torch.utils.data.Dataset],
        batch_size: int,
        seed: int = 0,
        num_workers: int = 0,
        local_epochs: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.data = _TaggedDatasets(datasets)
        self.batch_size = batch_size
        self.seed = seed
        self.local_epochs = local_epochs
        self._start_schedule(len(self.data.datasets))
        self._loader = torch.utils.data.DataLoader(
            self.data,
            batch_sampler=_RoundBatches(self),
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            generator=seeded_generator(seed, Stream.LOADER, -1, 0, 0),  # the workers' base seed
        )

    @property
    def num_workers(self) -> int:
        return self._loader.num_workers

    def _client_size(self, client_id: int) -> int:
        return int(self.data.sizes[client_id])

    def _real_batches(self, round_idx: int, clients: list[int]) -> Iterator[tuple[Any, Any, int]]:
        # the batch sampler reads the round from this loader when the DataLoader starts a pass
        if not clients:  # a process without clients this round: padding only
            return
        for x, y, ids in self._loader:
            yield x, y, int(ids[0])


class DatasetEvalLoader(_EvalShard):
    """:class:`ClientEvalLoader` for clients given as datasets: all clients' items in client order, in
    batches that may span clients; yields ``(x, y, client_ids)`` with ``client_ids`` int64 [B]."""

    def __init__(self, datasets: Sequence[torch.utils.data.Dataset], batch_size: int, num_workers: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"eval batch_size must be >= 1, got {batch_size}")
        self.data = _TaggedDatasets(datasets)
        self.batch_size, self.num_workers = batch_size, num_workers
        self._loader = self._data_loader(self.data)

    def _data_loader(self, dataset: torch.utils.data.Dataset) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def set_shard(self, rank: int, world_size: int) -> None:
        """Serve the clients of process ``rank`` out of ``world_size`` (one empty batch if they hold no item)."""
        before = self._shard
        super().set_shard(rank, world_size)
        if self._shard != before:  # keep the DataLoader (and its persistent workers) while the shard stays
            lo, hi = self._rows()
            self._loader = self._data_loader(torch.utils.data.Subset(self.data, range(lo, hi)))

    @property
    def sizes(self) -> torch.Tensor:
        """Evaluation samples per client, int64 [K]."""
        return self.data.sizes

    def __len__(self) -> int:
        return max(len(self._loader), 1 if self._shard is not None else 0)

    def __iter__(self) -> Iterator[tuple[Any, Any, torch.Tensor]]:
        if len(self._loader) == 0 and self._shard is not None and len(self.data):
            # the empty batch of a process without samples: any item, collated, cut to no rows
            batch = torch.utils.data.default_collate([self.data[0]])
            yield tuple(part[:0] for part in batch)
            return
        yield from self._loader


CLUSTER_TRANSFORMS = ("none", "rotate", "label_shift", "label_subsets")
AUGMENTATIONS = ("none", "flip_crop")
SPLITS = ("train", "val", "test")

_DIRICHLET_TRIES = 100


def describe_source(source: DataSource | ClientSource) -> str:
    """How error messages name a source: its class, and the file it reads when it reads one."""
    path = getattr(source, "path", None)
    return type(source).__name__ + (f"(path={path!r})" if path is not None else "")


def validate_pool(pool: ArraySplits, num_classes: int | None, origin: str) -> None:
    """Refuse data that would train silently wrong or fail later with an unrelated error: non-finite features
    or targets, and integer labels outside ``[0, num_classes)``. Messages name ``origin``, the array, the
    offending value and its sample index, and what is valid."""
    for split in ("train", "test"):
        for kind, tensor in ((f"x_{split}", getattr(pool, f"x_{split}")), (f"y_{split}", getattr(pool, f"y_{split}"))):
            if tensor.is_floating_point():
                bad = (~torch.isfinite(tensor)).flatten(1).any(1) if tensor.dim() > 1 else ~torch.isfinite(tensor)
                if bool(bad.any()):
                    first = int(bad.nonzero()[0, 0])
                    raise ValueError(
                        f"{origin}: {kind} has {int(bad.sum())} sample(s) with non-finite values (NaN or inf), the "
                        f"first at index {first}; every feature and target must be finite"
                    )
            elif kind.startswith("y") and tensor.numel():
                upper = num_classes if num_classes is not None else None
                bad = (tensor < 0) if upper is None else (tensor < 0) | (tensor >= upper)
                if bool(bad.any()):
                    first = int(bad.nonzero()[0, 0])
                    valid = "labels >= 0" if upper is None else f"labels in [0, {upper}) (num_classes={upper})"
                    raise ValueError(
                        f"{origin}: {kind} has {int(bad.sum())} label(s) outside the valid range, the first "
                        f"{int(tensor[first])} at index {first}; valid are {valid}"
                    )


class FederatedDataModule(lightning.LightningDataModule):
    """Splits a source among ``num_clients`` clients and serves per-round training and per-client evaluation.

    Client k belongs to cluster ``k mod num_clusters``. For a pooled :class:`DataSource` the train and test
    pools are partitioned separately (each its own seeded IID partition into K shards, or Dirichlet label
    skew with ``dirichlet_alpha``), then each client's data get its cluster's transform:

    * ``"rotate"``: images rotated by ``360 / C · c`` degrees; ``"label_shift"``: ``y → (y + c) mod classes``;
    * ``"label_subsets"``: client k draws only from samples whose label ``l`` has ``l mod C == c``, split
      IID (or Dirichlet) among the clients of that cluster.

    Then each client keeps ``max(min_train_size, round(train_fraction · n))`` (at most n) random samples of
    its train shard (the paper's ``*_reduced`` tasks: 0.05), and ``val_fraction`` of that is carved off as a
    validation split; with ``val_fraction = 0`` validation uses each client's test split (the paper's
    practice). A :class:`ClientSource` produces the clients itself (``cluster_transform`` must be "none");
    the reduction and validation steps still apply to its train splits.

    Naturally partitioned data (``floral_lightning.data.partitioned``: ``NpzClients``,
    ``HuggingFaceClients``, ``ClientDatasets``) bring their own clients, their own train/test split and
    optionally their true clusters: ``clusters`` is then the source's (``None`` when it has none, and the
    routing metrics are not reported) and ``num_clusters`` is not used. ``ClientDatasets`` are read item by
    item with ``num_workers`` loader processes (``num_workers`` applies to them only: tensor sources are
    sliced in memory).

    All randomness comes from generators seeded by ``seed`` (``None``: the run's ``seed_everything``, see
    :func:`run_seed`): the same seed gives identical splits and
    batches. After :meth:`setup`: ``clusters`` [K], ``train_sizes`` [K], ``num_classes``, ``mean``/``std``,
    :meth:`client_split`, and the loaders (``train_dataloader()`` returns the same :class:`RoundLoader`
    every call; the trainer's round callback drives it with :meth:`RoundLoader.set_round`).
    """

    def __init__(
        self,
        source: DataSource | ClientSource | ClientDatasets,
        num_clients: int,
        num_clusters: int = 1,
        cluster_transform: str = "none",
        train_fraction: float = 1.0,
        min_train_size: int = 10,
        dirichlet_alpha: float | None = None,
        val_fraction: float = 0.0,
        batch_size: int = 32,
        eval_batch_size: int = 1024,
        augment: str = "none",
        seed: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(source, (DataSource, ClientSource, ClientDatasets)):
            raise TypeError(f"source must be a DataSource, ClientSource or ClientDatasets, got {type(source).__name__}")
        if num_workers < 0 or (num_workers > 0 and not isinstance(source, ClientDatasets)):
            raise ValueError(
                f"FederatedDataModule: num_workers={num_workers} is invalid; it must be >= 0, and > 0 only for "
                f"ClientDatasets (items read one by one); {type(source).__name__} is served from memory"
            )
        checks = [
            ("num_clients", num_clients, num_clients >= 1, ">= 1"),
            ("num_clusters", num_clusters, num_clusters >= 1, ">= 1"),
            (
                "cluster_transform",
                cluster_transform,
                cluster_transform in CLUSTER_TRANSFORMS,
                f"one of {CLUSTER_TRANSFORMS}",
            ),
            ("augment", augment, augment in AUGMENTATIONS, f"one of {AUGMENTATIONS}"),
            ("train_fraction", train_fraction, 0.0 < train_fraction <= 1.0, "in (0, 1]"),
            ("min_train_size", min_train_size, min_train_size >= 1, ">= 1"),
            ("dirichlet_alpha", dirichlet_alpha, dirichlet_alpha is None or dirichlet_alpha > 0, "None or > 0"),
            ("val_fraction", val_fraction, 0.0 <= val_fraction < 1.0, "in [0, 1)"),
            ("batch_size", batch_size, batch_size >= 1, ">= 1"),
            ("eval_batch_size", eval_batch_size, eval_batch_size >= 1, ">= 1"),
        ]
        for name, value, ok, valid in checks:
            if not ok:
                raise ValueError(f"FederatedDataModule: {name}={value!r} is invalid; it must be {valid}")
        if isinstance(source, (ClientSource, ClientDatasets)):
            for name, value, default in (
                ("cluster_transform", cluster_transform, "none"),
                ("dirichlet_alpha", dirichlet_alpha, None),
            ):
                if value != default:
                    raise ValueError(
                        f"FederatedDataModule: {name}={value!r} needs a pooled DataSource; "
                        f"{type(source).__name__} generates its clients with the clusters baked in "
                        f"(use {name}={default!r})"
                    )
        self.source = source
        self.num_clients = int(num_clients)
        self.num_clusters = int(num_clusters)
        self.cluster_transform = cluster_transform
        self.train_fraction = float(train_fraction)
        self.min_train_size = int(min_train_size)
        self.dirichlet_alpha = dirichlet_alpha
        self.val_fraction = float(val_fraction)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size)
        self.augment = augment
        self.seed = run_seed(seed)
        self.num_workers = int(num_workers)

        self.clusters: torch.Tensor | None = torch.arange(self.num_clients) % self.num_clusters
        if isinstance(source, ClientDatasets):
            if source.num_clients != self.num_clients:
                raise ValueError(
                    f"FederatedDataModule: the source has {source.num_clients} clients but num_clients="
                    f"{self.num_clients}; set data.num_clients={source.num_clients}"
                )
            self.clusters = source.client_clusters
        self.num_classes: int | None = source.num_classes
        self.mean: tuple[float, ...] | None = source.mean
        self.std: tuple[float, ...] | None = source.std
        self.train_sizes: torch.Tensor | None = None
        self._splits: dict[str, ClientTensors] = {}
        self._train_loader: RoundLoader | DatasetRoundLoader | None = None
        self._eval_loaders: dict[str, ClientEvalLoader | DatasetEvalLoader] = {}

    # ------------------------------------------------------------------ public accessors
    @property
    def is_built(self) -> bool:
        """Whether :meth:`setup` has built the splits."""
        return self._train_loader is not None

    def _require_setup(self) -> None:
        if self._train_loader is None:
            raise RuntimeError("FederatedDataModule: call setup() before accessing the splits or loaders")

    def split(self, split: str) -> ClientTensors:
        """All clients' stored tensors of ``split``: cluster transforms applied, images still uint8."""
        self._require_setup()
        if not self._splits:
            raise TypeError(
                f"FederatedDataModule: {type(self.source).__name__} serves datasets item by item, not stored "
                "tensors; read a client's items from the source's datasets"
            )
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is invalid; it must be one of {SPLITS}")
        return self._splits[split]

    def client_split(self, k: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """Client k's stored ``(x, y)`` of ``split`` ("train", "val" or "test"): views, images still uint8."""
        data = self.split(split)
        if not 0 <= k < self.num_clients:
            raise ValueError(f"client k={k} is out of range; valid ids are 0..{self.num_clients - 1}")
        return data.client(k)

    def sizes(self, split: str) -> torch.Tensor:
        """Samples per client of ``split``, int64 [K]."""
        return self.split(split).sizes

    # ------------------------------------------------------------------ building
    def setup(self, stage: str | None = None) -> None:
        """Build every client's splits and the loaders once (later calls, for any stage, do nothing)."""
        if self._splits or self._train_loader is not None:
            return
        if isinstance(self.source, ClientDatasets):
            self._setup_datasets()
            return
        if isinstance(self.source, ClientSource):
            pool, train_parts, test_parts = self._client_source_parts()
        else:
            pool = self.source.load()
        # the source may infer these while loading (e.g. NpzArrays)
        self.num_classes, self.mean, self.std = self.source.num_classes, self.source.mean, self.source.std
        # before any transform: label shift's ``mod`` would turn a label of -3 into a valid-looking one
        validate_pool(pool, self.num_classes, describe_source(self.source))
        if not isinstance(self.source, ClientSource):
            train_parts, test_parts = self._partition(pool)
        if self.augment != "none" and not pool.is_image:
            raise ValueError(f"FederatedDataModule: augment={self.augment!r} needs uint8 images; use 'none'")

        train_parts = self._reduce(train_parts)
        train_parts, val_parts = self._carve_val(train_parts)
        train = ClientTensors.gather(pool.x_train, pool.y_train, train_parts)
        test = ClientTensors.gather(pool.x_test, pool.y_test, test_parts)
        val = ClientTensors.gather(pool.x_train, pool.y_train, val_parts) if val_parts is not None else test
        del pool
        for data in {id(d): d for d in (train, val, test)}.values():  # val may be test: transform it once
            self._apply_cluster_transform(data)

        self._splits = {"train": train, "val": val, "test": test}
        self.train_sizes = train.sizes
        eval_prep = BatchPrep(self.mean, self.std)
        train_prep = BatchPrep(self.mean, self.std, augment=self.augment == "flip_crop")
        self._train_loader = RoundLoader(train, self.batch_size, train_prep, self.seed)
        self._eval_loaders = {
            s: ClientEvalLoader(d, self.eval_batch_size, eval_prep) for s, d in (("val", val), ("test", test))
        }

    def _client_source_parts(self) -> tuple[ArraySplits, list[torch.Tensor], list[torch.Tensor]]:
        """Pool a ClientSource's clients into one ArraySplits and index ranges per client."""
        clients = self.source.make_clients(self.num_clients, self.clusters.clone(), self.seed)
        if getattr(self.source, "partitioned", False):  # natural clients: their clusters, if known, are given
            self.clusters = self.source.client_clusters
        if len(clients) != self.num_clients:
            raise ValueError(
                f"{type(self.source).__name__}.make_clients returned {len(clients)} clients, "
                f"expected num_clients={self.num_clients}"
            )
        pool = ArraySplits(
            *(torch.cat([getattr(c, key) for c in clients]) for key in ("x_train", "y_train", "x_test", "y_test"))
        )

        def ranges(sizes: list[int]) -> list[torch.Tensor]:
            starts = np.cumsum([0, *sizes[:-1]])
            return [torch.arange(s, s + n) for s, n in zip(starts.tolist(), sizes)]

        return pool, ranges([len(c.y_train) for c in clients]), ranges([len(c.y_test) for c in clients])

    def _setup_datasets(self) -> None:
        """Loaders over a :class:`ClientDatasets`: each client's train items (reduced, validation carved off
        as for tensors) and test items (given, or held out with the source's ``test_fraction``)."""
        source: ClientDatasets = self.source
        train_parts, test_parts = [], []
        for k, dataset in enumerate(source.train):
            n = len(dataset)
            if source.test is None:
                n_test = min(max(n - 1, 0), round(source.test_fraction * n))
                perm = torch.randperm(
                    n, generator=seeded_generator(self.seed, Stream.SETUP, SplitStep.CLIENT_TEST, k, 0)
                )
                train_parts.append(perm[n_test:].sort().values)
                test_parts.append(perm[:n_test].sort().values)
            else:
                train_parts.append(torch.arange(n))
        train_parts, val_parts = self._carve_val(self._reduce(train_parts))
        subsets = torch.utils.data.Subset
        train = [subsets(d, p.tolist()) for d, p in zip(source.train, train_parts)]
        if source.test is None:
            test = [subsets(d, p.tolist()) for d, p in zip(source.train, test_parts)]
        else:
            test = source.test
        val = test if val_parts is None else [subsets(d, p.tolist()) for d, p in zip(source.train, val_parts)]
        self.num_classes = source.num_classes
        self._train_loader = DatasetRoundLoader(train, self.batch_size, self.seed, self.num_workers)
        self.train_sizes = self._train_loader.data.sizes
        self._eval_loaders = {
            "val": DatasetEvalLoader(val, self.eval_batch_size, self.num_workers),
            "test": DatasetEvalLoader(test, self.eval_batch_size, self.num_workers),
        }
        if val is test:
            self._eval_loaders["val"] = self._eval_loaders["test"]

    def _groups(self) -> list[tuple[list[int], int | None]]:
        """(clients, cluster whose labels they draw from or None for all labels) for each partition group."""
        if self.cluster_transform != "label_subsets":
            return [(list(range(self.num_clients)), None)]
        return [
            (list(range(c, self.num_clients, self.num_clusters)), c)
            for c in range(self.num_clusters)
            if c < self.num_clients
        ]

    def _partition(self, pool: ArraySplits) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Index shards of the train and test pools, one per client (train and test each partitioned)."""
        needs_labels = self.cluster_transform in ("label_shift", "label_subsets") or self.dirichlet_alpha
        if needs_labels and pool.y_train.dtype.is_floating_point:
            raise ValueError(
                f"FederatedDataModule: cluster_transform={self.cluster_transform!r} / "
                f"dirichlet_alpha={self.dirichlet_alpha!r} need integer class labels, got float targets"
            )
        if needs_labels and self.num_classes is None:
            raise ValueError("FederatedDataModule: the source has num_classes=None; label-based splits need it")
        if self.cluster_transform == "rotate" and not pool.is_image:
            raise ValueError("FederatedDataModule: cluster_transform='rotate' needs uint8 images [N, C, H, W]")

        groups = self._groups()
        train_g = seeded_generator(self.seed, Stream.SETUP, SplitStep.PARTITION, 0, 0)
        test_g = seeded_generator(self.seed, Stream.SETUP, SplitStep.PARTITION, 1, 0)
        if self.dirichlet_alpha is None:
            train = self._split_groups(pool.y_train, groups, train_g, None)
            test = self._split_groups(pool.y_test, groups, test_g, None)
        else:
            # One matrix of label proportions per group, shared by the train and test partitions, so a
            # client's test labels follow its own training distribution (independent draws would evaluate
            # each client on someone else's label mix). Redrawn while some client would get no training data.
            entropy = [self.seed % 2**64, int(Stream.SETUP), int(SplitStep.PARTITION), 2, 0]
            rng = np.random.default_rng(np.random.SeedSequence(entropy))
            for _ in range(_DIRICHLET_TRIES):
                props = [
                    rng.dirichlet([self.dirichlet_alpha] * len(members), size=self.num_classes) for members, _ in groups
                ]
                train = self._split_groups(pool.y_train, groups, train_g, props)
                if min(len(p) for p in train) > 0:
                    break
            else:
                raise ValueError(
                    f"FederatedDataModule: dirichlet_alpha={self.dirichlet_alpha} left some client without "
                    f"training data in {_DIRICHLET_TRIES} draws; increase dirichlet_alpha or lower num_clients"
                )
            test = self._split_groups(pool.y_test, groups, test_g, props)
        empty = [k for k, p in enumerate(train) if len(p) == 0]
        if empty:
            raise ValueError(
                f"FederatedDataModule: clients {empty[:10]} get no training data (train pool of "
                f"{len(pool.y_train)} samples, num_clients={self.num_clients}, "
                f"cluster_transform={self.cluster_transform!r}); use fewer clients or a larger pool"
            )
        return train, test

    def _split_groups(
        self,
        y: torch.Tensor,
        groups: list[tuple[list[int], int | None]],
        g: torch.Generator,
        props: list[np.ndarray] | None,
    ) -> list[torch.Tensor]:
        parts: list[torch.Tensor] = [torch.zeros(0, dtype=torch.int64)] * self.num_clients
        for gi, (members, cluster) in enumerate(groups):
            if cluster is None:
                idx = torch.arange(len(y))
            else:
                idx = torch.nonzero(label_subset_mask(y, cluster, self.num_clusters)).squeeze(1)
            shards = _split_indices(idx, y[idx], len(members), g, None if props is None else props[gi])
            for k, shard in zip(members, shards):
                parts[k] = shard
        return parts

    def _reduce(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Keep ``max(min_train_size, round(train_fraction · n))`` (capped at n) random samples per client."""
        if self.train_fraction >= 1.0:
            return parts
        g = seeded_generator(self.seed, Stream.SETUP, SplitStep.REDUCE, 0, 0)
        out = []
        for p in parts:
            n = len(p)
            keep = min(n, max(self.min_train_size, round(self.train_fraction * n)))
            out.append(p[torch.randperm(n, generator=g)[:keep]].sort().values)
        return out

    def _carve_val(self, parts: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Move ``round(val_fraction · n)`` of each client's train samples to validation (at least one stays)."""
        if self.val_fraction == 0.0:
            return parts, None
        g = seeded_generator(self.seed, Stream.SETUP, SplitStep.VAL, 0, 0)
        train, val = [], []
        for p in parts:
            n = len(p)
            n_val = min(max(n - 1, 0), round(self.val_fraction * n))
            perm = torch.randperm(n, generator=g)
            val.append(p[perm[:n_val]].sort().values)
            train.append(p[perm[n_val:]].sort().values)
        return train, val

    def _apply_cluster_transform(self, data: ClientTensors) -> None:
        """Rotate images or shift labels of each client's rows in place, per its cluster."""
        if self.cluster_transform not in ("rotate", "label_shift"):
            return
        for k in range(self.num_clients):
            lo, hi = data.bounds(k)
            c = int(self.clusters[k])
            if hi == lo or c == 0:  # cluster 0 is the identity for both transforms
                continue
            if self.cluster_transform == "rotate":
                rotated = rotate(data.x[lo:hi], c, self.num_clusters)
                if rotated.shape != data.x[lo:hi].shape:
                    raise ValueError(
                        f"cluster_transform='rotate' with num_clusters={self.num_clusters} turns the images "
                        f"by 90° and needs square images, got {tuple(data.x.shape[-2:])}"
                    )
                data.x[lo:hi] = rotated
            else:
                data.y[lo:hi] = label_shift(data.y[lo:hi], c, self.num_classes)

    # ------------------------------------------------------------------ checkpoints
    def settings(self) -> dict[str, object]:
        """The options that decide every client's data, by config key (``data.init_args.<key>``)."""
        return {
            "source": describe_source(self.source).split("(")[0],
            "num_clients": self.num_clients,
            "num_clusters": self.num_clusters,
            "cluster_transform": self.cluster_transform,
            "train_fraction": self.train_fraction,
            "min_train_size": self.min_train_size,
            "dirichlet_alpha": self.dirichlet_alpha,
            "val_fraction": self.val_fraction,
            "batch_size": self.batch_size,
            "augment": self.augment,
            "seed": self.seed,
        }

    def fingerprint(self) -> str:
        """A digest of every client's training labels and split sizes: equal for the same data and options."""
        self._require_setup()
        digest = hashlib.sha256()
        for split in SPLITS:
            data = self._splits[split]
            digest.update(data.offsets.numpy().tobytes())
            digest.update(data.y.contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def state_dict(self) -> dict[str, object]:
        """Saved in checkpoints so that a resume can check it gets the same clients' data."""
        return {"settings": self.settings(), "fingerprint": self.fingerprint() if self.is_built else None}

    def load_state_dict(self, state_dict: dict[str, object]) -> None:
        """Refuse, by name, data options or data that differ from the checkpoint's (the run would silently
        continue on other clients' data)."""
        saved, ours = state_dict.get("settings", {}), self.settings()
        differ = [
            f"data.init_args.{key}={ours.get(key)!r} (checkpoint: {value!r})"
            for key, value in saved.items()
            if repr(ours.get(key)) != repr(value)
        ]
        saved_print = state_dict.get("fingerprint")
        if not differ and saved_print is not None and self.is_built and saved_print != self.fingerprint():
            differ.append(
                f"the data itself (labels or client sizes; fingerprint {self.fingerprint()}, checkpoint: {saved_print})"
                f" from {describe_source(self.source)}"
            )
        if differ:
            raise ValueError(
                f"resuming with data that differ from the checkpoint's: {', '.join(differ)}. Give the checkpoint's "
                "data and options, or start a new run without --ckpt_path"
            )

    # ------------------------------------------------------------------ Lightning hooks
    def train_dataloader(self) -> RoundLoader:
        """The single :class:`RoundLoader` of this module (same object every call)."""
        self._require_setup()
        return self._train_loader

    def val_dataloader(self) -> ClientEvalLoader:
        """Every client's validation split (its test split when ``val_fraction == 0``)."""
        self._require_setup()
        return self._eval_loaders["val"]

    def test_dataloader(self) -> ClientEvalLoader:
        """Every client's test split."""
        self._require_setup()
        return self._eval_loaders["test"]


def _split_indices(
    idx: torch.Tensor, labels: torch.Tensor, n_parts: int, g: torch.Generator, props: np.ndarray | None
) -> list[torch.Tensor]:
    """Split ``idx`` into ``n_parts`` shards: IID (near-equal sizes) or, given ``props`` [classes, n_parts]
    (rows sum to 1), class l's samples split by the proportions ``props[l]``. Shards come back sorted."""
    if props is None:
        perm = idx[torch.randperm(len(idx), generator=g)]
        return [s.sort().values for s in torch.tensor_split(perm, n_parts)]
    pieces: list[list[torch.Tensor]] = [[] for _ in range(n_parts)]
    for label in torch.unique(labels).tolist():
        members = idx[labels == label]
        members = members[torch.randperm(len(members), generator=g)]
        cuts = np.round(np.cumsum(props[label]) * len(members)).astype(np.int64)[:-1]
        for j, s in enumerate(torch.tensor_split(members, cuts.tolist())):
            pieces[j].append(s)
    return [torch.cat(p).sort().values if p else torch.zeros(0, dtype=torch.int64) for p in pieces]
