"""The router (``ClientMixtures``) against spec §1, computed by hand:

pi_k = softmax((theta_k + noise) / T)     noise only in training: noise_std * U[0, 1) or noise_std * N(0, 1)
w_k  = max(pi_k, min_prob)                not renormalised; then only the top_k largest kept
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from floral_lightning import FloralModel
from floral_lightning.router import ClientMixtures


def hand_mixture(theta: torch.Tensor, temperature: float, min_prob: float, top_k: int | None) -> torch.Tensor:
    """The spec's rule written out: exp / sum, elementwise max with the floor, zero all but the k largest."""
    e = torch.exp(theta / temperature)
    w = e / e.sum(-1, keepdim=True)
    w = torch.where(w < min_prob, torch.full_like(w, min_prob), w)
    if top_k is not None:
        rank = w.argsort(-1, descending=True).argsort(-1)  # 0 for the largest
        w = torch.where(rank < top_k, w, torch.zeros_like(w))
    return w


def router_with_logits(randn, num_clients: int = 5, num_adaptors: int = 4, **options) -> ClientMixtures:
    router = ClientMixtures(num_clients, num_adaptors, **options).double()
    with torch.no_grad():
        router.logits.copy_(randn(num_clients, num_adaptors) * 2)
    return router


@pytest.mark.parametrize("top_k", [None, 1, 2])  # no ties at the k-th place for these logits
@pytest.mark.parametrize("temperature, min_prob", [(1.0, 0.0), (2.5, 0.1), (0.6, 0.03)])
def test_mixture_is_the_written_rule(temperature, min_prob, top_k, randn):
    router = router_with_logits(randn, temperature=temperature, min_prob=min_prob, top_k=top_k, noise="uniform")
    router.eval()
    theta = router.logits.detach()
    for k in range(5):
        torch.testing.assert_close(router(k), hand_mixture(theta[k], temperature, min_prob, top_k))
    ids = torch.tensor([4, 0, 0, 2])
    torch.testing.assert_close(router(ids), hand_mixture(theta[ids], temperature, min_prob, top_k))


def test_floor_is_not_renormalised_and_top_k_keeps_the_largest():
    router = ClientMixtures(1, 4, temperature=1.0, min_prob=0.2, top_k=2, noise="none")
    with torch.no_grad():
        router.logits.copy_(torch.tensor([[0.0, 1.0, 3.0, 2.0]]))
    w = router(0)
    assert w[0] == 0 and w[1] == 0  # the two smallest dropped
    p = torch.softmax(torch.tensor([0.0, 1.0, 3.0, 2.0]), -1)
    assert w[2].item() == pytest.approx(p[2].item()) and w[3].item() == pytest.approx(p[3].item())
    router.top_k = None
    assert router(0).sum().item() == pytest.approx(0.2 + 0.2 + p[2].item() + p[3].item())  # > 1: no renormalising


@pytest.mark.parametrize("kind, draw", [("uniform", torch.rand), ("gaussian", torch.randn)])
def test_training_noise_is_the_seeded_draw_added_to_the_logits(kind, draw, randn):
    router = router_with_logits(randn, temperature=1.7, min_prob=0.05, noise=kind, noise_std=0.8)
    theta = router.logits.detach()
    ids = torch.tensor([1, 3, 3, 0])
    torch.manual_seed(11)
    got = router(ids)
    torch.manual_seed(11)
    noise = 0.8 * draw(4, 4, dtype=torch.float64)
    torch.testing.assert_close(got, hand_mixture(theta[ids] + noise, 1.7, 0.05, None))
    torch.manual_seed(11)
    noise = 0.8 * draw(4, dtype=torch.float64)
    torch.manual_seed(11)
    torch.testing.assert_close(router(2), hand_mixture(theta[2] + noise, 1.7, 0.05, None))


@pytest.mark.parametrize("kind", ["uniform", "gaussian"])
def test_noise_has_the_documented_distribution(kind):
    """With two adaptors, zero logits, no floor and T = 2: log(w_1 / w_0) = (n_1 - n_0) / T exactly. The
    difference of two noise_std * U[0,1) draws is triangular on (-s, s) with variance s^2/6; of two
    noise_std * N(0,1) draws, normal with variance 2 s^2."""
    s, t, n = 1.5, 2.0, 20_000
    router = ClientMixtures(1, 2, temperature=t, min_prob=0.0, noise=kind, noise_std=s).double()
    torch.manual_seed(0)
    w = router(torch.zeros(n, dtype=torch.long))
    d = (w[:, 1] / w[:, 0]).log() * t
    variance = s * s / 6 if kind == "uniform" else 2 * s * s
    assert abs(d.mean().item()) < 4 * math.sqrt(variance / n)
    assert d.var().item() == pytest.approx(variance, rel=0.05)
    if kind == "uniform":
        assert d.abs().max().item() < s
    else:
        assert (d.abs() > s).float().mean().item() == pytest.approx(math.erfc(s / (2 * s)), abs=0.02)


