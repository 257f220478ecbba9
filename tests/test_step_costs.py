"""The per-step machinery FLoRAL adds, against its definition: the linear preconditioner (spec §2) and the way
``FloralModel`` hands the mixture to its wrappers (no module attribute writes per forward)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from floral_lightning import FloralLinear, FloralModel
from floral_lightning.layers.linear import precondition_rank1_

EPS = 1e-3  # larger than the default 1e-5 so that a dropped or misplaced eps shows in the comparison


def by_definition(layer: FloralLinear, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``grad A_c <- (B_c^T B_c + eps I)^-1 grad A_c`` and ``grad B_c <- grad B_c (A_c A_c^T + eps I)^-1``, one
    adaptor at a time with an explicit inverse."""
    a, b = layer.adaptor_A.detach(), layer.adaptor_B.detach()
    eye = torch.eye(layer.rank, dtype=a.dtype)
    grad_a = [torch.inverse(b[c].T @ b[c] + eps * eye) @ layer.adaptor_A.grad[c] for c in range(len(a))]
    grad_b = [layer.adaptor_B.grad[c] @ torch.inverse(a[c] @ a[c].T + eps * eye) for c in range(len(a))]
    return torch.stack(grad_a), torch.stack(grad_b)


def model_with_gradients(sizes: list[int]) -> FloralModel:
    """A double-precision tanh MLP with the given widths, full-rank adaptors (rank min(d_in, d_out) per layer,
    so [4, 3, 1, 2] gives ranks 3, 1, 1), random factors, and the gradients of one backward pass."""
    torch.manual_seed(0)
    blocks: list[nn.Module] = []
    for d_in, d_out in zip(sizes, sizes[1:]):
        blocks += [nn.Linear(d_in, d_out), nn.Tanh()]
    model = FloralModel(nn.Sequential(*blocks[:-1]), num_clients=4, num_adaptors=3, rank="full").double()
    with torch.no_grad():
        for p in model.adaptor_parameters():
            p.normal_()
    model(torch.randn(8, sizes[0], dtype=torch.float64), 1).pow(2).sum().backward()
    return model


def test_model_preconditions_every_linear_layer_as_defined():
    model = model_with_gradients([4, 3, 1, 2])  # one rank-3 layer (solves) and two rank-1 layers (closed form)
    layers = list(model.floral_layers().values())
    assert [layer.rank for layer in layers] == [3, 1, 1]
    expected = [by_definition(layer, EPS) for layer in layers]
    model.precondition_gradients_(EPS)
    for layer, (grad_a, grad_b) in zip(layers, expected):
        torch.testing.assert_close(layer.adaptor_A.grad, grad_a, msg=f"rank {layer.rank}: grad A")
        torch.testing.assert_close(layer.adaptor_B.grad, grad_b, msg=f"rank {layer.rank}: grad B")


@pytest.mark.parametrize("sizes", [[5, 1, 4], [5, 3, 4]])  # rank 1 (closed form) and rank 3 (solve)
def test_layer_preconditions_alone_as_defined(sizes):
    model = model_with_gradients(sizes)
    for layer in model.floral_layers().values():
        grad_a, grad_b = by_definition(layer, EPS)
        layer.precondition_gradients_(EPS)
        torch.testing.assert_close(layer.adaptor_A.grad, grad_a)
        torch.testing.assert_close(layer.adaptor_B.grad, grad_b)


def test_rank1_preconditioner_skips_missing_gradients_and_refuses_other_ranks():
    model = model_with_gradients([4, 1, 2])
    first, second = model.floral_layers().values()
    expected = [by_definition(layer, EPS) for layer in (first, second)]
    first.adaptor_B.grad = None  # e.g. a frozen factor
    precondition_rank1_([first, second], EPS)
    torch.testing.assert_close(first.adaptor_A.grad, expected[0][0])
    assert first.adaptor_B.grad is None
    torch.testing.assert_close(second.adaptor_A.grad, expected[1][0])
    torch.testing.assert_close(second.adaptor_B.grad, expected[1][1])
    rank2 = FloralLinear(nn.Linear(3, 2), 2, rank=2)
    with pytest.raises(ValueError, match="rank 2"):
        precondition_rank1_([rank2])


