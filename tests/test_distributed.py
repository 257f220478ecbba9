"""Client-parallel rounds on several processes (``floral_lightning.distributed``).

The definition: with N processes each round's sampled clients are split across the processes, each trains its
share exactly as one process trains all of them, and one collective per round combines the aggregation sums and
the trained clients' private rows; so N processes give the one-process run up to float summation order. The
end-to-end tests launch ``tests/distributed_run.py`` on 1 and 2 CPU processes (gloo) and compare.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from callbacks import FederatedCallback
from floral_lightning.aggregation import ClientUpdate, StreamingAggregator, aggregate
from floral_lightning.cli import select_client_parallel
from floral_lightning.data.federated import (
    ClientEvalLoader,
    ClientTensors,
    DatasetEvalLoader,
    DatasetRoundLoader,
    RoundLoader,
    is_padding,
)
from floral_lightning.distributed import ClientParallelStrategy, contiguous_shard, split_clients
from floral_lightning.methods import LocalAdaptorModule
from floral_lightning.module import FloralModule

SCRIPT = Path(__file__).with_name("distributed_run.py")
MLP = {"class_path": "floral_lightning.models.MLP", "init_args": {"in_features": 10, "hidden": [8], "out_features": 3}}


# --- the pieces, by their definitions ---------------------------------------------------------------------------
def test_split_clients_is_balanced_largest_first_and_covers_the_round():
    costs = {0: 5, 1: 3, 2: 3, 3: 2, 4: 9, 6: 1}
    shares = split_clients([6, 0, 1, 2, 3, 4], costs, 2)
    # largest first to the least loaded share: 4 -> r0 (9), 0 -> r1 (5), 1 -> r1 (8), 2 -> r1 (11), 3 -> r0 (11),
    # 6 -> r0 (12, the tie of 11 and 11 goes to rank 0)
    assert shares == [[3, 4, 6], [0, 1, 2]]
    assert split_clients([6, 0, 1, 2, 3, 4], costs, 2) == shares  # deterministic
    assert split_clients([1, 2], {1: 1, 2: 1}, 3) == [[1], [2], []]  # fewer clients than ranks: the last rank idles
    with pytest.raises(ValueError, match="world_size=0"):
        split_clients([1], {1: 1}, 0)


def test_contiguous_shards_cover_every_client_in_order_with_near_equal_samples():
    sizes = [5, 3, 3, 2, 9, 0, 4]
    for world in (1, 2, 3, 4):
        blocks = [contiguous_shard(sizes, r, world) for r in range(world)]
        assert blocks[0][0] == 0 and blocks[-1][1] == len(sizes)
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    # total 26: the edge nearest 13 is after client 3 (13 samples), so 13 / 13
    assert [contiguous_shard(sizes, r, 2) for r in range(2)] == [(0, 4), (4, 7)]


def test_merging_partial_aggregators_is_aggregating_all_clients():
    torch.manual_seed(0)
    template = {"w": torch.zeros(3, 2), "a": torch.zeros(4, 2), "steps": torch.zeros((), dtype=torch.long)}
    roles = {"w": "shared", "a": "adaptor", "steps": "shared"}
    updates = [
        ClientUpdate(
            k, {"w": torch.randn(3, 2), "a": torch.randn(4, 2), "steps": torch.tensor(k * 3)}, 2 + k, torch.randn(4)
        )
        for k in range(5)
    ]
    expected = aggregate(template, roles, updates)
    parts = [StreamingAggregator(template, roles) for _ in range(3)]
    for update, part in zip(updates, [parts[0], parts[1], parts[0], parts[1], parts[0]]):  # parts[2] sees nobody
        part.add(update.state, update.num_samples, update.logits)
    merged = StreamingAggregator(template, roles)
    merged.merge([p.partial_state() for p in parts])
    got = merged.result(template)
    assert merged.num_clients == 5 and got["steps"] == 12  # the maximum, not a sum; the empty part does not count
    for name in ("w", "a"):
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-6)


def test_padding_batches_come_first_then_the_round_unchanged():
    data = ClientTensors(torch.arange(20.0)[:, None], torch.arange(20), torch.tensor([0, 7, 12, 20]))
    loader = RoundLoader(data, batch_size=3, seed=1)
    loader.set_round(4, [0, 2])
    plain = list(loader)
    loader.set_round(4, [0, 2], padding_batches=2)
    padded = list(loader)
    assert len(loader) == len(padded) == len(plain) + 2
    assert [is_padding(b) for b in padded] == [True, True] + [False] * len(plain)
    for (x, y, k), (x2, y2, k2) in zip(plain, padded[2:]):
        assert k == k2 and torch.equal(x, x2) and torch.equal(y, y2)
    with pytest.raises(ValueError, match="padding_batches=-1"):
        loader.set_round(4, [0], padding_batches=-1)


def test_evaluation_shards_together_serve_every_sample_once():
    data = ClientTensors(torch.arange(20.0)[:, None], torch.arange(20), torch.tensor([0, 7, 12, 12, 20]))
    full = torch.cat([y for _, y, _ in ClientEvalLoader(data, batch_size=4)])
    served = []
    for rank in range(3):
        loader = ClientEvalLoader(data, batch_size=4)
        loader.set_shard(rank, 3)
        batches = list(loader)
        assert len(batches) == len(loader) >= 1
        for _, _, ids in batches:
            assert all(k in loader.shard_clients for k in ids.tolist())
        served.append(torch.cat([y for _, y, _ in batches]))
    assert torch.equal(torch.cat(served), full)
    loader = ClientEvalLoader(data, batch_size=4)
    loader.set_shard(2, 4)  # sizes 7, 5, 0, 8: rank 2 of 4 gets client 2, which has no sample: one empty batch
    ((x, y, ids),) = list(loader)
    assert loader.shard_clients == range(2, 3) and len(loader) == 1 and len(x) == len(y) == len(ids) == 0


def test_dataset_loaders_pad_and_shard_like_the_tensor_ones():
    datasets = [
        torch.utils.data.TensorDataset(torch.arange(a, b, dtype=torch.float32)[:, None], torch.arange(a, b))
        for a, b in ((0, 7), (7, 12), (12, 20))
    ]
    loader = DatasetRoundLoader(datasets, batch_size=3, seed=1)
    loader.set_round(2, [0, 2])
    plain = list(loader)
    loader.set_round(2, [0, 2], padding_batches=1)
    padded = list(loader)
    assert len(loader) == len(padded) == len(plain) + 1 and is_padding(padded[0])
    assert all(torch.equal(a[1], b[1]) and a[2] == b[2] for a, b in zip(plain, padded[1:]))
    loader.set_round(3, [], padding_batches=2)  # a process that trains nobody this round
    assert [is_padding(b) for b in loader] == [True, True]
    served = []
    for rank in range(2):
        evaluation = DatasetEvalLoader(datasets, batch_size=4)
        evaluation.set_shard(rank, 2)
        served += [y for _, y, _ in evaluation]
    assert torch.equal(torch.cat(served), torch.arange(20))


def test_client_tables_are_the_private_tensors_one_row_per_client():
    floral = FloralModule(base=MLP, num_clients=4, num_adaptors=2)
    (logits,) = floral.client_tables()
    assert logits is floral.model.router.logits and logits.shape == (4, 2)
    local = LocalAdaptorModule(base=MLP, num_clients=4)
    tables = local.client_tables()
    assert {id(t) for t in local.client_states.buffers()} <= {id(t) for t in tables}
    assert all(t.shape[0] == 4 for t in tables)

    class Shared(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(10, 3)
            self.scale = torch.nn.Parameter(torch.ones(3))  # private, but not per client

    odd = FloralModule(base=MLP, num_clients=4, num_adaptors=0)
    odd.model.extra = Shared()
    odd.model._roles.update({f"extra.{n}": "shared" for n, _ in odd.model.extra.named_parameters()})
    odd.model._roles["extra.scale"] = "private"
    with pytest.raises(ValueError, match=r"private tensor extra.scale has shape \(3,\)"):
        odd.client_tables()


@pytest.mark.parametrize("cls", [FloralModule, LocalAdaptorModule])
def test_an_empty_evaluation_batch_counts_nothing(cls):
    module = cls(base=MLP, num_clients=4, **({"num_adaptors": 2} if cls is FloralModule else {}))
    module.eval()
    module.validation_step((torch.zeros(0, 10), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)), 0)
    assert set(module._metrics["val"]) == {"acc", "loss"}  # the metrics exist, to take part in the reduction
    for metric in module._metrics["val"].values():
        assert metric.count.sum() == 0


def test_the_round_loop_needs_the_client_parallel_strategy_with_several_processes():
    module = FloralModule(base=MLP, num_clients=6)
    ddp = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match="world_size=2 needs trainer.strategy=client_parallel"):
        FederatedCallback().setup(ddp, module, "validate")
    ours = L.Trainer(accelerator="cpu", devices=2, strategy="client_parallel", logger=False, enable_checkpointing=False)
    assert isinstance(ours.strategy, ClientParallelStrategy) and ours.world_size == 2
    FederatedCallback().setup(ours, module, "fit")  # accepted
    with pytest.raises(ValueError, match="LightningModule has no client_tables"):
        FederatedCallback().setup(ours, L.LightningModule(), "fit")


@pytest.mark.parametrize(
    "trainer, chosen",
    [
        ({"devices": 2}, "client_parallel"),
        ({"devices": "2"}, "client_parallel"),
        ({"devices": -1}, "client_parallel"),
        ({"devices": "0,1"}, "client_parallel"),
        ({"devices": [0, 1]}, "client_parallel"),
        ({"devices": 1, "num_nodes": 2}, "client_parallel"),
        ({"devices": 1}, "auto"),
        ({"devices": "auto"}, "auto"),
        ({"devices": [3]}, "auto"),
        ({"devices": 2, "strategy": "ddp"}, "ddp"),  # the user's choice is kept (and refused by the round loop)
    ],
)
def test_the_cli_selects_client_parallel_when_several_processes_are_asked_for(trainer, chosen):
    config = {"strategy": "auto", "num_nodes": 1, **trainer}
    select_client_parallel(config)
    assert config["strategy"] == chosen


# --- end to end: 2 processes against 1 --------------------------------------------------------------------------
def launch(tmp: Path, name: str, devices: int, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SCRIPT.parents[1])}
    command = [sys.executable, str(SCRIPT), "--devices", str(devices), "--out", str(tmp / name), *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def result(tmp: Path, name: str, rank: int = 0) -> dict:
    return torch.load(tmp / f"{name}.rank{rank}.pt", weights_only=False)


def assert_same_run(ours: dict, theirs: dict, atol: float = 1e-5) -> None:
    assert ours["rounds"] == theirs["rounds"]
    for name, tensor in theirs["global"].items():
        torch.testing.assert_close(ours["global"][name], tensor, rtol=0, atol=atol, msg=name)
    assert len(ours["tables"]) == len(theirs["tables"]) >= 1
    for mine, other in zip(ours["tables"], theirs["tables"]):
        torch.testing.assert_close(mine, other, rtol=0, atol=atol)
    if theirs["mixtures"] is not None:
        torch.testing.assert_close(ours["mixtures"], theirs["mixtures"], rtol=0, atol=atol)
    assert len(ours["val"]) == len(theirs["val"]) >= 1
    for mine, other in zip(ours["val"], theirs["val"]):
        assert mine.keys() == other.keys()
        for key in other:
            assert mine[key] == pytest.approx(other[key], abs=atol), key


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, clients_per_round",
    [("floral", 5), ("local_adaptor", 5), ("floral", 1)],  # 1: a rank trains nobody in a round (padding only)
)
def test_two_processes_give_the_one_process_run(tmp_path, method, clients_per_round):
    args = ("--method", method, "--clients-per-round", str(clients_per_round))
    launch(tmp_path, "one", 1, *args)
    launch(tmp_path, "two", 2, *args)
    one, two, two_rank1 = result(tmp_path, "one"), result(tmp_path, "two"), result(tmp_path, "two", 1)
    assert two["world_size"] == 2 and len(one["rounds"]) == 3
    assert_same_run(two, one)
    assert_same_run(two_rank1, two, atol=0)  # every rank holds the same weights and tables, bit for bit
    assert two["sync_bytes"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_a_checkpoint_resumes_with_another_number_of_processes(tmp_path, first, then):
    launch(tmp_path, "full", 1)
    launch(tmp_path, "cut", first, "--rounds", "2", "--ckpt-dir", str(tmp_path / "ckpt"))
    launch(tmp_path, "resumed", then, "--resume", str(tmp_path / "ckpt" / "last.ckpt"))
    full, resumed = result(tmp_path, "full"), result(tmp_path, "resumed")
    # the resumed run records the rounds and evaluations after the checkpoint
    assert resumed["rounds"] == full["rounds"][2:] and len(resumed["val"]) == 1
    assert_same_run({**resumed, "rounds": full["rounds"], "val": full["val"][:2] + resumed["val"]}, full)


@pytest.mark.slow
def test_a_non_finite_client_on_one_rank_stops_every_rank(tmp_path):
    done = launch(tmp_path, "nan", 2, "--nan-round", "1", check=False)  # the timeout would catch a hang
    assert done.returncode != 0
    assert "FloatingPointError" in done.stderr and "client 0 in round 1" in done.stderr


@pytest.mark.slow
def test_the_distributed_benchmark_runs_and_records_every_figure(tmp_path):
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.distributed", "--quick", "--out", str(out)],
        cwd=SCRIPT.parents[1],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| mnist_label_shift (30 clients) |" in done.stdout
    (task,) = json.loads(out.read_text())["results"].values()
    # no speed assertion (the machine's load decides): every figure is there, finite and positive
    figures = [*task["round_seconds"].values(), task["ratio_2_vs_1"], task["sync_share"], task["transfer_share"]]
    assert len(task["round_seconds"]) == 3 and all(math.isfinite(f) and f > 0 for f in figures)
    assert task["bytes_sent_per_round_per_rank"] > 0 and task["bytes_received_per_round_per_rank"] > 0
