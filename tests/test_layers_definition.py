"""Every wrapper, on every forward path, against the written definition (spec §1) computed by hand:

    h(x) = base(x) + alpha * sum_c w_c * delta_c(x)

with ``alpha != 1``, mixtures that neither sum to one nor are uniform, and every adaptor tensor random (at
init ``B = 0`` would hide most bugs). The expected values below use only ``torch.nn.functional`` and the
spec's description of each adaptor, never the wrappers' own paths, so a bug applied consistently to the
merged, factorised and naive paths alike still fails here.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from floral_lightning import FloralModel
from floral_lightning.layers import FloralConv, FloralConvTranspose, FloralEmbedding, FloralLinear, FloralNorm

ALPHA = 0.7
C = 3
#: a one-mixture-per-batch w (the merged path): not normalised, not uniform
W_ONE = torch.tensor([0.5, -0.2, 1.3], dtype=torch.float64)
PATHS = ("auto", "merged", "factorised", "naive")


def randomise_(layer: nn.Module, randn) -> None:
    """Every adaptor tensor (everything outside ``base``) random; running variances positive."""
    with torch.no_grad():
        for name, t in list(layer.named_parameters()) + list(layer.named_buffers()):
            if name.startswith("base.") or ".base." in name or not t.is_floating_point():
                continue
            t.copy_(randn(*t.shape).abs() + 0.5 if "running_var" in name else randn(*t.shape))


def per_sample_mixture(randn, batch: int) -> torch.Tensor:
    return randn(batch, C)


def run(layer: nn.Module, x: torch.Tensor, w: torch.Tensor, path: str) -> torch.Tensor:
    """The layer's output on ``path`` (``merged`` needs a [C] mixture; the others take either shape)."""
    layer.path = path
    try:
        return layer(x, mixture=w)
    finally:
        layer.path = "auto"


def expand(w: torch.Tensor, batch: int) -> torch.Tensor:
    return w.expand(batch, -1) if w.dim() == 1 else w


def bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample scalar [B] viewed to broadcast against ``like`` [B, ...]."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def check_all_paths(layer: nn.Module, x: torch.Tensor, expected, randn) -> None:
    """One mixture on every path and through ``merged_module``; a per-sample mixture on the per-sample paths."""
    for path in PATHS:
        torch.testing.assert_close(run(layer, x, W_ONE, path), expected(W_ONE), msg=f"path={path}, w [C]")
    w = per_sample_mixture(randn, x.shape[0])
    for path in ("auto", "factorised", "naive"):
        torch.testing.assert_close(run(layer, x, w, path), expected(w), msg=f"path={path}, w [B, C]")


# --- linear -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("base_bias, bias", [(True, True), (False, True), (True, False)])
def test_linear_is_base_plus_alpha_weighted_low_rank_terms(base_bias, bias, randn):
    """Adaptor biases exist only where the base has one and ``bias=True``."""
    base = nn.Linear(6, 4, bias=base_bias).double()
    layer = FloralLinear(copy.deepcopy(base), C, rank=2, alpha=ALPHA, bias=bias)
    bias = bias and base_bias
    assert (layer.adaptor_bias is not None) == bias
    randomise_(layer, randn)
    x = randn(5, 6)

    def expected(w):
        w = expand(w, len(x))
        out = base(x)
        for c in range(C):
            delta = x @ layer.adaptor_A[c].T @ layer.adaptor_B[c].T
            if bias:
                delta = delta + layer.adaptor_bias[c]
            out = out + ALPHA * w[:, c : c + 1] * delta
        return out

    check_all_paths(layer, x, expected, randn)
    merged = layer.merged_module(W_ONE)
    assert type(merged) is nn.Linear
    torch.testing.assert_close(merged(x), expected(W_ONE))