def test_forward_writes_no_module_attributes(monkeypatch):
    model = FloralModel(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)), num_clients=3, num_adaptors=2)
    writes: list[str] = []
    original = nn.Module.__setattr__

    def counting(self, name, value):
        writes.append(f"{type(self).__name__}.{name}")
        original(self, name, value)

    x = torch.randn(4, 6)
    for training, client_ids in ((True, 1), (False, torch.tensor([0, 0, 2, 2]))):  # merged; per-sample in runs
        model.train(training)
        with monkeypatch.context() as patch:
            patch.setattr(nn.Module, "__setattr__", counting)
            model(x, client_ids).sum().backward()
        assert writes == [], f"training={training}"
    with monkeypatch.context() as patch:
        patch.setattr(nn.Module, "__setattr__", counting)
        model.train()
    assert "FloralModel.training" in writes


def test_mixture_context_is_per_model_and_cleared_after_forward():
    torch.manual_seed(0)
    model = FloralModel(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)), num_clients=3, num_adaptors=2)
    layers = list(model.floral_layers().values())
    assert layers[0].context is layers[1].context  # one hand-over for the whole model
    copied = copy.deepcopy(model)
    assert list(copied.floral_layers().values())[0].context is not layers[0].context
    assert all(layer.mixture is None and layer.runs is None for layer in layers)
    with pytest.raises(RuntimeError, match="boom"):

        class Boom(nn.Module):
            def forward(self, x):
                assert layers[0].mixture is not None  # set during the forward
                raise RuntimeError("boom")

        model.base.append(Boom())
        model(torch.randn(2, 6), 0)
    assert all(layer.mixture is None and layer.runs is None for layer in layers)  # reset even after an error


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_low_rank_path_matches_the_definition(rank, alpha):
    """One mixture for the batch with the adaptors beside the base: output and every gradient (factors, biases,
    mixture, input) equal the naive per-adaptor definition's."""
    torch.manual_seed(0)
    layer = FloralLinear(nn.Linear(7, 5).double(), 3, rank=rank, alpha=alpha)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if not name.startswith("base."):
                p.normal_()
    x = torch.randn(2, 4, 7, dtype=torch.float64)
    w = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    results = []
    for run in (layer.forward_low_rank, lambda x, w: layer.forward_naive(x, w.expand(x.shape[0], -1))):
        layer.zero_grad()
        xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = run(xi, wi)
        out.pow(2).sum().backward()
        results.append((out.detach(), xi.grad, wi.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}))
    (out, gx, gw, grads), (ref, ref_gx, ref_gw, ref_grads) = results
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, ref_gx)
    torch.testing.assert_close(gw, ref_gw)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=name)


def test_auto_runs_adaptors_beside_the_base_only_where_composing_costs_more():
    """rows * (in + out) < in * out: the adaptors run beside the base (the output is a sum of the base and the
    adaptor branch); otherwise the merged path (the output is one linear op, with the merged weight)."""

    def top_node(layer: FloralLinear, rows: int) -> str:
        out = layer(torch.randn(rows, layer.base.in_features), mixture=torch.tensor([0.5, 0.5]))
        return type(out.grad_fn).__name__

    wide = FloralLinear(nn.Linear(784, 200), 2, rank=1)  # breaks even at 784 * 200 / 984 = 159.3 rows
    assert top_node(wide, 159) == "AddBackward0" and top_node(wide, 160) == "AddmmBackward0"
    small = FloralLinear(nn.Linear(10, 20), 2, rank=1)  # breaks even at 6.7 rows
    assert top_node(small, 6) == "AddBackward0" and top_node(small, 7) == "AddmmBackward0"
    wide.path = "merged"  # a forced path is obeyed
    assert top_node(wide, 1) == "AddmmBackward0"
