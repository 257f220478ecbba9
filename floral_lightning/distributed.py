"""Client-parallel rounds on several processes (``--trainer.devices=N``, ``--trainer.num_nodes=M``).

Each process (rank) trains its share of a round's sampled clients one after another, exactly as a single process
trains all of them; clients are independent during local training, so there is no gradient all-reduce (DDP's
per-step sync would average different clients' gradients, and would hang on their unequal batch counts). At the
round's end one collective (:func:`sync_round`, an ``all_gather``) hands every rank the others'

- streaming-aggregator partial sums, normalisers and integer maxima (``StreamingAggregator.partial_state``), and
- the private rows (router logits, local adaptors, Ditto models: ``FloralModule.client_tables``) of the clients
  each rank trained,

so every rank applies the same server step to the same totals and holds the same global weights and the same
private tables: checkpoints (written by rank 0) and evaluation need nothing more. Evaluation is sharded: each
rank evaluates a contiguous block of clients and the per-client metric sums are reduced across ranks.

``ClientParallelStrategy`` is Lightning's ``DDPStrategy`` (the launcher, process groups, gloo on CPU and nccl on
GPU, SLURM/torchrun environments) without the ``DistributedDataParallel`` wrapper. It is registered as
``"client_parallel"``; the CLI picks it when more than one process is requested and no strategy is given.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

from .aggregation import StreamingAggregator
from .data.federated import is_padding

__all__ = ["ClientParallelStrategy", "RoundSync", "contiguous_shard", "split_clients", "sync_round"]

STRATEGY_NAME = "client_parallel"


def split_clients(clients: Sequence[int], costs: Mapping[int, int] | Sequence[int], world_size: int) -> list[list[int]]:
    """The round's ``clients`` split into ``world_size`` shares balanced by cost (a client's local batches).

    Largest first, each to the share with the least cost so far (ties: the larger client id last, the lower
    rank first); every share is returned sorted. A pure function of its arguments, so every rank computes the
    same split without communicating; rank 0 gets the largest client, and every rank gets one when there are
    at least ``world_size`` clients.
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size}: must be >= 1")
    loads = [0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for k in sorted((int(k) for k in clients), key=lambda k: (-int(costs[k]), k)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        shares[rank].append(k)
        loads[rank] += int(costs[k])
    return [sorted(share) for share in shares]


def contiguous_shard(sizes: Sequence[int], rank: int, world_size: int) -> tuple[int, int]:
    """The block ``[lo, hi)`` of consecutive clients that ``rank`` evaluates: the blocks of ranks 0..N-1 cover
    all clients in order, each holding as near ``1 / world_size`` of the samples (``sizes``) as block edges allow."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} out of range for world_size={world_size}")
    cumulative = [0]
    for size in sizes:
        cumulative.append(cumulative[-1] + int(size))
    total = cumulative[-1]

    def edge(r: int) -> int:  # the first client of rank r's block
        if r in (0, world_size):
            return 0 if r == 0 else len(sizes)
        target = total * r / world_size
        j = bisect.bisect_left(cumulative, target)  # cumulative[j] >= target > cumulative[j - 1]
        if j == len(cumulative) or (j > 0 and target - cumulative[j - 1] < cumulative[j] - target):
            j -= 1  # the edge just before the target is nearer
        return j

    lo, hi = edge(rank), edge(rank + 1)
    return lo, hi


@dataclass
class RoundSync:
    """What one round-end collective did: the payload each rank sent, the bytes each rank received, how long the
    collective took (the all_gather, which includes waiting for the slowest rank, plus combining), and the
    first client whose training failed (non-finite) on any rank, as ``(rank, client)``, or ``None``."""

    payload_bytes: int
    received_bytes: int
    seconds: float
    failure: tuple[int, int] | None


def _aligned(nbytes: int) -> int:
    return (nbytes + 7) // 8 * 8  # every segment starts on 8 bytes, so it can be viewed as any dtype in place


def _layout(specs: Sequence[tuple[torch.Size, torch.dtype]]) -> tuple[list[int], int]:
    offsets, total = [], 0
    for shape, dtype in specs:
        offsets.append(total)
        total += _aligned(shape.numel() * dtype.itemsize)
    return offsets, total


def _pack(tensors: Sequence[torch.Tensor], size: int, device: torch.device) -> torch.Tensor:
    """The tensors' bytes, one after another (8-byte aligned), in a uint8 buffer of ``size`` bytes."""
    buffer = torch.zeros(size, dtype=torch.uint8, device=device)
    offsets, _ = _layout([(t.shape, t.dtype) for t in tensors])
    for offset, tensor in zip(offsets, tensors):
        raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        buffer[offset : offset + raw.numel()] = raw
    return buffer


def _unpack(buffer: torch.Tensor, specs: Sequence[tuple[torch.Size, torch.dtype]]) -> list[torch.Tensor]:
    offsets, _ = _layout(specs)
    return [
        buffer[offset : offset + shape.numel() * dtype.itemsize].view(dtype).view(shape)
        for offset, (shape, dtype) in zip(offsets, specs)
    ]


@torch.no_grad()
def sync_round(
    strategy: Any,
    aggregator: StreamingAggregator,
    tables: Sequence[torch.Tensor],
    shares: Sequence[Sequence[int]],
    failed_client: int | None = None,
) -> RoundSync:
    """The round-end collective: after it, every rank's ``aggregator`` holds the whole round's sums and every
    rank's ``tables`` hold the rows of every client that trained (each from the rank that trained it).

    Args:
        strategy: the trainer's strategy (its ``global_rank`` and ``world_size``; the collective runs on the default
            process group, which the strategy set up).
        aggregator: this rank's aggregator over its own share of the clients; merged in place.
        tables: the private per-client tensors ``[K, ...]`` (row k is client k's), updated in place.
        shares: every rank's clients this round (:func:`split_clients`), the same on every rank.
        failed_client: a client of this rank whose training went non-finite (its update was not added), or ``None``.
    """
    start = time.perf_counter()
    rank, world_size = strategy.global_rank, strategy.world_size
    partial = aggregator.partial_state()
    names = list(partial)
    device = next(iter(partial.values())).device if partial else strategy.root_device
    status = torch.tensor([-1 if failed_client is None else failed_client], dtype=torch.int64, device=device)

    def specs(r: int) -> list[tuple[torch.Size, torch.dtype]]:
        rows = [(torch.Size((len(shares[r]), *t.shape[1:])), t.dtype) for t in tables]
        return [(t.shape, t.dtype) for t in partial.values()] + rows + [(status.shape, status.dtype)]

    sizes = [_layout(specs(r))[1] for r in range(world_size)]
    mine = [partial[n].to(device) for n in names]
    mine += [t[torch.as_tensor(list(shares[rank]), dtype=torch.long, device=t.device)].to(device) for t in tables]
    buffer = _pack([*mine, status], max(sizes), device)
    gathered = buffer.new_empty((world_size, buffer.numel()))
    torch.distributed.all_gather(list(gathered.unbind(0)), buffer)  # every rank's buffer, on every rank
    partials, failure = [], None
    for r in range(world_size):
        parts = _unpack(gathered[r], specs(r))
        partials.append(dict(zip(names, parts[: len(names)])))
        rows = torch.as_tensor(list(shares[r]), dtype=torch.long)
        for table, values in zip(tables, parts[len(names) : len(names) + len(tables)]):
            if len(rows):
                table[rows.to(table.device)] = values.to(table.device)
        client = int(parts[-1])
        if client >= 0 and failure is None:
            failure = (r, client)
    aggregator.merge(partials)  # in rank order: the same sums, bit for bit, on every rank
    return RoundSync(
        payload_bytes=sizes[rank],
        received_bytes=(world_size - 1) * max(sizes),
        seconds=time.perf_counter() - start,
        failure=failure,
    )


class ClientParallelStrategy(DDPStrategy):
    """Lightning's DDP strategy for client-parallel federated rounds: processes, launcher, backends (gloo on
    CPU, nccl on GPU) and cluster environments as ``DDPStrategy``, but the model is not wrapped in
    ``DistributedDataParallel``: nothing is synchronised during local steps. Instead:

    - at set-up, the module's weights are broadcast from rank 0, so every rank starts from the same model;
    - a padding batch of a round loader (``floral_lightning.data.federated.is_padding``) is a no-op step: the
      module's ``training_step``, the optimizer's step hooks and the optimizer step are skipped, and the
      backward of a constant zero reaches no parameter (the padding only keeps Lightning's per-step collective
      in step across ranks);
    - evaluation loaders are sharded (``set_shard``): each rank evaluates a block of clients.

    The round-end collective is the round loop's (``callbacks.FederatedCallback`` calls :func:`sync_round`).
    Registered as ``"client_parallel"``: ``Trainer(strategy="client_parallel", devices=2)``.
    """

    strategy_name = STRATEGY_NAME

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._padding_step = False

    @torch.no_grad()
    def configure_ddp(self) -> None:
        """No ``DistributedDataParallel``: only the initial weights (every parameter and buffer) are made rank 0's
        on every rank, as DDP's constructor would, so runs that did not seed every process start the same."""
        for tensor in self.model.state_dict().values():
            torch.distributed.broadcast(tensor, src=0)

    def batch_to_device(self, batch: Any, device: torch.device | None = None, dataloader_idx: int = 0) -> Any:
        self._padding_step = is_padding(batch)  # read by optimizer_step, which Lightning calls next
        return super().batch_to_device(batch, device, dataloader_idx)

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if is_padding(args[0]):
            # a loss with no graph behind it (Lightning refuses a None loss with several processes): its backward
            # leaves every gradient unset
            return torch.zeros((), device=self.root_device, requires_grad=True)
        return super().training_step(*args, **kwargs)

    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        if self._padding_step:
            # Lightning requires the closure to run (training_step above, then a backward that reaches no
            # parameter); the step hooks and the optimizer step are skipped, so a padding batch changes nothing
            return closure()
        return super().optimizer_step(optimizer, closure, model, **kwargs)

    def process_dataloader(self, dataloader: object) -> object:
        """Shard evaluation loaders across ranks (round loaders are split per round by the round loop)."""
        if hasattr(dataloader, "set_shard"):
            dataloader.set_shard(self.global_rank, self.world_size)
        elif not hasattr(dataloader, "set_round"):
            raise TypeError(
                f"strategy={STRATEGY_NAME!r} needs the federated data module's loaders (a round loader for training, "
                f"shardable evaluation loaders), got {type(dataloader).__name__}: every rank would evaluate every "
                "sample. Use FederatedDataModule, or a loader with set_shard(rank, world_size)"
            )
        return dataloader

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        if STRATEGY_NAME not in strategy_registry:
            strategy_registry.register(
                STRATEGY_NAME,
                cls,
                description="federated rounds, clients split across processes (DDP without DistributedDataParallel)",
            )


ClientParallelStrategy.register_strategies(StrategyRegistry)