def test_linear_preconditioning_is_the_inverse_gram_of_the_other_factor(randn):
    """Spec §2: grad A_c <- (B_c^T B_c + eps I)^-1 grad A_c, grad B_c <- grad B_c (A_c A_c^T + eps I)^-1."""
    layer = FloralLinear(nn.Linear(6, 5).double(), C, rank=3)
    randomise_(layer, randn)
    layer.adaptor_A.grad, layer.adaptor_B.grad = randn(C, 3, 6), randn(C, 5, 3)
    grad_a, grad_b = layer.adaptor_A.grad.clone(), layer.adaptor_B.grad.clone()
    eps = 0.3  # large enough that a dropped eps shows
    layer.precondition_gradients_(eps)
    for c in range(C):
        a, b = layer.adaptor_A[c].detach(), layer.adaptor_B[c].detach()
        torch.testing.assert_close(layer.adaptor_A.grad[c], torch.linalg.inv(b.T @ b + eps * torch.eye(3)) @ grad_a[c])
        torch.testing.assert_close(layer.adaptor_B.grad[c], grad_b[c] @ torch.linalg.inv(a @ a.T + eps * torch.eye(3)))


@pytest.mark.parametrize("init", ["uniform_in", "normal_in", "uniform_out", "normal_out"])
def test_factor_initialisation_follows_the_spec(init):
    """``*_in``: A ~ U(+-sqrt(6 / fan_in)) (He-uniform) or N(0, 2 / fan_in), B = 0; ``*_out``: the same for B
    with fan_in = r, A = 0. Either way B A = 0, so the model equals its base at init."""
    torch.manual_seed(0)
    layer = FloralLinear(nn.Linear(400, 300), 4, rank=12, init=init)
    drawn, zero, fan = (
        (layer.adaptor_A, layer.adaptor_B, 400) if init.endswith("_in") else (layer.adaptor_B, layer.adaptor_A, 12)
    )
    assert torch.count_nonzero(zero) == 0
    if init.startswith("uniform"):
        bound = math.sqrt(6 / fan)
        assert drawn.abs().max() <= bound and drawn.abs().max() > 0.99 * bound
        assert drawn.var().item() == pytest.approx(bound**2 / 3, rel=0.05)
    else:
        assert drawn.std().item() == pytest.approx(math.sqrt(2 / fan), rel=0.05)
    assert drawn.mean().abs().item() < 0.05 * drawn.std().item()


def test_linear_rank_follows_the_budget_rule():
    # r = floor(rho * d_in * d_out / (d_in + d_out)): 0.1 * 784 * 200 / 984 = 15.93 -> 15
    assert FloralLinear(nn.Linear(784, 200), 2, rank=0.1).rank == 15
    assert FloralLinear(nn.Linear(10, 3), 2, rank=0.01).rank == 1  # min_rank
    assert FloralLinear(nn.Linear(10, 3), 2, rank=0.01, min_rank=2).rank == 2
    assert FloralLinear(nn.Linear(64, 20), 2, rank="sqrt").rank == 4  # floor(sqrt(20)) = floor(4.47)
    assert FloralLinear(nn.Linear(64, 20), 2, rank="log").rank == 4  # floor(log2(21)) = floor(4.39)
    assert FloralLinear(nn.Linear(64, 20), 2, rank="full").rank == 20
    with pytest.warns(UserWarning, match="rank 21 for linear exceeds its max rank 20; clipped to 20"):
        assert FloralLinear(nn.Linear(64, 20), 2, rank=21).rank == 20


# --- conv ---------------------------------------------------------------------------------------------------
def conv_nd(x, weight, bias, stride, padding, dilation, groups, n):
    return {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n](x, weight, bias, stride, padding, dilation, groups)


