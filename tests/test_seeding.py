"""Named random streams: a client's local training is a function of (seed, round, client), nothing else."""

from __future__ import annotations

import torch
from federated_helpers import RecordingCallback, fit, linear_data
from torch import nn

from floral_lightning.module import ClientOptimizer, RegressionModule, RouterOptions
from floral_lightning.seeding import Stream, seed_local_training, seeded_generator, stream_seed


def test_streams_are_reproducible_and_distinct():
    assert stream_seed(0, Stream.LOADER, 1, 2, 0) == stream_seed(0, 1, 1, 2, 0)
    seeds = {stream_seed(0, s, 1, 2) for s in Stream} | {stream_seed(1, Stream.LOADER, 1, 2)}
    assert len(seeds) == len(Stream) + 1
    a = torch.rand(5, generator=seeded_generator(7, Stream.SETUP, 3))
    b = torch.rand(5, generator=seeded_generator(7, Stream.SETUP, 3))
    assert torch.equal(a, b)


def test_local_training_seed_ignores_what_ran_before():
    seed_local_training(3, 5, 2)
    first = torch.rand(4)
    torch.rand(100)  # another client's draws
    seed_local_training(3, 5, 2)
    assert torch.equal(torch.rand(4), first)
    seed_local_training(3, 5, 1)
    assert not torch.equal(torch.rand(4), first)


def _noisy_dropout_module() -> RegressionModule:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(10, 16), nn.Dropout(0.3), nn.Linear(16, 3))
    return RegressionModule(
        base,
        num_clients=6,
        num_adaptors=2,
        rank=1,
        router=RouterOptions(noise="gaussian", noise_std=0.5),
        optimizer=ClientOptimizer(lr=0.05, router_lr=0.1),
    )


def test_a_clients_update_does_not_depend_on_the_other_sampled_clients():
    """Router noise and dropout are drawn per (seed, round, client): client k's round-0 update is the same
    whether it trains with every client or with a subset, before or after others."""
    updates = {}
    for per_round in (6, 3):
        callback = RecordingCallback(clients_per_round=per_round, seed=4)
        torch.manual_seed(per_round)  # a different global RNG state at start must not matter
        fit(_noisy_dropout_module(), linear_data(), 1, callback)
        updates[per_round] = {u.client_id: u for u in callback.updates}
    common = set(updates[3]) & set(updates[6])
    assert common
    for k in common:
        for name, tensor in updates[6][k].state.items():
            assert torch.equal(updates[3][k].state[name], tensor), (k, name)
        assert torch.equal(updates[3][k].logits, updates[6][k].logits)


def test_seed_global_rng_leaves_the_cpu_generator_as_torch_manual_seed_does():
    from floral_lightning.seeding import seed_global_rng

    torch.manual_seed(12345)
    expected = torch.get_rng_state()
    torch.rand(7)  # move it on
    seed_global_rng(12345)
    assert torch.equal(torch.get_rng_state(), expected)
    assert torch.equal(torch.rand(5), (torch.manual_seed(12345), torch.rand(5))[1])
