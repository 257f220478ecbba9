"""The server optimizers against their written update rules (Reddi et al., Adaptive Federated Optimization)."""

from __future__ import annotations

import pytest
import torch

from callbacks import FederatedCallback
from floral_lightning.aggregation import SERVER_DEFAULTS, ServerOptimizer


def _yogi_by_hand(x0, averages, lr, betas, tau):
    """Algorithm 2 of Reddi et al. (FedYogi), written out: Delta = avg - x, m and v start at zero."""
    x, m, v = x0.clone(), torch.zeros_like(x0), torch.zeros_like(x0)
    beta1, beta2 = betas
    for avg in averages:
        delta = avg - x
        m = beta1 * m + (1 - beta1) * delta
        v = v - (1 - beta2) * delta**2 * torch.sign(v - delta**2)
        x = x + lr * m / (torch.sqrt(v) + tau)
    return x


def test_fedyogi_follows_its_formula_over_rounds():
    torch.manual_seed(0)
    x0 = torch.randn(5, dtype=torch.float64)
    # averages near and far from x: v grows on some rounds and shrinks on others (both signs of v - delta^2)
    averages = [x0 + s * torch.randn(5, dtype=torch.float64) for s in (1.0, 0.01, 0.5, 2.0, 0.001)]
    lr, betas, tau = 0.3, (0.8, 0.95), 0.05  # not the defaults: every constant is exercised
    state = {"w": x0.clone()}
    server = ServerOptimizer("yogi", lr=lr, betas=betas, eps=tau)
    server.bind(state, {"w": "shared"}, {"w"})
    for avg in averages:
        server.step(state, {"w": avg})
    x_hand = _yogi_by_hand(x0, averages, lr, betas, tau)
    torch.testing.assert_close(state["w"], x_hand, rtol=1e-12, atol=1e-12)


def test_fedyogi_differs_from_fedadam_when_the_second_moment_shrinks():
    # Yogi's v decreases additively (by (1-beta2) g^2) where Adam's decays multiplicatively: after a large
    # round and then small ones, the two take different steps.
    x0 = torch.zeros(1, dtype=torch.float64)
    states = {}
    for name in ("adam", "yogi"):
        state = {"w": x0.clone()}
        server = ServerOptimizer(name, lr=0.1)
        server.bind(state, {"w": "shared"}, {"w"})
        for avg in (10.0, 0.01, 0.01, 0.01):
            server.step(state, {"w": state["w"] + avg})
        states[name] = state["w"]
    assert not torch.allclose(states["adam"], states["yogi"])


def test_adaptive_defaults_are_reddi_et_al_and_sgd_stays_plain_averaging():
    for name in ("adam", "yogi"):
        server = ServerOptimizer(name)
        assert (server.lr, server.adaptor_lr, server.eps, server.betas) == (1e-2, 1e-2, 1e-3, (0.9, 0.99))
    avgm = ServerOptimizer("avgm")
    assert (avgm.lr, avgm.momentum) == (1.0, 0.9) and not avgm.is_plain_average
    sgd = ServerOptimizer()
    assert (sgd.lr, sgd.momentum) == (1.0, 0.0) and sgd.is_plain_average
    assert FederatedCallback().server.is_plain_average  # the round loop's default is FedAvg, unchanged
    assert set(SERVER_DEFAULTS) == {"sgd", "avgm", "adam", "yogi"}


def test_fedadam_default_step_of_a_tiny_update_is_damped_by_tau():
    # the case: a 1e-4 client change must not move a weight by about the server lr in one round
    state = {"w": torch.zeros(1, dtype=torch.float64)}
    server = ServerOptimizer("adam")
    server.bind(state, {"w": "shared"}, {"w"})
    server.step(state, {"w": torch.full((1,), 1e-4, dtype=torch.float64)})
    # bias-corrected first step: lr * g / (|g| + tau) = 1e-2 * 1e-4 / (1e-4 + 1e-3)
    torch.testing.assert_close(state["w"], torch.full((1,), 1e-2 * 1e-4 / 1.1e-3, dtype=torch.float64))


def test_fedavgm_default_is_sgd_with_momentum():
    state = {"w": torch.ones(2, dtype=torch.float64)}
    server = ServerOptimizer("avgm")
    server.bind(state, {"w": "shared"}, {"w"})
    buf, x = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    for avg in (0.5, 0.25):
        g = x - avg
        buf = 0.9 * buf + g
        x = x - buf
        server.step(state, {"w": torch.full((2,), avg, dtype=torch.float64)})
        torch.testing.assert_close(state["w"], x)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "adagrad"}, "expected one of"),
        ({"name": "adam", "momentum": 0.9}, "momentum=0.9 does not apply to 'adam'"),
        ({"name": "sgd", "eps": 1e-3}, "eps=0.001 does not apply to 'sgd'"),
        ({"name": "yogi", "lr": 0.0}, "must be > 0"),
    ],
)
def test_bad_server_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ServerOptimizer(**kwargs)