def hand_conv_pair(x, a, b, bias, geometry, first_dims, groups):
    """Adaptor = conv(x, A) then conv(., B) + b: every spatial dim's kernel, stride, padding and dilation live
    on the conv named by the spec's split (``first_dims`` on the first conv, the rest on the second); the
    other conv has kernel 1 there. ``geometry`` = (stride, padding, dilation, padding_mode) of the base."""
    stride, padding, dilation, mode = geometry
    n = len(stride)

    def part(dims):
        s = tuple(stride[d] if d in dims else 1 for d in range(n))
        p = tuple(padding[d] if d in dims else 0 for d in range(n))
        dl = tuple(dilation[d] if d in dims else 1 for d in range(n))
        return s, p, dl

    s1, p1, d1 = part(first_dims)
    s2, p2, d2 = part([d for d in range(n) if d not in first_dims])

    def conv(h, weight, bias_, s, p, dl):
        if mode == "zeros":
            return conv_nd(h, weight, bias_, s, p, dl, groups, n)
        pad = [q for d in reversed(range(n)) for q in (p[d], p[d])]  # F.pad order: last dim first
        return conv_nd(F.pad(h, pad, mode=mode), weight, bias_, s, 0, dl, groups, n)

    return conv(conv(x, a, None, s1, p1, d1), b, bias, s2, p2, d2)


CONV_CASES = {
    # name: (base factory, split, first-conv dims per the spec's split rule, input shape)
    "2d-balanced_2d": (
        lambda: nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
        "balanced_2d",
        [1],  # width on the first conv (1 x kw), height on the second (kh x 1)
        (3, 4, 9, 11),
    ),
    "2d-in": (lambda: nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(1, 2)), "in", [0, 1], (3, 4, 9, 11)),
    "2d-out": (lambda: nn.Conv2d(4, 6, (3, 5), stride=(1, 2), padding=(0, 1)), "out", [], (3, 4, 9, 11)),
    "2d-balanced-fewer-in": (lambda: nn.Conv2d(4, 6, 3, padding=1), "balanced", [0, 1], (2, 4, 7, 7)),
    "2d-balanced-fewer-out": (lambda: nn.Conv2d(6, 4, 3, padding=1), "balanced", [], (2, 6, 7, 7)),
    "2d-grouped": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), "balanced_2d", [1], (2, 4, 6, 6)),
    "2d-circular": (
        lambda: nn.Conv2d(3, 5, (3, 3), padding=1, padding_mode="circular"),
        "balanced_2d",
        [1],
        (2, 3, 6, 7),
    ),
    "1d-balanced_2d-falls-back": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), "balanced_2d", [0], (3, 4, 13)),
    "3d-out": (lambda: nn.Conv3d(2, 3, (3, 1, 2), padding=(1, 0, 1)), "out", [], (2, 2, 4, 5, 5)),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_is_base_plus_alpha_weighted_two_conv_adaptors(case, randn):
    factory, split, first_dims, shape = CONV_CASES[case]
    torch.manual_seed(0)
    base = factory().double()
    rank = 2
    layer = FloralConv(copy.deepcopy(base), C, rank=rank, split=split, alpha=ALPHA)
    randomise_(layer, randn)
    x = randn(*shape)
    geometry = (base.stride, base.padding, base.dilation, base.padding_mode)

    def expected(w):
        w = expand(w, len(x))
        out = base(x)
        for c in range(C):
            a, b, bias = layer.adaptor_A[c], layer.adaptor_B[c], layer.adaptor_bias[c]
            delta = hand_conv_pair(x, a, b, bias, geometry, first_dims, base.groups)
            out = out + ALPHA * bcast(w[:, c], out) * delta
        return out

    check_all_paths(layer, x, expected, randn)
    merged = layer.merged_module(W_ONE)
    assert type(merged) is type(base) and merged.weight.shape == base.weight.shape
    torch.testing.assert_close(merged(x), expected(W_ONE))


def test_conv_merged_kernel_is_the_composed_product(randn):
    """balanced_2d: K_c[o, i, y, x] = sum_q B_c[o, q, y, 0] A_c[q, i, 0, x], the spec's composition."""
    base = nn.Conv2d(3, 4, (3, 5)).double()
    layer = FloralConv(base, C, rank=2, alpha=ALPHA)
    randomise_(layer, randn)
    kernel = sum(
        ALPHA * W_ONE[c] * torch.einsum("oqy,qix->oiyx", layer.adaptor_B[c][..., 0], layer.adaptor_A[c][:, :, 0])
        for c in range(C)
    )
    dw, db = layer.delta_weight(W_ONE)
    torch.testing.assert_close(dw, kernel)
    torch.testing.assert_close(db, ALPHA * (W_ONE[:, None] * layer.adaptor_bias).sum(0))