def test_no_noise_in_eval_mode_or_when_switched_off(randn):
    router = router_with_logits(randn, noise="uniform", noise_std=3.0, min_prob=0.0)
    theta = router.logits.detach()
    router.train()
    assert not torch.equal(router(1), router(1))  # noisy in training
    router.eval()
    torch.testing.assert_close(router(1), torch.softmax(theta[1], -1))
    for options in ({"noise": "none"}, {"noise": "gaussian", "noise_std": 0.0}):
        quiet = router_with_logits(randn, min_prob=0.0, **options)
        quiet.train()
        torch.testing.assert_close(quiet(2), torch.softmax(quiet.logits.detach()[2], -1))


def test_model_mixture_of_is_noise_free_and_keeps_the_mode(randn):
    model = FloralModel(nn.Linear(4, 2), num_clients=3, num_adaptors=4, rank=1, router={"noise_std": 5.0})
    with torch.no_grad():
        model.router.logits.copy_(randn(3, 4).float())
    model.train()
    expected = hand_mixture(model.router.logits.detach()[2], 1.0, 0.01, None)
    torch.testing.assert_close(model.mixture_of(2), expected)
    assert model.router.training


def test_probabilities_are_the_plain_softmax(randn):
    """p(c|k), what the aggregation weights use: no temperature, no floor, no top-k, no noise."""
    router = router_with_logits(randn, temperature=3.0, min_prob=0.3, top_k=1, noise="uniform")
    theta = router.logits.detach()
    torch.testing.assert_close(router.probabilities(), theta.exp() / theta.exp().sum(-1, keepdim=True))
    torch.testing.assert_close(router.probabilities(3), theta[3].exp() / theta[3].exp().sum())


def test_entropy_and_a_positive_penalty_sharpens(randn):
    router = router_with_logits(randn, temperature=1.5, entropy_penalty=0.5)
    ids = torch.tensor([0, 2])
    p = torch.softmax(router.logits.detach()[ids] / 1.5, -1)
    entropy = -(p * p.log()).sum(-1).mean()
    torch.testing.assert_close(router.entropy(ids), entropy)
    loss = router.entropy_loss(ids)
    torch.testing.assert_close(loss, 0.5 * entropy)
    loss.backward()
    with torch.no_grad():
        router.logits -= 0.1 * router.logits.grad
    assert router.entropy(ids).item() < entropy.item()  # descending a positive penalty: sharper mixtures
    assert ClientMixtures(2, 2).entropy_loss(0) is None


def test_only_looked_up_rows_get_gradients(randn):
    router = router_with_logits(randn, noise="gaussian")
    router(torch.tensor([1, 3, 1])).pow(2).sum().backward()
    grad = router.logits.grad
    assert grad[[1, 3]].abs().sum() > 0
    assert torch.equal(grad[[0, 2, 4]], torch.zeros(3, 4, dtype=grad.dtype))


def test_oracle_is_one_hot_logits_and_frozen():
    router = ClientMixtures(4, 3)
    router.set_oracle(torch.tensor([2, 0, 1, 2]))
    expected = torch.full((4, 3), -100.0)
    expected[[0, 1, 2, 3], [2, 0, 1, 2]] = 0.0
    assert torch.equal(router.logits.detach(), expected) and router.frozen
    with pytest.raises(ValueError, match=r"oracle clusters must lie in \[0, 3\)"):
        ClientMixtures(2, 3).set_oracle(torch.tensor([0, 3]))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"noise": "laplace"}, "noise='laplace'"),
        ({"temperature": 0.0}, "temperature=0.0"),
        ({"top_k": 5}, r"top_k=5: must be None or in \[1, num_adaptors=4\]"),
        ({"min_prob": 1.0}, r"min_prob=1.0: must lie in \[0, 1\)"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        ClientMixtures(3, 4, **options)
