"""FloralModel and FloralLinear: exact init, path equivalence, roles, merging, targeting and bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from floral_lightning import ClientMixtures, FloralLinear, FloralModel
from floral_lightning.layers import resolve_rank


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))


def randomise_adaptors(model: FloralModel) -> None:
    with torch.no_grad():
        for p in model.adaptor_parameters():
            p.normal_(0, 0.5)


def test_init_equals_base_exactly():
    torch.manual_seed(0)
    base = mlp()
    x = torch.randn(8, 10)
    expected = base(x)
    model = FloralModel(base, num_clients=5, num_adaptors=3, rank=2)
    model.eval()
    assert torch.equal(model(x, 2), expected)
    assert torch.equal(model(x, torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])), expected)


@settings(max_examples=25, deadline=None)
@given(
    d_in=st.integers(1, 12),
    d_out=st.integers(1, 12),
    rank=st.integers(1, 6),
    c=st.integers(1, 5),
    bias=st.booleans(),
    extra_dims=st.integers(0, 2),
    alpha=st.sampled_from([1.0, 0.5]),
)
def test_linear_paths_agree_forward_and_gradients(d_in, d_out, rank, c, bias, extra_dims, alpha):
    torch.manual_seed(0)
    layer = FloralLinear(nn.Linear(d_in, d_out, bias=bias).double(), c, rank=min(rank, d_in, d_out), alpha=alpha)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if not name.startswith("base."):
                p.normal_()
    x = torch.randn(4, *([3] * extra_dims), d_in, dtype=torch.float64)
    w = torch.rand(c, dtype=torch.float64)
    results = {}
    for path in ("merged", "factorised", "naive"):
        layer.path = path
        mix = w.clone().requires_grad_(True)
        out = layer(x, mixture=mix)
        out.pow(2).sum().backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
        grads["mixture"] = mix.grad.clone()
        layer.zero_grad()
        results[path] = (out.detach(), grads)
    ref_out, ref_grads = results["naive"]
    for path in ("merged", "factorised"):
        out, grads = results[path]
        torch.testing.assert_close(out, ref_out)
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], msg=f"{path}: grad of {name}")


def test_per_sample_mixtures_match_per_client_forward():
    torch.manual_seed(0)
    model = FloralModel(mlp(), num_clients=6, num_adaptors=3, rank=2)
    randomise_adaptors(model)
    with torch.no_grad():
        model.router.logits.normal_()
    model.eval()
    x = torch.randn(6, 10)
    ids = torch.tensor([5, 0, 3, 3, 1, 2])
    batched = model(x, ids)
    single = torch.cat([model(x[i : i + 1], int(ids[i])) for i in range(6)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


def test_merge_matches_model_for_that_client():
    torch.manual_seed(0)
    model = FloralModel(mlp(), num_clients=4, num_adaptors=2, rank=3)
    randomise_adaptors(model)
    with torch.no_grad():
        model.router.logits.normal_()
    model.eval()
    x = torch.randn(5, 10)
    merged = model.merge(3)
    assert not any("adaptor" in n for n, _ in merged.named_parameters())
    assert isinstance(merged[0], nn.Linear) and type(merged) is nn.Sequential
    torch.testing.assert_close(merged(x), model(x, 3), rtol=1e-5, atol=1e-5)


def test_roles_cover_every_tensor_once():
    model = FloralModel(mlp(), num_clients=4, num_adaptors=2, rank=3)
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    assert sorted(model.roles) == sorted(names)
    assert model.roles["router.logits"] == "private"
    assert model.roles["base.0.base.weight"] == "shared"
    assert model.roles["base.0.adaptor_A"] == "adaptor"
    count = sum(p.numel() for p in model.parameters())
    by_role = sum(
        p.numel() for p in model.shared_parameters() + model.adaptor_parameters() + model.private_parameters()
    )
    assert count == by_role
    for p in model.adaptor_parameters():
        assert p.shape[0] == 2
    assert [v.shape for v in model.adaptor_parameters(1)] == [p.shape[1:] for p in model.adaptor_parameters()]


def test_overhead_report_counts():
    model = FloralModel(mlp(), num_clients=7, num_adaptors=2, rank=1)
    o = model.overhead()
    assert o.base == 10 * 20 + 20 + 20 * 3 + 3
    # per layer: C * (r*in + out*r + out)
    assert o.adaptors == 2 * (1 * 10 + 20 * 1 + 20) + 2 * (1 * 20 + 3 * 1 + 3)
    assert o.router == 7 * 2 and o.per_client == 2
    assert "adaptors" in o.as_markdown() and f"{o.adaptor_percent:.2f}" in o.as_markdown()


def test_state_dict_round_trips():
    torch.manual_seed(0)
    a = FloralModel(mlp(), num_clients=3, num_adaptors=2, rank=2)
    randomise_adaptors(a)
    b = FloralModel(mlp(), num_clients=3, num_adaptors=2, rank=2)
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    x = torch.randn(4, 10)
    assert torch.equal(a(x, 1), b(x, 1))


def test_base_methods_reachable_through_base():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x)

        def describe(self) -> str:
            return "net"

    model = FloralModel(Net(), num_clients=2, num_adaptors=2, rank=1)
    assert model.base.describe() == "net"
    assert not hasattr(model, "describe")


def test_target_and_exclude_patterns():
    model = FloralModel(mlp(), num_clients=2, num_adaptors=2, rank=1, target_modules=["2"])
    assert list(model.floral_layers()) == ["2"]
    model = FloralModel(mlp(), num_clients=2, num_adaptors=2, rank=1, exclude_modules=r"2")
    assert list(model.floral_layers()) == ["0"]
    model = FloralModel(mlp(), num_clients=2, num_adaptors=2, rank=1, target_modules=r"\d")
    assert list(model.floral_layers()) == ["0", "2"]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_adaptors": 0}, ValueError, "num_adaptors=0"),
        ({"rank": -1}, ValueError, "rank=-1"),
        ({"rank": 1.5}, ValueError, "rank=1.5"),
        ({"rank": "huge"}, ValueError, "rank='huge'.*sqrt"),
        ({"conv_split": "diagonal", "conv": True}, None, None),  # no conv in the MLP: split never used
        ({"target_modules": ["fc9"]}, ValueError, "'fc9' matches no module"),
        ({"target_modules": ["1"]}, TypeError, "ReLU, which FLoRAL cannot adapt"),
        ({"exclude_modules": ["nothing"]}, ValueError, "'nothing' matches no module"),
        ({"linear": False}, ValueError, "no layer of the base model was selected"),
        ({"init": "zeros"}, ValueError, "init='zeros'"),
        ({"router": {"noise": "pink"}}, ValueError, "noise='pink'"),
        ({"router": {"top_k": 5}}, ValueError, "top_k=5"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, error, match):
    if error is None:
        FloralModel(mlp(), num_clients=2, num_adaptors=2, rank=1, **kwargs)
        return
    args = {"num_adaptors": 2, "rank": 1} | kwargs
    with pytest.raises(error, match=match):
        FloralModel(mlp(), num_clients=2, **args)


def test_rank_rules():
    assert resolve_rank(3, 10, 20) == 3
    assert resolve_rank(0.1, 100, 100) == 5  # 0.1 * 100 * 100 / 200
    assert resolve_rank(0.001, 10, 10, min_rank=2) == 2
    assert resolve_rank("full", 7, 30) == 7
    assert resolve_rank("sqrt", 16, 100) == 4
    assert resolve_rank("log", 15, 100) == 4
    with pytest.warns(UserWarning, match="clipped"):
        assert resolve_rank(50, 8, 9) == 8


# --- the router ----------------------------------------------------------------------------------------------


def test_router_lookup_shapes_and_floor():
    router = ClientMixtures(5, 3, min_prob=0.2)
    router.eval()
    with torch.no_grad():
        router.logits[2] = torch.tensor([10.0, 0.0, 0.0])
    assert router(2).shape == (3,)
    assert router(torch.tensor([1, 2])).shape == (2, 3)
    assert router(2).min() >= 0.2  # the floor, not renormalised
    torch.testing.assert_close(router.probabilities(1), torch.full((3,), 1 / 3))


def test_router_noise_only_in_training():
    router = ClientMixtures(2, 4, noise="gaussian", noise_std=1.0, min_prob=0.0)
    router.eval()
    assert torch.equal(router(0), router(0))
    router.train()
    assert not torch.equal(router(0), router(0))


def test_router_top_k_keeps_k_entries():
    router = ClientMixtures(3, 4, top_k=2, min_prob=0.0, noise="none")
    with torch.no_grad():
        router.logits.normal_()
    w = router(torch.arange(3))
    assert ((w > 0).sum(-1) == 2).all()


def test_router_only_looked_up_rows_get_gradients():
    router = ClientMixtures(6, 3, noise="none")
    router(4)[0].backward()
    grad = router.logits.grad
    assert torch.count_nonzero(grad[4]) == 3 and torch.count_nonzero(grad[[0, 1, 2, 3, 5]]) == 0


def test_entropy_penalty_sign_sharpens():
    router = ClientMixtures(1, 3, noise="none", entropy_penalty=1.0)
    with torch.no_grad():
        router.logits[0] = torch.tensor([0.3, 0.0, -0.2])
    opt = torch.optim.SGD(router.parameters(), lr=1.0)
    before = router.entropy(0).item()
    for _ in range(20):
        opt.zero_grad()
        router.entropy_loss(0).backward()
        opt.step()
    assert router.entropy(0).item() < before


def test_oracle_router_is_one_hot_and_frozen():
    router = ClientMixtures(4, 2, min_prob=0.0)
    router.set_oracle(torch.tensor([0, 1, 0, 1]))
    router.eval()
    assert router.frozen
    torch.testing.assert_close(router(torch.arange(4)).argmax(-1), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="oracle clusters must lie"):
        ClientMixtures(2, 2).set_oracle(torch.tensor([0, 2]))


def test_a_single_layer_base_is_wrapped_whole():
    torch.manual_seed(0)
    base = nn.Linear(10, 3)
    x = torch.randn(4, 10)
    expected = base(x)
    model = FloralModel(base, num_clients=3, num_adaptors=2, rank=1)
    assert isinstance(model.base, FloralLinear) and model.base.base is base
    assert model.roles["base.adaptor_A"] == "adaptor" and model.roles["base.base.weight"] == "shared"
    model.eval()
    assert torch.equal(model(x, 0), expected)
    randomise_adaptors(model)
    merged = model.merge(1)
    assert type(merged) is nn.Linear
    torch.testing.assert_close(merged(x), model(x, 1))