def block_gram_norm(factor: torch.Tensor, groups: int) -> torch.Tensor:
    """||M M^T||_F of a grouped conv factor as the block-diagonal matrix it is (one block per group)."""
    blocks = [part.reshape(part.shape[0], -1) for part in factor.chunk(groups, dim=0)]
    matrix = torch.block_diag(*blocks)
    return torch.linalg.matrix_norm(matrix @ matrix.T)


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_preconditioning_divides_by_the_other_factors_gram_norm(groups, randn):
    """Spec §2: each conv factor's gradient divided by ||G||_F + eps of the other factor's Gram; a grouped factor
    is the block-diagonal matrix of its groups."""
    layer = FloralConv(nn.Conv2d(4, 6, 3, groups=groups).double(), C, rank=2, alpha=ALPHA)
    randomise_(layer, randn)
    layer.adaptor_A.grad, layer.adaptor_B.grad = randn(*layer.adaptor_A.shape), randn(*layer.adaptor_B.shape)
    grad_a, grad_b = layer.adaptor_A.grad.clone(), layer.adaptor_B.grad.clone()
    layer.precondition_gradients_(0.1)
    for c in range(C):
        a, b = layer.adaptor_A[c].detach(), layer.adaptor_B[c].detach()
        torch.testing.assert_close(layer.adaptor_A.grad[c], grad_a[c] / (block_gram_norm(b, groups) + 0.1))
        torch.testing.assert_close(layer.adaptor_B.grad[c], grad_b[c] / (block_gram_norm(a, groups) + 0.1))


@pytest.mark.parametrize("split, first_dims", [("balanced_2d", [1]), ("in", [0, 1]), ("out", [])])
def test_conv_transpose_is_base_plus_alpha_weighted_adaptors(split, first_dims, randn):
    base = nn.ConvTranspose2d(4, 3, (3, 3), stride=2, padding=1, output_padding=1).double()
    layer = FloralConvTranspose(copy.deepcopy(base), C, rank=2, split=split, alpha=ALPHA)
    randomise_(layer, randn)
    x = randn(2, 4, 5, 4)

    def part(dims):
        return {
            "stride": tuple(2 if d in dims else 1 for d in range(2)),
            "padding": tuple(1 if d in dims else 0 for d in range(2)),
            "output_padding": tuple(1 if d in dims else 0 for d in range(2)),
        }

    second = [d for d in range(2) if d not in first_dims]

    def expected(w):
        w = expand(w, len(x))
        out = base(x)
        for c in range(C):
            h = F.conv_transpose2d(x, layer.adaptor_A[c], **part(first_dims))
            delta = F.conv_transpose2d(h, layer.adaptor_B[c], layer.adaptor_bias[c], **part(second))
            out = out + ALPHA * bcast(w[:, c], out) * delta
        return out

    check_all_paths(layer, x, expected, randn)
    torch.testing.assert_close(layer.merged_module(W_ONE)(x), expected(W_ONE))


# --- embedding ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_shape", [(2, 2), (3, 5)], ids=["lookup", "table"])  # fewer / more indices than rows
def test_embedding_is_base_plus_alpha_weighted_low_rank_rows(batch_shape, randn):
    base = nn.Embedding(7, 5, padding_idx=2).double()
    layer = FloralEmbedding(copy.deepcopy(base), C, rank=2, alpha=ALPHA)
    randomise_(layer, randn)
    x = torch.randint(0, 7, batch_shape, generator=torch.Generator().manual_seed(3))
    x[0, 0] = 2  # a padding position

    def expected(w):
        w = expand(w, len(x))
        out = base(x)
        for c in range(C):
            delta = layer.adaptor_A[c][x] @ layer.adaptor_B[c].T  # [B, L, dim]
            delta = delta * (x != 2).unsqueeze(-1)  # padding positions output the base's padding vector
            out = out + ALPHA * w[:, c].view(-1, 1, 1) * delta
        return out

    check_all_paths(layer, x, expected, randn)
    torch.testing.assert_close(layer.merged_module(W_ONE)(x), expected(W_ONE))


