"""The aggregation rule: weights, the streaming form, integer buffers, and the server optimizer."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from floral_lightning import FloralModel
from floral_lightning.aggregation import ClientUpdate, ServerOptimizer, StreamingAggregator, aggregate, client_weights


@settings(max_examples=30, deadline=None)
@given(s=st.integers(1, 8), c=st.integers(1, 5), seed=st.integers(0, 1000))
def test_p_k_given_c_sums_to_one_over_clients(s, c, seed):
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(1, 100, (s,), generator=g)
    logits = 3 * torch.randn(s, c, generator=g)
    p_k, p_k_c = client_weights(n, logits)
    torch.testing.assert_close(p_k.sum(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(p_k_c.sum(0), torch.ones(c, dtype=torch.float64))
    # Bayes: p(k|c) p(c) = p(k) p(c|k)
    p_c_k = torch.softmax(logits.double(), -1)
    p_c = (p_k[:, None] * p_c_k).sum(0)
    torch.testing.assert_close(p_k_c * p_c, p_k[:, None] * p_c_k)


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(3, 4, generator=g),
        "A": torch.randn(2, 5, 3, generator=g),  # adaptor tensor, C = 2
        "steps": torch.tensor(seed, dtype=torch.long),
    }


ROLES = {"w": "shared", "A": "adaptor", "steps": "shared"}


def test_aggregate_matches_the_formula():
    updates = [
        ClientUpdate(k, _state(k + 1), n, torch.tensor(lg))
        for k, (n, lg) in enumerate([(10, [0.0, 1.0]), (30, [2.0, -1.0]), (20, [0.5, 0.5])])
    ]
    out = aggregate(_state(0), ROLES, updates)
    n = torch.tensor([10.0, 30.0, 20.0])
    p_k, p_k_c = client_weights(n, torch.stack([u.logits for u in updates]))
    expected_w = sum(float(p_k[i]) * u.state["w"] for i, u in enumerate(updates))
    expected_a = torch.stack(
        [sum(float(p_k_c[i, c]) * u.state["A"][c] for i, u in enumerate(updates)) for c in range(2)]
    )
    torch.testing.assert_close(out["w"], expected_w)
    torch.testing.assert_close(out["A"], expected_a)
    assert out["steps"].item() == 3 and out["steps"].dtype == torch.long  # max, never a sum


def test_streaming_equals_batch_in_any_order():
    updates = [ClientUpdate(k, _state(k + 1), 5 + k, torch.randn(2)) for k in range(4)]
    forward = aggregate(_state(0), ROLES, updates)
    backward = aggregate(_state(0), ROLES, list(reversed(updates)))
    for name in forward:
        torch.testing.assert_close(forward[name], backward[name])


def test_no_clients_keeps_global():
    state = _state(0)
    out = StreamingAggregator(state, ROLES).result(state)
    for name in state:
        assert torch.equal(out[name], state[name])


def test_single_adaptor_reduces_to_fedavg():
    """C = 1: adaptor weights p(k|c) equal p(k), so every tensor averages like FedAvg."""
    base = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    model = FloralModel(base, num_clients=3, num_adaptors=1, rank=1)
    roles = {n: r for n, r in model.roles.items() if r != "private"}
    states, n = [], [3, 7, 10]
    for k in range(3):
        torch.manual_seed(k)
        states.append({name: torch.randn_like(t) for name, t in model.federated_state().items()})
    updates = [ClientUpdate(k, states[k], n[k], torch.randn(1)) for k in range(3)]
    out = aggregate(model.federated_state(), roles, updates)
    fedavg = aggregate(model.federated_state(), dict.fromkeys(roles, "shared"), updates)
    for name in out:
        torch.testing.assert_close(out[name], fedavg[name])


def test_bad_role_and_size_are_rejected():
    with pytest.raises(ValueError, match="no federated role"):
        StreamingAggregator({"x": torch.zeros(2)}, {"x": "private"})
    agg = StreamingAggregator(_state(0), ROLES)
    with pytest.raises(ValueError, match="num_samples=0"):
        agg.add(_state(1), 0, torch.zeros(2))


def test_server_sgd_lr1_is_exact_average_and_momentum_differs():
    state = {"w": torch.ones(3), "A": torch.ones(2, 3)}
    roles = {"w": "shared", "A": "adaptor"}
    avg = {"w": torch.full((3,), 0.3), "A": torch.full((2, 3), 0.7)}
    server = ServerOptimizer("sgd", lr=1.0)
    server.bind(state, roles, set(state))
    server.step(state, avg)
    assert torch.equal(state["w"], avg["w"]) and torch.equal(state["A"], avg["A"])

    state = {"w": torch.ones(3), "A": torch.ones(2, 3)}
    server = ServerOptimizer("sgd", lr=0.5, adaptor_lr=1.0, momentum=0.9)
    server.bind(state, roles, set(state))
    server.step(state, avg)
    torch.testing.assert_close(state["w"], torch.full((3,), 1 - 0.5 * 0.7))  # x - lr * (x - avg)
    torch.testing.assert_close(state["A"], avg["A"])


def test_server_adam_moves_towards_average_and_buffers_copy():
    state = {"w": torch.ones(3), "running_mean": torch.zeros(3)}
    roles = {"w": "shared", "running_mean": "shared"}
    server = ServerOptimizer("adam", lr=0.1)
    server.bind(state, roles, {"w"})
    server.step(state, {"w": torch.zeros(3), "running_mean": torch.full((3,), 2.0)})
    # Adam's first step is lr * g / (|g| + eps), eps = tau = 1e-3 by default
    torch.testing.assert_close(state["w"], torch.full((3,), 1 - 0.1 / (1 + 1e-3)))
    assert torch.equal(state["running_mean"], torch.full((3,), 2.0))
    restored = ServerOptimizer("adam", lr=0.1)
    restored.bind(state, roles, {"w"})
    restored.load_state_dict(server.state_dict())
    assert restored.state_dict()["state"][0]["step"] == 1


def test_server_lr_one_with_another_adaptor_lr_still_steps_the_adaptors():
    """lr 1 is plain averaging for the base only: adaptors move x - adaptor_lr * (x - avg)."""
    state = {"w": torch.ones(3), "A": torch.ones(2, 3)}
    avg = {"w": torch.full((3,), 0.3), "A": torch.full((2, 3), 0.7)}
    server = ServerOptimizer("sgd", lr=1.0, adaptor_lr=0.5)
    server.bind(state, {"w": "shared", "A": "adaptor"}, set(state))
    server.step(state, avg)
    torch.testing.assert_close(state["w"], avg["w"])
    torch.testing.assert_close(state["A"], torch.full((2, 3), 1 - 0.5 * 0.3))


def test_an_adaptor_no_client_weights_keeps_its_global_value():
    """p(c|k) underflows to exactly 0 for adaptor 1 in every client: its slice keeps the global value rather
    than becoming 0 / 0 or 0."""
    global_state = _state(0)
    aggregator = StreamingAggregator(global_state, ROLES)
    for seed in (1, 2):
        aggregator.add(_state(seed), 10, torch.tensor([0.0, -1000.0]))
    result = aggregator.result(fallback=global_state)
    assert torch.equal(result["A"][1], global_state["A"][1])
    torch.testing.assert_close(result["A"][0], (_state(1)["A"][0] + _state(2)["A"][0]) / 2)