# --- norms --------------------------------------------------------------------------------------------------
def hand_normalise(x, dims, mean=None, var=None, eps=1e-5):
    """(x - mean) / sqrt(var + eps), the statistics over ``dims`` (biased variance) unless given."""
    if mean is None:
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, keepdim=True, unbiased=False)
    return (x - mean) / (var + eps).sqrt()


def channel(v, x):
    """A per-channel [F] vector viewed against x [B, F, ...]."""
    return v.view(1, -1, *([1] * (x.dim() - 2)))


NORM_CASES = {
    "layer": (lambda: nn.LayerNorm([4, 5]), (3, 6, 4, 5)),
    "group": (lambda: nn.GroupNorm(2, 4), (3, 4, 5)),
    "batch-train": (lambda: nn.BatchNorm2d(4), (5, 4, 3, 3)),
    "batch-no-affine-train": (lambda: nn.BatchNorm1d(4, affine=False), (6, 4)),
    "instance-train": (lambda: nn.InstanceNorm1d(4, affine=True), (3, 4, 7)),
}


def hand_norm(kind: str, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, groups: int = 2) -> torch.Tensor:
    """One adaptor's norm of x with its own affine, statistics from the input (spec: a fresh copy of the norm)."""
    if kind == "layer":
        return hand_normalise(x, (-2, -1)) * gamma + beta
    if kind == "group":
        b, f = x.shape[:2]
        xg = x.reshape(b, groups, -1)
        return hand_normalise(xg, (-1,)).reshape(x.shape) * channel(gamma, x) + channel(beta, x)
    if kind.startswith("batch"):
        dims = (0, *range(2, x.dim()))
        return hand_normalise(x, dims) * channel(gamma, x) + channel(beta, x)
    return hand_normalise(x, tuple(range(2, x.dim()))) * channel(gamma, x) + channel(beta, x)  # instance


@pytest.mark.parametrize("case", list(NORM_CASES))
def test_norm_in_training_is_base_plus_alpha_weighted_adaptor_norms(case, randn):
    factory, shape = NORM_CASES[case]
    base = factory().double()
    with torch.no_grad():  # a base affine that is not the identity
        for p in base.parameters():
            p.copy_(randn(*p.shape))
    layer = FloralNorm(copy.deepcopy(base), C, alpha=ALPHA)
    randomise_(layer, randn)
    x = randn(*shape)
    kind = case.split("-")[0]

    def expected(w):
        w = expand(w, len(x))
        out = copy.deepcopy(base)(x)  # a copy: the base's running statistics update once per call
        for c in range(C):
            y = hand_norm(kind, x, layer.adaptor_weight[c], layer.adaptor_bias[c])
            out = out + ALPHA * bcast(w[:, c], out) * y
        return out

    check_all_paths(layer, x, expected, randn)


def test_batch_norm_in_eval_uses_each_adaptors_running_statistics(randn):
    base = nn.BatchNorm2d(4).double()
    with torch.no_grad():
        base.running_mean.copy_(randn(4))
        base.running_var.copy_(randn(4).abs() + 0.5)
    layer = FloralNorm(copy.deepcopy(base), C, alpha=ALPHA)
    randomise_(layer, randn)
    layer.eval()
    base.eval()
    x = randn(3, 4, 2, 2)

    def expected(w):
        w = expand(w, len(x))
        out = base(x)
        for c in range(C):
            mean, var = channel(layer.adaptor_running_mean[c], x), channel(layer.adaptor_running_var[c], x)
            y = hand_normalise(x, (), mean, var) * channel(layer.adaptor_weight[c], x)
            y = y + channel(layer.adaptor_bias[c], x)
            out = out + ALPHA * bcast(w[:, c], out) * y
        return out

    check_all_paths(layer, x, expected, randn)
    torch.testing.assert_close(layer.merged_module(W_ONE).eval()(x), expected(W_ONE))


@pytest.mark.parametrize("momentum", [0.3, None])
def test_batch_norm_adaptor_running_statistics_follow_the_batch(momentum, randn):
    """Training: every adaptor's running mean/var move towards the batch's (unbiased variance) with the
    base's momentum (None: the cumulative average), as each fresh norm copy's own would."""
    layer = FloralNorm(nn.BatchNorm1d(4, momentum=momentum).double(), C, alpha=ALPHA)
    randomise_(layer, randn)
    rm, rv = layer.adaptor_running_mean.clone(), layer.adaptor_running_var.clone()
    x = randn(6, 4)
    layer(x, mixture=W_ONE)
    f = 0.3 if momentum is not None else 1.0  # the first batch of a cumulative average weighs 1
    mean, var = x.mean(0), x.var(0, unbiased=True)
    torch.testing.assert_close(layer.adaptor_running_mean, (1 - f) * rm + f * mean)
    torch.testing.assert_close(layer.adaptor_running_var, (1 - f) * rv + f * var)
    assert layer.adaptor_num_batches_tracked.tolist() == [1] * C


# --- the whole model: alpha and the router's options reach every layer ------------------------------------
def hand_mixture(theta: torch.Tensor, temperature: float, min_prob: float, top_k: int | None) -> torch.Tensor:
    """Spec §1: softmax(theta / T), floored at min_prob (not renormalised), the top-k largest kept."""
    w = torch.exp(theta / temperature)
    w = w / w.sum(-1, keepdim=True)
    w = torch.maximum(w, torch.full_like(w, min_prob))
    if top_k is not None:
        order = w.argsort(-1, descending=True)
        keep = torch.zeros_like(w).scatter(-1, order[..., :top_k], 1.0)
        w = w * keep
    return w


def test_model_output_is_the_definition_with_the_routers_mixture(randn):
    """An MLP with both layers adapted, alpha 0.7, T = 2.5, min_prob 0.2, top-2 of 3: merged (int id),
    factorised (ids per sample, train mode), runs of one client (eval mode) and ``merge(k)``."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    reference = copy.deepcopy(base)
    router = {"temperature": 2.5, "min_prob": 0.2, "top_k": 2, "noise": "none"}
    model = FloralModel(base, num_clients=4, num_adaptors=C, rank=2, alpha=ALPHA, router=router).double()
    randomise_(model.base, randn)
    with torch.no_grad():
        model.router.logits.copy_(randn(4, C) * 2)
    layers = model.floral_layers()
    x = randn(6, 6)

    def linear(name, h, w):
        layer, lin = layers[name], reference.get_submodule(name)
        out = lin(h)
        for c in range(C):
            delta = h @ layer.adaptor_A[c].T @ layer.adaptor_B[c].T + layer.adaptor_bias[c]
            out = out + ALPHA * w[:, c : c + 1] * delta
        return out

    def expected(ids):
        w = hand_mixture(model.router.logits.detach()[ids], 2.5, 0.2, 2)
        return linear("2", torch.relu(linear("0", x, w)), w)

    for k in range(4):
        ids = torch.full((6,), k)
        torch.testing.assert_close(model(x, k), expected(ids), msg=f"client {k}, merged")
        torch.testing.assert_close(model.merge(k)(x), expected(ids), msg=f"client {k}, merge()")
    ids = torch.tensor([3, 0, 1, 3, 2, 0])
    torch.testing.assert_close(model(x, ids), expected(ids), msg="per-sample ids")
    model.eval()
    ids = torch.tensor([1, 1, 1, 2, 2, 2])  # client-sorted, as evaluation batches are
    torch.testing.assert_close(model(x, ids), expected(ids), msg="eval, runs of one client")
